"""Faithfulness metrics, the sanity check and the CLI of evaluate.py, on tiny models with known answers."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import runtime  # noqa: E402
import keras  # noqa: E402

import evaluate as ev  # noqa: E402
from kerascam.methods import center_map, random_map  # noqa: E402
import kerascam  # noqa: E402

S = 16


def softmax_head(x, inp, classes=2):
    x = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inp, keras.layers.Activation("softmax", name="predictions")(x))


def brightness_model(w=4.0, size=S, offset=0.0):
    """p(class 0) = sigmoid(w * (mean pixel / 255 - offset)): every pixel counts the same."""
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(1, 1, use_bias=False, name="conv")(inp)
    model = softmax_head(keras.layers.GlobalAveragePooling2D()(x), inp)
    model.get_layer("conv").set_weights([np.full((1, 1, 3, 1), 1 / (3 * 255), np.float32)])
    model.get_layer("logits").set_weights([np.array([[w, 0.0]], np.float32), np.array([-w * offset, 0], np.float32)])
    return model


def pixel_weight_model(weights, bias):
    """logit of class 0 = sum of weights[i, j] x (pixel (i, j)'s mean over RGB / 255) + bias, class 1's
    logit 0: p(class 0) = sigmoid(that). A linear read-out of chosen pixels, by hand."""
    inp = keras.Input((S, S, 3))
    x = keras.layers.Conv2D(1, 1, use_bias=False, name="conv")(inp)
    model = softmax_head(keras.layers.Flatten()(x), inp)
    model.get_layer("conv").set_weights([np.full((1, 1, 3, 1), 1 / (3 * 255), np.float32)])
    kernel = np.zeros((S * S, 2), np.float32)
    kernel[:, 0] = np.asarray(weights, np.float32).reshape(-1)
    model.get_layer("logits").set_weights([kernel, np.array([bias, 0], np.float32)])
    return model


def pixel_weight_probability(weights, bias, images):
    """pixel_weight_model's p(class 0), in numpy."""
    grey = np.asarray(images, np.float64).mean(axis=-1) / 255
    return sigmoid((grey * weights).sum(axis=(-2, -1)) + bias)


def contrast_model():
    """Class 0's score counts the bright-on-dark edges (a ReLU Laplacian) in the top-left quadrant
    only: blurring or zeroing that quadrant removes the evidence, the rest of the image is ignored."""
    inp = keras.Input((S, S, 3))
    x = keras.layers.Conv2D(1, 3, padding="same", use_bias=False, activation="relu", name="edges")(inp)
    model = softmax_head(keras.layers.Flatten()(x), inp)
    lap = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], np.float32) / (3 * 255)
    model.get_layer("edges").set_weights([np.repeat(lap[:, :, None, None], 3, axis=2)])
    w = np.zeros((S, S, 2), np.float32)
    w[:8, :8, 0] = 6 / 128  # 32 bright pixels x response 4 = 128: logit 6, p = 0.9975
    model.get_layer("logits").set_weights([w.reshape(-1, 2), np.zeros(2, np.float32)])
    return model


def checkerboards(n=4):
    yy, xx = np.mgrid[:S, :S]
    return np.repeat((((yy + xx) % 2) * 255.0)[None, :, :, None], 3, axis=-1).repeat(n, 0).astype(np.float32)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


# ---------------------------------------------------------------- metric definitions

def test_trapezoid_auc_by_hand():
    assert kerascam.metrics.auc([0, 1], [0, 1]) == pytest.approx(0.5)
    assert kerascam.metrics.auc([0, 0.5, 1], [1, 0, 0]) == pytest.approx(0.25)
    assert kerascam.metrics.auc(np.linspace(0, 1, 5), [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]) == pytest.approx([1.0, 0.125])


def test_drop_and_increase_by_hand():
    drop, increase = kerascam.metrics.drop_and_increase([0.8, 0.5, 0.4], [0.2, 0.5, 0.9])
    assert drop == pytest.approx([75.0, 0.0, 0.0]) and increase == pytest.approx([0.0, 0.0, 100.0])
    drop, _ = kerascam.metrics.drop_and_increase([0.0], [0.0])
    assert np.isfinite(drop).all()


def test_pixel_ranks_follow_the_map_and_break_ties_by_seed():
    maps = np.array([[[0.1, 0.9], [0.5, 0.3]]])
    assert kerascam.metrics.pixel_ranks(maps).tolist() == [[[3, 0], [1, 2]]]
    flat = np.ones((2, 4, 4))
    a, b = kerascam.metrics.pixel_ranks(flat, seed=0), kerascam.metrics.pixel_ranks(flat, seed=1)
    assert sorted(a[0].ravel()) == list(range(16)) and not np.array_equal(a, b)
    assert np.array_equal(a, kerascam.metrics.pixel_ranks(flat, seed=0))


