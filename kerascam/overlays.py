"""Heatmap colouring and overlays (OpenCV): a [0, 1] map as a jet heatmap, blended over a picture."""
import cv2
import numpy as np


def colorize(cam):
    """A [0, 1] map as an RGB uint8 jet heatmap (OpenCV colormap)."""
    heat = cv2.applyColorMap(np.uint8(np.clip(cam, 0, 1) * 255 + 0.5), cv2.COLORMAP_JET)
    return cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)


def overlay(image, cam, alpha=0.45):
    """Blend the heatmap over an RGB uint8 image of any size (the map is resized to it)."""
    h, w = image.shape[:2]
    cam = cv2.resize(np.asarray(cam, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.addWeighted(colorize(cam), alpha, np.ascontiguousarray(image, dtype=np.uint8), 1 - alpha, 0)
