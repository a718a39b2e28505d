"""Score-CAM (Wang et al. 2020) for Keras models: a batched, backend-neutral core and a CLI.

    python scorecam.py                          # demo: the shipped CIFAR-10 model on scikit-image's cat
    python scorecam.py IMAGE [IMAGE ...] [--model ANY.keras] [--layer NAME_OR_PATH | --all-layers]
                       [--method scorecam|faster-scorecam|gradcam|gradcampp|layercam]
                       [--class NAME_OR_INDEX] [--out PATH] [--max-n N] [--precision auto|float32|bfloat16]
                       [--preprocess none|unit|tf|torch|caffe]   # a model trained on preprocessed pictures
    python scorecam.py --folder DIR --out OUTDIR [--layer NAME] ...   # one overlay PNG per picture, streamed

For each channel k of a layer's activation A, A_k is upsampled bilinearly to the input size,
min-max normalised to a mask M_k, and weighted by the model's probability of the target class on
x * M_k; the map is ReLU(sum_k w_k A_k) min-max normalised to [0, 1]. This follows the authors'
reference code. Which layer and which probability (softmax applied once) follow cam.py's rules, so
any single-input Keras image classifier works. Masks are built inside one compiled graph with the
forward pass, and the masked inputs of consecutive images share full batches (see "the compiled
core" below; bench.py measures it).
"""
import argparse
import collections
import re
import sys
import time
from pathlib import Path

import runtime  # before keras: quiet TensorFlow start-up
import keras
import numpy as np

import cam

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "cifar10.keras"


def check_max_n(max_n):
    """max_n as an int of at least 1, or None for every channel (None or 0); a clear ValueError otherwise."""
    if max_n is not None and (isinstance(max_n, bool) or not isinstance(max_n, (int, np.integer)) or max_n < 0):
        raise ValueError(f"max_n must be None or an int of at least 0 (0 and None: every channel), got {max_n!r}")
    return int(max_n) if max_n else None


def select_channels(activations, max_n):
    """Faster-Score-CAM: indices (N, max_n) of the channels with the largest spatial standard deviation."""
    flat = activations.reshape(len(activations), -1, activations.shape[-1])
    std = flat.std(axis=1, dtype=np.float64)  # float64: a float32 variance overflows past 1e19
    return np.argsort(-std, axis=1, kind="stable")[:, :max_n]


# ---------------------------------------------------------------- precision

PRECISIONS = ("auto", "float32", "bfloat16")
AUTO_AGREEMENT = 0.999  # least Pearson r between the float32 and bfloat16 maps for "auto" to take bfloat16
# "auto" measures only calls much larger than its measurement, and runs the others in float32. The
# measurement explains AUTO_MEASURED images four times (each precision: a compiling call, then a timed
# one), i.e. 4 * AUTO_MEASURED = 8 images' work; bfloat16 at best halves the work (half the bytes moved),
# so it can repay that only past 16 images. AUTO_MIN_IMAGES = 32 keeps the measurement to at most a quarter
# of the call's own work. AUTO_MIN_PASSES (masked passes, images x channels) leaves out calls short enough
# that compiling, not the steady speed being measured, is their cost. Streams (length unknown) are measured.
AUTO_MEASURED = 2
AUTO_MIN_IMAGES = 16 * AUTO_MEASURED
AUTO_MIN_PASSES = 8192
_timer = time.perf_counter  # tests stub it to force each outcome of "auto"