def test_deletion_and_insertion_of_an_all_ones_map_by_hand():
    """On a brightness model and a white image, deleting k of 256 pixels in any order leaves the
    mean 1 - k/256: the curve is sigmoid(4 (1 - x)) at 33 points; the blur of a flat image is the
    image, so the insertion curve stays at sigmoid(4)."""
    model, images = brightness_model(), np.full((2, S, S, 3), 255.0, np.float32)
    maps, targets = np.ones((2, S, S), np.float32), np.zeros(2, np.int64)
    x, curves = kerascam.metrics.deletion(model, images, maps, targets)
    assert len(x) == 33 and x[0] == 0 and x[-1] == 1
    assert np.allclose(curves, sigmoid(4 * (1 - x)), atol=1e-5)
    assert kerascam.metrics.auc(x, curves) == pytest.approx(np.trapezoid(sigmoid(4 * (1 - x)), x), abs=1e-5)
    _, curves = kerascam.metrics.insertion(model, images, maps, targets)
    assert np.allclose(curves, sigmoid(4.0), atol=1e-5)


def test_deletion_curves_and_auc_of_a_region_counting_model_by_hand():
    """Class 0's logit is 6 x (share of the top-left quadrant's 64 pixels still white) - 3. Deleting
    k of 256 pixels of a white image in the order of a map that is 1 on the quadrant removes
    min(k, 64) of them (whatever order the ties take), in the order of the opposite map
    max(0, k - 192): both curves, their AUC, and class 1's (1 - p) curve, are known."""
    quadrant = np.zeros((S, S))
    quadrant[:8, :8] = 1
    model = pixel_weight_model(6 * quadrant / 64, -3.0)
    images = np.full((3, S, S, 3), 255.0, np.float32)
    maps = np.stack([quadrant, 1 - quadrant, quadrant]).astype(np.float32)
    targets = np.array([0, 0, 1])
    x, curves = kerascam.metrics.deletion(model, images, maps, targets, seed=5)
    k = np.round(np.linspace(0, 256, 33))
    assert np.allclose(x, k / 256)
    right = sigmoid(6 * (64 - np.minimum(k, 64)) / 64 - 3)
    wrong = sigmoid(6 * (64 - np.maximum(k - 192, 0)) / 64 - 3)
    assert np.allclose(curves, [right, wrong, 1 - right], atol=1e-5)
    areas = kerascam.metrics.auc(x, curves)
    # right: 0.9526 falling linearly to 0.0474 over x in [0, 1/4], then flat; wrong: the mirror image
    assert areas == pytest.approx([np.trapezoid(right, k / 256), np.trapezoid(wrong, k / 256),
                                   np.trapezoid(1 - right, k / 256)], abs=1e-5)
    assert areas[0] == pytest.approx(0.25 * (sigmoid(3) + sigmoid(-3)) / 2 + 0.75 * sigmoid(-3), abs=2e-3)
    assert areas[0] + areas[2] == pytest.approx(1, abs=1e-5)


def test_insertion_starts_from_a_sigma_5_blur_by_hand():
    """Class 0 reads one pixel, (8, 8), in the middle of a white 6x6 square on black: p =
    sigmoid(8 v - 4), v its grey level in [0, 1]. Insertion starts from OpenCV's Gaussian blur with
    sigma 5 (RISE's), where v is low, and jumps to sigmoid(4) at the first step that restores
    (8, 8); sigma 2 would keep v near 1/2 and change every point before the jump."""
    weights = np.zeros((S, S))
    weights[8, 8] = 8
    model = pixel_weight_model(weights, -4.0)
    image = np.zeros((S, S, 3), np.float32)
    image[5:11, 5:11] = 255
    images = np.stack([image, image])
    blurred = cv2.GaussianBlur(image, (0, 0), 5)
    assert np.array_equal(kerascam.metrics.blur(images), np.stack([blurred, blurred]))
    v5 = blurred[8, 8, 0] / 255
    v2 = cv2.GaussianBlur(image, (0, 0), 2)[8, 8, 0] / 255
    assert v5 < 0.35 and v2 > 0.6  # the picture tells the two blurs apart
    maps = np.random.default_rng(1).random((2, S, S)).astype(np.float32)  # no ties
    maps[1, 8, 8] = 2  # image 1: (8, 8) is restored first
    ranks = np.argsort(np.argsort(-maps.reshape(2, -1), axis=1), axis=1).reshape(2, S, S)
    k = np.round(np.linspace(0, S * S, 33))
    want = np.array([[pixel_weight_probability(weights, -4.0, np.where((r < kk)[..., None], image, blurred))
                      for kk in k] for r in ranks])
    x, curves = kerascam.metrics.insertion(model, images, maps, np.zeros(2, np.int64))
    assert np.allclose(curves, want, atol=1e-5)
    assert curves[:, 0] == pytest.approx(sigmoid(8 * v5 - 4), abs=1e-5)
    assert curves[1, 1:] == pytest.approx(sigmoid(4.0), abs=1e-5)
    assert 1 < (curves[0] < 0.5).sum() < 33  # image 0's jump comes part-way
    assert kerascam.metrics.auc(x, curves) == pytest.approx(np.trapezoid(want, k / 256), abs=1e-5)


