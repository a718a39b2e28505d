"""Training-time augmentation on uint8 batches, driven by an explicit NumPy generator.

Written on arrays rather than as Keras random layers so a batch is a pure function of
(seed, epoch, batch index): a resumed training sees exactly the batches it would have seen,
and both backends see the same batches.

Keras 3.15's own layers for the newer ones (RandomErasing, MixUp, CutMix, RandAugment) can be pure
functions of a batch's generator too: a layer built per batch, seeded from it, gives the same output for
the same seed (on TensorFlow and on JAX, eager or compiled; the two backends differ from each other).
They are not used because on a 256-picture CIFAR-10 batch on the 2-core CPU they cost 15-70 ms (MixUp,
CutMix, RandomErasing) and 0.3-2.5 s (RandAugment: 0.6 s eager and 0.3 s compiled on TensorFlow,
2.3-2.5 s on JAX) where a GPU step takes 9-13 ms; Keras's RandAugment also gives the whole batch the
same operations, and computes all 11 for each; and its CutMix weighs the labels by a box with
fractional corners while it pastes whole pixels, so a label's weight is up to 6 points off the share
of pixels it describes. The functions below are the same techniques in NumPy and OpenCV, at 1-10 ms
a batch.
"""
from functools import partial

import cv2
import numpy as np


def crop_flip(images, rng, pad=4):
    """Random crop of a reflect-padded image (CIFAR's standard pad 4) and horizontal flip."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
    flip = rng.random(n) < 0.5
    out = np.empty_like(images)
    for i, (y, x, f) in enumerate(zip(dy, dx, flip)):  # slices: 3x faster than one fancy-indexed gather
        crop = padded[i, y:y + h, x:x + w]
        out[i] = crop[:, ::-1] if f else crop
    return out


def rotate_shift_flip(images, rng, degrees=20.0, shift=0.1):
    """The character experiment's augmentation: rotation up to +-degrees, shifts up to +-shift, flip."""
    n, h, w, _ = images.shape
    out = np.empty_like(images)
    angles = rng.uniform(-degrees, degrees, n)
    shifts = rng.uniform(-shift, shift, (n, 2)) * (w, h)
    flips = rng.random(n) < 0.5
    for i in range(n):
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angles[i], 1.0)
        m[:, 2] += shifts[i]
        image = images[i, :, ::-1] if flips[i] else images[i]
        out[i] = cv2.warpAffine(np.ascontiguousarray(image), m, (w, h), borderMode=cv2.BORDER_REFLECT_101)
    return out


def cutout(images, rng, size=None):
    """Cutout (DeVries & Taylor 2017): a size x size square of each picture set to 0, centred anywhere in
    the picture and clipped at its border (so a square near the edge is smaller). size: half the
    shorter side by default, the paper's 16 pixels on CIFAR-10."""
    n, h, w, _ = images.shape
    size = size or min(h, w) // 2
    top, left = rng.integers(0, h, n) - size // 2, rng.integers(0, w, n) - size // 2
    out = images.copy()
    for i, (y, x) in enumerate(zip(top, left)):
        out[i, max(y, 0):max(y + size, 0), max(x, 0):max(x + size, 0)] = 0
    return out


def _warp(images, matrices):
    """Each picture warped by its 2x3 matrix, which maps an output pixel (x, y, 1) to the input pixel it
    shows (PIL's convention); nearest pixel, grey outside, as in RandAugment's reference code."""
    h, w = images.shape[1:3]
    out = np.empty_like(images)
    for i, m in enumerate(np.asarray(matrices, np.float64)):
        out[i] = cv2.warpAffine(images[i], m, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=(128, 128, 128))
    return out


def _blend(images, degenerate, factors):
    """PIL's ImageEnhance: factor * picture + (1 - factor) * degenerate picture, rounded and clipped to 0-255,
    one factor a picture (OpenCV a picture: 5x faster than NumPy on the batch here)."""
    out = np.empty_like(images)
    for i, f in enumerate(np.asarray(factors, np.float64)):
        cv2.addWeighted(images[i], f, degenerate[i], 1 - f, 0, dst=out[i])
    return out


