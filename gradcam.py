"""Baselines for Score-CAM with its API: Grad-CAM, Grad-CAM++, Layer-CAM, and two model-blind floors.

Every function takes images (N, H, W, C) as the model takes them and returns maps (N, H, W) float32
in [0, 1], finite for any input (a map with no signal is all zeros). Layers, classes and scores follow
cam.py's rules, so any single-input Keras image classifier works.

The gradient methods differentiate the pre-softmax score of the target class (the softmax saturates
on confident images and its gradients vanish there), at the layer's activation on the path that
produces the output. The gradient itself is cam.gradient, one small function per backend. A method
differs from the others in one function: the weights it puts on the activations.
"""
import zlib

import numpy as np

import cam

CENTER_SIGMA = 0.25  # the centre floor's Gaussian sigma, as a fraction of the shorter image side


def _gradient_cam(model, images, weigh, layer, class_index, batch_size):
    """ReLU(sum_k w_k A_k) with w = weigh(A, dS/dA), batch by batch (at most cam.PIXEL_BUDGET pixels a batch),
    upsampled bilinearly and normalised."""
    images = cam.check_images(model, images)
    ref = cam.find_layer(model, layer)
    targets = np.full(len(images), -1, np.int64) if class_index is None else \
        cam.target_classes(class_index, np.zeros((len(images), cam.num_classes(model))))
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int of at least 1, got {batch_size!r}")
    batch_size = min(batch_size, max(1, cam.PIXEL_BUDGET // int(np.prod(images.shape[1:3]))))
    maps = []
    for start in range(0, len(images), batch_size):
        acts, grads = cam.layer_gradients(model, ref, images[start:start + batch_size],
                                          targets[start:start + batch_size])
        maps.append(cam.finish_maps(cam.weighted_sum(acts, weigh(acts, grads)), images.shape[1:3], relu_first=True))
    return np.concatenate(maps) if maps else np.zeros((0,) + images.shape[1:3], np.float32)


def gradcam_weights(acts, grads):
    """Grad-CAM (Selvaraju et al. 2017): the spatial mean of the gradient per channel."""
    return grads.mean(axis=(1, 2))


def gradcampp_weights(acts, grads):
    """Grad-CAM++ (Chattopadhay et al. 2018), closed form with exp(score).

    With the exponential of the score, the second and third derivatives are exp(S) g^2 and
    exp(S) g^3, so alpha = g^2 / (2 g^2 + sum_ab A_ab g^3) (exp(S) cancels); the weight is
    sum_ab alpha relu(g) (the common factor exp(S) disappears in the min-max normalisation).
    Where the denominator is 0 the gradient is 0 too, and alpha is set to 0.
    """
    g2 = grads**2
    denom = 2 * g2 + acts.sum(axis=(1, 2), keepdims=True) * grads**3
    alpha = np.where(denom != 0, g2 / np.where(denom != 0, denom, 1), 0)
    return (alpha * np.maximum(grads, 0)).sum(axis=(1, 2))


def layercam_weights(acts, grads):
    """Layer-CAM (Jiang et al. 2021): a weight per pixel, the positive part of the gradient there."""
    return np.maximum(grads, 0)


@cam.register("gradcam", "Grad-CAM")
def grad_cam(model, images, layer=None, class_index=None, batch_size=64):
    """Grad-CAM maps (N, H, W) in [0, 1] of a layer (None: the last conv) for the predicted or given class."""
    return _gradient_cam(model, images, gradcam_weights, layer, class_index, batch_size)


@cam.register("gradcampp", "Grad-CAM++")
def grad_cam_pp(model, images, layer=None, class_index=None, batch_size=64):
    """Grad-CAM++ maps (N, H, W) in [0, 1]; arguments as grad_cam."""
    return _gradient_cam(model, images, gradcampp_weights, layer, class_index, batch_size)


@cam.register("layercam", "Layer-CAM")
def layer_cam(model, images, layer=None, class_index=None, batch_size=64):
    """Layer-CAM maps (N, H, W) in [0, 1]; arguments as grad_cam."""
    return _gradient_cam(model, images, layercam_weights, layer, class_index, batch_size)


def _layer_size(model, layer, size):
    """(h, w) of the layer's activation for images of this size."""
    ref = cam.find_layer(model, layer)
    h, w = cam.explainable_cached(model, [ref]).outputs[0].shape[1:3]
    if h and w:
        return h, w
    probe = np.zeros((1,) + tuple(size) + (cam.input_spec(model)[2],), np.float32)
    return cam.explainable_cached(model, [ref]).predict_on_batch(probe)[0].shape[1:3]


@cam.register("random", "random floor", floor=True)
def random_map(model, images, layer=None, class_index=None, batch_size=64, seed=0):
    """Floor: seeded uniform noise drawn at the layer's resolution and upsampled bilinearly, i.e.
    smoothed exactly like the CAMs of that layer, so only where it points is uninformed.

    The noise is seeded by (seed, the image's bytes): an image gets the same map however the images
    are batched, and the model's weights are never used.
    """
    images = cam.check_images(model, images)
    size = images.shape[1:3]
    h, w = _layer_size(model, layer, size)
    noise = np.stack([np.random.default_rng([seed, zlib.crc32(image.tobytes())]).random((h, w, 1), np.float32)
                      for image in images]) if len(images) else np.zeros((0, h, w, 1), np.float32)
    return cam.normalise_maps(cam.upsample(noise, size)[..., 0])


@cam.register("center", "centre floor", floor=True)
def center_map(model, images, layer=None, class_index=None, batch_size=64):
    """Floor: the same centred Gaussian for every image (sigma = CENTER_SIGMA x the shorter side),
    since objects in photo data sets sit near the middle."""
    images = cam.check_images(model, images)
    h, w = images.shape[1:3]
    sigma = CENTER_SIGMA * min(h, w)
    y, x = np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2
    blob = np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return cam.normalise_maps(np.broadcast_to(blob, (len(images), h, w)))