def test_greyscale_model_insertion_starts_from_its_blurred_picture():
    """A one-channel model: OpenCV's blur returns (H, W) for an (H, W, 1) picture; insertion must still
    start from the blurred picture (a dropped axis would broadcast to (N, H, W, W) or fail), and the
    whole evaluation gives finite metrics."""
    inp = keras.Input((S, S, 1))
    x = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="conv")(inp)
    model = softmax_head(keras.layers.GlobalAveragePooling2D()(x), inp)
    images = np.random.default_rng(0).uniform(0, 255, (3, S, S, 1)).astype(np.float32)
    maps = np.random.default_rng(1).random((3, S, S)).astype(np.float32)
    x, curves = kerascam.metrics.insertion(model, images, maps, np.zeros(3, np.int64), steps=4)
    start = np.stack([cv2.GaussianBlur(im, (0, 0), 5)[..., None] for im in images])
    assert curves.shape == (3, 5)
    np.testing.assert_allclose(curves[:, 0], model.predict(start, verbose=0)[:, 0], atol=1e-5)
    np.testing.assert_allclose(curves[:, -1], model.predict(images, verbose=0)[:, 0], atol=1e-5)
    result = ev.evaluate(model, images, names=["scorecam", "gradcam"], steps=4, sanity_n=0, resamples=20)
    assert all(np.isfinite(result["methods"][m]["insertion_auc"]) for m in ("scorecam", "gradcam"))


def test_average_drop_and_increase_on_a_model_by_hand():
    """Brightness model, white image, a map of 0.5 everywhere: the explanation image is mid-grey.
    Class 0 (bright): Y = sigmoid(4), O = sigmoid(2), a drop of (Y - O) / Y; class 1 (dark) gains
    confidence: no drop (max(0, .)), an increase."""
    model = brightness_model()
    images = np.full((2, S, S, 3), 255.0, np.float32)
    maps = np.full((2, S, S), 0.5, np.float32)
    targets = np.array([0, 1])
    y = np.array([sigmoid(4), 1 - sigmoid(4)])
    values = ev.per_image_metrics(model, images, maps, targets, y, steps=4)[0]
    assert values["avg_drop"] == pytest.approx([(sigmoid(4) - sigmoid(2)) / sigmoid(4) * 100, 0], abs=1e-3)
    assert values["increase"].tolist() == [0, 100]


def test_the_map_of_the_used_region_beats_the_floors():
    model, images = contrast_model(), checkerboards()
    probs = ev.predict(model, images)
    targets = probs.argmax(1)
    y = probs[np.arange(len(images)), targets]
    assert (targets == 0).all() and y.min() > 0.99
    region = np.zeros((len(images), S, S), np.float32)
    region[:, :8, :8] = 1
    scores = {name: {k: v.mean() for k, v in ev.per_image_metrics(model, images, maps, targets, y)[0].items()}
              for name, maps in (("region", region), ("random", random_map(model, images)),
                                 ("center", center_map(model, images)))}
    assert scores["region"]["avg_drop"] == pytest.approx(0, abs=1e-3)  # image x map keeps all the evidence
    assert scores["region"]["insertion_auc"] > 0.95
    for floor in ("random", "center"):
        assert scores[floor]["avg_drop"] > 2
        assert scores[floor]["insertion_auc"] < scores["region"]["insertion_auc"] - 0.04
        assert scores[floor]["deletion_auc"] > scores["region"]["deletion_auc"] + 0.2


def test_bootstrap_interval():
    values = np.random.default_rng(0).normal(10, 2, 200)
    low, high = kerascam.metrics.bootstrap_ci(values, seed=3)
    assert low < values.mean() < high and high - low < 1.5
    assert kerascam.metrics.bootstrap_ci(values, seed=3) == [low, high]
    assert kerascam.metrics.bootstrap_ci([5.0, 5.0, 5.0]) == [5.0, 5.0]
    with pytest.raises(ValueError):
        kerascam.metrics.bootstrap_ci([])


def test_bootstrap_level_is_95_percent():
    """Half zeros, half ones, n = 400: a resample's mean is Binomial(400, 1/2) / 400, whose central
    95 % lies within 0.5 -+ 1.96 x 0.025 = [0.451, 0.549] (0.5 -+ 0.017 at 50 %). The default level
    also equals numpy's 2.5 and 97.5 percentiles of the same seeded resamples."""
    from scipy.stats import binom

    values = np.repeat([0.0, 1.0], 200)
    low, high = kerascam.metrics.bootstrap_ci(values, seed=4)
    exact = binom.ppf([0.025, 0.975], 400, 0.5) / 400
    assert [low, high] == pytest.approx(exact, abs=0.01)
    assert kerascam.metrics.bootstrap_ci(values, seed=4, level=0.5) == pytest.approx(binom.ppf([0.25, 0.75], 400, 0.5) / 400,
                                                                       abs=0.01)
    means = values[np.random.default_rng(4).integers(0, 400, (ev.BOOTSTRAP, 400))].mean(axis=1)
    assert [low, high] == pytest.approx(np.percentile(means, [2.5, 97.5]), abs=1e-12)
    assert ev.BOOTSTRAP == 1000


