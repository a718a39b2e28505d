"""Images in, maps out: the images' checks, the target classes, and how a map is finished (weighted
sum, ReLU, bilinear upsampling, min-max normalisation), shared by every method.

  images    (N, H, W, C) at the model's input size (any size where the model has None), pixels as
            the model takes them: preprocessing belongs inside the model.
"""
import keras
import numpy as np

from .cache import derived
from .graph import input_spec, rerun
from .layers import all_layers, path_name

# A batch through the network holds its pictures at the input size and the activations for all of them, so
# its memory grows with batch x H x W: every method caps a batch at PIXEL_BUDGET pixels, Score-CAM's default
# 256 masked pictures at ImageNet's 224 x 224, which leaves 32 x 32 to 224 x 224 inputs their full batch and
# lets a model that takes any size explain a 12-megapixel photo a picture at a time instead of running out
# of memory.
PIXEL_BUDGET = 256 * 224 * 224


def check_images(model, images):
    """Images as float32 (N, H, W, C) the model takes; a clear ValueError otherwise."""
    height, width, channels = input_spec(model)
    try:
        images = np.asarray(images, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError("images must be a numeric array (N, H, W, C)") from None
    given = images.shape
    if images.ndim == 3:
        images = images[None]
    want = (height or "H", width or "W", channels)
    if images.ndim != 4 or images.shape[-1] != channels or any(
            s is not None and s != got for s, got in zip((height, width), images.shape[1:3])) or 0 in images.shape[1:3]:
        hint = ""
        if len(given) == 3 and channels == 1 and given[-1] != 1:  # (N, H, W): greyscale pictures without their axis
            hint = "; a batch of greyscale pictures (N, H, W) needs its channel axis: images[..., None]"
        raise ValueError(f"images must be (N, {want[0]}, {want[1]}, {want[2]}) arrays (or one (H, W, C) picture) "
                         f"for this model, got {given}{hint}")
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    if height is None or width is None:
        problem = _size_problem(model, images.shape[1:3])
        if problem:
            raise ValueError(f"the model cannot take {images.shape[1]}x{images.shape[2]} images: {problem}; "
                             "pass larger images")
    return images


def _size_problem(model, size):
    """Why a model that takes any size cannot take images of this (H, W) (too small for its kernels
    and poolings: a layer refuses the size, or an output is left with no pixels), or None. Worked out
    once per size on symbolic tensors, through the nested models too; nothing runs."""
    def find():
        refs = all_layers(model)
        spec = model.inputs[0]
        x = keras.Input(batch_shape=(1,) + tuple(size) + tuple(spec.shape[3:]), dtype=spec.dtype)
        found = {}
        try:
            rerun(model, x, {ref.path: i for i, ref in enumerate(refs)}, found)
        except Exception as e:  # Keras and the backends refuse a size in many ways
            return f"its layers refuse that size ({type(e).__name__})"
        empty = [path_name(refs[i]) for i, out in found.items() if len(out.shape) == 4 and 0 in out.shape[1:3]]
        return f"layer {empty[0]!r} has no pixels left" if empty else None

    return derived(model, ("size_problem", tuple(size)), find)


def target_classes(class_index, probs):
    """Target class per image: predicted (None), one int for all, or one int per image."""
    n, count = probs.shape
    if class_index is None:
        return probs.argmax(axis=1)
    try:
        targets = np.asarray(class_index)
        if (targets.dtype.kind not in "iu" and targets.size) or targets.ndim > 1:  # [] is 0 ints
            raise TypeError
    except (TypeError, ValueError):  # ValueError: ragged lists
        raise ValueError(f"class_index must be None, an int or {n} ints, got {class_index!r}") from None
    targets = np.broadcast_to(targets.astype(np.int64), (n,)) if targets.ndim == 0 else targets.astype(np.int64)
    if targets.shape != (n,):
        raise ValueError(f"class_index must be an int or {n} ints, got {len(targets)}")
    if n and (targets.min() < 0 or targets.max() >= count):
        raise ValueError(f"class index out of range 0..{count - 1}")
    return targets


def normalise_maps(maps):
    """Min-max normalise each (H, W) map to [0, 1]; a constant map becomes all zeros, never NaN."""
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    flat = maps.reshape(len(maps), -1)
    if flat.shape[1] == 0:
        return maps
    low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    span = high - low
    out = np.where(span > 0, (flat - low) / np.where(span > 0, span, 1), 0)
    return np.clip(out, 0, 1).reshape(maps.shape).astype(np.float32)


def upsample(activations, size):
    """Bilinear (half-pixel, like PyTorch's align_corners=False) upsampling of (N, h, w, K) to size."""
    up = keras.ops.image.resize(np.asarray(activations, dtype=np.float32), tuple(size), interpolation="bilinear")
    return np.asarray(keras.ops.convert_to_numpy(up), dtype=np.float32)


def weighted_sum(acts, weights):
    """sum_k w_k A_k: weights (N, K) per channel, or (N, h, w, K) per pixel."""
    acts = np.asarray(acts, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim == 2:
        return np.einsum("nhwk,nk->nhw", acts, weights)
    return (acts * weights).sum(axis=-1)


def finish_maps(low_res, size, relu_first):
    """(N, h, w) weighted sums -> maps (N, H, W) in [0, 1]: ReLU, bilinear upsampling to size and
    min-max normalisation; relu_first puts the ReLU before the upsampling (Grad-CAM's order),
    else after it (Score-CAM's, whose masks are upsampled first)."""
    low_res = np.nan_to_num(np.asarray(low_res, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if relu_first:
        low_res = np.maximum(low_res, 0)
    up = upsample(low_res[..., None], size)[..., 0]
    return normalise_maps(up if relu_first else np.maximum(up, 0))


def pearson(a, b):
    """Per-map Pearson r of two (N, H, W) stacks; two constant maps that are equal count as 1."""
    a = np.asarray(a).reshape(len(a), -1).astype(np.float64)
    b = np.asarray(b).reshape(len(b), -1).astype(np.float64)
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    norm = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    both_flat = ((a == 0).all(axis=1)) & ((b == 0).all(axis=1))
    return np.where(both_flat, 1.0, (a * b).sum(axis=1) / np.where(norm > 0, norm, 1))
