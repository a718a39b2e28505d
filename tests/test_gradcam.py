"""Grad-CAM, Grad-CAM++ and the floors on hand-weighted models whose answer is known."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import runtime  # noqa: E402,F401
import keras  # noqa: E402

from kerascam.methods import center_map, grad_cam, grad_cam_pp, gradcampp_weights, random_map  # noqa: E402
from kerascam.methods import score_cam  # noqa: E402
import kerascam  # noqa: E402

SIZE = 8
RED = (slice(0, 3), slice(0, 3))  # where the red blob is
GREEN = (slice(5, 8), slice(5, 8))


def colour_model(scale=1.0):
    """Class 0's score is the mean redness, class 1's the mean greenness (half weight): a 1x1 conv
    with a red and a green detector (no bias, so a black image gives all-zero activations), an
    identity 1x1 conv on top, global average pooling, a Dense 'logits' and a softmax."""
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(2, 1, activation="relu", name="detect")(inp)
    x = keras.layers.Conv2D(2, 1, name="same")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(2, name="logits")(x)
    model = keras.Model(inp, keras.layers.Activation("softmax", name="predictions")(x))
    kernel = np.zeros((1, 1, 3, 2), np.float32)
    kernel[0, 0, 0, 0] = kernel[0, 0, 1, 1] = 1 / 255
    model.get_layer("detect").set_weights([kernel, np.zeros(2, np.float32)])
    model.get_layer("same").set_weights([np.eye(2, dtype=np.float32)[None, None], np.zeros(2, np.float32)])
    model.get_layer("logits").set_weights([np.diag([16.0, 8.0]).astype(np.float32) * scale, np.zeros(2, np.float32)])
    return model


def blobs():
    """One image: a red blob top left, a green blob bottom right, black elsewhere."""
    image = np.zeros((1, SIZE, SIZE, 3), np.float32)
    image[(0, *RED, 0)] = 255
    image[(0, *GREEN, 1)] = 255
    return image


def peak(cam):
    return np.unravel_index(np.argmax(cam), cam.shape)


@pytest.fixture(scope="module")
def model():
    return colour_model()


ALL = [grad_cam, grad_cam_pp, score_cam]


@pytest.mark.parametrize("method", ALL)
def test_map_peaks_where_the_predicted_class_looks(model, method):
    cam = method(model, blobs())
    assert cam.shape == (1, SIZE, SIZE) and cam.dtype == np.float32
    assert peak(cam[0])[0] < 3 and peak(cam[0])[1] < 3  # inside the red blob
    assert cam[(0, *RED)].mean() > cam[(0, *GREEN)].mean() + 0.3


@pytest.mark.parametrize("method", ALL)
def test_class_index_moves_the_map(model, method):
    cam = method(model, blobs(), class_index=1)
    assert peak(cam[0])[0] >= 5 and peak(cam[0])[1] >= 5  # inside the green blob


@pytest.mark.parametrize("method", [grad_cam, grad_cam_pp])
def test_gradients_of_the_pre_softmax_score_survive_saturation(method):
    saturated = colour_model(scale=1e4)
    assert saturated.predict_on_batch(blobs())[0, 0] == 1.0  # the softmax's own gradient is 0 here
    cam = method(saturated, blobs())
    assert cam[(0, *RED)].min() == 1.0 and cam[(0, *GREEN)].max() == 0.0


@pytest.mark.parametrize("method", [grad_cam, grad_cam_pp])
def test_any_conv_layer_and_clear_errors(model, method):
    cam = method(model, blobs(), layer="detect")
    assert peak(cam[0])[0] < 3 and peak(cam[0])[1] < 3
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        method(model, blobs(), layer="nope")
    with pytest.raises(ValueError, match="needs a 4-D"):
        method(model, blobs(), layer="logits")
    with pytest.raises(ValueError, match="class_index"):
        method(model, np.repeat(blobs(), 2, axis=0), class_index=[0, 1, 0])


def test_batches_give_the_same_maps(model):
    images = np.concatenate([blobs(), blobs()[:, ::-1, ::-1], blobs()[:, ::-1]])
    assert np.allclose(grad_cam(model, images, batch_size=1), grad_cam(model, images, batch_size=64), atol=1e-6)


def test_gradcampp_closed_form_by_hand():
    acts = np.array([1.0, 3.0]).reshape(1, 1, 2, 1)  # sum_ab A = 4
    grads = np.array([0.5, -1.0]).reshape(1, 1, 2, 1)
    # alpha = g^2 / (2 g^2 + 4 g^3): 0.25 / (0.5 + 0.5) = 0.25 and 1 / (2 - 4) = -0.5; relu(g) = 0.5, 0
    assert np.allclose(gradcampp_weights(acts, grads), [[0.25 * 0.5]])
    assert np.array_equal(gradcampp_weights(np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 1))), [[0.0]])


@pytest.mark.parametrize("method", ALL + [random_map, center_map])
@pytest.mark.parametrize("value", [0.0, 128.0, 255.0])
def test_constant_images_give_finite_maps(model, method, value):
    """Black images make every activation 0; constant ones a constant map: zeros, never NaN."""
    cam = method(model, np.full((2, SIZE, SIZE, 3), value, np.float32))
    assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    if method in ALL:
        assert not cam.any()


def test_random_floor_is_seeded_and_as_coarse_as_the_layer():
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(2, 3, padding="same", name="conv")(inp)
    x = keras.layers.MaxPooling2D(4)(x)
    x = keras.layers.Conv2D(2, 1, name="coarse")(x)
    x = keras.layers.Dense(2)(keras.layers.Flatten()(x))
    model = keras.Model(inp, keras.layers.Activation("softmax")(x))
    images = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    a = random_map(model, images, seed=1)
    assert np.array_equal(a, random_map(model, images, seed=1))
    assert np.array_equal(a[::-1], random_map(model, images[::-1], seed=1))  # per image, not per position
    assert not np.allclose(a[0], a[1])
    assert not np.allclose(a, random_map(model, images, seed=2))
    assert a.min() == 0 and a.max() == 1
    fine = random_map(model, images, layer="conv", seed=1)
    roughness = lambda m: np.abs(np.diff(m, axis=2)).mean()  # noqa: E731
    assert roughness(a) < roughness(fine) / 2  # noise on a 4x4 grid, upsampled: smooth


def test_center_floor_peaks_in_the_middle(model):
    cam = center_map(model, blobs())[0]
    assert cam[3:5, 3:5].min() == pytest.approx(1.0) and cam.min() == 0
    assert np.allclose(cam, cam[::-1]) and np.allclose(cam, cam.T)


def test_gradient_batches_are_capped_at_the_pixel_budget_with_the_same_maps(monkeypatch):
    """Large pictures through a model of any input size: a gradient batch holds at most kerascam.maps.PIXEL_BUDGET pixels
    (here lowered to 2 of the test's pictures), and the maps are those of the uncapped batches."""
    import kerascam  # noqa: F401
    from kerascam.methods import layer_cam

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (5, SIZE, SIZE, 3)).astype(np.float32)
    model = colour_model()
    plain = {f.__name__: f(model, images, "detect") for f in (grad_cam, grad_cam_pp, layer_cam)}
    batches = []
    original = kerascam.gradients.layer_gradients

    def recording(model, ref, x, targets, *rest):
        batches.append(len(x[0]))
        return original(model, ref, x, targets, *rest)

    monkeypatch.setattr(kerascam.pipelines, "layer_gradients", recording)
    monkeypatch.setattr(kerascam.pipelines, "PIXEL_BUDGET", 2 * SIZE * SIZE + SIZE)
    for f in (grad_cam, grad_cam_pp, layer_cam):
        batches.clear()
        np.testing.assert_allclose(f(model, images, "detect"), plain[f.__name__], atol=1e-6)
        assert batches == [2, 2, 1]
    batches.clear()
    monkeypatch.setattr(kerascam.pipelines, "PIXEL_BUDGET", 256 * 224 * 224)  # within the budget: the batch asked for
    grad_cam(model, images, "detect", batch_size=4)
    assert batches == [4, 1]