def test_the_time_interval_resamples_the_chunks_that_were_timed(monkeypatch):
    """ms / image is measured per chunk of images, each image getting its chunk's time: 2 chunks of 8
    images timed at 1 and 3 ms a picture. Resampling the 2 chunks gives a mean of 1, 2 or 3 ms with
    chances 1/4, 1/2, 1/4: the 95 % interval is [1, 3]. Resampling the 16 images as if independent
    gave about [1.5, 2.5], an interval sqrt(8) times too narrow for what was measured."""
    values = np.repeat([1.0, 3.0], 8)
    assert kerascam.metrics.chunk_bootstrap_ci(values, 8) == [1.0, 3.0]
    assert kerascam.metrics.chunk_bootstrap_ci(values, 16) == [1.0, 1.0]  # one chunk: one measurement
    low, high = kerascam.metrics.chunk_bootstrap_ci(np.repeat([1.0, 3.0, 2.0], [8, 8, 4]), 8)  # a last, smaller chunk weighs less
    assert low == 1.0 and high == 3.0
    assert kerascam.metrics.chunk_bootstrap_ci(values, 1) == kerascam.metrics.bootstrap_ci(values)  # chunks of one image: the images

    def timed(method, model, images, targets, layer=None, batch_size=256, chunk=ev.TIME_CHUNK):
        return np.zeros(images.shape[:3], np.float32), np.repeat([0.001, 0.003], len(images) // 2)

    monkeypatch.setattr(ev, "TIME_CHUNK", 8)
    monkeypatch.setattr(ev, "explain_timed", timed)
    images = np.random.default_rng(0).uniform(0, 255, (16, S, S, 3)).astype(np.float32)
    result = ev.evaluate(brightness_model(), images, names=["random"], steps=1, sanity_n=0)["methods"]["random"]
    assert result["ms_per_image"] == pytest.approx(2.0)
    assert result["ms_per_image_ci"] == pytest.approx([1.0, 3.0])


def test_spearman():
    a = np.random.default_rng(0).random((3, 5, 5))
    assert kerascam.metrics.spearman(a, a) == pytest.approx([1, 1, 1])
    assert kerascam.metrics.spearman(a, a**3) == pytest.approx([1, 1, 1])  # ranks only
    assert kerascam.metrics.spearman(a, -a) == pytest.approx([-1, -1, -1])
    assert kerascam.metrics.spearman(a, np.zeros_like(a)).tolist() == [0, 0, 0]  # a constant map ranks nothing


def test_spearman_by_hand():
    """2x2 maps. [1 2 3 4] vs [1 3 2 4]: one swap, rho = 1 - 6 x 2 / (4 x 15) = 0.8. With a tie,
    [1 1 2 3] ranks [1.5 1.5 3 4]: centred ranks [-1 -1 .5 1.5] and [-1.5 -.5 .5 1.5], rho =
    4.5 / sqrt(4.5 x 5) = 3 / sqrt(10). A constant map (either side, or both) gives 0."""
    a = np.array([[1, 2, 3, 4], [1, 1, 2, 3], [1, 2, 3, 4], [7, 7, 7, 7], [7, 7, 7, 7]], float).reshape(5, 2, 2)
    b = np.array([[1, 3, 2, 4], [1, 2, 3, 4], [5, 5, 5, 5], [1, 2, 3, 4], [0, 0, 0, 0]], float).reshape(5, 2, 2)
    rho = kerascam.metrics.spearman(a, b)
    assert rho.shape == (5,) and np.isfinite(rho).all()
    assert rho == pytest.approx([0.8, 3 / np.sqrt(10), 0, 0, 0], abs=1e-12)
    assert kerascam.metrics.spearman(b, a) == pytest.approx(rho, abs=1e-12)


# ---------------------------------------------------------------- sanity check

def test_cascade_order_on_the_real_architecture():
    from model import build_model

    groups = kerascam.sanity.layer_groups(build_model())
    names = [g for g, _ in groups]
    assert names[:5] == ["logits", "fc3", "fc2", "fc1", "block4_conv3"]
    assert names[-1] == "block1_conv1" and len(names) == 16
    assert [layer.name for layer in dict(groups)["block4_conv3"]] == ["block4_conv3", "block4_bn"]


def test_reinitialise_is_seeded_and_uses_the_layers_initializers():
    model = brightness_model()
    dense = model.get_layer("logits")
    kerascam.sanity.reinitialise(dense, seed=7)
    first = [w.copy() for w in dense.get_weights()]
    assert not np.allclose(first[0], [[4.0, 0.0]]) and not first[1].any()  # glorot kernel, zero bias
    kerascam.sanity.reinitialise(dense, seed=7)
    assert np.array_equal(first[0], dense.get_weights()[0])


def tiny_conv_model(seed=0, size=S):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.Dense(8, activation="relu", name="fc1")(keras.layers.GlobalAveragePooling2D()(x))
    return softmax_head(x, inp)


def test_sanity_check_decorrelates_and_the_floors_do_not():
    model = tiny_conv_model()
    images = np.random.default_rng(0).uniform(0, 255, (6, S, S, 3)).astype(np.float32)
    before = [w.copy() for w in model.get_weights()]
    targets = ev.predict(model, images).argmax(1)
    methods = ev.method_functions(["gradcam", "scorecam", "random", "center"])
    out = kerascam.sanity.sanity_check(model, images, methods, targets, seed=0)
    assert list(out["gradcam"]) == ["logits", "fc1", "conv2", "conv1"]
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # the original is untouched
    for name in ("gradcam", "scorecam"):
        assert out[name]["conv1"].mean() < 0.5
    for name in ("random", "center"):
        assert all(np.allclose(v, 1) for v in out[name].values())


def nested_backbone_model(seed=0):
    """An adapted Normalization, then a nested backbone of two conv + BatchNorm blocks, then a head:
    the transfer-learning shape of model, whose trained BatchNorm variances are not 1."""
    keras.utils.set_random_seed(seed)
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(np.random.default_rng(seed).uniform(0, 255, (8, S, S, 3)).astype(np.float32))
    backbone = keras.Sequential([keras.Input((S, S, 3)),
                                 keras.layers.Conv2D(8, 3, padding="same", name="c1"),
                                 keras.layers.BatchNormalization(name="bn1"), keras.layers.Activation("relu"),
                                 keras.layers.Conv2D(8, 3, padding="same", name="c2"),
                                 keras.layers.BatchNormalization(name="bn2"), keras.layers.Activation("relu")],
                                name="backbone")
    inp = keras.Input((S, S, 3))
    x = keras.layers.GlobalAveragePooling2D()(backbone(norm(inp)))
    model = keras.Model(inp, keras.layers.Dense(3, name="logits")(x))
    for bn in ("bn1", "bn2"):
        layer = backbone.get_layer(bn)
        layer.moving_variance.assign(np.full(8, 2.0, np.float32))
    return model


def test_the_cascade_goes_through_a_nested_backbone_layer_by_layer_and_stays_finite():
    """A nested backbone was one step (every conv of it at once), and its layers' weights, having no
    initializer on the backbone, were drawn from N(0, 0.05): negative BatchNorm variances, a NaN
    model, whose constant maps read as a perfect decorrelation (Spearman 0). An adapted
    Normalization's variance met the same fate. Now each inner layer is a step with its own
    initializer (variance 1), the Normalization is left alone, and every randomised copy predicts."""
    model = nested_backbone_model()
    groups = kerascam.sanity.layer_groups(model)
    assert [g for g, _ in groups] == ["logits", "backbone/c2", "backbone/c1"]
    assert [layer.name for layer in dict(groups)["backbone/c2"]] == ["c2", "bn2"]
    images = np.random.default_rng(1).uniform(0, 255, (4, S, S, 3)).astype(np.float32)
    before = [w.copy() for w in model.get_weights()]
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for g, (_, layers) in enumerate(kerascam.sanity.layer_groups(copy)):
        for j, layer in enumerate(layers):
            kerascam.sanity.reinitialise(layer, g * 100 + j * 10)
        assert np.isfinite(ev.predict(copy, images)).all()
    assert np.array_equal(copy.get_layer("backbone").get_layer("bn1").moving_variance.numpy(), np.ones(8))
    assert np.array_equal(copy.get_layer("norm").get_weights()[1], model.get_layer("norm").get_weights()[1])
    targets = ev.predict(model, images).argmax(1)
    out = kerascam.sanity.sanity_check(model, images, ev.method_functions(["gradcam", "random"]), targets)
    assert list(out["gradcam"]) == ["logits", "backbone/c2", "backbone/c1"]
    assert all(np.allclose(v, 1) for v in out["random"].values())
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # the original is untouched


def test_the_sanity_check_runs_on_a_random_part_of_the_sample_not_its_first_pictures(monkeypatch):
    """The sample is sorted by index and the splits are ordered by class, so its first 50 pictures are
    the first class's (all 50 were airplanes in the README's CIFAR-10 run). Picture i here is filled
    with the value i: the sanity check gets sanity_sample's pictures, spread over the whole sample."""
    seen = {}

    def record(model, images, methods, targets, layer=None, batch_size=256, seed=0):
        seen["values"] = images[:, 0, 0, 0].round().astype(int).tolist()
        return {name: {"logits": np.ones(len(images))} for name in methods}

    monkeypatch.setattr(ev, "sanity_check", record)
    images = np.repeat(np.arange(40, dtype=np.float32), S * S * 3).reshape(40, S, S, 3)
    labels = np.repeat(np.arange(4), 10)  # as a class-ordered split: 10 pictures a class
    result = ev.evaluate(brightness_model(), images, names=["random"], steps=1, sanity_n=8, seed=2)
    pick = kerascam.sanity.sanity_sample(40, 8, seed=2)
    assert seen["values"] == pick.tolist() and pick.tolist() != list(range(8))
    assert len(set(labels[pick])) > 1 and result["sanity_images"] == 8
    assert kerascam.sanity.sanity_sample(40, 100).tolist() == list(range(40))  # at most the whole sample
    first = kerascam.sanity.sanity_sample(1000, 50, seed=0)
    assert len(set(np.repeat(np.arange(10), 100)[first])) >= 8  # CIFAR-10's 10 classes x 100: nearly all


# ---------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny 32x32 two-class model file and a CIFAR-like folder tree (train/<class>, test/<class>)."""
    from model import save_model

    tmp = tmp_path_factory.mktemp("eval")
    save_model(tiny_conv_model(1, 32), tmp / "tiny.keras", ["cat", "dog"])
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp / split / name / f"{i}.png")
    return tmp


