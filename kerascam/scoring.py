"""Score-CAM's Python API over the engine: several layers from one activation pass, any stream of
batches, and the precision and batch_size options resolved once per call."""
import numpy as np

from .batching import AUTO_PICTURES, check_batch, resolve_batch_size
from .devices import resolve_devices
from .engine import Explainer
from .graph import explainable_cached
from .layers import find_layer
from .maps import check_inputs
from .precision import measure_precision, resolve_precision
from .targets import check_target
from .views import resolve


def check_max_n(max_n):
    """max_n as an int of at least 1, or None for every channel (None or 0); a clear ValueError otherwise."""
    if max_n is not None and (isinstance(max_n, bool) or not isinstance(max_n, (int, np.integer)) or max_n < 0):
        raise ValueError(f"max_n must be None or an int of at least 0 (0 and None: every channel), got {max_n!r}")
    return int(max_n) if max_n else None


def _runner(model, layers, batch_size, max_n, inputs=None, **view):
    """(run(precision, images) -> score_cam_layers' result, the measurement's cache key) for these options;
    `inputs`: all the inputs of a model of several, of which run takes as many rows as `images` has."""
    def run(choice, sample):
        part = sample if inputs is None or len(inputs) == 1 else [a[:len(sample)] for a in inputs]
        return score_cam_layers(model, part, layers, batch_size=batch_size, max_n=max_n, precision=choice, **view)

    options = tuple(view.get(k) for k in ("input", "output", "reshape", "target"))  # given or not: the same key
    return run, (tuple(find_layer(model, layer).path for layer in layers), max_n) + options


def _measured(model, layers, inputs, images, batch_size, max_n, passes=None, **view):
    """resolve_precision("auto") for a Score-CAM call on these layers and options."""
    run, key = _runner(model, layers, batch_size, max_n, inputs, **view)
    return resolve_precision("auto", model, run, images, passes, key)


def _batch_size(model, layers, inputs, index, batch_size, max_n, precision, passes, devices, **view):
    """resolve_batch_size for a Score-CAM call: each candidate one full masked batch of the call's first
    pictures (`inputs`, all the model's inputs; `index` the masked one) through this call's engine."""
    sample = None if inputs is None else [a[:AUTO_PICTURES] for a in inputs]

    def prepare(b):
        explainer = Explainer(model, layers, b, max_n, precision, view=resolve(model, view.get("input"),
                              view.get("output"), view.get("reshape")), target=view.get("target"))
        return explainer.masked_step(sample if len(sample) > 1 else sample[0])

    key = (tuple(find_layer(model, layer).path for layer in layers), max_n, precision,
           None if inputs is None else inputs[index].shape[1:]) + tuple(view.items())
    return resolve_batch_size(batch_size, model, None if sample is None or not len(sample[index]) else prepare,
                              passes, key, len(resolve_devices(devices)))


def auto_precision(model, layers, images, batch_size=256, max_n=None, **view):
    """What precision="auto" chooses for Score-CAM of these layers on this model here, measured on the
    first images (see precision.measure_precision): {"choice", "images_per_s", "min_pearson_r", ...}.
    view: input=, output=, reshape=, target= as score_cam takes them."""
    index = resolve(model, view.get("input"), view.get("output"), view.get("reshape")).input
    inputs = check_inputs(model, images, index)
    run, key = _runner(model, layers, batch_size, check_max_n(max_n), inputs, **view)
    return measure_precision(model, run, inputs[index], key)


