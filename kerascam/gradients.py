"""The gradient, one small function per backend, and a layer's activation with the target score's
gradient there (what every gradient method weighs)."""
import keras
import numpy as np

from .graph import explainable_cached
from .targets import takes
from .views import DEFAULT


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


def layer_gradients(model, ref, inputs, class_index, view=DEFAULT, target=None, index=None):
    """(A, dS/dA) as float64 arrays (N, *grid, K): the layer's activation on the image input's grid and the
    gradient of the score S there: the target class's pre-softmax score (class_index: per-image ints, -1 for
    the predicted class), or the target's (targets.py) for the pictures' rows `index` in the call.
    inputs: one array per model input."""
    net = explainable_cached(model, [ref], perturb=True, view=view)
    x = [keras.ops.convert_to_tensor(a) for a in inputs]
    shape = net.inputs[-1].shape
    if any(s is None for s in shape[1:]):  # a model of any size: the layer's size for these pictures
        shape = explainable_cached(model, [ref], view=view).predict_on_batch(inputs if len(x) > 1 else inputs[0])[0]
        shape = shape.shape
    zero = np.zeros((len(inputs[view.input]),) + tuple(shape[1:]), np.float32)
    given = keras.ops.convert_to_tensor(np.asarray(class_index, dtype=np.int32))
    rows = keras.ops.convert_to_tensor(np.asarray(index if index is not None else np.arange(len(zero)), np.int32))

    def picked_score(delta):
        acts, *_, output, scores, probs = net(x + [delta], training=False)
        if target is not None:
            values = {"outputs": output, "scores": scores, "probabilities": probs}[takes(target)]
            return keras.ops.sum(keras.ops.cast(target(values, rows), "float32")), acts
        predicted = keras.ops.cast(keras.ops.argmax(scores, axis=-1), "int32")
        targets = keras.ops.where(given >= 0, given, predicted)
        value = keras.ops.sum(keras.ops.take_along_axis(scores, targets[:, None], axis=1))
        return value, acts

    grads, acts = gradient(picked_score, zero)
    if net.grids[0] is not None:  # the gradient at the layer's raw output, laid on the grid as the activation is
        grads = net.grids[0](grads)
    return (np.asarray(keras.ops.convert_to_numpy(acts), dtype=np.float64),
            np.asarray(keras.ops.convert_to_numpy(grads), dtype=np.float64))
