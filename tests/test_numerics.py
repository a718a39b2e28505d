"""Every method returns finite maps in [0, 1] on degenerate input: constant and black images,
saturated predictions (probability exactly 1.0), and a layer whose activations are all zero."""
import functools

import keras
import numpy as np
import pytest

from gradcam import center_map, grad_cam, grad_cam_pp, random_map
from scorecam import score_cam

METHODS = {"scorecam": score_cam, "faster_scorecam": functools.partial(score_cam, max_n=2), "gradcam": grad_cam,
           "gradcampp": grad_cam_pp, "random": random_map, "center": center_map}


def small_model(boost=0.0, dead_conv=False):
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")
    x = conv(x)
    x = keras.layers.Flatten()(keras.layers.MaxPooling2D(4)(x))
    logits = keras.layers.Dense(3, name="logits")
    out = keras.layers.Activation("softmax")(logits(x))
    model = keras.Model(inp, out)
    w, b = logits.get_weights()
    logits.set_weights([w, b + np.array([boost, 0, 0], "float32")])  # boost 200: p(class 0) == 1.0 in float32
    if dead_conv:  # a bias of -1000 keeps every ReLU at zero
        kernel, _ = conv.get_weights()
        conv.set_weights([kernel, np.full(4, -1000.0, "float32")])
    return model


RNG = np.random.default_rng(0)
CASES = {
    "constant": (small_model(), np.full((2, 16, 16, 3), 128.0, "float32")),
    "black": (small_model(), np.zeros((2, 16, 16, 3), "float32")),
    "saturated": (small_model(boost=200.0), RNG.uniform(0, 255, (2, 16, 16, 3)).astype("float32")),
    "dead_layer": (small_model(dead_conv=True), RNG.uniform(0, 255, (2, 16, 16, 3)).astype("float32")),
}


def test_the_saturated_case_really_saturates():
    model, x = CASES["saturated"]
    assert (model.predict(x, verbose=0)[:, 0] == 1.0).all()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_finite_maps_in_unit_range(method, case):
    model, x = CASES[case]
    maps = METHODS[method](model, x, layer="conv")
    assert maps.shape == (2, 16, 16) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    if case == "dead_layer" and method not in ("random", "center"):
        assert (maps == 0).all()  # no activation, no evidence: an all-zero map, not noise
