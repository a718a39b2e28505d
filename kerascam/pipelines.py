"""The pipelines the non-masked methods share: a gradient method differs from the others in the
weights it puts on the activations, an activation method in how it reduces them to a map, a floor in
what it draws. Every one takes images (N, H, W, C) as the model takes them and returns maps (N, H, W)
float32 in [0, 1], finite for any input (a map with no signal is all zeros), batch by batch at most
PIXEL_BUDGET pixels a batch."""
import numpy as np

from .graph import explainable_cached, input_spec, num_classes
from .gradients import layer_gradients
from .layers import find_layer
from .maps import PIXEL_BUDGET, check_images, finish_maps, target_classes, weighted_sum


def _batches(model, images, batch_size):
    """The images checked, and the starts of batches of at most batch_size pictures and PIXEL_BUDGET pixels."""
    images = check_images(model, images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int of at least 1, got {batch_size!r}")
    batch_size = min(batch_size, max(1, PIXEL_BUDGET // int(np.prod(images.shape[1:3]))))
    return images, batch_size


def gradient_cam(model, images, weigh, layer=None, class_index=None, batch_size=64):
    """ReLU(sum_k w_k A_k) with w = weigh(A, dS/dA), S the target's pre-softmax score (the softmax saturates
    on confident images and its gradients vanish there), upsampled bilinearly and normalised."""
    ref = find_layer(model, layer)
    images, batch_size = _batches(model, images, batch_size)
    targets = np.full(len(images), -1, np.int64) if class_index is None else \
        target_classes(class_index, np.zeros((len(images), num_classes(model))))
    maps = []
    for start in range(0, len(images), batch_size):
        acts, grads = layer_gradients(model, ref, images[start:start + batch_size],
                                      targets[start:start + batch_size])
        maps.append(finish_maps(weighted_sum(acts, weigh(acts, grads)), images.shape[1:3], relu_first=True))
    return np.concatenate(maps) if maps else np.zeros((0,) + images.shape[1:3], np.float32)


def activation_cam(model, images, reduce, layer=None, batch_size=64):
    """ReLU(reduce(A)) of the layer's activation A (N, h, w, K) -> (N, h, w), upsampled and normalised;
    no score and no gradient, so the map is the same for every class."""
    net = explainable_cached(model, [find_layer(model, layer)])
    images, batch_size = _batches(model, images, batch_size)
    maps = []
    for start in range(0, len(images), batch_size):
        acts = np.asarray(net.predict_on_batch(images[start:start + batch_size])[0], np.float64)
        acts = np.nan_to_num(acts, nan=0.0, posinf=0.0, neginf=0.0)
        maps.append(finish_maps(reduce(acts), images.shape[1:3], relu_first=True))
    return np.concatenate(maps) if maps else np.zeros((0,) + images.shape[1:3], np.float32)


def layer_size(model, layer, size):
    """(h, w) of the layer's activation for images of this size."""
    net = explainable_cached(model, [find_layer(model, layer)])
    h, w = net.outputs[0].shape[1:3]
    if h and w:
        return h, w
    return net.predict_on_batch(np.zeros((1,) + tuple(size) + (input_spec(model)[2],), np.float32))[0].shape[1:3]
