"""Every method, one function each, registered with its kind (registry.py). Adding a method is one
function here and one @register line; the command line, evaluate.py, figures.py and the tests read
the registry. Layers, classes and scores follow the core's rules, so any single-input Keras image
classifier works; each returns maps (N, H, W) float32 in [0, 1]."""
import zlib

import numpy as np

from .maps import normalise_maps, upsample
from .pipelines import activation_cam, gradient_cam, layer_size, prepare
from .registry import ACTIVATION, BLIND, GRADIENT, MASKED, register
from .scoring import score_cam_layers

CENTER_SIGMA = 0.25  # the centre floor's Gaussian sigma, as a fraction of the shorter image side


def spatial_axes(a):
    """The axes of (N, *spatial, K) between the batch and the channels: (1, 2) for pictures."""
    return tuple(range(1, a.ndim - 1))


@register("scorecam", "Score-CAM", MASKED)
def score_cam(model, images, layer=None, class_index=None, batch_size="auto", max_n=None, precision="auto",
              devices=None, **view):
    """Score-CAM (Wang et al. 2020) maps (N, H, W) float32 in [0, 1] for images (N, H, W, C) as the model
    takes them: each channel of the layer's activation, upsampled and min-max normalised, masks the image,
    and its weight is the target class's probability there (the authors' reference code).

    layer: a name, path or Layer (None: the default layer), see layers.find_layer. class_index: None
    explains each image's predicted class; an int or N ints choose classes. max_n: Faster-Score-CAM,
    only the max_n channels of largest spatial standard deviation (None or 0: every channel).
    batch_size: masked images a forward pass, at most maps.PIXEL_BUDGET pixels in all (fewer, for pictures
    larger than 224 x 224, so memory stays bounded); "auto" measures 32, 64, 128 and 256 on the first
    pictures of a large call and keeps the fastest (batching.py; 256 for a small call). precision: "float32", "bfloat16" (a bfloat16 copy
    of the model does the forward passes) or "auto" (measured: scoring.auto_precision).
    devices: None (one device), a count, "all" or device names: the masked batches are sharded over
    them with Keras's DataParallel distribution (JAX backend; batch_size a multiple of their number).
    view: input=, output=, reshape= (views.py) and target= (targets.py), which every method takes: the
    image input of several, the head of several, a token layer's grid, the score explained.
    """
    maps, _ = score_cam_layers(model, images, [layer], class_index, batch_size, max_n, precision=precision,
                               devices=devices, **view)
    return next(iter(maps.values()))


@register("faster_scorecam", "Faster-Score-CAM (16 ch.)", MASKED)
def faster_score_cam(model, images, layer=None, class_index=None, batch_size="auto", max_n=16, precision="auto",
                     devices=None, **view):
    """Faster-Score-CAM (Desai & Ramaswamy's channel selection as in the Score-CAM authors' repository):
    Score-CAM on the max_n channels of largest spatial standard deviation."""
    return score_cam(model, images, layer, class_index, batch_size, max_n, precision, devices, **view)


def gradcam_weights(acts, grads):
    """Grad-CAM (Selvaraju et al. 2017): the spatial mean of the gradient per channel."""
    return grads.mean(axis=spatial_axes(grads))


def gradcampp_weights(acts, grads):
    """Grad-CAM++ (Chattopadhay et al. 2018), closed form with exp(score).

    With the exponential of the score, the second and third derivatives are exp(S) g^2 and
    exp(S) g^3, so alpha = g^2 / (2 g^2 + sum_ab A_ab g^3) (exp(S) cancels); the weight is
    sum_ab alpha relu(g) (the common factor exp(S) disappears in the min-max normalisation).
    Where the denominator is 0 the gradient is 0 too, and alpha is set to 0.
    """
    g2 = grads**2
    denom = 2 * g2 + acts.sum(axis=spatial_axes(acts), keepdims=True) * grads**3
    alpha = np.where(denom != 0, g2 / np.where(denom != 0, denom, 1), 0)
    return (alpha * np.maximum(grads, 0)).sum(axis=spatial_axes(grads))


def layercam_weights(acts, grads):
    """Layer-CAM (Jiang et al. 2021): a weight per pixel, the positive part of the gradient there."""
    return np.maximum(grads, 0)