def label_classes(labels):
    """The classes a batch's labels name, as class_index="labels" takes them: class indices (n,) or (n, 1),
    ints or whole floats (keras.utils.image_dataset_from_directory's label_mode="binary"), or one-hot
    rows (n, C) (its label_mode="categorical"); a clear ValueError for anything else (soft labels)."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        if not (np.isin(labels, (0, 1)).all() and (labels.sum(axis=1) == 1).all()):
            raise ValueError(f"labels of shape {labels.shape} are not one-hot rows; class_index=\"labels\" takes "
                             "class indices (n,) or one-hot rows (n, classes)")
        return labels.argmax(axis=1)
    labels = labels.reshape(-1)
    if labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels == np.round(labels)).all():
        return labels.astype(np.int64)
    return labels


def _split(item, count=1):
    """(images, labels or None) of one item of a stream: (images, labels) a pair, for a model of `count`
    inputs a pair whose images are the list (or dict) of its inputs; a list or dict alone is the inputs."""
    if count == 1 and isinstance(item, (tuple, list)) and len(item) == 2 and np.ndim(item[0]) >= 3:
        return item[0], item[1]
    if count > 1 and isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (list, tuple, dict)):
        return item[0], item[1]
    return item, None


def _parts(batches, class_index, count=1):
    """(images, class_index) for each item of `batches`: an array of images, or a tuple (images,
    labels) such as a labelled tf.data dataset yields, whose labels (label_classes) are the classes when
    class_index == "labels" (and are otherwise ignored)."""
    for item in batches:
        images, labels = _split(item, count)
        if isinstance(class_index, str) and class_index == "labels":
            if labels is None:
                raise ValueError('class_index="labels" needs (images, labels) batches')
            yield images, label_classes(labels)
        else:
            yield images, class_index


def _first_batch(batches, count=1):
    """(the first batch's images, an iterator giving every batch again)."""
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        return None, iter(())

    def again():
        yield first
        yield from iterator
    return _split(first, count)[0], again()


def score_cam_stream(model, batches, layer=None, class_index=None, batch_size="auto", max_n=None,
                     precision="auto", layers=None, devices=None, input=None, output=None, reshape=None, target=None):
    """Score-CAM over any iterable of image batches (a generator, a list, a tf.data dataset's
    .as_numpy_iterator()): an iterator giving, for each batch in order, its maps (n, H, W) float32
    in [0, 1] - or, when `layers` is given, (maps {layer: (n, H, W)}, probabilities (n, C)).

    The maps are score_cam's on each batch, whatever the batch sizes, but the masked images of
    consecutive batches share forward passes, so small batches cost no more than large ones. A
    batch comes out once its last masked images have been through the network, i.e. up to about
    batch_size / K pictures after it. Memory holds the batches in flight and a few chunks, however
    long the stream. class_index: None (each image's predicted class), an int, or "labels" for
    (images, labels) batches. precision: "auto", "float32" or "bfloat16". devices, input, output, reshape,
    target: as score_cam (with a target, a batch's scores are its pictures' target scores (n,); per-picture
    data of a target is indexed by the picture's row in its batch).
    Arguments are checked here, before the first batch is read, except that "auto" looks at the first batch.
    """
    wanted = layers if layers is not None else [layer]
    if isinstance(class_index, str) and class_index != "labels":
        raise ValueError(f'class_index must be None, an int or "labels", got {class_index!r}')
    max_n = check_max_n(max_n)
    view = resolve(model, input, output, reshape)
    target = check_target(target, None if class_index == "labels" else class_index)
    batch_size, given = check_batch(batch_size), dict(input=input, output=output, reshape=reshape, target=target)
    if len(resolve_devices(devices)) > 1:
        precision = "float32" if precision == "auto" else precision
    inputs = None
    if "auto" in (precision, batch_size):
        first, batches = _first_batch(batches, len(model.inputs))
        inputs = None if first is None else check_inputs(model, first, view.input)
    if precision == "auto":
        precision = _measured(model, wanted, inputs, None if first is None else inputs[view.input], batch_size,
                              max_n, **given)
    precision = resolve_precision(precision)
    batch_size = _batch_size(model, wanted, inputs, view.input, batch_size, max_n, precision, None, devices, **given)
    explainer = Explainer(model, wanted, batch_size, max_n, precision, devices=devices, view=view, target=target)
    results = explainer.explain(_parts(batches, class_index, len(model.inputs)))
    return results if layers is not None else (maps[explainer.names[0]] for maps, _ in results)


def score_cam_layers(model, images, layers=None, class_index=None, batch_size="auto", max_n=None, chunk=None,
                     precision="auto", devices=None, input=None, output=None, reshape=None, target=None):
    """Score-CAM maps of several layers from one activation pass: (maps {layer path: (N, *spatial) float32
    in [0, 1]}, the probabilities (N, C) that were explained, or with a target its scores (N,)). layers:
    names, paths or Layers (None: the default layer). Images go in chunks so memory stays bounded whatever
    N is. input, output, reshape (views.py) and target (targets.py): as score_cam."""
    layers = [None] if layers is None else list(layers)
    view = resolve(model, input, output, reshape)
    target = check_target(target, class_index)
    inputs = check_inputs(model, images, view.input)
    max_n = check_max_n(max_n)
    batch_size, given = check_batch(batch_size), dict(input=input, output=output, reshape=reshape, target=target)
    if len(resolve_devices(devices)) > 1:
        precision = "float32" if precision == "auto" else precision
    passes = None
    if "auto" in (precision, batch_size):
        channels = sum(explainable_cached(model, [find_layer(model, layer)], view=view).outputs[0].shape[-1]
                       for layer in layers)
        passes = len(inputs[view.input]) * min(channels, max_n * len(layers) if max_n else channels)
    if precision == "auto":
        precision = _measured(model, layers, inputs, inputs[view.input], batch_size, max_n, passes, **given)
    precision = resolve_precision(precision)
    batch_size = _batch_size(model, layers, inputs, view.input, batch_size, max_n, precision, passes, devices, **given)
    explainer = Explainer(model, layers, batch_size, max_n, precision, chunk, devices, view, target)
    return next(iter(explainer.explain([(inputs if len(inputs) > 1 else inputs[0], class_index)])))
