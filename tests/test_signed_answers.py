"""Known answers where signs matter: Score-CAM, Grad-CAM and Grad-CAM++ maps, whole, on tiny models
with hand-set weights whose explained layer has negative activations and channels whose gradient
is negative.

Two models, one 4x4 greyscale picture each. The explained layer is 2x2x2 (a 2x2 conv with stride
2), so the maps are upsampled 2x, where ReLU-then-upsample and upsample-then-ReLU differ:
  linear     the explained layer is a linear conv with negative weights and biases;
  batchnorm  the explained layer is a BatchNormalization output with a negative beta, after a
             ReLU conv (non-negative) - only beta makes it negative.
A Flatten and a Dense "logits" follow, so dS_c/dA is the Dense column of class c reshaped to
(2, 2, 2): a gradient known by hand, of both signs, different at every pixel.

The expected maps are computed here with plain numpy (no Keras): a forward pass for Score-CAM's
masked pictures, the gradient read off the Dense weights, and bilinear upsampling written as the
matrix UP. test_the_answers_tell_the_wrong_maths_apart checks that each case separates the right
map from the maps of the usual mistakes (no final ReLU, |gradient| weights, ReLU and upsampling
swapped, Grad-CAM++ without relu(gradient)) by far more than the tolerance, so the comparisons
below fail on any of them.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import runtime  # noqa: E402,F401
import keras  # noqa: E402

from kerascam.methods import grad_cam, grad_cam_pp  # noqa: E402
from kerascam.methods import score_cam  # noqa: E402

# Bilinear 2 -> 4 with half-pixel centres (output pixel i samples input coordinate (i + 0.5) / 2 - 0.5,
# clamped to the edge): -0.25 -> 0, 0.25, 0.75, 1.25 -> 1.
UP = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
BN_EPSILON = 1e-3
TOLERANCE = 1e-5
CASES = {
    "linear": dict(
        picture=[[4, 3, 3, 4], [1, 1, 1, 0], [1, 1, 2, 3], [3, 2, 0, 1]],
        kernel=[[[-2, -1], [1, 2]], [[2, 0], [0, 0]]],  # (2, 2, in 1 squeezed, out 2): [row][col][channel]
        bias=[-1, -3],
        dense=[[-1, 2], [1, -3], [3, -3], [-1, -2], [-2, -2], [3, 3], [-2, -3], [1, -3]],
    ),
    "batchnorm": dict(
        picture=[[2, 1, 4, 0], [1, 1, 0, 4], [1, 0, 1, 4], [2, 2, 3, 2]],
        kernel=[[[0, -1], [2, 2]], [[-2, -2], [1, 1]]],
        bias=[2, 0],
        dense=[[1, -1], [-3, 1], [-1, 2], [-2, 3], [3, -3], [-2, -3], [-1, -2], [-3, -1]],
        # inference: (x - mean) / sqrt(var + eps) * gamma + beta = x + beta, with beta negative
        gamma=[2.0, 0.5], beta=[-3.0, -1.0], mean=[0.0, 0.0], variance=[4 - BN_EPSILON, 0.25 - BN_EPSILON],
    ),
}


def build(case):
    """The Keras model of a case: 4x4x1 -> conv 2x2/2 (-> BatchNorm) -> Flatten -> Dense logits -> softmax."""
    p = CASES[case]
    inp = keras.Input((4, 4, 1))
    linear = case == "linear"
    x = keras.layers.Conv2D(2, 2, strides=2, activation=None if linear else "relu", name="conv")(inp)
    if not linear:
        x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name="bn")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(2, name="logits")(x)
    model = keras.Model(inp, keras.layers.Activation("softmax")(x))
    kernel = np.asarray(p["kernel"], np.float32)[:, :, None, :]
    model.get_layer("conv").set_weights([kernel, np.asarray(p["bias"], np.float32)])
    if not linear:
        model.get_layer("bn").set_weights([np.asarray(p[k], np.float32) for k in ("gamma", "beta", "mean", "variance")])
    model.get_layer("logits").set_weights([np.asarray(p["dense"], np.float32), np.zeros(2, np.float32)])
    return model, ("conv" if linear else "bn")


# ---------------------------------------------------------------- the answers, in plain numpy

def picture(case):
    return np.asarray(CASES[case]["picture"], np.float64)


def activation(case, x):
    """The explained layer's (2, 2, 2) activation for a 4x4 picture x."""
    p = CASES[case]
    blocks = x.reshape(2, 2, 2, 2).transpose(0, 2, 1, 3)  # (i, j, row in block, column in block)
    a = np.einsum("ijab,abk->ijk", blocks, np.asarray(p["kernel"], np.float64)) + np.asarray(p["bias"])
    if case == "linear":
        return a
    scale = np.asarray(p["gamma"]) / np.sqrt(np.asarray(p["variance"]) + BN_EPSILON)
    return (np.maximum(a, 0) - np.asarray(p["mean"])) * scale + np.asarray(p["beta"])