def _grey(images):
    """The luma (ITU-R 601-2, as PIL's convert('L')) of each picture, as a uint8 grey picture."""
    luma = images.astype(np.float32) @ np.array([[0.299], [0.587], [0.114]], np.float32)
    return np.repeat(luma.round().astype(np.uint8), 3, axis=-1)


def _mean_grey(images):
    """Pictures filled with the mean luma of each picture (PIL's degenerate picture for contrast)."""
    means = _grey(images).mean(axis=(1, 2, 3)).round().astype(np.uint8)
    return np.broadcast_to(means[:, None, None, None], images.shape).copy()


def _smooth(images):
    """PIL's SMOOTH filter (3x3, centre weight 5 of 13) inside a one-pixel border, which stays as it is."""
    p = images.astype(np.float32)
    h, w = p.shape[1:3]
    out = p.copy()
    out[:, 1:-1, 1:-1] = (sum(p[:, 1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
                          + 4 * p[:, 1:-1, 1:-1]) / 13
    return out.round().astype(np.uint8)


def _per_channel(images, f):
    """f applied to each channel of each picture (OpenCV's per-channel functions; also faster than NumPy's
    reductions over the middle axes of a small batch)."""
    out = np.empty_like(images)
    for i, j in np.ndindex(images.shape[0], images.shape[3]):
        out[i, :, :, j] = f(np.ascontiguousarray(images[i, :, :, j]))
    return out


def _autocontrast(channel):
    """A channel stretched to 0-255 (unchanged where it is constant)."""
    lo, hi = cv2.minMaxLoc(channel)[:2]
    return cv2.normalize(channel, None, 0, 255, cv2.NORM_MINMAX) if hi > lo else channel


def _high_bits(bits):
    """Masks keeping the top `bits` bits of a byte, one a picture, shaped to broadcast over a batch."""
    return (0xFF << (8 - bits) & 0xFF).astype(np.uint8)[:, None, None, None]


def _rotation(w, h, degrees):
    """A rotation about the centre of a w x h picture."""
    return cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), degrees, 1.0)


# RandAugment's 14 operations (Cubuk et al. 2020) with torchvision's strengths at full magnitude, each on a
# group of pictures x with one signed magnitude s in [-1, 1] a picture (the sign matters where it can).
RANDAUGMENT_OPS = {
    "identity": lambda x, s: x,
    "shear_x": lambda x, s: _warp(x, [[[1, 0.3 * v, 0], [0, 1, 0]] for v in s]),
    "shear_y": lambda x, s: _warp(x, [[[1, 0, 0], [0.3 * v, 1, 0]] for v in s]),
    "translate_x": lambda x, s: _warp(x, [[[1, 0, 150 / 331 * x.shape[2] * v], [0, 1, 0]] for v in s]),
    "translate_y": lambda x, s: _warp(x, [[[1, 0, 0], [0, 1, 150 / 331 * x.shape[1] * v]] for v in s]),
    "rotate": lambda x, s: _warp(x, [_rotation(x.shape[2], x.shape[1], 30 * v) for v in s]),
    "brightness": lambda x, s: _blend(x, np.zeros_like(x), 1 + 0.9 * s),
    "color": lambda x, s: _blend(x, _grey(x), 1 + 0.9 * s),
    "contrast": lambda x, s: _blend(x, _mean_grey(x), 1 + 0.9 * s),
    "sharpness": lambda x, s: _blend(x, _smooth(x), 1 + 0.9 * s),
    "posterize": lambda x, s: x & _high_bits(8 - np.round(4 * abs(s)).astype(int)),
    "solarize": lambda x, s: np.where(x >= (255 * (1 - abs(s)))[:, None, None, None], 255 - x, x),
    "autocontrast": lambda x, s: _per_channel(x, _autocontrast),
    "equalize": lambda x, s: _per_channel(x, cv2.equalizeHist),
}


def rand_augment(images, rng, num_ops=2, magnitude=9 / 30):
    """RandAugment: `num_ops` operations in turn, each drawn uniformly per picture (as in the paper;
    keras.layers.RandAugment draws them once per batch), at `magnitude` of their full strength with a
    random sign; torchvision's defaults (2 operations, magnitude 9 of 30). Pictures that drew the same
    operation go through it together."""
    names = list(RANDAUGMENT_OPS)
    out = images.copy()
    for _ in range(num_ops):
        ops = rng.integers(0, len(names), len(images))
        strengths = np.where(rng.random(len(images)) < 0.5, -magnitude, magnitude)
        for k, name in enumerate(names):
            group = np.flatnonzero(ops == k)
            if len(group):
                out[group] = RANDAUGMENT_OPS[name](out[group], strengths[group])
    return out