@register("gradcam", "Grad-CAM", GRADIENT)
def grad_cam(model, images, layer=None, class_index=None, batch_size=64, **view):
    """Grad-CAM maps (N, H, W) in [0, 1] of a layer (None: the last conv) for the predicted or given class."""
    return gradient_cam(model, images, gradcam_weights, layer, class_index, batch_size, **view)


@register("gradcampp", "Grad-CAM++", GRADIENT)
def grad_cam_pp(model, images, layer=None, class_index=None, batch_size=64, **view):
    """Grad-CAM++ maps (N, H, W) in [0, 1]; arguments as grad_cam."""
    return gradient_cam(model, images, gradcampp_weights, layer, class_index, batch_size, **view)


@register("layercam", "Layer-CAM", GRADIENT)
def layer_cam(model, images, layer=None, class_index=None, batch_size=64, **view):
    """Layer-CAM maps (N, H, W) in [0, 1]; arguments as grad_cam."""
    return gradient_cam(model, images, layercam_weights, layer, class_index, batch_size, **view)


@register("hirescam", "HiRes-CAM", GRADIENT)
def hires_cam(model, images, layer=None, class_index=None, batch_size=64, **view):
    """HiRes-CAM (Draelos & Carin 2020): the gradient times the activation, element by element, summed over
    the channels (Grad-CAM without its spatial average of the gradient); arguments as grad_cam."""
    return gradient_cam(model, images, lambda acts, grads: grads, layer, class_index, batch_size, **view)


@register("eigencam", "Eigen-CAM", ACTIVATION)
def eigen_cam(model, images, layer=None, class_index=None, batch_size=64, **view):
    """Eigen-CAM (Muhammad & Yeasin 2020): the activation projected on its first principal component over
    the pixels (the channels centred, SVD); no gradient and no score, so class_index changes nothing. The
    component's sign, which an SVD leaves open, is chosen so that the map correlates positively with the
    channel sum of the activation (the component points where the layer is active)."""
    def first_component(acts):
        n, k = len(acts), acts.shape[-1]
        flat = acts.reshape(n, -1, k)
        centred = flat - flat.mean(axis=1, keepdims=True)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        projection = np.einsum("npk,nk->np", centred, vt[:, 0])
        total = flat.sum(axis=2)
        sign = np.sign(((projection - projection.mean(1, keepdims=True)) * total).sum(axis=1, keepdims=True))
        return (projection * np.where(sign == 0, 1, sign)).reshape(acts.shape[:-1])

    return activation_cam(model, images, first_component, layer, batch_size, **view)


@register("random", "random floor", BLIND, floor=True)
def random_map(model, images, layer=None, class_index=None, batch_size=64, seed=0, **view):
    """Floor: seeded uniform noise drawn at the layer's resolution and upsampled bilinearly, i.e.
    smoothed exactly like the CAMs of that layer, so only where it points is uninformed.

    The noise is seeded by (seed, the image's bytes): an image gets the same map however the images
    are batched, and the model's weights are never used.
    """
    view, inputs, images, _ = prepare(model, images, batch_size, **view)
    size = images.shape[1:-1]
    grid = tuple(layer_size(model, layer, inputs, view))
    noise = np.stack([np.random.default_rng([seed, zlib.crc32(image.tobytes())]).random(grid + (1,), np.float32)
                      for image in images]) if len(images) else np.zeros((0,) + grid + (1,), np.float32)
    return normalise_maps(upsample(noise, size)[..., 0])


@register("center", "centre floor", BLIND, floor=True)
def center_map(model, images, layer=None, class_index=None, batch_size=64, **view):
    """Floor: the same centred Gaussian for every image (sigma = CENTER_SIGMA x the shorter side),
    since objects in photo data sets sit near the middle."""
    _, _, images, _ = prepare(model, images, batch_size, **view)
    size = images.shape[1:-1]
    sigma = CENTER_SIGMA * min(size)
    grid = np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in size], indexing="ij")
    blob = np.exp(-sum(g**2 for g in grid) / (2 * sigma**2))
    return normalise_maps(np.broadcast_to(blob, (len(images),) + tuple(size)))
