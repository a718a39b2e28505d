"""Score-CAM against known answers on tiny hand-weighted models, plus shapes, ranges and invariances."""
import keras
import numpy as np
import pytest

from kerascam.layers import find_layer
from kerascam.maps import normalise_maps, upsample
from kerascam.methods import score_cam
from kerascam.scoring import score_cam_layers


def colour_model(size=8, pool=False):
    """conv channel 0 = red, channel 1 = green (1x1 conv, identity weights); logits = 4 * mean of each.

    Class 0 is "red", class 1 is "green": the evidence for red lies exactly where the red pixels are.
    """
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    conv = keras.layers.Conv2D(2, 1, activation="relu", name="conv")
    x = conv(x)
    if pool:
        x = keras.layers.AveragePooling2D(2)(x)
        x = keras.layers.Conv2D(2, 1, name="conv_low")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(2, name="logits")
    out = keras.layers.Activation("softmax")(dense(x))
    model = keras.Model(inp, out)
    conv.set_weights([np.eye(3, 2)[None, None].astype("float32"), np.zeros(2, "float32")])
    dense.set_weights([4 * np.eye(2, dtype="float32") * size**2 / 16, np.zeros(2, "float32")])
    if pool:
        model.get_layer("conv_low").set_weights([np.eye(2)[None, None].astype("float32"), np.zeros(2, "float32")])
    return model


def red_square(size=8, top=0, left=0, side=4):
    x = np.zeros((1, size, size, 3), "float32")
    x[0, top:top + side, left:left + side, 0] = 255
    return x


def reference_score_cam(model, image, layer, target):
    """The authors' loop, one channel at a time, for comparison."""
    acts = keras.Model(model.inputs, model.get_layer(layer).output).predict(image, verbose=0)
    up = upsample(acts, image.shape[1:3])[0]
    cam = np.zeros(image.shape[1:3])
    for k in range(up.shape[-1]):
        a = up[..., k]
        if a.max() == a.min():
            continue
        mask = (a - a.min()) / (a.max() - a.min())
        score = model.predict(image * mask[None, ..., None], verbose=0)[0, target]
        cam += score * a
    cam = np.maximum(cam, 0)
    return (cam - cam.min()) / (cam.max() - cam.min())


def test_known_answer_map_is_exactly_the_red_square():
    model, x = colour_model(), red_square(top=2, left=3)
    cam = score_cam(model, x, layer="conv")
    expected = np.zeros((8, 8))
    expected[2:6, 3:7] = 1
    np.testing.assert_allclose(cam[0], expected, atol=1e-6)


def test_constant_channels_are_skipped_and_never_give_nan():
    model = colour_model()
    black = np.zeros((1, 8, 8, 3), "float32")
    cam = score_cam(model, black, layer="conv")  # both channels constant (zero)
    assert np.isfinite(cam).all() and (cam == 0).all()


def test_matches_reference_loop_with_two_informative_channels():
    model = colour_model()
    x = red_square(top=0, left=0, side=5)
    x[0, 4:, 4:, 1] = 200  # green square overlapping the red one: both channels carry weight
    for target in (0, 1):
        cam = score_cam(model, x, layer="conv", class_index=target)[0]
        np.testing.assert_allclose(cam, reference_score_cam(model, x, "conv", target), atol=1e-5)


def test_low_resolution_layer_is_upsampled_bilinearly_like_align_corners_false():
    model = colour_model(pool=True)
    x = red_square(size=8, top=0, left=0, side=2)
    cam = score_cam(model, x, layer="conv_low")[0]
    np.testing.assert_allclose(cam, reference_score_cam(model, x, "conv_low", 0), atol=1e-5)
    import cv2  # OpenCV's INTER_LINEAR uses the same half-pixel centres as PyTorch's align_corners=False

    low = np.zeros((4, 4), "float32")
    low[0, 0] = 1
    np.testing.assert_allclose(upsample(low[None, ..., None], (8, 8))[0, ..., 0],
                               cv2.resize(low, (8, 8), interpolation=cv2.INTER_LINEAR), atol=1e-6)


def test_default_layer_is_the_last_conv_and_default_class_the_predicted_one():
    model = colour_model(pool=True)
    assert find_layer(model).path == ("conv_low",)
    x = red_square()
    np.testing.assert_array_equal(score_cam(model, x), score_cam(model, x, layer="conv_low", class_index=0))


def test_shapes_range_and_batch_size_invariance(tiny_model_path):
    from model import load_model

    model, _, _ = load_model(tiny_model_path)
    x = np.random.default_rng(1).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    a = score_cam(model, x, batch_size=256)
    b = score_cam(model, x, batch_size=1)
    assert a.shape == (5, 32, 32) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1 and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_per_image_class_indices_and_faster_score_cam(tiny_model_path):
    from model import load_model

    model, _, _ = load_model(tiny_model_path)
    x = np.random.default_rng(2).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    per_image = score_cam(model, x, class_index=[0, 5, 9])
    for i, c in enumerate([0, 5, 9]):
        np.testing.assert_allclose(per_image[i], score_cam(model, x[i:i + 1], class_index=c)[0], atol=1e-5)
    # max_n = all channels is the full method; fewer channels changes the map but keeps its range
    np.testing.assert_allclose(score_cam(model, x, max_n=64), score_cam(model, x), atol=1e-5)
    fast = score_cam(model, x, max_n=4)
    assert fast.shape == (3, 32, 32) and 0 <= fast.min() and fast.max() <= 1


def test_faster_score_cam_uses_the_most_varying_channels():
    model = colour_model()
    x = red_square(side=4)
    x[0, :, :, 1] = 40  # green constant: zero spatial std, so max_n=1 keeps red
    np.testing.assert_allclose(score_cam(model, x, layer="conv", max_n=1), score_cam(model, x, layer="conv"))


def test_all_layers_from_one_call_equal_single_layer_calls(tiny_model_path):
    from model import load_model

    model, _, _ = load_model(tiny_model_path)
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    maps, probs = score_cam_layers(model, x, ["block1_conv1", "block4_conv3"])
    assert set(maps) == {"block1_conv1", "block4_conv3"}
    np.testing.assert_allclose(maps["block1_conv1"], score_cam(model, x, layer="block1_conv1"), atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)


def test_bad_arguments_are_clear_errors(tiny_model_path):
    from model import load_model

    model, _, _ = load_model(tiny_model_path)
    x = np.zeros((1, 32, 32, 3), "float32")
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        score_cam(model, x, layer="nope")
    with pytest.raises(ValueError, match="needs a 4-D"):
        score_cam(model, x, layer="fc1")
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
        score_cam(model, np.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="out of range"):
        score_cam(model, x, class_index=10)


def test_normalise_maps_handles_constant_and_non_finite_input():
    maps = np.stack([np.full((4, 4), 3.0), np.arange(16.0).reshape(4, 4)])
    out = normalise_maps(maps)
    assert (out[0] == 0).all() and out[1].min() == 0 and out[1].max() == 1
