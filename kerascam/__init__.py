"""kerascam: Score-CAM and its baselines for any single-input Keras 3 image classifier, on TensorFlow and JAX.

    import kerascam
    maps = kerascam.score_cam(model, images)                 # images (N, H, W, C) as the model takes them
    maps = kerascam.explain("gradcam", model, images, layer="block4_conv3")
    picture = kerascam.overlay(image_uint8, maps[0])

Every method is in kerascam.METHODS (registry.py), with its kind and options; kerascam.explain runs any
of them by name. Every method also takes input=, output=, reshape= (views.py) and target= (targets.py):
vision transformers' token layers, models of several inputs or outputs, any score, 1-D and 3-D data. Importing the package imports Keras on the backend KERAS_BACKEND names and changes
nothing else: no logging, no file descriptors, no environment variables.
"""
from .layers import all_layers, conv_layers, find_layer
from .graph import explainable, input_spec, num_classes, predict_probabilities
from .maps import check_images, normalise_maps, pearson, target_classes
from .scoring import auto_precision, score_cam_layers, score_cam_stream
from .registry import KINDS, METHODS, Method, explain, explain_layers, label, register
from .methods import (center_map, eigen_cam, faster_score_cam, grad_cam, grad_cam_pp, hires_cam, layer_cam,
                      random_map, score_cam)
from .overlays import colorize, overlay
from .reference import naive_score_cam
from . import targets, views

__version__ = "1.0.0"

__all__ = [
    # the explainers, every one registered in METHODS
    "score_cam", "faster_score_cam", "grad_cam", "grad_cam_pp", "layer_cam", "hires_cam", "eigen_cam",
    "random_map", "center_map",
    # one entry to every method, and the registry
    "explain", "explain_layers", "METHODS", "Method", "KINDS", "register", "label",
    # Score-CAM over several layers, over a stream of batches, and its precision
    "score_cam_layers", "score_cam_stream", "auto_precision",
    # what is explained: targets (kerascam.targets: probability, logit, regression, segmentation, similarity)
    # and the view of a model of several inputs or outputs or of a token layer (kerascam.views)
    "targets", "views",
    # layers, classes and targets, scores
    "find_layer", "conv_layers", "all_layers", "target_classes", "predict_probabilities", "num_classes",
    "input_spec", "explainable", "check_images",
    # maps and overlays
    "normalise_maps", "pearson", "colorize", "overlay",
    # the plain per-image Score-CAM the fast path is tested against
    "naive_score_cam",
]
