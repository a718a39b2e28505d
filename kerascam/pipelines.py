"""The pipelines the non-masked methods share: a gradient method differs from the others in the
weights it puts on the activations, an activation method in how it reduces them to a map, a floor in
what it draws. Every one takes images as the model takes them ((N, H, W, C) pictures, (N, L, C) signals,
(N, D, H, W, C) volumes, or a list of one array per input) and returns maps (N, *spatial) float32 in
[0, 1], finite for any input (a map with no signal is all zeros), batch by batch at most PIXEL_BUDGET
pixels a batch. The view options (input=, output=, reshape=, target=) are resolved here, once, so the
methods pass them on unread."""
import numpy as np

from .graph import explainable_cached, is_classifier, num_classes
from .gradients import layer_gradients
from .layers import find_layer
from .maps import PIXEL_BUDGET, check_inputs, finish_maps, target_classes, weighted_sum
from .targets import check_target, takes
from .views import resolve


def prepare(model, images, batch_size, input=None, output=None, reshape=None, target=None):
    """(view, the inputs checked, the image input's array, batch size capped at PIXEL_BUDGET pixels); a
    target is the caller's (a floor ignores it)."""
    view = resolve(model, input, output, reshape)
    inputs = check_inputs(model, images, view.input)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int of at least 1, got {batch_size!r}")
    images = inputs[view.input]
    batch_size = min(batch_size, max(1, PIXEL_BUDGET // int(np.prod(images.shape[1:-1]))))
    return view, inputs, images, batch_size


def gradient_cam(model, images, weigh, layer=None, class_index=None, batch_size=64, target=None, **view):
    """ReLU(sum_k w_k A_k) with w = weigh(A, dS/dA), S the target class's pre-softmax score (the softmax
    saturates on confident images and its gradients vanish there) or a target's score, upsampled and
    normalised."""
    ref = find_layer(model, layer)
    target = check_target(target, class_index)
    view, inputs, images, batch_size = prepare(model, images, batch_size, **view)
    if target is None and not is_classifier(model, view.output):
        raise ValueError(f"the explained output is {tuple(model.outputs[view.output].shape)}, not (N, classes): "
                         "pass target= (kerascam.targets: regression, segmentation, similarity, or your own)")
    targets = np.full(len(images), -1, np.int64) if class_index is None else \
        target_classes(class_index, np.zeros((len(images), num_classes(model, view.output))))
    maps = []
    for start in range(0, len(images), batch_size):
        rows = slice(start, start + batch_size)
        acts, grads = layer_gradients(model, ref, [a[rows] for a in inputs], targets[rows], view, target,
                                      np.arange(len(images))[rows])
        maps.append(finish_maps(weighted_sum(acts, weigh(acts, grads)), images.shape[1:-1], relu_first=True))
    return np.concatenate(maps) if maps else np.zeros((0,) + images.shape[1:-1], np.float32)


def activation_cam(model, images, reduce, layer=None, batch_size=64, target=None, **view):
    """ReLU(reduce(A)) of the layer's activation A (N, *grid, K) -> (N, *grid), upsampled and normalised;
    no score and no gradient, so the map is the same for every class (and target)."""
    view, inputs, images, batch_size = prepare(model, images, batch_size, **view)
    net = explainable_cached(model, [find_layer(model, layer)], view=view)
    maps = []
    for start in range(0, len(images), batch_size):
        batch = [a[start:start + batch_size] for a in inputs]
        acts = np.asarray(net.predict_on_batch(batch if len(batch) > 1 else batch[0])[0], np.float64)
        acts = np.nan_to_num(acts, nan=0.0, posinf=0.0, neginf=0.0)
        maps.append(finish_maps(reduce(acts), images.shape[1:-1], relu_first=True))
    return np.concatenate(maps) if maps else np.zeros((0,) + images.shape[1:-1], np.float32)


def layer_size(model, layer, inputs, view):
    """The grid ((h, w) for pictures) of the layer's activation for these inputs."""
    net = explainable_cached(model, [find_layer(model, layer)], view=view)
    grid = tuple(net.outputs[0].shape[1:-1])
    if None not in grid:
        return grid
    probe = [a[:1] for a in inputs]
    return net.predict_on_batch(probe if len(probe) > 1 else probe[0])[0].shape[1:-1]


def predict_scores(model, images, class_index=None, batch_size=256, target=None, **view):
    """What a call explained besides its maps: the probabilities (N, C) by the score rule, or with a target its
    scores (N,) on the pictures as given."""
    target = check_target(target, class_index)
    view, inputs, images, batch_size = prepare(model, images, batch_size, **view)
    net = explainable_cached(model, view=view)
    out = []
    for start in range(0, len(images), batch_size):
        batch = [a[start:start + batch_size] for a in inputs]
        output, scores, probs = net.predict_on_batch(batch if len(batch) > 1 else batch[0])[-3:]
        if target is None:
            out.append(np.asarray(probs, np.float32))
        else:
            values = {"outputs": output, "scores": scores, "probabilities": probs}[takes(target)]
            out.append(np.asarray(target(values, np.arange(start, start + len(batch[0]), dtype=np.int32)), np.float32))
    if out:
        return np.concatenate(out)
    return np.zeros((0,) if target is not None else (0, num_classes(model, view.output)), np.float32)
