"""The explainers' shared maths on arrays, each against an answer worked out by hand: normalisation,
weighted sums, upsampling, the ReLU's place, Pearson r, target classes and the three gradient
weightings. No model: these run in milliseconds, which is what the mutation run (setup.cfg) needs."""
import numpy as np
import pytest

import kerascam  # noqa: F401
from kerascam.methods import gradcam_weights, gradcampp_weights, layercam_weights


def test_normalise_maps_each_map_on_its_own_range():
    maps = np.array([[[0, 1], [2, 4]], [[-2, 0], [2, 2]]], np.float32)
    np.testing.assert_array_equal(kerascam.maps.normalise_maps(maps), [[[0, .25], [.5, 1]], [[0, .5], [1, 1]]])
    assert kerascam.maps.normalise_maps(maps).dtype == np.float32


def test_normalise_maps_constant_is_zero_and_non_finite_counts_as_zero():
    maps = np.array([[[3, 3], [3, 3]], [[np.nan, 2], [np.inf, 1]], [[-np.inf, -1], [-2, -4]]], np.float32)
    np.testing.assert_array_equal(kerascam.maps.normalise_maps(maps), [[[0, 0], [0, 0]], [[0, 1], [0, .5]],
                                                           [[1, .75], [.5, 0]]])
    empty = np.zeros((2, 0, 3), np.float32)
    assert kerascam.maps.normalise_maps(empty).shape == (2, 0, 3)


def test_weighted_sum_per_channel_and_per_pixel():
    acts = np.array([[[[1, 2], [3, -4]]]], np.float32)  # (1, 1, 2, 2): pixels (0,0) and (0,1), channels 0, 1
    np.testing.assert_allclose(kerascam.maps.weighted_sum(acts, [[10, -1]]), [[[10 - 2, 30 + 4]]])
    per_pixel = np.array([[[[1, 0], [0, 2]]]], np.float32)
    np.testing.assert_allclose(kerascam.maps.weighted_sum(acts, per_pixel), [[[1, -8]]])


def test_upsample_is_half_pixel_bilinear():
    """2 -> 4 columns: sample points (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped at the edges."""
    row = np.array([0, 1], np.float32).reshape(1, 1, 2, 1)
    up = kerascam.maps.upsample(np.repeat(row, 2, axis=1), (2, 4))
    np.testing.assert_allclose(up[0, :, :, 0], [[0, .25, .75, 1]] * 2, atol=1e-6)
    assert kerascam.maps.upsample(np.full((1, 2, 2, 3), 7, np.float32), (5, 3)).shape == (1, 5, 3, 3)
    np.testing.assert_allclose(kerascam.maps.upsample(np.full((1, 2, 2, 1), 7, np.float32), (5, 3)), 7)


def test_finish_maps_puts_the_relu_where_asked():
    """[-1, 1] upsampled to 4 columns: ReLU first gives [0, .25, .75, 1]; ReLU after gives
    ReLU([-1, -.5, .5, 1]) = [0, 0, .5, 1]; both already span [0, 1]."""
    low = np.array([[[-1, 1]]], np.float32)
    np.testing.assert_allclose(kerascam.maps.finish_maps(low, (1, 4), relu_first=True), [[[0, .25, .75, 1]]], atol=1e-6)
    np.testing.assert_allclose(kerascam.maps.finish_maps(low, (1, 4), relu_first=False), [[[0, 0, .5, 1]]], atol=1e-6)
    scaled = np.array([[[-2, 2, 6]]], np.float32)  # normalised after: the scale goes
    np.testing.assert_allclose(kerascam.maps.finish_maps(scaled, (1, 3), relu_first=True), [[[0, 1 / 3, 1]]], atol=1e-6)
    np.testing.assert_array_equal(kerascam.maps.finish_maps(np.array([[[np.nan, -3]]]), (1, 2), relu_first=True), [[[0, 0]]])


def test_pearson_by_hand():
    a = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3], [5, 5, 5], [5, 5, 5]], np.float32)
    b = np.array([[2, 4, 6], [3, 2, 1], [1, 3, 2], [5, 5, 5], [1, 2, 3]], np.float32)
    # r([1,2,3], [1,3,2]) = (-1*-1 + 0*1 + 1*0) / (sqrt(2) sqrt(2)) = 0.5
    np.testing.assert_allclose(kerascam.maps.pearson(a, b), [1, -1, .5, 1, 0], atol=1e-12)
    np.testing.assert_allclose(kerascam.maps.pearson(a.reshape(5, 1, 3), b.reshape(5, 3, 1)), [1, -1, .5, 1, 0], atol=1e-12)


