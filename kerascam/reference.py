"""The plain Score-CAM, one image at a time: the yardstick the fast path is tested against (tests/)
and timed against (bench.py). It is the original experiment's loop, made to follow the core's rules
for layers and scores so that it applies to any model the fast path does."""
import cv2
import numpy as np

from .graph import explainable
from .layers import find_layer


def naive_score_cam(model, image, layer=None, class_index=None, max_n=None):
    """Score-CAM of one image (H, W, C): a sub-model built on every call, one activation pass, a
    Python loop upsampling (cv2.resize, bilinear) and min-max normalising each channel, then one
    `predict` of that image's masked batch. Returns the (H, W) float32 map in [0, 1] and the
    probabilities (C,)."""
    ref = find_layer(model, layer)
    sub = explainable(model, [ref])
    acts, *_, probs = sub.predict(np.asarray(image, np.float32)[None], verbose=0)
    acts, probs = acts[0], probs[0]
    target = int(np.argmax(probs)) if class_index is None else int(class_index)
    height, width = image.shape[:2]
    channels = range(acts.shape[-1])
    if max_n:  # Faster-Score-CAM: the channels of largest spatial standard deviation
        std = acts.reshape(-1, acts.shape[-1]).std(axis=0, dtype=np.float64)
        channels = sorted(np.argsort(-std, kind="stable")[:max_n])
    upsampled, masks, used = {}, [], []
    for k in channels:
        up = cv2.resize(acts[..., k], (width, height), interpolation=cv2.INTER_LINEAR)
        upsampled[k] = up
        if acts[..., k].max() > acts[..., k].min():  # constant at the layer's resolution: skipped, as the
            # fast path does (cv2.resize can add rounding noise to a constant channel)
            masks.append((up - up.min()) / (up.max() - up.min()))
            used.append(k)
    heat = np.zeros((height, width), dtype=np.float32)
    if masks:
        masked = np.stack([image * m.reshape(height, width, 1) for m in masks]).astype(np.float32)
        scores = sub.predict(masked, verbose=0)[-1][:, target]
        for k, s in zip(used, scores):
            heat += s * upsampled[k]
    heat = np.maximum(heat, 0)
    span = heat.max() - heat.min()
    return ((heat - heat.min()) / span if span > 0 else np.zeros_like(heat)).astype(np.float32), probs