@pytest.fixture(scope="module")
def cli_run(saved, tmp_path_factory):
    """One run of the command line on the CIFAR-like tree: (process, results JSON path, figure path).
    Every test that reads its output asks for it, so none depends on another test having run."""
    out = tmp_path_factory.mktemp("cli")
    results, fig = out / "results.json", out / "curves.png"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(saved / "tiny.keras"),
                           "--data-dir", str(saved), "--n", "4", "--sanity-n", "2", "--json", str(results),
                           "--figure", str(fig)], capture_output=True, text=True, env=env, timeout=180)
    return proc, results, fig


def test_cli_writes_json_and_figure(cli_run):
    proc, out, fig = cli_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert list(results["methods"]) == list(kerascam.registry.METHODS)
    assert results["settings"]["machine"].startswith(runtime.cpu_name() + ", ")  # timings name their CPU
    for m in results["methods"].values():
        for key in ev.METRICS:
            low, high = m[f"{key}_ci"]
            assert np.isfinite(m[key]) and low <= m[key] + 1e-9 and m[key] <= high + 1e-9
        assert len(m["deletion_curve"]) == len(m["insertion_curve"]) == 33
        assert list(m["sanity_spearman"]) == results["sanity_layers"] == ["logits", "fc1", "conv2", "conv1"]
    assert results["sample"]["n"] == 4 and results["sample"]["split"] == "test"
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Score-CAM" in proc.stdout and "Traceback" not in proc.stderr