def reason(error):
    """An error of Keras or a backend on one line: its type and the first line of its own message, without
    Keras's "Exception encountered when calling" preamble, its arguments listing and its terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()
             and not line.strip().startswith(("Exception encountered", "Arguments received", "\u2022"))]
    line = lines[0] if lines else ""
    return f"{type(error).__name__}: {line if len(line) <= 200 else line[:197] + '...'}"


def sync_weights(copy, model):
    """`copy` (a clone of `model`) given the model's weights, then finalize_state() on each of its layers
    that holds weights, as Keras's own weight loading does: an adapted Normalization computes the mean and
    variance it uses there from the weights, and a clone would otherwise normalise with mean 0, variance 1."""
    copy.set_weights(model.get_weights())
    for ref in cam.all_layers(copy):
        if ref.layer.weights and hasattr(ref.layer, "finalize_state"):
            ref.layer.finalize_state()
    return copy


def bfloat16_copy(model):
    """A copy of `model` computing in bfloat16 (Keras "mixed_bfloat16": float32 weights, bfloat16
    maths); the scores are cast to float32 before the softmax. The user's model is never changed;
    the copy is cached, and its weights re-synced on every call."""
    def build():
        def clone(layer):
            config = layer.get_config()
            if "dtype" in config and not isinstance(layer, keras.layers.InputLayer):
                config["dtype"] = "mixed_bfloat16"
            return layer.__class__.from_config(config)

        try:
            return keras.models.clone_model(model, clone_function=clone, recursive=True)
        except Exception as e:  # a layer that cannot be rebuilt from its config in bfloat16
            raise ValueError(f"precision='bfloat16' could not make a bfloat16 copy of this model ({reason(e)}); "
                             "pass precision='float32'") from None

    return sync_weights(cam.derived(model, "bfloat16", build), model)


def _device():
    devices = keras.distribution.list_devices()
    return devices[0] if devices else "cpu"


def replicated_copy(model, devices):
    """A float32 copy of `model` whose weights are replicated on every device of a Keras DataParallel
    distribution, and that distribution: batches given to it run sharded over the devices."""
    distribution = keras.distribution.DataParallel(devices=list(devices))

    def build():
        with distribution.scope():
            try:
                return keras.models.clone_model(model, clone_function=lambda layer: layer.__class__.from_config(
                    layer.get_config()), recursive=True)
            except Exception as e:  # a layer that cannot be rebuilt from its config
                raise ValueError(f"devices= could not copy this model onto the devices ({reason(e)}); "
                                 "use one device") from None

    return sync_weights(cam.derived(model, ("replicated", tuple(devices)), build), model), distribution


def auto_precision(model, layers, images, batch_size=256, max_n=None):
    """What precision="auto" means for this model here: both precisions explain AUTO_MEASURED of the
    caller's images with the caller's layers and max_n (after a warm-up call that compiles), timed;
    bfloat16 is chosen only where it is faster and its maps agree with float32's (Pearson r >=
    AUTO_AGREEMENT on every map) with the same top classes. Measured once per model, device, backend,
    input shape, layers and max_n in this process; returns {"choice", "images_per_s": {precision:
    speed}, "min_pearson_r", "top_class_equal"}."""
    images = np.asarray(images, dtype=np.float32)[:AUTO_MEASURED]
    max_n = check_max_n(max_n)
    paths = tuple(cam.find_layer(model, layer).path for layer in layers)
    key = ("auto_precision", _device(), keras.backend.backend(), images.shape[1:], paths, max_n)

    def measure():
        speed, maps, probs = {}, {}, {}
        for precision in ("float32", "bfloat16"):
            try:
                score_cam_layers(model, images, layers, batch_size=batch_size, max_n=max_n,
                                 precision=precision)  # compiles
                start = _timer()
                maps[precision], probs[precision] = score_cam_layers(model, images, layers, batch_size=batch_size,
                                                                     max_n=max_n, precision=precision)
                speed[precision] = len(images) / max(_timer() - start, 1e-9)
            except ValueError:  # no bfloat16 copy of this model, or one that does not run in bfloat16
                return {"choice": "float32", "images_per_s": speed, "min_pearson_r": None, "top_class_equal": None}
        r = min(float(cam.pearson(maps["float32"][k], maps["bfloat16"][k]).min()) for k in maps["float32"])
        same = bool((probs["float32"].argmax(1) == probs["bfloat16"].argmax(1)).all())
        faster = speed["bfloat16"] > speed["float32"]
        return {"choice": "bfloat16" if faster and same and r >= AUTO_AGREEMENT else "float32",
                "images_per_s": speed, "min_pearson_r": r, "top_class_equal": same}

    return cam.derived(model, key, measure)


def resolve_precision(precision, model=None, layers=None, images=None, batch_size=256, passes=None, max_n=None):
    """'float32' or 'bfloat16' for a precision option. "auto" is auto_precision's measured choice for
    a call on `images` of `passes` masked passes (None: a stream, of unknown length, `images` its first
    batch), and float32 when there are no images to measure on, or a call of fewer than AUTO_MIN_IMAGES
    images or AUTO_MIN_PASSES passes."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision != "auto":
        return precision
    if model is None or images is None or len(images) == 0:
        return "float32"
    if passes is not None and (len(images) < AUTO_MIN_IMAGES or passes < AUTO_MIN_PASSES):
        return "float32"
    return auto_precision(model, layers, images, batch_size, max_n)["choice"]


# ---------------------------------------------------------------- the compiled core
#
# Score-CAM costs one forward pass per (image, channel) pair plus one activation pass per image; the
# fast path keeps the network busy with full batches of masked images and does the rest in the graph:
#   1. the explainable graph (cam.explainable) runs once per chunk of images;
#   2. the (image, channel) pairs whose channel varies are queued per layer, across chunks and input
#      batches, and consumed `batch_size` at a time by MaskedScores, one compiled graph that upsamples
#      each pair's low-resolution channel, min-max normalises it, masks its image, runs the network and
#      picks the target probability; only the low-resolution channel, the few distinct images and
#      two int32 indices cross from the host, never a batch of masks;
#   3. pairs are scored in the order they were queued, so chunks finish in order: a chunk is finished
#      once every layer has scored as many pairs as had been queued when the chunk was added (the one
#      completion rule); its map is ReLU(upsample(sum_k w_k A_k)), min-max normalised, and an input
#      batch comes out with its last chunk.
# Everything is keras.ops, so the graph runs wherever the backend puts it (the GPU when there is one).
# Only full batches run until the input ends; the tail is cut into power-of-two batches (padded to at
# least 16), so a compiler that specialises on shapes (XLA, JAX) compiles a handful of programs.

