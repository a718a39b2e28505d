"""Baselines for Score-CAM with its API: Grad-CAM, Grad-CAM++, and two model-blind floors.

Every function takes images (N, H, W, 3) with pixels in [0, 255] and returns maps (N, H, W) float32
in [0, 1], finite for any input (a map with no signal is all zeros).

The gradient methods differentiate the pre-softmax score of the target class: the softmax saturates
on confident images and its gradients vanish there. TensorFlow's GradientTape is used in this
module and nowhere else; everything around it is Keras and NumPy.
"""
import zlib

import runtime  # noqa: F401  (before keras: quiet TensorFlow start-up)
import keras
import numpy as np
import tensorflow as tf

from scorecam import check_images, target_classes, conv_layer, normalise_maps, upsample

CENTER_SIGMA = 0.25  # the centre floor's Gaussian sigma, as a fraction of the shorter image side


def is_softmax(layer):
    """A Softmax layer or an Activation("softmax") layer."""
    if isinstance(layer, keras.layers.Softmax):
        return True
    return isinstance(layer, keras.layers.Activation) and getattr(layer.activation, "__name__", "") == "softmax"


def class_scores(model):
    """The tensor of pre-softmax class scores: the input of a final softmax layer, else the model's output."""
    last = model.layers[-1]
    return last.input if is_softmax(last) else model.outputs[0]


def _check_class_index(class_index, n):
    if class_index is not None and np.ndim(class_index) > 0 and len(class_index) != n:
        raise ValueError(f"class_index must be an int or {n} ints, got {len(class_index)}")


def _batch_gradients(grad_model, x, class_index):
    """Activations A and d score[target] / dA for one batch, as float64 arrays."""
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)  # record every op from the input, even in a model with frozen layers
        acts, scores = grad_model(x, training=False)
        scores = tf.cast(scores, tf.float32)
        targets = target_classes(class_index, scores.numpy())  # argmax of the scores = argmax of the softmax
        picked = tf.reduce_sum(scores * tf.one_hot(targets, scores.shape[-1]))
    grads = tape.gradient(picked, acts, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return np.asarray(acts, dtype=np.float64), np.asarray(grads, dtype=np.float64)


def _gradient_cam(model, images, weigh, layer, class_index, batch_size):
    """ReLU(sum_k w_k A_k) with w = weigh(A, dS/dA), batch by batch, upsampled bilinearly and normalised."""
    images = check_images(model, images)
    _check_class_index(class_index, len(images))
    grad_model = keras.Model(model.inputs, [conv_layer(model, layer).output, class_scores(model)])
    cams = []
    for start in range(0, len(images), batch_size):
        chunk = class_index if np.ndim(class_index) == 0 else np.asarray(class_index)[start:start + batch_size]
        acts, grads = _batch_gradients(grad_model, images[start:start + batch_size], chunk)
        cam = np.maximum(np.einsum("nhwk,nk->nhw", acts, weigh(acts, grads)), 0)
        cams.append(np.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32))
    cam = np.concatenate(cams)
    return normalise_maps(upsample(cam[..., None], tuple(model.input_shape[1:3]))[..., 0])


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


def grad_cam(model, images, layer=None, class_index=None, batch_size=64):
    """Grad-CAM maps (N, H, W) in [0, 1] of a conv layer (None: the last) for the predicted or given class."""
    return _gradient_cam(model, images, gradcam_weights, layer, class_index, batch_size)


def grad_cam_pp(model, images, layer=None, class_index=None, batch_size=64):
    """Grad-CAM++ maps (N, H, W) in [0, 1]; arguments as grad_cam."""
    return _gradient_cam(model, images, gradcampp_weights, layer, class_index, batch_size)


def random_map(model, images, layer=None, class_index=None, batch_size=64, seed=0):
    """Floor: seeded uniform noise drawn at the conv layer's resolution and upsampled bilinearly, i.e.
    smoothed exactly like the CAMs of that layer, so only where it points is uninformed.

    The noise is seeded by (seed, the image's bytes): an image gets the same map however the images
    are batched, and the model's weights are never used.
    """
    images = check_images(model, images)
    size = tuple(model.input_shape[1:3])
    h, w = conv_layer(model, layer).output.shape[1:3]
    h, w = (h, w) if h and w else size
    noise = np.stack([np.random.default_rng([seed, zlib.crc32(image.tobytes())]).random((h, w, 1), np.float32)
                      for image in images]) if len(images) else np.zeros((0, h, w, 1), np.float32)
    return normalise_maps(upsample(noise, size)[..., 0])


def center_map(model, images, layer=None, class_index=None, batch_size=64):
    """Floor: the same centred Gaussian for every image (sigma = CENTER_SIGMA x the shorter side),
    since objects in photo data sets sit near the middle."""
    images = check_images(model, images)
    h, w = model.input_shape[1:3]
    sigma = CENTER_SIGMA * min(h, w)
    y, x = np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2
    blob = np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return normalise_maps(np.broadcast_to(blob, (len(images), h, w)))