def test_markdown_from_json(cli_run, capsys):
    proc, out, _ = cli_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev.main(["--markdown", str(out)])
    text = capsys.readouterr().out
    assert text.startswith("| Method") and "Grad-CAM++" in text and "random floor" in text
    assert "| *paper: Score-CAM*" in text and "31.5" in text and "0.386" in text
    assert "down to conv1" in text
    assert f"ms / image on {runtime.cpu_name()}, " in text and "2 images drawn at random from the sample" in text


SPLIT_SEED = 3


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    """A 32x32 brightness classifier (cat: bright, dog: dark) and a folder of 12 cats and 12 dogs in
    which exactly the pictures of train.py's validation split for --seed SPLIT_SEED (val_fraction 0.2,
    the split depends only on the labels and the seed) match their class; every training picture has
    the other class's brightness. Accuracy 1 on the validation split, 0 on the training split."""
    from data.folder import stratified_split
    from model import save_model

    tmp = tmp_path_factory.mktemp("split")
    save_model(brightness_model(w=8.0, size=32, offset=0.5), tmp / "bright.keras", ["cat", "dog"])
    labels = np.repeat([0, 1], 12)
    val = set(stratified_split(labels, 0.2, SPLIT_SEED)[1].tolist())
    assert val != set(stratified_split(labels, 0.2, 0)[1].tolist())  # the seed matters
    rng = np.random.default_rng(0)
    for i, label in enumerate(labels):
        bright = (label == 0) == (i in val)
        level = 200 if bright else 40
        write = rng.integers(level - 30, level + 30, (32, 32, 3)).astype(np.uint8)
        (tmp / "data" / ["cat", "dog"][label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(write).save(tmp / "data" / ["cat", "dog"][label] / f"{i % 12:02d}.png")
    return tmp


def test_folder_dataset_uses_the_validation_split(split_folder, capsys):
    """The evaluated pictures are train.py's validation split: as many as it holds, and the model is
    right on all of them (it is wrong on every training picture)."""
    from data.folder import load_image_folder
    from model import load_model

    out = split_folder / "results.json"
    ev.main(["--model", str(split_folder / "bright.keras"), "--dataset", "folder", "--data-dir",
             str(split_folder / "data"), "--split-seed", str(SPLIT_SEED), "--methods", "gradcam,center",
             "--sanity-n", "0", "--steps", "4", "--json", str(out)])
    text = capsys.readouterr().out
    assert "Grad-CAM" in text and "centre floor" in text and "Score-CAM " not in text.split("*paper")[0]
    sample = json.loads(out.read_text())["sample"]
    d = load_image_folder(split_folder / "data", image_size=(32, 32), val_fraction=0.2, seed=SPLIT_SEED)
    model = load_model(split_folder / "bright.keras")[0]
    assert len(d.x_val) == 4 and len(d.x_train) == 20  # 0.25 would hold out 6
    assert sample["split"] == "validation" and sample["n"] == sample["of"] == len(d.x_val)
    assert (ev.predict(model, d.x_val).argmax(1) == d.y_val).mean() == 1
    assert (ev.predict(model, d.x_train).argmax(1) == d.y_train).mean() == 0
    assert sample["accuracy"] == 1.0


def run_dir(split_folder, name, **options):
    """A RUN_DIR as train.py leaves it: model.keras (the brightness model), its class file and options.json
    (`options` change it; None leaves a key out)."""
    import shutil

    run = split_folder / name
    run.mkdir()
    shutil.copy(split_folder / "bright.keras", run / "model.keras")
    shutil.copy(split_folder / "bright.classes.json", run / "model.classes.json")
    options = {"dataset": "folder", "image_size": 32, "val_split": 0.2, "seed": SPLIT_SEED, "split_seed": SPLIT_SEED,
               **options}
    (run / "options.json").write_text(json.dumps({k: v for k, v in options.items() if v is not None}))
    return run / "model.keras"


def folder_sample(model_path, data, *extra):
    from model import load_model

    model, names, _ = load_model(model_path)
    args = ev.parse_args(["--model", str(model_path), "--dataset", "folder", "--data-dir", str(data), *extra])
    images, labels, sample = ev.load_sample(args, model, names)
    return sample, float((ev.predict(model, images).argmax(1) == labels).mean())


def test_folder_split_comes_from_the_options_json_beside_the_model(split_folder, capsys):
    """train.py splits with --val-split and --split-seed (default --seed) and writes them to RUN_DIR/options.json:
    a model in a RUN_DIR is evaluated on its own held-out pictures (all right here), not mostly on training ones
    (all wrong), unless the command line says otherwise; a model without one, as the shipped models, on train.py's
    defaults (0.2, seed 0). Which split is used is printed and recorded."""
    data = split_folder / "data"
    sample, accuracy = folder_sample(run_dir(split_folder, "run"), data)
    assert accuracy == 1.0 and sample["of"] == 4 and (sample["val_split"], sample["split_seed"]) == (0.2, SPLIT_SEED)
    options = str(split_folder / "run" / "options.json")
    assert sample["split_from"] == {"val_split": options, "split_seed": options}
    assert capsys.readouterr().err.strip().splitlines()[0] == (
        f"validation split: --val-split 0.2 ({options}), --split-seed {SPLIT_SEED} ({options})")
    sample, accuracy = folder_sample(split_folder / "bright.keras", data)  # no options.json beside it
    assert (sample["val_split"], sample["split_seed"]) == (0.2, 0) and accuracy < 1
    assert sample["split_from"] == {"val_split": "train.py's default", "split_seed": "train.py's default"}

    older = run_dir(split_folder, "older", val_split=0.25, split_seed=None)  # before --split-seed: split by --seed
    sample, _ = folder_sample(older, data)
    assert (sample["val_split"], sample["split_seed"], sample["of"]) == (0.25, SPLIT_SEED, 6)
    sample, accuracy = folder_sample(older, data, "--val-split", "0.2", "--split-seed", "0")
    assert (sample["val_split"], sample["split_seed"], sample["of"]) == (0.2, 0, 4) and accuracy < 1
    assert sample["split_from"] == {"val_split": "--val-split", "split_seed": "--split-seed"}


def test_unreadable_files_in_the_folder_are_one_line_not_a_python_warning(split_folder, tmp_path, capsys):
    """An unreadable file in a class folder came out as Python's two-line UserWarning pointing into
    data/folder.py; it is one line naming the file, as train.py prints it, and the count is recorded."""
    import shutil
    import warnings

    data = tmp_path / "data"
    shutil.copytree(split_folder / "data", data)
    (data / "cat" / "broken.png").write_bytes(b"not a picture")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample, _ = folder_sample(split_folder / "bright.keras", data)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    err = capsys.readouterr().err.strip().splitlines()
    assert f"skipped 1 unreadable file(s): {data / 'cat' / 'broken.png'}: not an image or an unsupported format" in err
    assert sample["skipped_files"] == 1 and sample["of"] == 4


def test_a_folder_split_without_held_out_pictures_or_of_another_run_is_refused(split_folder, capsys):
    every = run_dir(split_folder, "every", val_split=0.0)
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", str(every), "--dataset", "folder", "--data-dir", str(split_folder / "data")])
    assert e.value.code == (f"error: {every.parent / 'options.json'} says the model was trained on every picture "
                            "(--val-split 0): none is held out to evaluate it on; pass --val-split to evaluate it on "
                            "pictures it was trained on anyway")
    other = run_dir(split_folder, "other", image_size=64)
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", str(other), "--dataset", "folder", "--data-dir", str(split_folder / "data")])
    assert e.value.code == (f"error: {other.parent / 'options.json'} is a run at --image-size 64, the model takes "
                            "32x32: not this model's run; move the model or that file")
    for value in ("0", "1", "nan"):
        with pytest.raises(SystemExit) as e:
            ev.parse_args(["--dataset", "folder", "--val-split", value])
        assert e.value.code == 2 and "error: --val-split must be above 0 and below 1" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["folder", "cifar10"])
def test_data_with_other_class_names_than_the_model_is_refused(saved, dataset):
    """As many classes, other names: the model's outputs would be scored against other classes' pictures. A model
    without a class file (its classes are indices) can only be checked for the count."""
    from model import save_model

    model = tiny_conv_model(1, 32)
    save_model(model, saved / f"cow_{dataset}.keras", ["cat", "cow"])
    data = saved / "train" if dataset == "folder" else saved
    argv = ["--dataset", dataset, "--data-dir", str(data), "--methods", "center", "--sanity-n", "0", "--steps", "1"]
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", str(saved / f"cow_{dataset}.keras"), *argv])
    assert e.value.code == ("error: the data's classes are not the model's (the data lacks the model's cow; the model "
                            "lacks the data's dog); pass the --data-dir the model was trained on")
    model.save(saved / f"indices_{dataset}.keras")
    assert ev.run(ev.parse_args(["--model", str(saved / f"indices_{dataset}.keras"), *argv]))["methods"]


def test_a_layer_path_runs_in_the_model_and_in_its_randomised_copy(split_folder, capsys):
    """`--layer /conv`: the top model's own "conv" beside a backbone's "conv", explained in the trained model
    and in the sanity check's re-initialised copy (a clone: the path, not a layer object, finds it there)."""
    import keras

    from model import save_model

    backbone = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3, padding="same", name="conv")],
                                name="backbone")
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(backbone(inp))
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)))
    save_model(model, split_folder / "nested.keras", ["cat", "dog"])
    out = split_folder / "nested.json"
    ev.main(["--model", str(split_folder / "nested.keras"), "--dataset", "folder", "--data-dir",
             str(split_folder / "data"), "--layer", "/conv", "--methods", "gradcam", "--sanity-n", "2",
             "--steps", "4", "--json", str(out)])
    results = json.loads(out.read_text())
    assert results["sample"]["layer"] == "/conv" and results["sanity_layers"][-2:] == ["conv", "backbone/conv"]
    assert set(results["methods"]["gradcam"]["sanity_spearman"]) == set(results["sanity_layers"])