def test_target_classes_by_hand():
    probs = np.array([[.1, .7, .2], [.5, .2, .3]])
    np.testing.assert_array_equal(kerascam.maps.target_classes(None, probs), [1, 0])
    np.testing.assert_array_equal(kerascam.maps.target_classes(2, probs), [2, 2])
    np.testing.assert_array_equal(kerascam.maps.target_classes([0, 2], probs), [0, 2])
    np.testing.assert_array_equal(kerascam.maps.target_classes(np.int8(1), probs), [1, 1])
    assert kerascam.maps.target_classes([], np.zeros((0, 3))).shape == (0,)
    for bad, message in ((3, "out of range 0..2"), (-1, "out of range"), ([0, 1, 2], "got 3"), (1.0, "must be None"),
                         ([[0, 1]], "must be None"), ([0, [1]], "must be None"), ("1", "must be None")):
        with pytest.raises(ValueError, match=message):
            kerascam.maps.target_classes(bad, probs)


def test_grad_cam_weight_is_the_mean_gradient():
    grads = np.array([[[[1, -2], [3, 0]], [[5, 2], [-1, 4]]]], np.float32)  # (1, 2, 2, 2)
    np.testing.assert_allclose(gradcam_weights(None, grads), [[(1 + 3 + 5 - 1) / 4, (-2 + 0 + 2 + 4) / 4]])


def test_grad_cam_pp_weight_by_hand():
    """One channel, two pixels: g = [2, -1], A = [1, 3] (sum 4). g^2 = [4, 1], g^3 = [8, -1];
    denominators 2 g^2 + 4 g^3 = [40, -2]; alpha = [0.1, -0.5]; weight = sum alpha relu(g) = 0.2.
    A second channel with g = 1 at A summing to -2 has denominator 2 - 2 = 0: alpha 0, weight 0."""
    acts = np.array([[[[1, -1]], [[3, -1]]]], np.float64)  # (1, 2, 1, 2)
    grads = np.array([[[[2, 1]], [[-1, 1]]]], np.float64)
    np.testing.assert_allclose(gradcampp_weights(acts, grads), [[0.2, 0.0]], atol=1e-12)
    negative = np.array([[[[-3]], [[-1]]]], np.float64)  # negative gradients only: no weight
    np.testing.assert_array_equal(gradcampp_weights(np.ones_like(negative), negative), [[0]])


def test_layer_cam_weight_is_the_positive_gradient_per_pixel():
    grads = np.array([[[[1, -2], [-3, 4]]]], np.float32)
    np.testing.assert_array_equal(layercam_weights(None, grads), [[[[1, 0], [0, 4]]]])


def test_normalise_maps_divides_by_a_span_below_one():
    np.testing.assert_array_equal(kerascam.maps.normalise_maps(np.array([[[0, .5], [.25, .5]]], np.float32)), [[[0, 1], [.5, 1]]])


def test_weighted_sum_keeps_each_images_weights_and_sums_over_channels():
    acts = np.array([[[[1, 2]]], [[[3, 4]]]], np.float32)  # (2, 1, 1, 2)
    np.testing.assert_allclose(kerascam.maps.weighted_sum(acts, [[1, 0], [0, 1]]), [[[1]], [[4]]])
    acts = np.array([[[[1, 2], [3, 4]]]], np.float32)  # (1, 1, 2, 2), a weight per pixel and channel
    np.testing.assert_allclose(kerascam.maps.weighted_sum(acts, [[[[1, 10], [100, 1000]]]]), [[[21, 4300]]])


def test_finish_maps_counts_infinities_as_zero_before_upsampling():
    """+-inf count as 0 like NaN, so they do not spill into their neighbours through the upsampling:
    [-inf, 1] -> [0, 1] -> [0, .25, .75, 1]; [inf, 1, 0] at its own size -> [0, 1, 0]."""
    for relu_first in (True, False):
        np.testing.assert_allclose(kerascam.maps.finish_maps(np.array([[[-np.inf, 1]]]), (1, 4), relu_first),
                                   [[[0, .25, .75, 1]]], atol=1e-6)
        np.testing.assert_allclose(kerascam.maps.finish_maps(np.array([[[np.inf, 1, 0]]]), (1, 3), relu_first), [[[0, 1, 0]]])


def test_upsample_returns_float32_whatever_it_is_given():
    assert kerascam.maps.upsample(np.ones((1, 2, 2, 1), np.float64), (3, 3)).dtype == np.float32


def test_pearson_of_small_values():
    np.testing.assert_allclose(kerascam.maps.pearson([[0, .1]], [[0, .2]]), [1], atol=1e-12)


def test_target_classes_are_integers():
    probs = np.array([[.1, .7, .2], [.5, .2, .3]])
    assert kerascam.maps.target_classes(2, probs).dtype == np.int64 and kerascam.maps.target_classes([0, 1], probs).dtype == np.int64


def test_grad_cam_pp_sums_each_images_own_activations():
    """Two images, one channel of two pixels with g = 1: alpha = 1 / (2 + S) for the image's own sum S."""
    acts = np.array([[[[1], [1]]], [[[3], [3]]]], np.float64)  # (2, 1, 2, 1): sums 2 and 6
    grads = np.ones_like(acts)
    np.testing.assert_allclose(gradcampp_weights(acts, grads), [[2 / 4], [2 / 8]])


