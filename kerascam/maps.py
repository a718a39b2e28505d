"""Images in, maps out: the images' checks, the target classes, and how a map is finished (weighted
sum, ReLU, bilinear upsampling, min-max normalisation), shared by every method.

  images    (N, H, W, C) at the model's input size (any size where the model has None), pixels as
            the model takes them: preprocessing belongs inside the model.
"""
import keras
import numpy as np

from .cache import derived
from .graph import rerun
from .layers import all_layers, path_name

# A batch through the network holds its pictures at the input size and the activations for all of them, so
# its memory grows with batch x H x W: every method caps a batch at PIXEL_BUDGET pixels, Score-CAM's default
# 256 masked pictures at ImageNet's 224 x 224, which leaves 32 x 32 to 224 x 224 inputs their full batch and
# lets a model that takes any size explain a 12-megapixel photo a picture at a time instead of running out
# of memory.
PIXEL_BUDGET = 256 * 224 * 224


AXES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}  # the spatial axes of signals, pictures and volumes
WHAT = {1: "signal", 2: "picture", 3: "volume"}


def check_images(model, images, input=0):
    """Images as float32 (N, *spatial, C) that the model's input `input` takes (N, H, W, C) pictures, (N, L, C)
    signals or (N, D, H, W, C) volumes, one without its batch axis too; a clear ValueError otherwise."""
    spec = tuple(model.inputs[input].shape)
    spatial, channels = spec[1:-1], spec[-1]
    axes = AXES.get(len(spatial), tuple(f"S{i}" for i in range(len(spatial))))
    try:
        images = np.asarray(images, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"images must be a numeric array (N, {', '.join(axes)}, C)") from None
    given = images.shape
    if images.ndim == len(spec) - 1:
        images = images[None]
    if images.ndim != len(spec) or images.shape[-1] != channels or any(
            s is not None and s != got for s, got in zip(spatial, images.shape[1:-1])) or 0 in images.shape[1:-1]:
        hint = ""
        if len(given) == len(spec) - 1 and channels == 1 and given[-1] != 1:  # greyscale without its channel axis
            hint = f"; a batch of greyscale {WHAT.get(len(spatial), 'input')}s needs its channel axis: images[..., None]"
        want = ", ".join(str(s or a) for s, a in zip(spatial, axes))
        raise ValueError(f"images must be (N, {want}, {channels}) arrays (or one ({', '.join(axes)}, C) "
                         f"{WHAT.get(len(spatial), 'input')}) for this model, got {given}{hint}")
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    if None in spatial:
        problem = _size_problem(model, images.shape[1:-1], input)
        if problem:
            raise ValueError(f"the model cannot take {'x'.join(map(str, images.shape[1:-1]))} images: {problem}; "
                             "pass larger images")
    return images


def check_inputs(model, images, input=0):
    """The call's inputs as arrays in the model's input order, batched alike: `images` is one array for a
    single-input model, or a list (or a dict by input name) of one array per input for a model of several;
    the image input (`input`, the one masked) is checked as check_images does, as float32."""
    count = len(model.inputs)
    if count == 1:
        return [check_images(model, images, 0)]
    names = [t._keras_history.operation.name for t in model.inputs]
    if isinstance(images, dict):
        missing = [name for name in names if name not in images]
        if missing:
            raise ValueError(f"images has no array for input(s) {', '.join(map(repr, missing))}; the model's "
                             f"inputs: {', '.join(map(repr, names))}")
        arrays = [images[name] for name in names]
    elif isinstance(images, (list, tuple)) and len(images) == count:
        arrays = list(images)
    else:
        raise ValueError(f"the model takes {count} inputs ({', '.join(map(repr, names))}): pass a list (or a dict by "
                         f"name) of {count} arrays, batched alike")
    arrays = [np.asarray(a) for a in arrays]
    arrays[input] = check_images(model, arrays[input], input)
    lengths = {len(a) if a.ndim else -1 for a in arrays}
    if len(lengths) > 1:
        raise ValueError(f"the inputs' arrays must be batched alike (one row per picture), got lengths "
                         f"{[len(a) if a.ndim else None for a in arrays]}")
    return arrays