def test_preprocess_unit_evaluates_a_unit_range_model_as_its_pixel_twin(split_folder):
    """The brightness model rebuilt for [0, 1] input (its 1x1 conv 255 times larger), evaluated with
    --preprocess unit, gives the [0, 255] model's accuracy and metrics (the same activations; deleting to 0
    and blurring commute with / 255); without it, it sees 255 times its range and calls every picture bright."""
    from model import save_model

    unit = brightness_model(w=8.0, size=32, offset=0.5)
    unit.get_layer("conv").set_weights([np.full((1, 1, 3, 1), 1 / 3, np.float32)])
    save_model(unit, split_folder / "unit.keras", ["cat", "dog"])
    results = {}
    for name, mode in (("bright", "none"), ("unit", "unit"), ("unit", "none")):
        out = split_folder / f"{name}_{mode}.json"
        ev.main(["--model", str(split_folder / f"{name}.keras"), "--dataset", "folder", "--data-dir",
                 str(split_folder / "data"), "--split-seed", str(SPLIT_SEED), "--methods", "gradcam",
                 "--sanity-n", "0", "--steps", "4", "--preprocess", mode, "--json", str(out)])
        results[name, mode] = json.loads(out.read_text())
    want, got, raw = results["bright", "none"], results["unit", "unit"], results["unit", "none"]
    assert want["sample"]["accuracy"] == got["sample"]["accuracy"] == 1.0 and raw["sample"]["accuracy"] == 0.5
    assert got["sample"]["preprocess"] == "unit"
    for metric in ("avg_drop", "increase", "deletion_auc", "insertion_auc", "deletion_curve", "insertion_curve"):
        np.testing.assert_allclose(got["methods"]["gradcam"][metric], want["methods"]["gradcam"][metric], atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--model", "missing.keras"], "error: model file not found"),
    (["--data-dir", "nowhere"], "error: "),
    (["--dataset", "folder"], "error: --dataset folder needs --data-dir"),
    (["--methods", "gradcam,magic"], "error: unknown method(s) magic"),
    (["--markdown", "missing.json"], "error: missing.json: not a results file"),
    (["--markdown", "BROKEN"], "error: BROKEN_PATH: incomplete results file"),
])
def test_errors_are_one_line(saved, argv, message):
    broken = saved / "broken.json"
    broken.write_text(json.dumps({"methods": {"gradcam": {"avg_drop": "x"}}}))
    argv = [str(broken) if a == "BROKEN" else a for a in argv]
    message = message.replace("BROKEN_PATH", str(broken))
    if "--model" not in argv and "--markdown" not in argv:
        argv = argv + ["--model", str(saved / "tiny.keras")]
    with pytest.raises(SystemExit) as exit_:
        ev.main(argv)
    assert str(exit_.value.code).startswith(message) and "\n" not in str(exit_.value.code)


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        ev.main(["--help"])
    assert exit_.value.code == 0 and "Average Drop" in capsys.readouterr().out