def probabilities(case, x):
    z = activation(case, x).reshape(-1) @ np.asarray(CASES[case]["dense"], np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def gradient(case, c):
    """dS_c/dA: the Dense column of class c in Flatten's (row, column, channel) order."""
    return np.asarray(CASES[case]["dense"], np.float64)[:, c].reshape(2, 2, 2)


def normalise(m):
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else np.zeros_like(m)


def upsample(low):
    return UP @ low @ UP.T


def finish(low, relu_first, relu=True):
    if not relu:
        return normalise(upsample(low))
    return normalise(upsample(np.maximum(low, 0)) if relu_first else np.maximum(upsample(low), 0))


def scorecam_weights(case, c):
    """Probability of class c on the picture times each channel's upsampled, min-max normalised map."""
    x, a = picture(case), activation(case, picture(case))
    return np.array([probabilities(case, x * normalise(upsample(a[..., k])))[c] for k in range(a.shape[-1])])


def gradcam_weights(case, c, absolute=False):
    g = gradient(case, c)
    return (np.abs(g) if absolute else g).mean(axis=(0, 1))


def gradcampp_weights(case, c, relu_gradient=True):
    """Closed form with exp(score): alpha = g^2 / (2 g^2 + sum_ab A_ab g^3), w = sum_ab alpha relu(g)."""
    a, g = activation(case, picture(case)), gradient(case, c)
    alpha = g**2 / (2 * g**2 + a.sum(axis=(0, 1)) * g**3)
    return (alpha * (np.maximum(g, 0) if relu_gradient else g)).sum(axis=(0, 1))


def weighted(case, weights):
    return activation(case, picture(case)) @ weights


def expected(method, case, c):
    if method == "scorecam":  # ReLU after the upsampling: the authors' order
        return finish(weighted(case, scorecam_weights(case, c)), relu_first=False)
    weights = gradcam_weights(case, c) if method == "gradcam" else gradcampp_weights(case, c)
    return finish(weighted(case, weights), relu_first=True)  # Grad-CAM's order: ReLU, then upsample


def wrong_answers(method, case, c):
    """The maps of the one-line mistakes the comparisons must catch."""
    if method == "scorecam":
        low = weighted(case, scorecam_weights(case, c))
        return {"no final ReLU": finish(low, False, relu=False), "ReLU before upsampling": finish(low, True)}
    if method == "gradcam":
        low = weighted(case, gradcam_weights(case, c))
        wrong = {"|gradient| weights": finish(weighted(case, gradcam_weights(case, c, absolute=True)), True)}
    else:
        low = weighted(case, gradcampp_weights(case, c))
        wrong = {"gradient, not relu(gradient)": finish(weighted(case, gradcampp_weights(case, c, False)), True)}
    return {**wrong, "no ReLU": finish(low, True, relu=False), "ReLU after upsampling": finish(low, False)}


# ---------------------------------------------------------------- the tests

EXPLAIN = {"scorecam": lambda model, x, layer, c: score_cam(model, x, layer, c, precision="float32"),
           "gradcam": grad_cam, "gradcampp": grad_cam_pp}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_cases_have_negative_activations_and_gradients_of_both_signs(case):
    model, layer = build(case)
    x = picture(case)[None, ..., None].astype(np.float32)
    got = keras.Model(model.inputs, model.get_layer(layer).output).predict_on_batch(x)[0]
    np.testing.assert_allclose(got, activation(case, picture(case)), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(model.predict_on_batch(x)[0], probabilities(case, picture(case)), rtol=1e-5)
    assert got.min() < 0 < got.max()
    for c in (0, 1):
        assert gradient(case, c).min() < 0 < gradient(case, c).max()
        assert min(gradcam_weights(case, c)) < 0  # a channel the target class counts against


@pytest.mark.parametrize("c", [0, 1])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", sorted(EXPLAIN))
def test_the_answers_tell_the_wrong_maths_apart(method, case, c):
    right = expected(method, case, c)
    assert right.min() == 0 and right.max() == 1 and len(np.unique(right.round(6))) > 2  # a map, not a blank or a mask
    for mistake, wrong in wrong_answers(method, case, c).items():
        assert np.abs(wrong - right).max() > 0.2, mistake


@pytest.mark.parametrize("c", [0, 1])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", sorted(EXPLAIN))
def test_whole_map_matches_the_hand_computed_answer(method, case, c):
    model, layer = build(case)
    x = picture(case)[None, ..., None].astype(np.float32)
    got = EXPLAIN[method](model, x, layer, c)
    assert got.shape == (1, 4, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], expected(method, case, c), rtol=TOLERANCE, atol=TOLERANCE)


def test_the_numpy_answer_by_hand_for_one_case():
    """Grad-CAM, linear case, class 0, worked by hand, so the reference above is what it claims to be.

    A = conv(picture): channel 0 [[-4, -1], [4, -2]], channel 1 [[-1, 2], [-2, 1]];
    dS_0/dA = Dense column 0: channel 0 [[-1, 3], [-2, -2]], channel 1 [[1, -1], [3, 1]]
    -> spatial means w = (-0.5, 1.0); w . A = [[1, 2.5], [-4, 2]] -> ReLU [[1, 2.5], [0, 2]]
    -> each row, then each column, [a, b] -> [a, 3a/4 + b/4, a/4 + 3b/4, b] -> / max (2.5; min 0).
    """
    a = activation("linear", picture("linear"))
    np.testing.assert_array_equal(a[..., 0], [[-4, -1], [4, -2]])
    np.testing.assert_array_equal(a[..., 1], [[-1, 2], [-2, 1]])
    np.testing.assert_array_equal(gradcam_weights("linear", 0), [-0.5, 1.0])
    by_hand = np.array([[1, 1.375, 2.125, 2.5],
                        [0.75, 1.15625, 1.96875, 2.375],
                        [0.25, 0.71875, 1.65625, 2.125],
                        [0, 0.5, 1.5, 2]]) / 2.5
    np.testing.assert_allclose(expected("gradcam", "linear", 0), by_hand)