def _size_problem(model, size, input=0):
    """Why a model that takes any size cannot take images of this size (too small for its kernels
    and poolings: a layer refuses the size, or an output is left with no pixels), or None. Worked out
    once per size on symbolic tensors, through the nested models too; nothing runs."""
    def find():
        refs = all_layers(model)
        specs = [keras.Input(batch_shape=(1,) + (tuple(size) if i == input else tuple(t.shape[1:-1])) +
                             (t.shape[-1],), dtype=t.dtype) for i, t in enumerate(model.inputs)]
        found = {}
        try:
            rerun(model, specs[0] if len(specs) == 1 else specs, {ref.path: i for i, ref in enumerate(refs)}, found)
        except Exception as e:  # Keras and the backends refuse a size in many ways
            return f"its layers refuse that size ({type(e).__name__})"
        empty = [path_name(refs[i]) for i, out in found.items()
                 if hasattr(out, "shape") and len(out.shape) >= 3 and 0 in out.shape[1:-1]]
        return f"layer {empty[0]!r} has no pixels left" if empty else None

    return derived(model, ("size_problem", tuple(size), input), find)


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


def resize(x, size):
    """keras.ops: (N, *spatial, K) resized to `size` over its 1 to 3 spatial axes, linearly with half-pixel
    centres (bilinear for pictures, like PyTorch's align_corners=False; trilinear for volumes as two
    separable passes, the second along the depth only, which leaves the other axes exactly as they are)."""
    ops, size = keras.ops, tuple(int(s) for s in size)
    if len(size) == 2:
        return ops.image.resize(x, size, interpolation="bilinear")
    if len(size) == 1:
        return ops.image.resize(ops.expand_dims(x, 2), size + (1,), interpolation="bilinear")[:, :, 0]
    if len(size) != 3:
        raise ValueError(f"maps have 1 to 3 spatial axes, not {len(size)}")
    shape = ops.shape(x)
    planes = ops.image.resize(ops.reshape(x, (-1,) + tuple(shape[2:])), size[1:], interpolation="bilinear")
    stacked = ops.reshape(planes, (-1, shape[1], size[1] * size[2], shape[-1]))
    deep = ops.image.resize(stacked, (size[0], size[1] * size[2]), interpolation="bilinear")
    return ops.reshape(deep, (-1,) + size + (shape[-1],))


def upsample(activations, size):
    """Linear (half-pixel) upsampling of (N, *spatial, K) activations to size, as float32 NumPy (resize)."""
    up = resize(keras.ops.convert_to_tensor(np.asarray(activations, dtype=np.float32)), size)
    return np.asarray(keras.ops.convert_to_numpy(up), dtype=np.float32)


def weighted_sum(acts, weights):
    """sum_k w_k A_k: weights (N, K) per channel, or (N, *spatial, K) per pixel."""
    acts = np.asarray(acts, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim == 2:
        return np.einsum("n...k,nk->n...", acts, weights)
    return (acts * weights).sum(axis=-1)


def finish_maps(low_res, size, relu_first):
    """(N, h, w) weighted sums (or (N, l), (N, d, h, w)) -> maps (N, H, W) in [0, 1]: ReLU, upsampling to size and
    min-max normalisation; relu_first puts the ReLU before the upsampling (Grad-CAM's order),
    else after it (Score-CAM's, whose masks are upsampled first)."""
    low_res = np.nan_to_num(np.asarray(low_res, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if relu_first:
        low_res = np.maximum(low_res, 0)
    up = upsample(low_res[..., None], size)[..., 0]
    return normalise_maps(up if relu_first else np.maximum(up, 0))


def pearson(a, b):
    """Per-map Pearson r of two (N, ...) stacks of maps; two constant maps that are equal count as 1."""
    a = np.asarray(a).reshape(len(a), -1).astype(np.float64)
    b = np.asarray(b).reshape(len(b), -1).astype(np.float64)
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    norm = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    both_flat = ((a == 0).all(axis=1)) & ((b == 0).all(axis=1))
    return np.where(both_flat, 1.0, (a * b).sum(axis=1) / np.where(norm > 0, norm, 1))
