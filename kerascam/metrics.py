"""The faithfulness metrics' maths (Average Drop, Increase in Confidence, deletion and insertion curves
and their AUC, Spearman rank correlation) and their bootstrap intervals; evaluate.py runs them.

  Average Drop %      mean over images of max(0, Y - O) / Y x 100, where Y is the target's
                      probability on the image and O on the explanation image (image x map, the
                      map broadcast over RGB). Lower is better (Chattopadhay et al. 2018).
  Increase in Conf. % share of images with O > Y, x 100. Higher is better.
  Deletion AUC        pixels ranked by the map (highest first, ties in a seeded random order) are
                      set to 0 in `steps` equal steps; the target probability after each step
                      (0 % and 100 % changed included) is integrated by the trapezoid rule over the
                      fraction of pixels changed, x in [0, 1]. Lower is better (Petsiuk et al. 2018).
  Insertion AUC       the same, restoring the ranked pixels onto a blurred copy of the image
                      (Gaussian, sigma pixels). Higher is better.
"""
import cv2
import numpy as np
from scipy.stats import rankdata
from tqdm import tqdm

from .graph import predict_probabilities

STEPS = 32  # deletion / insertion steps: 33 points per curve
BLUR_SIGMA = 5.0  # RISE's insertion blur, in pixels
BOOTSTRAP = 1000


def predict(model, images, batch_size=256):
    """Probabilities (N, C) float32 by the score rule (graph.py), batch_size images per forward pass."""
    return predict_probabilities(model, np.asarray(images, dtype=np.float32), batch_size)


def target_probs(model, images, targets, batch_size=256):
    return predict(model, images, batch_size)[np.arange(len(images)), targets]


def drop_and_increase(y, o):
    """Per-image Average Drop terms max(0, Y - O) / Y x 100 and Increase terms 1[O > Y] x 100."""
    y, o = np.asarray(y, np.float64), np.asarray(o, np.float64)
    drop = np.maximum(0, y - o) / np.maximum(y, np.finfo(np.float32).tiny) * 100
    return drop, (o > y) * 100.0


def pixel_ranks(maps, seed=0):
    """Rank of each pixel in its map, 0 = highest; equal values in a seeded random order, so that
    flat regions are not removed top row first."""
    n, h, w = maps.shape
    flat = maps.reshape(n, -1)
    tiebreak = np.random.default_rng(seed).random(flat.shape)
    order = np.lexsort((tiebreak, -flat), axis=1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(h * w)[None].repeat(n, 0), axis=1)
    return ranks.reshape(n, h, w)


def perturbation_curves(model, start, end, maps, targets, steps=STEPS, batch_size=256, seed=0, desc=None):
    """Target probability as pixels switch from `start` to `end` images in the maps' order.

    Returns x (steps + 1,) the fraction switched, from 0 to 1, and curves (N, steps + 1). All
    images of a step go through the network together, batch_size at a time.
    """
    n, h, w = maps.shape
    ranks = pixel_ranks(maps, seed)
    counts = np.round(np.linspace(0, h * w, steps + 1)).astype(np.int64)
    curves = np.zeros((n, steps + 1), dtype=np.float32)
    for s, k in enumerate(tqdm(counts, desc=desc, leave=False, disable=None if desc else True, mininterval=1)):
        x = np.where((ranks < k)[..., None], end, start).astype(np.float32)
        curves[:, s] = target_probs(model, x, targets, batch_size)
    return counts / (h * w), curves


def blur(images, sigma=BLUR_SIGMA):
    """Gaussian blur of each image (OpenCV, kernel from sigma, reflected border): insertion's start.
    The shape is kept (OpenCV drops a single channel's axis, which greyscale models need)."""
    images = np.asarray(images)
    return np.stack([cv2.GaussianBlur(np.float32(im), (0, 0), sigma).reshape(im.shape) for im in images]) \
        if len(images) else images


def auc(x, curves):
    """Area under each curve (..., len(x)) by the trapezoid rule."""
    return np.trapezoid(np.asarray(curves, np.float64), np.asarray(x, np.float64), axis=-1)


def deletion(model, images, maps, targets, steps=STEPS, batch_size=256, seed=0, desc=None):
    """(x, curves): most important pixels set to 0 first."""
    return perturbation_curves(model, images, np.zeros_like(images), maps, targets, steps, batch_size, seed, desc)


def insertion(model, images, maps, targets, steps=STEPS, batch_size=256, seed=0, sigma=BLUR_SIGMA, desc=None):
    """(x, curves): most important pixels restored first onto a blurred copy."""
    return perturbation_curves(model, blur(images, sigma), images, maps, targets, steps, batch_size, seed, desc)


def bootstrap_ci(values, resamples=BOOTSTRAP, seed=0, level=0.95):
    """Percentile bootstrap interval [low, high] of the mean of per-image values."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("no values to bootstrap")
    means = values[np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return [float(low), float(high)]


def chunk_bootstrap_ci(values, chunk, resamples=BOOTSTRAP, seed=0, level=0.95):
    """Percentile bootstrap interval [low, high] of the mean of per-image values measured chunk by chunk
    (images i // chunk share one measurement, values[i] being it): the chunks are resampled, each
    counting for its images. Resampling the images as if independent would make the interval about
    sqrt(chunk) times too narrow (8 times for 64)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("no values to bootstrap")
    starts = np.arange(0, len(values), chunk)
    per_chunk, sizes = values[starts], np.diff(np.append(starts, len(values)))
    pick = np.random.default_rng(seed).integers(0, len(starts), (resamples, len(starts)))
    means = (per_chunk[pick] * sizes[pick]).sum(axis=1) / sizes[pick].sum(axis=1)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return [float(low), float(high)]


def spearman(a, b):
    """Spearman rank correlation of each pair of maps a[i], b[i]; 0 where a map is constant, since a
    constant map ranks nothing."""
    ra = rankdata(np.asarray(a).reshape(len(a), -1), axis=1)
    rb = rankdata(np.asarray(b).reshape(len(b), -1), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    return np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1), 0.0)


def summarise(values, seed=0, resamples=BOOTSTRAP):
    """{metric: mean, metric_ci: [low, high]} from per-image values."""
    out = {}
    for key, v in values.items():
        out[key] = float(np.mean(v))
        out[f"{key}_ci"] = bootstrap_ci(v, resamples, seed)
    return out