_TAIL_MIN = 16
# A masked batch is capped at cam.PIXEL_BUDGET pixels (see there).


class MaskedScores(keras.Model):
    """One compiled step of Score-CAM: for P (image, channel) pairs, the probability of the target
    class on image * mask, the mask being the pair's channel upsampled bilinearly to the input size
    and min-max normalised; 0 for a constant channel (the reference skips those).

    Inputs: images (U, H, W, C) float32, the distinct images of the pairs; acts (P, h, w) float32,
    each pair's channel at the layer's resolution; index (P,) int32, the pair's row in images;
    target (P,) int32, the class to score. Output: (P,) float32. `net` is cam.explainable(model).
    """

    def __init__(self, net, size, **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.size = tuple(int(s) for s in size)

    def call(self, inputs):
        ops = keras.ops
        images, acts, index, target = inputs
        up = ops.image.resize(ops.expand_dims(acts, -1), self.size, interpolation="bilinear")
        low = ops.min(up, axis=(1, 2, 3), keepdims=True)
        span = ops.max(up, axis=(1, 2, 3), keepdims=True) - low
        varies = span > 0
        masks = ops.where(varies, (up - low) / ops.where(varies, span, ops.ones_like(span)), ops.zeros_like(up))
        probs = self.net(ops.take(images, index, axis=0) * masks, training=False)[-1]
        scores = ops.take_along_axis(probs, ops.expand_dims(target, -1), axis=1)[:, 0]
        return ops.where(ops.reshape(varies, (-1,)), scores, ops.zeros_like(scores))


def _tail_sizes(count, batch_size, multiple=1):
    """(pairs taken, batch size run) for `count` leftover pairs: power-of-two batches, the last one
    padded up to _TAIL_MIN, so shape-specialising compilers see few distinct shapes; every run a
    multiple of `multiple` (the devices a batch is sharded over)."""
    sizes = []
    while count > 0:
        if count >= batch_size:
            sizes.append((batch_size, batch_size))
        elif count >= _TAIL_MIN:
            sizes.append((1 << (count.bit_length() - 1),) * 2)
        else:
            sizes.append((count, min(_TAIL_MIN, batch_size)))
        count -= sizes[-1][0]
    return [(take, -(-run // multiple) * multiple) for take, run in sizes]


# A chunk of images in flight: `out` is its input batch's (maps, probabilities), `rows` its rows there;
# pairs[layer] = (image, channel) index arrays, image-major; ends[layer] = pairs queued up to and
# including this chunk's; `last`: the batch's last chunk.
_Chunk = collections.namedtuple("_Chunk", "out rows x acts targets pairs ends last")


class _Explainer:
    """Streams (images, class_index) batches through the explainable graph and the masked-scores graph."""

    def __init__(self, model, layers, batch_size, max_n, precision, chunk=None, devices=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an int of at least 1, got {batch_size!r}")
        self.devices = runtime.resolve_devices(devices)
        if batch_size % len(self.devices):
            raise ValueError(f"batch_size {batch_size} does not divide evenly over {len(self.devices)} devices; "
                             f"pass a multiple of {len(self.devices)}")
        if len(self.devices) > 1 and precision == "bfloat16":
            raise ValueError("devices= runs in float32; pass precision='float32' (or 'auto')")
        max_n = check_max_n(max_n)
        refs = {ref.path: ref for ref in (cam.find_layer(model, layer) for layer in layers)}
        self.names = ["/".join(path) for path in refs]
        self.precision = precision
        self.distribution = None
        if len(self.devices) > 1:
            self.net, self.distribution = replicated_copy(model, self.devices)
        else:
            self.net = bfloat16_copy(model) if precision == "bfloat16" else model
        net_refs = [cam.at_path(self.net, path) for path in refs]
        self.tapped = cam.explainable_cached(self.net, net_refs)
        self.classes = cam.num_classes(model)
        self.model = model
        self.batch_size = int(batch_size)
        self.max_n = max_n
        per_image = max(int(t.shape[-1]) for t in self.tapped.outputs[:-2])
        self.per_image = min(per_image, self.max_n or per_image)
        self.chunk_given = bool(chunk)
        self.chunk = int(chunk) if chunk else max(1, 4 * self.batch_size // self.per_image)
        self.size = None  # the images' (H, W): one per explainer
        self.queue = {name: collections.deque() for name in self.names}  # [chunk, pairs taken] in queue order
        self.queued = dict.fromkeys(self.names, 0)  # pairs queued, ever
        self.scored = dict.fromkeys(self.names, 0)  # pairs scored, ever
        self.scores = {name: collections.deque() for name in self.names}  # scores not yet used, in order
        self.in_flight = collections.deque()

    def explain(self, parts):
        """Yield (maps {layer: (n, H, W)}, probabilities (n, C)) for each (images, class_index)."""
        for images, class_index in parts:
            images = cam.check_images(self.model, images)
            if self.size is None:
                self.size = images.shape[1:3]
                self._fit_batch()
            elif images.shape[1:3] != self.size and len(images):
                raise ValueError(f"all images of one call must share a size: {self.size} and {images.shape[1:3]}")
            n = len(images)
            if class_index is not None:  # checked before any work: ints, one for all or one per image, in range
                class_index = cam.target_classes(class_index, np.zeros((n, self.classes), np.float32))
            out = ({name: np.zeros((n,) + tuple(images.shape[1:3]), np.float32) for name in self.names},
                   np.zeros((n, self.classes), np.float32))
            for start in range(0, max(n, 1), self.chunk):
                rows = slice(start, min(n, start + self.chunk))
                classes = class_index if np.ndim(class_index) == 0 else np.asarray(class_index)[rows]
                self._add(out, rows, images[rows], classes, last=rows.stop >= n)
                for name in self.names:
                    while self.queued[name] - self.scored[name] >= self.batch_size:
                        self._score(name, self.batch_size, self.batch_size)
                yield from self._finished()
        for name in self.names:
            for take, run in _tail_sizes(self.queued[name] - self.scored[name], self.batch_size, len(self.devices)):
                self._score(name, take, run)
        yield from self._finished()

    def _fit_batch(self):
        """batch_size (and the chunk it sets) lowered to cam.PIXEL_BUDGET pixels a masked batch for the images'
        size, kept a multiple of the devices; the maps do not change, only how many pictures a step runs."""
        k = len(self.devices)
        fits = max(k, cam.PIXEL_BUDGET // int(np.prod(self.size)) // k * k)
        if fits < self.batch_size:
            self.batch_size = fits
            if not self.chunk_given:
                self.chunk = max(1, 4 * fits // self.per_image)

    def _add(self, out, rows, x, classes, last):
        acts, pairs, ends, targets = {}, {}, {}, np.zeros(0, np.int32)
        if len(x):
            try:
                *layer_acts, _, probs = self.tapped.predict_on_batch(x)
            except Exception as e:  # maths that will not run in bfloat16 (a TensorFlow op on a float32 constant)
                if self.precision != "bfloat16":
                    raise
                raise ValueError(f"this model does not run in bfloat16 ({reason(e)}); "
                                 "pass precision='float32'") from None
            probs = np.asarray(probs, dtype=np.float32)
            targets = cam.target_classes(classes, probs).astype(np.int32)
            out[1][rows] = probs
            for name, a in zip(self.names, layer_acts):
                a = np.nan_to_num(np.asarray(a, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
                flat = a.reshape(len(a), -1, a.shape[-1])
                chosen = flat.max(axis=1) > flat.min(axis=1)  # constant channels get weight 0
                if self.max_n:
                    keep = np.zeros_like(chosen)
                    np.put_along_axis(keep, select_channels(a, self.max_n), True, axis=1)
                    chosen &= keep
                acts[name], pairs[name] = a, np.nonzero(chosen)
        for name in self.names:
            pairs.setdefault(name, (np.zeros(0, np.int64),) * 2)
            self.queued[name] += len(pairs[name][0])
            ends[name] = self.queued[name]
        chunk = _Chunk(out, rows, x, acts, targets, pairs, ends, last)
        for name in self.names:
            if len(pairs[name][0]):
                self.queue[name].append([chunk, 0])
        self.in_flight.append(chunk)

    def _score(self, name, take, run):
        """Score the next `take` queued pairs of layer `name` in one batch of `run` >= take."""
        pieces, need, queue = [], take, self.queue[name]
        while need:
            entry = queue[0]
            chunk, pos = entry
            img, ch = chunk.pairs[name]
            n = min(need, len(img) - pos)
            pieces.append((chunk, img[pos:pos + n], ch[pos:pos + n]))
            entry[1] += n
            need -= n
            if entry[1] == len(img):
                queue.popleft()
        images, acts, index, target, rows = [], [], [], [], 0
        for chunk, img, ch in pieces:
            lo, hi = int(img[0]), int(img[-1]) + 1
            images.append(chunk.x[lo:hi])
            index.append(img - lo + rows)
            rows += hi - lo
            acts.append(chunk.acts[name][img, :, :, ch])
            target.append(chunk.targets[img])
        distinct = 1 << (rows - 1).bit_length()  # padded to a power of two: few distinct shapes
        x = np.zeros((distinct,) + images[0].shape[1:], dtype=np.float32)
        np.concatenate(images, out=x[:rows])
        a = np.zeros((run,) + acts[0].shape[1:], dtype=np.float32)
        np.concatenate(acts, out=a[:take])
        idx, tgt = np.zeros(run, dtype=np.int32), np.zeros(run, dtype=np.int32)
        np.concatenate(index, out=idx[:take], casting="unsafe")
        np.concatenate(target, out=tgt[:take])
        scorer = cam.derived(self.net, ("masked_scores", tuple(self.size)),
                             lambda: MaskedScores(cam.explainable_cached(self.net), self.size))
        if self.distribution is None:
            scores = scorer.predict_on_batch((x, a, idx, tgt))
        else:  # the pairs sharded over the devices, the few distinct images on every device
            with self.distribution.scope():
                shard = lambda v: keras.distribution.distribute_tensor(  # noqa: E731
                    v, self.distribution.get_data_layout(v.shape))
                whole = keras.distribution.TensorLayout([None] * x.ndim, self.distribution.device_mesh)
                scores = scorer.predict_on_batch((keras.distribution.distribute_tensor(x, whole), shard(a),
                                                  shard(idx), shard(tgt)))
        self.scores[name].append(np.asarray(scores, dtype=np.float32)[:take])
        self.scored[name] += take

    def _finished(self):
        """The input batches whose chunks are all finished, in order (the completion rule above)."""
        while self.in_flight and all(self.scored[n] >= self.in_flight[0].ends[n] for n in self.names):
            chunk = self.in_flight.popleft()
            self._finish(chunk)
            if chunk.last:
                yield chunk.out

    def _finish(self, chunk):
        for name in self.names:
            img, ch = chunk.pairs[name]
            if not len(chunk.x):
                continue
            a = chunk.acts[name]
            weights = np.zeros((len(a), a.shape[-1]), dtype=np.float32)
            weights[img, ch] = self._take_scores(name, len(img))
            chunk.out[0][name][chunk.rows] = cam.finish_maps(cam.weighted_sum(a, weights), self.size,
                                                             relu_first=False)

    def _take_scores(self, name, count):
        """The next `count` scores of layer `name`, in the order their pairs were queued."""
        taken, pending = [], self.scores[name]
        while count:
            first = pending[0]
            taken.append(first[:count])
            if len(first) > count:
                pending[0] = first[count:]
            else:
                pending.popleft()
            count -= len(taken[-1])
        return np.concatenate(taken) if taken else np.zeros(0, np.float32)


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


def _parts(batches, class_index):
    """(images, class_index) for each item of `batches`: an array of images, or a tuple (images,
    labels) such as a labelled tf.data dataset yields, whose labels (label_classes) are the classes when
    class_index == "labels" (and are otherwise ignored)."""
    for item in batches:
        if isinstance(item, (tuple, list)) and len(item) == 2 and np.ndim(item[0]) == 4:
            images, labels = item
        else:
            images, labels = item, None
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
    images = first[0] if isinstance(first, (tuple, list)) and len(first) == 2 and np.ndim(first[0]) == 4 else first

    def again():
        yield first
        yield from iterator
    return images, again()


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
    if len(runtime.resolve_devices(devices)) > 1:
        precision = "float32" if precision == "auto" else precision
    if precision == "auto":
        first, batches = _first_batch(batches)
        precision = resolve_precision(precision, model, wanted, None if first is None else
                                      cam.check_images(model, first), batch_size, max_n=max_n)
    explainer = _Explainer(model, wanted, batch_size, max_n, resolve_precision(precision), devices=devices)
    results = explainer.explain(_parts(batches, class_index))
    return results if layers is not None else (maps[explainer.names[0]] for maps, _ in results)


def score_cam_layers(model, images, layers=None, class_index=None, batch_size=256, max_n=None, chunk=None,
                     precision="auto", devices=None):
    """Score-CAM maps of several layers from one activation pass: (maps {layer path: (N, H, W)
    float32 in [0, 1]}, the probabilities (N, C) that were explained). layers: names, paths or
    Layers (None: the last conv layer). Images go in chunks so memory stays bounded whatever N is."""
    layers = [None] if layers is None else list(layers)
    images = cam.check_images(model, images)
    max_n = check_max_n(max_n)
    if len(runtime.resolve_devices(devices)) > 1:
        precision = "float32" if precision == "auto" else precision
    if precision == "auto":
        channels = sum(cam.explainable_cached(model, [cam.find_layer(model, layer)]).outputs[0].shape[-1]
                       for layer in layers)
        passes = len(images) * min(channels, max_n * len(layers) if max_n else channels)
        precision = resolve_precision(precision, model, layers, images, batch_size, passes, max_n)
    explainer = _Explainer(model, layers, batch_size, max_n, resolve_precision(precision), chunk, devices)
    return next(iter(explainer.explain([(images, class_index)])))


@cam.register("scorecam", "Score-CAM")
def score_cam(model, images, layer=None, class_index=None, batch_size=256, max_n=None, precision="auto",
              devices=None):
    """Score-CAM maps (N, H, W) float32 in [0, 1] for images (N, H, W, C) as the model takes them.

    layer: a name, path or Layer (None: the last conv layer), see cam.find_layer. class_index: None
    explains each image's predicted class; an int or N ints choose classes. max_n: Faster-Score-CAM,
    only the max_n channels of largest spatial standard deviation (None or 0: every channel).
    batch_size: masked images a forward pass, at most cam.PIXEL_BUDGET pixels in all (fewer, for pictures
    larger than 224 x 224, so memory stays bounded). precision: "float32", "bfloat16" (a bfloat16 copy
    of the model does the forward passes) or "auto" (measured: auto_precision).
    devices: None (one device), a count, "all" or device names: the masked batches are sharded over
    them with Keras's DataParallel distribution (JAX backend; batch_size a multiple of their number).
    """
    maps, _ = score_cam_layers(model, images, [layer], class_index, batch_size, max_n, precision=precision,
                               devices=devices)
    return next(iter(maps.values()))


@cam.register("faster_scorecam", "Faster-Score-CAM (16 ch.)")
def faster_score_cam(model, images, layer=None, class_index=None, batch_size=256, max_n=16, precision="auto"):
    """Faster-Score-CAM (Desai & Ramaswamy's channel selection as in the Score-CAM authors' repository):
    Score-CAM on the max_n channels of largest spatial standard deviation."""
    return score_cam(model, images, layer, class_index, batch_size, max_n, precision)


# ---------------------------------------------------------------- the command line

def demo_image():
    """scikit-image's bundled cat photo, so the demo needs no download."""
    from skimage import data

    return np.ascontiguousarray(data.chelsea()), "chelsea (skimage.data)"


def parse_class(value, class_names):
    if value is None:
        return None
    if value in class_names:
        return class_names.index(value)
    if value.lstrip("-").isdecimal() and 0 <= int(value) < len(class_names):
        return int(value)
    raise ValueError(f"unknown --class {value!r}; classes: {', '.join(class_names)}")


FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg")


def output_names(sources, suffix):
    """Names of the outputs of pictures written into one folder, in order: <stem>_<suffix>.png, the whole
    file name (a.jpg: a_jpg_<suffix>.png) where stems clash, and a counter (a_jpg_2_<suffix>.png) where
    names still clash, so no output replaces another (names compared case-blind, as some file systems do)."""
    stems = collections.Counter(Path(source).stem.casefold() for source in sources)
    names, taken = [], set()
    for source in map(Path, sources):
        base = source.stem if stems[source.stem.casefold()] == 1 else source.name.replace(".", "_")
        name, count = f"{base}_{suffix}.png", 1
        while name.casefold() in taken:
            count += 1
            name = f"{base}_{count}_{suffix}.png"
        taken.add(name.casefold())
        names.append(name)
    return names


def output_paths(out, sources, suffix):
    """Where each picture's figure goes: --out itself for one picture where it names a PNG or JPEG
    file, else the folder --out, with output_names."""
    out = Path(out)
    if len(sources) == 1 and out.suffix.lower() in FIGURE_SUFFIXES:
        return [out]
    return [out / name for name in output_names(sources, suffix)]


def method_max_n(args):
    """The channels Score-CAM uses for --method and --max-n: --max-n, else 16 for faster-scorecam;
    None for every channel (and for the gradient methods, which take no max_n)."""
    function = cam.METHODS[args.method].function
    if function not in (score_cam, faster_score_cam):
        return None
    return check_max_n(args.max_n if args.max_n is not None else (16 if function is faster_score_cam else None))


def method_label(args):
    """The method's label in figures, from the channels actually used: "Faster-Score-CAM (64 ch.)" for
    --max-n 64, "Score-CAM" for faster-scorecam with --max-n 0."""
    if cam.METHODS[args.method].function not in (score_cam, faster_score_cam):
        return cam.METHODS[args.method].label
    max_n = method_max_n(args)
    return f"Faster-Score-CAM ({max_n} ch.)" if max_n else "Score-CAM"


def output_suffix(args):
    """The end of an output's name: the method, so that runs of several methods into one --out keep
    each other's figures (scorecam, fasterscorecam, gradcam, ...; "_layers" added for --all-layers)."""
    return args.method.replace("_", "") + ("_layers" if args.all_layers else "")


def model_input(model, image):
    """A picture (H, W, 3) uint8 as the model's input (1, H', W', C) float32: resized to the model's
    size (kept where the model takes any size), greyscale for a one-channel model."""
    import cv2

    from data.images import resize

    height, width, channels = cam.input_spec(model)
    x = resize(image, (height or image.shape[0], width or image.shape[1]))
    if channels == 1:
        x = cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY)[..., None]
    elif channels != 3:
        raise ValueError(f"the model takes {channels}-channel images; the command line reads RGB pictures "
                         "(use the Python API)")
    return x[None].astype(np.float32)


PREPROCESSING = ("none", "unit", "tf", "torch", "caffe")


def preprocess(x, mode):
    """Pixels (N, H, W, C) in [0, 255] as a model trained on preprocessed pictures takes them (--preprocess):
    "none" as they are (preprocessing inside the model), "unit" x / 255, and keras.applications'
    ImageNet modes: "tf" [-1, 1], "torch" [0, 1] less the ImageNet mean over its std, "caffe" BGR less
    the ImageNet mean. Score-CAM then masks the preprocessed input, as the authors' code does."""
    if mode == "none":
        return x
    if mode == "unit":
        return x / np.float32(255)
    if mode in ("torch", "caffe") and x.shape[-1] != 3:
        raise ValueError(f"--preprocess {mode} is for RGB models; this one takes {x.shape[-1]}-channel images "
                         "(use --preprocess none, unit or tf)")
    return keras.applications.imagenet_utils.preprocess_input(np.array(x, np.float32), mode=mode)


def explain_maps(model, x, layers, target, args):
    """({layer: maps}, probabilities) of the chosen method for the layers."""
    method = cam.METHODS[args.method]
    if method.function in (score_cam, faster_score_cam):
        return score_cam_layers(model, x, layers, target, args.batch_size, method_max_n(args),
                                precision=args.precision)
    maps = {cam.path_name(cam.find_layer(model, layer)): method.function(model, x, layer, target)
            for layer in layers}
    return maps, cam.predict_probabilities(model, x)


def explain_file(model, names, display, image, source, args, path):
    """Compute and draw the figure for one picture into `path` (output_paths)."""
    from plots import layer_grid_figure, overlay, single_layer_figure

    x = model_input(model, image)
    shown = np.clip(x[0], 0, 255).astype(np.uint8)
    shown = np.repeat(shown, 3, axis=-1) if shown.shape[-1] == 1 else shown
    target = parse_class(args.class_name, names)
    layers = cam.conv_layers(model) if args.all_layers else [args.layer]
    maps, probs = explain_maps(model, preprocess(x, args.preprocess), layers, target, args)
    probs = probs[0]
    pred = int(probs.argmax())
    parent = Path(source).parent.name
    true = display[names.index(parent)] if parent in names else None
    label = method_label(args)
    if args.all_layers:
        title = f"{display[pred]} - {true or '?'} : {probs[pred]:.2f} ({label}"
        title += f", map for {display[target]})" if target is not None else ")"
        layer_grid_figure(shown, maps, title, path, label=label)
    else:
        (layer, heat), = maps.items()
        title = f"predicted {display[pred]} ({probs[pred]:.2f})" + (f", true {true}" if true else "")
        if target is not None:
            title += f"; map for {display[target]} ({probs[target]:.2f})"
        single_layer_figure(image, shown, heat[0], overlay(image, heat[0]), f"{title}\n{label}, {layer}", path,
                            label=label)


def _folder_files(folder, out, suffix):
    """Every non-hidden file under `folder` (sorted, recursive), leaving out anything under `out`,
    each with the overlay path it gets: OUT/<same subfolders>/<stem>_<suffix>.png (output_names)."""
    out = out.resolve()
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.resolve() == out or out in path.resolve().parents:
            continue  # earlier outputs written inside the folder are not inputs
        files.append(path)
    by_folder = collections.defaultdict(list)
    for path in files:
        by_folder[path.parent].append(path)
    dest = {}
    for parent, paths in by_folder.items():
        for path, name in zip(paths, output_names(paths, suffix)):
            dest[path] = out / parent.relative_to(folder) / name
    return files, dest


def explain_folder(model, names, args):
    """One overlay PNG per picture under args.folder, streamed: pictures are read, explained and
    written a batch at a time. Returns (written, skipped), skipped being the unreadable files' errors."""
    from PIL import Image
    from tqdm import tqdm

    from atomic import atomic_path
    from data.images import ImageError, read_image
    from plots import overlay

    folder = Path(args.folder)
    if not folder.is_dir():
        raise ValueError(f"folder not found: {folder}")
    files, dest = _folder_files(folder, Path(args.out), output_suffix(args))
    target = parse_class(args.class_name, names)
    height, width, _ = cam.input_spec(model)
    any_size = height is None or width is None  # then each picture is explained at its own size, one at a time
    read_batch = 1 if any_size else args.read_batch
    if any_size and args.devices is not None:
        raise ValueError("--devices needs a model with a fixed input size (this one explains each picture at its "
                         "own size, one at a time)")
    skipped, in_flight = [], collections.deque()
    bar = tqdm(total=len(files), desc=method_label(args), unit="img", mininterval=1)

    def batches():
        paths, pictures = [], []
        for n, path in enumerate(files, 1):
            try:
                pictures.append(read_image(path))
                paths.append(path)
            except ImageError as e:
                skipped.append(str(e))
                bar.update(1)
            if paths and (len(paths) == read_batch or n == len(files)):
                in_flight.append((paths, pictures))  # the originals of the batches in flight, no more
                yield preprocess(np.concatenate([model_input(model, p) for p in pictures]), args.preprocess)
                paths, pictures = [], []

    method = cam.METHODS[args.method].function
    if any_size:
        results = (explain_maps(model, x, [args.layer], target, args)[0].popitem()[1] for x in batches())
    elif method in (score_cam, faster_score_cam):  # "auto" measures a stream, unless the folder is a small call
        precision = "float32" if args.precision == "auto" and len(files) < AUTO_MIN_IMAGES else args.precision
        results = score_cam_stream(model, batches(), args.layer, target, args.batch_size, method_max_n(args),
                                   precision, devices=args.devices)
    else:
        results = (method(model, x, args.layer, target) for x in batches())
    written = 0
    try:
        for maps in results:
            for path, picture, heat in zip(*in_flight.popleft(), maps):
                with atomic_path(dest[path]) as tmp:
                    Image.fromarray(overlay(picture, heat)).save(tmp, format="PNG")
                written += 1
                bar.update(1)
    finally:
        bar.close()
    return written, skipped


def method_name(value):
    """--method: a registry name, with '-' for '_' (faster-scorecam)."""
    name = value.replace("-", "_")
    if name not in cam.METHODS or cam.METHODS[name].floor:
        choices = [n.replace("_", "-") for n, m in cam.METHODS.items() if not m.floor]
        raise argparse.ArgumentTypeError(f"unknown method {value!r}; choose from {', '.join(choices)}")
    return name


def main(argv=None):
    import gradcam  # noqa: F401  (registers the gradient methods for --method)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (none: scikit-image's cat, a demo)")
    p.add_argument("--folder", metavar="DIR", help="explain every picture under DIR (recursively): one overlay "
                   "PNG each in --out, same subfolders; unreadable files are skipped and counted")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="a .keras model (default: the shipped CIFAR-10 one)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--layer", help="layer to explain: a name, or a path outer/inner inside nested models; "
                       "any layer with a 4-D output (default: the last conv layer)")
    group.add_argument("--all-layers", action="store_true", help="one heatmap per conv layer, in one figure")
    p.add_argument("--method", type=method_name, default="scorecam",
                   help="scorecam (default), faster-scorecam, gradcam, gradcampp or layercam")
    p.add_argument("--class", dest="class_name", metavar="NAME_OR_INDEX", help="class to explain (default: predicted)")
    p.add_argument("--out", default="out", help="output PNG or JPEG (one image) or folder (default: %(default)s/)")
    p.add_argument("--batch-size", type=int, default=256, help="masked images per forward pass (fewer "
                   "for pictures over 224 x 224: at most 256 x 224 x 224 pixels a pass)")
    p.add_argument("--max-n", type=int, help="Faster-Score-CAM: use only the N most varying channels")
    p.add_argument("--preprocess", choices=PREPROCESSING, default="none",
                   help="how the model takes pixels, where it was trained on preprocessed pictures without that "
                   "step inside it: none (default: [0, 255], or preprocessing inside the model), unit ([0, 1]), "
                   "or keras.applications' ImageNet modes tf ([-1, 1]), torch, caffe")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="forward passes in float32 or bfloat16 (default: %(default)s, measured on this machine)")
    p.add_argument("--read-batch", type=int, default=16, help="--folder: pictures read and explained together")
    p.add_argument("--devices", help="--folder with Score-CAM: shard the masked batches over N devices, 'all', "
                   "or names cpu:0,cpu:1 (KERAS_BACKEND=jax; --batch-size a multiple of N)")
    args = p.parse_args(argv)
    if args.folder and (args.images or args.all_layers):
        p.error("--folder takes no IMAGE arguments and no --all-layers")
    if args.batch_size < 1 or args.read_batch < 1:
        p.error("--batch-size and --read-batch must be at least 1")
    if args.max_n is not None and args.max_n < 0:
        p.error("--max-n must be at least 0 (0: every channel)")
    from data.images import ImageError, read_image
    from model import load_model

    try:
        model, names, display = load_model(args.model)
        parse_class(args.class_name, names)
        cam.find_layer(model, args.layer)
        # the layers' graph built once here: a layer without a 4-D output is one error, not one per picture
        cam.explainable_cached(model, cam.conv_layers(model) if args.all_layers else
                               [cam.find_layer(model, args.layer)])
        preprocess(np.zeros((1, 1, 1, cam.input_spec(model)[2]), np.float32), args.preprocess)
        if args.devices is not None:
            if not args.folder:
                raise ValueError("--devices works with --folder (many pictures); one picture runs on one device")
            count = len(runtime.resolve_devices(args.devices))
            if args.batch_size % count:
                raise ValueError(f"--batch-size {args.batch_size} does not divide evenly over {count} devices; "
                                 f"pass a multiple of {count}")
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.folder:
        try:
            written, skipped = explain_folder(model, names, args)
        except (ValueError, OSError) as e:
            sys.exit(f"error: {e}")
        for message in skipped:
            print(f"skipped: {message}", file=sys.stderr)
        print(f"{args.folder}: wrote {written} overlay(s) to {args.out}; skipped {len(skipped)} unreadable file(s)")
        sys.exit(1 if skipped else 0)
    failed = 0
    sources = args.images or [None]
    paths = output_paths(args.out, [source or "chelsea.png" for source in sources], output_suffix(args))
    for source, path in zip(sources, paths):
        try:
            image, label = (demo_image() if source is None else (read_image(source), source))
            explain_file(model, names, display, image, source or "chelsea.png", args, path)
            print(f"{label}: wrote {path}")
        except (ImageError, ValueError, OSError) as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
