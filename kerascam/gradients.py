"""The gradient, one small function per backend, and a layer's activation with the target score's
gradient there (what every gradient method weighs)."""
import keras
import numpy as np

from .graph import explainable_cached


def _gradient_tensorflow(f, x):
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value, aux = f(x)
    return tape.gradient(value, x, unconnected_gradients=tf.UnconnectedGradients.ZERO), aux


def _gradient_jax(f, x):
    import jax

    return jax.grad(f, has_aux=True)(keras.ops.convert_to_tensor(x))


def _gradient_torch(f, x):  # not run in CI: the PyTorch wheel is too large to install there
    import torch

    x = torch.as_tensor(x).requires_grad_(True)
    value, aux = f(x)
    (grad,) = torch.autograd.grad(value, x, allow_unused=False)
    return grad, aux


GRADIENTS = {"tensorflow": _gradient_tensorflow, "jax": _gradient_jax, "torch": _gradient_torch}


def gradient(f, x):
    """(df/dx, aux) for f(x) -> (scalar, aux), with the running backend's automatic differentiation."""
    backend = keras.backend.backend()
    if backend not in GRADIENTS:
        raise ValueError(f"no gradient for the {backend!r} backend; use tensorflow, jax or torch")
    return GRADIENTS[backend](f, x)


def layer_gradients(model, ref, images, class_index):
    """(A, dS/dA) as float64 arrays (N, h, w, K): the layer's activation and the gradient of the
    target class's pre-softmax score S there. class_index: per-image ints, -1 for the predicted class."""
    net = explainable_cached(model, [ref], perturb=True)
    x = keras.ops.convert_to_tensor(images)
    shape = net.inputs[1].shape
    if any(s is None for s in shape[1:]):
        shape = explainable_cached(model, [ref]).predict_on_batch(images)[0].shape
    zero = np.zeros((len(images),) + tuple(shape[1:]), np.float32)
    given = keras.ops.convert_to_tensor(np.asarray(class_index, dtype=np.int32))

    def picked_score(delta):
        acts, scores, _ = net([x, delta], training=False)
        predicted = keras.ops.cast(keras.ops.argmax(scores, axis=-1), "int32")
        targets = keras.ops.where(given >= 0, given, predicted)
        value = keras.ops.sum(keras.ops.take_along_axis(scores, targets[:, None], axis=1))
        return value, acts

    grads, acts = gradient(picked_score, zero)
    return (np.asarray(keras.ops.convert_to_numpy(acts), dtype=np.float64),
            np.asarray(keras.ops.convert_to_numpy(grads), dtype=np.float64))
