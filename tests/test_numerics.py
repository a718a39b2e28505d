"""Every method returns finite maps in [0, 1] on degenerate input: constant and black images,
saturated predictions (probability exactly 1.0), a layer whose activations are all zero, and
explained layers whose activations are negative (a linear conv, a BatchNorm output with a negative
beta, a layer that is negative everywhere)."""
import functools

import keras
import numpy as np
import pytest

import kerascam  # noqa: F401
import kerascam  # noqa: F401
import scorecam  # noqa: F401  (registers Score-CAM)

# Every registered method; Faster-Score-CAM keeps 2 of the 4 channels so that its selection acts.
METHODS = {name: method.function for name, method in kerascam.registry.METHODS.items()}
METHODS["faster_scorecam"] = functools.partial(kerascam.methods.score_cam, max_n=2)


def test_every_method_is_here():
    assert {"scorecam", "faster_scorecam", "gradcam", "gradcampp", "layercam", "random", "center"} <= set(METHODS)


def small_model(boost=0.0, dead_conv=False, linear=False, bias=None, batchnorm=False):
    """linear: the explained conv has no ReLU (negative activations); bias: its bias, all channels;
    batchnorm: a BatchNormalization "bn" with beta -0.1 after it (the ReLU conv's zeros shifted below 0)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    conv = keras.layers.Conv2D(4, 3, padding="same", activation=None if linear else "relu", name="conv")
    x = conv(x)
    if batchnorm:
        bn = keras.layers.BatchNormalization(name="bn")
        x = bn(x)
        gamma, _, mean, variance = bn.get_weights()
        bn.set_weights([gamma, np.full(4, -0.1, "float32"), mean, variance])
    x = keras.layers.Flatten()(keras.layers.MaxPooling2D(4)(x))
    logits = keras.layers.Dense(3, name="logits")
    out = keras.layers.Activation("softmax")(logits(x))
    model = keras.Model(inp, out)
    w, b = logits.get_weights()
    logits.set_weights([w, b + np.array([boost, 0, 0], "float32")])  # boost 200: p(class 0) == 1.0 in float32
    if dead_conv:  # a bias of -1000 keeps every ReLU at zero
        kernel, _ = conv.get_weights()
        conv.set_weights([kernel, np.full(4, -1000.0, "float32")])
    if bias is not None:
        kernel, _ = conv.get_weights()
        conv.set_weights([kernel, np.full(4, bias, "float32")])
    return model


RNG = np.random.default_rng(0)
PICTURES = RNG.uniform(0, 255, (2, 16, 16, 3)).astype("float32")
CASES = {  # name: (model, images, explained layer)
    "constant": (small_model(), np.full((2, 16, 16, 3), 128.0, "float32"), "conv"),
    "black": (small_model(), np.zeros((2, 16, 16, 3), "float32"), "conv"),
    "saturated": (small_model(boost=200.0), PICTURES, "conv"),
    "dead_layer": (small_model(dead_conv=True), PICTURES, "conv"),
    "linear_conv": (small_model(linear=True), PICTURES, "conv"),
    "batchnorm_negative_beta": (small_model(batchnorm=True), PICTURES, "bn"),
    "all_negative": (small_model(linear=True, bias=-1000.0), PICTURES, "conv"),
}
NEGATIVE = {"linear_conv": "some", "batchnorm_negative_beta": "some", "all_negative": "all"}


def activations(case):
    model, x, layer = CASES[case]
    return keras.Model(model.inputs, model.get_layer(layer).output).predict_on_batch(x)


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_the_negative_cases_really_have_negative_activations(case):
    a = activations(case)
    assert np.isfinite(a).all() and a.min() < 0
    if NEGATIVE[case] == "all":
        assert a.max() < 0
    else:
        assert a.max() > 0
        assert (a.reshape(-1, a.shape[-1]).std(axis=0) > 0).all()  # every channel varies: it gets a mask


def test_the_saturated_case_really_saturates():
    model, x, _ = CASES["saturated"]
    assert (model.predict(x, verbose=0)[:, 0] == 1.0).all()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_finite_maps_in_unit_range(method, case):
    model, x, layer = CASES[case]
    maps = METHODS[method](model, x, layer=layer)
    assert maps.shape == (2, 16, 16) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    if case == "dead_layer" and method not in ("random", "center"):
        assert (maps == 0).all()  # no activation, no evidence: an all-zero map, not noise
