"""Score-CAM's Python API over the engine: several layers from one activation pass, any stream of
batches, and the precision option resolved once per call."""
import numpy as np

from .devices import resolve_devices
from .engine import Explainer
from .graph import explainable_cached
from .layers import find_layer
from .maps import check_images
from .precision import measure_precision, resolve_precision


def check_max_n(max_n):
    """max_n as an int of at least 1, or None for every channel (None or 0); a clear ValueError otherwise."""
    if max_n is not None and (isinstance(max_n, bool) or not isinstance(max_n, (int, np.integer)) or max_n < 0):
        raise ValueError(f"max_n must be None or an int of at least 0 (0 and None: every channel), got {max_n!r}")
    return int(max_n) if max_n else None


def _runner(model, layers, batch_size, max_n):
    """(run(precision, images) -> score_cam_layers' result, the measurement's cache key) for these options."""
    def run(choice, sample):
        return score_cam_layers(model, sample, layers, batch_size=batch_size, max_n=max_n, precision=choice)

    return run, (tuple(find_layer(model, layer).path for layer in layers), max_n)


def _measured(model, layers, images, batch_size, max_n, passes=None):
    """resolve_precision("auto") for a Score-CAM call on these layers and options."""
    run, key = _runner(model, layers, batch_size, max_n)
    return resolve_precision("auto", model, run, images, passes, key)


def auto_precision(model, layers, images, batch_size=256, max_n=None):
    """What precision="auto" chooses for Score-CAM of these layers on this model here, measured on the
    first images (see precision.measure_precision): {"choice", "images_per_s", "min_pearson_r", ...}."""
    run, key = _runner(model, layers, batch_size, check_max_n(max_n))
    return measure_precision(model, run, check_images(model, images), key)


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


def _split(item):
    """(images, labels or None) of one item of a stream."""
    if isinstance(item, (tuple, list)) and len(item) == 2 and np.ndim(item[0]) == 4:
        return item[0], item[1]
    return item, None


def _parts(batches, class_index):
    """(images, class_index) for each item of `batches`: an array of images, or a tuple (images,
    labels) such as a labelled tf.data dataset yields, whose labels (label_classes) are the classes when
    class_index == "labels" (and are otherwise ignored)."""
    for item in batches:
        images, labels = _split(item)
        if isinstance(class_index, str) and class_index == "labels":
            if labels is None:
                raise ValueError('class_index="labels" needs (images, labels) batches')
            yield images, label_classes(labels)
        else:
            yield images, class_index


def _first_batch(batches):
    """(the first batch's images, an iterator giving every batch again)."""
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        return None, iter(())

    def again():
        yield first
        yield from iterator
    return _split(first)[0], again()


def score_cam_stream(model, batches, layer=None, class_index=None, batch_size=256, max_n=None,
                     precision="auto", layers=None, devices=None):
    """Score-CAM over any iterable of image batches (a generator, a list, a tf.data dataset's
    .as_numpy_iterator()): an iterator giving, for each batch in order, its maps (n, H, W) float32
    in [0, 1] - or, when `layers` is given, (maps {layer: (n, H, W)}, probabilities (n, C)).

    The maps are score_cam's on each batch, whatever the batch sizes, but the masked images of
    consecutive batches share forward passes, so small batches cost no more than large ones. A
    batch comes out once its last masked images have been through the network, i.e. up to about
    batch_size / K pictures after it. Memory holds the batches in flight and a few chunks, however
    long the stream. class_index: None (each image's predicted class), an int, or "labels" for
    (images, labels) batches. precision: "auto", "float32" or "bfloat16". devices: as score_cam.
    Arguments are checked here, before the first batch is read, except that "auto" looks at the first batch.
    """
    wanted = layers if layers is not None else [layer]
    if isinstance(class_index, str) and class_index != "labels":
        raise ValueError(f'class_index must be None, an int or "labels", got {class_index!r}')
    max_n = check_max_n(max_n)
    if len(resolve_devices(devices)) > 1:
        precision = "float32" if precision == "auto" else precision
    if precision == "auto":
        first, batches = _first_batch(batches)
        precision = _measured(model, wanted, None if first is None else check_images(model, first), batch_size,
                              max_n)
    explainer = Explainer(model, wanted, batch_size, max_n, resolve_precision(precision), devices=devices)
    results = explainer.explain(_parts(batches, class_index))
    return results if layers is not None else (maps[explainer.names[0]] for maps, _ in results)


def score_cam_layers(model, images, layers=None, class_index=None, batch_size=256, max_n=None, chunk=None,
                     precision="auto", devices=None):
    """Score-CAM maps of several layers from one activation pass: (maps {layer path: (N, H, W)
    float32 in [0, 1]}, the probabilities (N, C) that were explained). layers: names, paths or
    Layers (None: the last conv layer). Images go in chunks so memory stays bounded whatever N is."""
    layers = [None] if layers is None else list(layers)
    images = check_images(model, images)
    max_n = check_max_n(max_n)
    if len(resolve_devices(devices)) > 1:
        precision = "float32" if precision == "auto" else precision
    if precision == "auto":
        channels = sum(explainable_cached(model, [find_layer(model, layer)]).outputs[0].shape[-1]
                       for layer in layers)
        passes = len(images) * min(channels, max_n * len(layers) if max_n else channels)
        precision = _measured(model, layers, images, batch_size, max_n, passes)
    explainer = Explainer(model, layers, batch_size, max_n, resolve_precision(precision), chunk, devices)
    return next(iter(explainer.explain([(images, class_index)])))