# Batch-level label mixing: (pixels, one-hot labels, generator) -> (pixels, soft labels). Each picture
# is mixed with its partner in a permutation of the batch (itself for a fixed point), with its own
# weight lam ~ Beta(alpha, alpha); alpha = 1 (lam uniform) is both papers' CIFAR-10 setting. The
# soft labels go through CategoricalCrossentropy (and its label smoothing) as one-hot labels do.

def mixup(images, labels, rng, alpha=1.0):
    """MixUp (Zhang et al. 2018): picture and label both lam * own + (1 - lam) * partner's. The pixels
    come back as float32: rounding them to uint8 would part them from the labels' weights."""
    partner, lam = rng.permutation(len(images)), rng.beta(alpha, alpha, len(images))
    mixed = np.empty(images.shape, np.float32)
    for i, (j, weight) in enumerate(zip(partner, lam)):  # OpenCV a picture: 5x faster than NumPy on the batch here
        cv2.addWeighted(images[i], weight, images[j], 1 - weight, 0, dst=mixed[i], dtype=cv2.CV_32F)
    return mixed, (lam[:, None] * labels + (1 - lam[:, None]) * labels[partner]).astype(labels.dtype)


def cutmix(images, labels, rng, alpha=1.0):
    """CutMix (Yun et al. 2019): a box of area (1 - lam) of the picture, centred anywhere and clipped at
    the border, replaced by the same box of the partner; each label weighted by the share of pixels
    it describes after clipping (whole pixels, so the weights are exact)."""
    n, h, w, _ = images.shape
    partner, lam = rng.permutation(n), rng.beta(alpha, alpha, n)
    box_h, box_w = (np.sqrt(1 - lam) * h).astype(int), (np.sqrt(1 - lam) * w).astype(int)
    top, left = rng.integers(0, h, n) - box_h // 2, rng.integers(0, w, n) - box_w // 2
    y0, y1 = np.clip(top, 0, h), np.clip(top + box_h, 0, h)
    x0, x1 = np.clip(left, 0, w), np.clip(left + box_w, 0, w)
    out = images.copy()
    for i in range(n):
        out[i, y0[i]:y1[i], x0[i]:x1[i]] = images[partner[i], y0[i]:y1[i], x0[i]:x1[i]]
    pasted = ((y1 - y0) * (x1 - x0) / (h * w))[:, None]
    return out, ((1 - pasted) * labels + pasted * labels[partner]).astype(labels.dtype)


AUGMENTATIONS = {"none": None, "crop-flip": crop_flip, "rotate-shift-flip": rotate_shift_flip}
EXTRAS = {"randaugment": rand_augment, "cutout": cutout}  # after AUGMENTATIONS' geometric one: crop-flip+cutout
MIXES = {"none": None, "mixup": mixup, "cutmix": cutmix}


def _in_turn(steps, images, rng):
    for step in steps:
        images = step(images, rng)
    return images


def augmentation(spec):
    """The batch function of an --augment spec: a name of AUGMENTATIONS, then '+'-joined EXTRAS applied after
    it in the order written, each once ('crop-flip+randaugment+cutout'); None for 'none'. ValueError
    naming the valid names for anything else."""
    base, *extras = spec.split("+")
    if base not in AUGMENTATIONS or not set(extras) <= set(EXTRAS) or len(set(extras)) < len(extras):
        raise ValueError(f"unknown augmentation {spec!r}: choose one of {', '.join(AUGMENTATIONS)}, then "
                         f"optionally +{' and/or +'.join(EXTRAS)}, each once (e.g. crop-flip+cutout)")
    steps = [f for f in (AUGMENTATIONS[base], *(EXTRAS[e] for e in extras)) if f is not None]
    return None if not steps else steps[0] if len(steps) == 1 else partial(_in_turn, steps)