def test_bootstrap_default_seed_and_empty_input():
    import evaluate

    values = np.arange(20.0)
    assert kerascam.metrics.bootstrap_ci(values, resamples=50) == kerascam.metrics.bootstrap_ci(values, resamples=50, seed=0)
    assert kerascam.metrics.bootstrap_ci(values, resamples=50) != kerascam.metrics.bootstrap_ci(values, resamples=50, seed=1)
    with pytest.raises(ValueError, match="^no values to bootstrap$"):
        kerascam.metrics.bootstrap_ci([])


def test_spearman_of_two_pixel_maps():
    """Two pixels: centred ranks [-.5, .5], whose norm (0.5) is below one."""
    import evaluate

    np.testing.assert_allclose(kerascam.metrics.spearman([[1, 2], [1, 2]], [[3, 4], [4, 3]]), [1, -1])


def test_pixel_ranks_rank_each_map_on_its_own_and_spread_ties():
    """Rank 0 is each map's highest pixel; ties follow a seeded shuffle, not the reading order."""
    import evaluate

    maps = np.array([[[0.1, 0.9], [0.5, 0.3]], [[4, 3], [2, 1]]], np.float32)
    assert kerascam.metrics.pixel_ranks(maps).tolist() == [[[3, 0], [1, 2]], [[0, 1], [2, 3]]]
    flat = np.zeros((1, 8, 8))
    ranks = kerascam.metrics.pixel_ranks(flat)
    assert ranks.shape == (1, 8, 8) and sorted(ranks.ravel()) == list(range(64))
    assert ranks[0, 0].tolist() != list(range(8)), "ties removed the top row first"
    assert np.array_equal(ranks, kerascam.metrics.pixel_ranks(flat, seed=0))
    tied = np.array([[[1.0, 1.0], [0.0, 0.0]]])  # ties inside each level, levels still in order
    assert set(kerascam.metrics.pixel_ranks(tied)[0, 0]) == {0, 1}


def test_blur_is_opencvs_sigma_5_gaussian_with_reflected_border():
    """An impulse spreads into the 41-tap sigma-5 kernel's outer product; a flat image stays flat
    (the reflected border adds no dark edge); no images gives no images."""
    import cv2

    import evaluate

    impulse = np.zeros((1, 61, 61, 1), np.float32)
    impulse[0, 30, 30] = 1
    g = cv2.getGaussianKernel(41, 5).ravel()
    want = np.zeros((61, 61))
    want[10:51, 10:51] = np.outer(g, g)
    np.testing.assert_allclose(kerascam.metrics.blur(impulse)[0, ..., 0], want, atol=1e-9)
    flat = np.full((2, 9, 7, 3), 0.5, np.float32)
    np.testing.assert_allclose(kerascam.metrics.blur(flat), flat, atol=1e-6)
    step = np.zeros((1, 16, 16, 3), np.float32)
    step[:, :, 8:] = 1
    edge = kerascam.metrics.blur(step, sigma=2)[0, 8, 7:9, 0]
    assert 0.35 < edge[0] < 0.5 < edge[1] < 0.65 and edge.sum() == pytest.approx(1, abs=1e-6)
    assert kerascam.metrics.blur(np.zeros((0, 4, 4, 3), np.float32)).shape == (0, 4, 4, 3)


def test_auc_is_the_trapezoid_rule_in_float64_over_the_last_axis():
    import evaluate

    x = np.array([0, 0.25, 1.0])
    curves = np.array([[1.0, 1.0, 0.0], [0.0, 0.5, 0.5]])
    np.testing.assert_allclose(kerascam.metrics.auc(x, curves), [0.25 + 0.375, 0.0625 + 0.375])
    # float32 pictures' curves and steps are summed in float64: in float32, 1 + (1 + 2**-23) rounds to 2 and
    # 1 - 2**-30 to 1
    assert kerascam.metrics.auc([0.0, 1.0], np.array([1, 1 + 2**-23], np.float32)) == 1 + 2**-24
    assert kerascam.metrics.auc(np.array([2**-30, 1], np.float32), [1.0, 1.0]) == 1 - 2**-30


def test_select_channels_ranks_by_spatial_std_per_image_even_past_float32s_range():
    from kerascam.engine import select_channels

    a = np.zeros((2, 2, 2, 3), np.float32)
    a[0, 0, 0] = [1, 3, 2]  # image 0: std ranks channel 1, 2, 0
    a[1, 1, 1] = [5, 0, 4]  # image 1: 0, 2, 1
    np.testing.assert_array_equal(select_channels(a, 2), [[1, 2], [0, 2]])
    np.testing.assert_array_equal(select_channels(a * np.float32(1e20), 3), [[1, 2, 0], [0, 2, 1]])  # var ~1e40
