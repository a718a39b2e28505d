"""Score-CAM (Wang et al. 2020) for Keras models: a batched, backend-neutral core, overlays, and a CLI.

    python scorecam.py                          # demo: the shipped CIFAR-10 model on scikit-image's cat
    python scorecam.py IMAGE [IMAGE ...] [--model models/cifar10.keras] [--layer NAME | --all-layers]
                       [--class NAME_OR_INDEX] [--out PATH] [--max-n N] [--precision auto|float32|bfloat16]
    python scorecam.py --folder DIR --out OUTDIR [--layer NAME] ...   # one overlay PNG per picture, streamed

For each channel k of a conv layer's activation A, A_k is upsampled bilinearly to the input size,
min-max normalised to a mask M_k, and weighted by the model's probability of the target class on
x * M_k; the map is ReLU(sum_k w_k A_k) min-max normalised to [0, 1]. This follows the authors'
reference code. Masks are built inside one compiled graph with the forward pass, and the masked
inputs of consecutive images share full batches (see "the compiled core" below; bench.py measures it).
"""
import argparse
import collections
import sys
from pathlib import Path

import cv2
import runtime  # noqa: F401  (before keras: quiet TensorFlow start-up)
import keras
import numpy as np

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "cifar10.keras"
CONV_TYPES = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)


def conv_layer(model, name=None):
    """The named conv layer, or the last Conv2D-type layer when name is None; ValueError otherwise."""
    convs = [layer for layer in model.layers if isinstance(layer, CONV_TYPES)]
    if not convs:
        raise ValueError("the model has no convolutional layer to explain")
    if name is None:
        return convs[-1]
    try:
        layer = model.get_layer(name)
    except ValueError:
        raise ValueError(f"no layer named {name!r}; conv layers: {', '.join(c.name for c in convs)}") from None
    if not isinstance(layer, CONV_TYPES):
        raise ValueError(f"layer {name!r} is a {type(layer).__name__}, not a convolutional layer; "
                         f"conv layers: {', '.join(c.name for c in convs)}")
    return layer


def activation_model(model, layer_names):
    """A model giving every named layer's activation and the predictions from one forward pass."""
    outputs = [model.get_layer(n).output for n in layer_names] + [model.output]
    return keras.Model(model.inputs, outputs)


def check_images(model, images):
    """Images as float32 (N, H, W, 3) at the model's input size; a clear ValueError otherwise."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[None]
    size = tuple(model.input_shape[1:3])
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1:3] != size:
        raise ValueError(f"images must be (N, {size[0]}, {size[1]}, 3) RGB arrays in [0, 255], got {images.shape}")
    return images


def target_classes(class_index, probs):
    """Target class per image: predicted (None), one int for all, or one int per image."""
    n, num_classes = probs.shape
    if class_index is None:
        return probs.argmax(axis=1)
    targets = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (n,)) if np.ndim(class_index) == 0 \
        else np.asarray(class_index, dtype=np.int64)
    if targets.shape != (n,):
        raise ValueError(f"class_index must be an int or {n} ints, got {len(targets)}")
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(f"class index out of range 0..{num_classes - 1}")
    return targets


def normalise_maps(maps):
    """Min-max normalise each (H, W) map to [0, 1]; a constant map becomes all zeros, never NaN."""
    maps = np.asarray(maps, dtype=np.float32)
    flat = maps.reshape(len(maps), -1)
    low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    span = high - low
    out = np.where(span > 0, (flat - low) / np.where(span > 0, span, 1), 0)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).reshape(maps.shape).astype(np.float32)


def upsample(activations, size):
    """Bilinear (half-pixel, like PyTorch's align_corners=False) upsampling of (N, h, w, K) to size."""
    up = keras.ops.image.resize(activations, size, interpolation="bilinear")
    return np.asarray(keras.ops.convert_to_numpy(up), dtype=np.float32)


def select_channels(activations, max_n):
    """Faster-Score-CAM: indices (N, max_n) of the channels with the largest spatial standard deviation."""
    std = activations.reshape(len(activations), -1, activations.shape[-1]).std(axis=1)
    return np.argsort(-std, axis=1, kind="stable")[:, :max_n]


# ---------------------------------------------------------------- the compiled core
#
# Score-CAM costs one forward pass per (image, channel) pair plus one activation pass per image; the
# fast path keeps the network busy with full batches of masked images and does the rest in the graph:
#   1. the activation model runs once per chunk of images (a compiled Keras predict step);
#   2. the (image, channel) pairs whose channel varies are queued, across chunks and input batches,
#      and consumed `batch_size` at a time by MaskedScores, one compiled graph that upsamples each
#      pair's low-resolution channel, min-max normalises it, masks its image, runs the network and
#      picks the target probability; only the low-resolution channel, the few distinct images and
#      two int32 indices cross from the host, never a batch of masks;
#   3. a chunk's map is ReLU(upsample(sum_k w_k A_k)) (bilinear resizing is linear, so summing at the
#      layer's resolution first is the same map), min-max normalised.
# Everything is keras.ops, so the graph runs wherever the backend puts it (the GPU when there is one).
# Only full batches run until the input ends; the tail is cut into power-of-two batches (padded to at
# least 16), so a compiler that specialises on shapes (XLA, JAX) compiles a handful of programs.

PRECISIONS = ("auto", "float32", "bfloat16")
# What "auto" means. bfloat16 is used only where it was measured both faster than float32 and in
# agreement with it (bench.py measures both). On the 2-core Xeon (avx512_bf16, no AMX) it was
# slower than float32, and no GPU has been measured yet, so "auto" is float32 everywhere for now.
AUTO_PRECISION = "float32"
_TAIL_MIN = 16
_CACHE_MODELS = 4
_cache = collections.OrderedDict()  # id(model) -> (model, {key: derived model}), the most recent few


def _derived(model, key, build):
    """A model derived from `model` (activation model, compiled masked-scores graph, bfloat16 copy),
    built once and reused so that each is traced/compiled once, not on every call."""
    entry = _cache.get(id(model))
    if entry is None or entry[0] is not model:
        entry = _cache[id(model)] = (model, {})
    _cache.move_to_end(id(model))
    while len(_cache) > _CACHE_MODELS:
        _cache.popitem(last=False)
    if key not in entry[1]:
        entry[1][key] = build()
    return entry[1][key]


class MaskedScores(keras.Model):
    """One compiled step of Score-CAM: for P (image, channel) pairs, the probability of the target
    class on image * mask, the mask being the pair's channel upsampled bilinearly to the input size
    and min-max normalised; 0 for a constant channel (the reference skips those).

    Inputs: images (U, H, W, 3) float32, the distinct images of the pairs; acts (P, h, w) float32,
    each pair's channel at the layer's resolution; index (P,) int32, the pair's row in images;
    target (P,) int32, the class to score. Output: (P,) float32.
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
        probs = ops.cast(self.net(ops.take(images, index, axis=0) * masks, training=False), "float32")
        scores = ops.take_along_axis(probs, ops.expand_dims(target, -1), axis=1)[:, 0]
        return ops.where(ops.reshape(varies, (-1,)), scores, ops.zeros_like(scores))


def resolve_precision(precision):
    """'float32' or 'bfloat16' for a precision option ('auto' is AUTO_PRECISION)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return AUTO_PRECISION if precision == "auto" else precision


def bfloat16_copy(model):
    """A copy of `model` computing in bfloat16 (Keras "mixed_bfloat16": float32 weights, bfloat16
    maths) except its output layers, which keep their dtype so probabilities stay float32. The
    user's model is never changed; the copy is cached, and its weights re-synced on every call."""
    def build():
        keep = set()
        for tensor in model.outputs:
            history = getattr(tensor, "_keras_history", None)
            keep.add(history.operation.name if history else model.layers[-1].name)

        def clone(layer):
            config = layer.get_config()
            if layer.name not in keep and "dtype" in config:
                config["dtype"] = "mixed_bfloat16"
            return layer.__class__.from_config(config)

        try:
            return keras.models.clone_model(model, clone_function=clone, recursive=True)
        except Exception as e:  # subclassed models cannot be rebuilt from their config
            raise ValueError(f"precision='bfloat16' needs a Functional or Sequential model "
                             f"({type(e).__name__}: {e})") from None

    copy = _derived(model, "bfloat16", build)
    copy.set_weights(model.get_weights())
    return copy


def _forward_model(model, precision):
    return bfloat16_copy(model) if resolve_precision(precision) == "bfloat16" else model


def _tail_sizes(count, batch_size):
    """(pairs taken, batch size run) for `count` leftover pairs: power-of-two batches, the last one
    padded up to _TAIL_MIN, so shape-specialising compilers see few distinct shapes."""
    sizes = []
    while count > 0:
        if count >= batch_size:
            sizes.append((batch_size, batch_size))
        elif count >= _TAIL_MIN:
            sizes.append((1 << (count.bit_length() - 1),) * 2)
        else:
            sizes.append((count, min(_TAIL_MIN, batch_size)))
        count -= sizes[-1][0]
    return sizes


class _Chunk:
    """Images explained together: their activations, targets and weights until every pair is scored."""

    def __init__(self, part, start, x, acts, targets, channels):
        self.part, self.start, self.x, self.acts, self.targets = part, start, x, acts, targets
        self.weights = {name: np.zeros((len(x), a.shape[-1]), dtype=np.float32) for name, a in acts.items()}
        self.pairs = {}
        for name, a in acts.items():
            flat = a.reshape(len(a), -1, a.shape[-1])
            chosen = flat.max(axis=1) > flat.min(axis=1)  # constant channels get weight 0
            if channels is not None:
                keep = np.zeros_like(chosen)
                np.put_along_axis(keep, channels(a), True, axis=1)
                chosen &= keep
            self.pairs[name] = np.nonzero(chosen)  # image-major order
        self.left = sum(len(img) for img, _ in self.pairs.values())


class _Part:
    """One input batch: its output arrays, and how many of its chunks are still being scored."""

    def __init__(self, names, n, size, num_classes):
        self.maps = {name: np.zeros((n,) + size, dtype=np.float32) for name in names}
        self.maps[None] = np.zeros((n, num_classes), dtype=np.float32)
        self.chunks_left = 0
        self.queued = False  # every chunk handed to the scorer


class _Explainer:
    """Streams (images, class_index) parts through the activation model and the masked-scores graph."""

    def __init__(self, model, layers, batch_size, max_n, precision, chunk=None):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.net = _forward_model(model, precision)
        self.names = [conv_layer(model, name).name for name in (layers if layers is not None else [None])]
        self.names = list(dict.fromkeys(self.names))
        self.size = tuple(model.input_shape[1:3])
        self.num_classes = model.output_shape[-1]
        self.batch_size = int(batch_size)
        self.max_n = max_n if max_n and max_n > 0 else None
        self.acts_model = _derived(self.net, ("activations", tuple(self.names)),
                                   lambda: activation_model(self.net, self.names))
        self.scorer = _derived(self.net, ("masked_scores", self.size), lambda: MaskedScores(self.net, self.size))
        per_image = max(int(self.net.get_layer(n).output.shape[-1]) for n in self.names)
        per_image = min(per_image, self.max_n or per_image)
        self.chunk = int(chunk) if chunk else max(1, 4 * self.batch_size // per_image)
        self.queue = {name: collections.deque() for name in self.names}  # [chunk, img, ch, position]
        self.pending = {name: 0 for name in self.names}
        self.parts = collections.deque()

    def explain(self, parts):
        """Yield {layer: maps (n, H, W), None: probabilities (n, C)} for each (images, class_index)."""
        for images, class_index in parts:
            images = check_images(self.net, images)
            part = _Part(self.names, len(images), self.size, self.num_classes)
            self.parts.append(part)
            for start in range(0, len(images), self.chunk):
                classes = class_index if np.ndim(class_index) == 0 else \
                    np.asarray(class_index)[start:start + self.chunk]
                self._add_chunk(part, start, images[start:start + self.chunk], classes)
                for name in self.names:
                    while self.pending[name] >= self.batch_size:
                        self._score(name, self.batch_size, self.batch_size)
            part.queued = True
            yield from self._finished()
        for name in self.names:
            for take, run in _tail_sizes(self.pending[name], self.batch_size):
                self._score(name, take, run)
        yield from self._finished()

    def _finished(self):
        while self.parts and self.parts[0].queued and self.parts[0].chunks_left == 0:
            yield self.parts.popleft().maps

    def _add_chunk(self, part, start, x, classes):
        *acts, probs = self.acts_model.predict_on_batch(x)
        probs = np.asarray(probs, dtype=np.float32)
        targets = target_classes(classes, probs)
        part.maps[None][start:start + len(x)] = probs
        acts = {name: np.asarray(a, dtype=np.float32) for name, a in zip(self.names, acts)}
        channels = (lambda a: select_channels(a, self.max_n)) if self.max_n else None
        chunk = _Chunk(part, start, x, acts, targets.astype(np.int32), channels)
        part.chunks_left += 1
        if chunk.left == 0:
            self._finish(chunk)
        for name, (img, ch) in chunk.pairs.items():
            if len(img):
                self.queue[name].append([chunk, img, ch, 0])
                self.pending[name] += len(img)

    def _score(self, name, take, run):
        """Score the next `take` queued pairs of layer `name` in one batch of `run` >= take."""
        pieces, need, queue = [], take, self.queue[name]
        while need:
            entry = queue[0]
            chunk, img, ch, pos = entry
            n = min(need, len(img) - pos)
            pieces.append((chunk, img[pos:pos + n], ch[pos:pos + n]))
            entry[3] += n
            need -= n
            if entry[3] == len(img):
                queue.popleft()
        self.pending[name] -= take
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
        scores = np.asarray(self.scorer.predict_on_batch((x, a, idx, tgt)), dtype=np.float32)[:take]
        done = 0
        for chunk, img, ch in pieces:
            chunk.weights[name][img, ch] = scores[done:done + len(img)]
            done += len(img)
            chunk.left -= len(img)
            if chunk.left == 0:
                self._finish(chunk)

    def _finish(self, chunk):
        """The chunk's maps, from its weights; frees its activations."""
        part, rows = chunk.part, slice(chunk.start, chunk.start + len(chunk.x))
        for name, a in chunk.acts.items():
            low_res = np.einsum("nhwk,nk->nhw", a, chunk.weights[name])
            part.maps[name][rows] = normalise_maps(np.maximum(upsample(low_res[..., None], self.size)[..., 0], 0))
        chunk.acts = chunk.x = None
        part.chunks_left -= 1


def channel_weights(model, images, upsampled, targets, batch_size, channels=None):
    """w[i, k]: probability of class targets[i] for images[i] * mask_k, masks made from `upsampled`
    (N, H, W, K); constant channels get weight 0 and are never sent through the net. (score_cam
    passes the layer's low-resolution activations instead; this is the same graph at full size.)"""
    images = check_images(model, images)
    n, _, _, k = upsampled.shape
    chosen = np.asarray(upsampled).reshape(n, -1, k)
    chosen = chosen.max(axis=1) > chosen.min(axis=1)
    if channels is not None:
        keep = np.zeros_like(chosen)
        np.put_along_axis(keep, np.asarray(channels), True, axis=1)
        chosen &= keep
    img, ch = np.nonzero(chosen)
    scorer = _derived(model, ("masked_scores", tuple(model.input_shape[1:3])),
                      lambda: MaskedScores(model, model.input_shape[1:3]))
    weights = np.zeros((n, k), dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int32)
    for start in range(0, len(img), batch_size):
        i, c = img[start:start + batch_size], ch[start:start + batch_size]
        a = np.asarray(upsampled[i, :, :, c], dtype=np.float32)
        weights[i, c] = scorer.predict_on_batch((images, a, i.astype(np.int32), targets[i]))
    return weights


def _parts(batches, class_index):
    """(images, class_index) for each item of `batches`: an array of images, or a tuple (images,
    labels) such as a labelled tf.data dataset yields, whose labels are the classes when
    class_index == "labels" (and are otherwise ignored)."""
    for item in batches:
        if isinstance(item, (tuple, list)) and len(item) == 2 and np.ndim(item[0]) == 4:
            images, labels = item
        else:
            images, labels = item, None
        if isinstance(class_index, str) and class_index == "labels":
            if labels is None:
                raise ValueError('class_index="labels" needs (images, labels) batches')
            yield images, np.asarray(labels).reshape(-1)
        else:
            yield images, class_index


def score_cam_stream(model, batches, layer=None, class_index=None, batch_size=256, max_n=None,
                     precision="auto", layers=None):
    """Score-CAM over any iterable of image batches (a generator, a list, a tf.data dataset's
    .as_numpy_iterator()): an iterator giving, for each batch in order, its maps (n, H, W) float32
    in [0, 1] - or, when `layers` is given, {layer: maps, None: probabilities} as score_cam_layers.

    The maps are score_cam's on each batch, whatever the batch sizes, but the masked images of
    consecutive batches share forward passes, so small batches cost no more than large ones. A
    batch comes out once its last masked images have been through the network, i.e. up to about
    batch_size / K pictures after it. Memory holds the batches in flight and a few chunks, however
    long the stream. class_index: None (each image's predicted class), an int, or "labels" for
    (images, labels) batches. precision: "auto", "float32" or "bfloat16". Arguments are checked here,
    before the first batch is read.
    """
    explainer = _Explainer(model, layers if layers is not None else [layer], batch_size, max_n, precision)
    if isinstance(class_index, str) and class_index != "labels":
        raise ValueError(f'class_index must be None, an int or "labels", got {class_index!r}')
    maps = explainer.explain(_parts(batches, class_index))
    return maps if layers is not None else (m[explainer.names[0]] for m in maps)


def score_cam_layers(model, images, layers=None, class_index=None, batch_size=256, max_n=None, chunk=None,
                     precision="auto"):
    """Score-CAM maps of several conv layers from one activation pass: {layer: (N, H, W) float32 in [0, 1]}.

    Also returns the predicted probabilities (N, C) as the key None. Images go in chunks so memory
    stays bounded whatever N is.
    """
    explainer = _Explainer(model, layers, batch_size, max_n, precision, chunk)
    images = check_images(model, images)
    if np.ndim(class_index) and len(class_index) != len(images):  # the same message as one-shot target_classes
        raise ValueError(f"class_index must be an int or {len(images)} ints, got {len(class_index)}")
    return next(iter(explainer.explain([(images, class_index)])))


def score_cam(model, images, layer=None, class_index=None, batch_size=256, max_n=None, precision="auto"):
    """Score-CAM maps (N, H, W) float32 in [0, 1] for images (N, H, W, 3) with pixels in [0, 255].

    layer: conv layer name (None: the last conv layer). class_index: None explains each image's
    predicted class; an int or N ints choose classes. max_n: Faster-Score-CAM, only the max_n
    channels of largest spatial standard deviation. precision: "float32", "bfloat16" (a bfloat16
    copy of the model does the forward passes) or "auto" (AUTO_PRECISION).
    """
    maps = score_cam_layers(model, images, [layer], class_index, batch_size, max_n, precision=precision)
    return next(v for k, v in maps.items() if k is not None)


# ---------------------------------------------------------------- overlays and the command line

def colorize(cam):
    """A [0, 1] map as an RGB uint8 jet heatmap (OpenCV colormap)."""
    heat = cv2.applyColorMap(np.uint8(np.clip(cam, 0, 1) * 255 + 0.5), cv2.COLORMAP_JET)
    return cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)


def overlay(image, cam, alpha=0.45):
    """Blend the heatmap over an RGB uint8 image of any size (the map is resized to it)."""
    h, w = image.shape[:2]
    cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.addWeighted(colorize(cam), alpha, np.ascontiguousarray(image, dtype=np.uint8), 1 - alpha, 0)


def demo_image():
    """scikit-image's bundled cat photo, so the demo needs no download."""
    from skimage import data

    return np.ascontiguousarray(data.chelsea()), "chelsea (skimage.data)"


def parse_class(value, class_names):
    if value is None:
        return None
    if value in class_names:
        return class_names.index(value)
    if value.lstrip("-").isdigit() and 0 <= int(value) < len(class_names):
        return int(value)
    raise ValueError(f"unknown --class {value!r}; classes: {', '.join(class_names)}")


def output_path(out, source, many, suffix):
    out = Path(out)
    if not many and out.suffix.lower() == ".png":
        return out
    return out / f"{Path(source).stem}_{suffix}.png"


def explain_file(model, names, display, image, source, args):
    """Compute and draw the figure for one picture; returns the written path."""
    from data.images import resize
    from plots import layer_grid_figure, single_layer_figure

    x = resize(image, tuple(model.input_shape[1:3]))[None].astype(np.float32)
    target = parse_class(args.class_name, names)
    layers = [c.name for c in model.layers if isinstance(c, CONV_TYPES)] if args.all_layers else [args.layer]
    maps = score_cam_layers(model, x, layers, target, args.batch_size, args.max_n, precision=args.precision)
    probs = maps.pop(None)[0]
    pred = int(probs.argmax())
    parent = Path(source).parent.name
    true = display[names.index(parent)] if parent in names else None
    if args.all_layers:
        title = f"{display[pred]} - {true or '?'} : {probs[pred]:.2f}"
        path = output_path(args.out, source, args.many, "layers")
        layer_grid_figure(x[0].astype(np.uint8), maps, title, path)
    else:
        (layer, cam), = maps.items()
        title = f"predicted {display[pred]} ({probs[pred]:.2f})" + (f", true {true}" if true else "")
        if target is not None:
            title += f"; map for {display[target]} ({probs[target]:.2f})"
        path = output_path(args.out, source, args.many, "scorecam")
        single_layer_figure(image, x[0].astype(np.uint8), cam[0], overlay(image, cam[0]), f"{title}\n{layer}", path)
    return path


def _folder_files(folder, out):
    """Every non-hidden file under `folder` (sorted, recursive), leaving out anything under `out`,
    each with the overlay path it gets: OUT/<same subfolders>/<stem>_scorecam.png."""
    out = out.resolve()
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.resolve() == out or out in path.resolve().parents:
            continue  # earlier outputs written inside the folder are not inputs
        files.append(path)
    stems = collections.Counter((p.parent, p.stem) for p in files)
    dest = {}
    for path in files:  # a.jpg and a.png side by side: keep both, named after the whole file name
        stem = path.stem if stems[(path.parent, path.stem)] == 1 else path.name.replace(".", "_")
        dest[path] = out / path.relative_to(folder).parent / f"{stem}_scorecam.png"
    return files, dest


def explain_folder(model, names, args):
    """One overlay PNG per picture under args.folder, streamed: pictures are read, explained and
    written a batch at a time. Returns (written, skipped), skipped being the unreadable files' errors."""
    from PIL import Image
    from tqdm import tqdm

    from atomic import atomic_path
    from data.images import ImageError, read_image, resize

    folder = Path(args.folder)
    if not folder.is_dir():
        raise ValueError(f"folder not found: {folder}")
    files, dest = _folder_files(folder, Path(args.out))
    target = parse_class(args.class_name, names)
    size = tuple(model.input_shape[1:3])
    skipped, in_flight = [], collections.deque()
    bar = tqdm(total=len(files), desc="Score-CAM", unit="img", mininterval=1)

    def batches():
        paths, pictures = [], []
        for n, path in enumerate(files, 1):
            try:
                pictures.append(read_image(path))
                paths.append(path)
            except ImageError as e:
                skipped.append(str(e))
                bar.update(1)
            if paths and (len(paths) == args.read_batch or n == len(files)):
                in_flight.append((paths, pictures))  # the originals of the batches in flight, no more
                yield np.stack([resize(p, size) for p in pictures]).astype(np.float32)
                paths, pictures = [], []

    written = 0
    try:
        for maps in score_cam_stream(model, batches(), args.layer, target, args.batch_size, args.max_n,
                                     args.precision):
            for path, picture, cam in zip(*in_flight.popleft(), maps):
                with atomic_path(dest[path]) as tmp:
                    Image.fromarray(overlay(picture, cam)).save(tmp, format="PNG")
                written += 1
                bar.update(1)
    finally:
        bar.close()
    return written, skipped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (none: scikit-image's cat, a demo)")
    p.add_argument("--folder", metavar="DIR", help="explain every picture under DIR (recursively): one overlay "
                   "PNG each in --out, same subfolders; unreadable files are skipped and counted")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="a .keras model (default: the shipped CIFAR-10 one)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--layer", help="conv layer to explain (default: the last one)")
    group.add_argument("--all-layers", action="store_true", help="one heatmap per conv layer, in one figure")
    p.add_argument("--class", dest="class_name", metavar="NAME_OR_INDEX", help="class to explain (default: predicted)")
    p.add_argument("--out", default="out", help="output PNG (one image) or folder (default: %(default)s/)")
    p.add_argument("--batch-size", type=int, default=256, help="masked images per forward pass")
    p.add_argument("--max-n", type=int, help="Faster-Score-CAM: use only the N most varying channels")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help=f"forward passes in float32 or bfloat16 (default: %(default)s = {AUTO_PRECISION})")
    p.add_argument("--read-batch", type=int, default=16, help="--folder: pictures read and explained together")
    args = p.parse_args(argv)
    if args.folder and (args.images or args.all_layers):
        p.error("--folder takes no IMAGE arguments and no --all-layers")
    if args.batch_size < 1 or args.read_batch < 1:
        p.error("--batch-size and --read-batch must be at least 1")
    args.many = len(args.images) > 1
    from data.images import ImageError, read_image
    from model import load_model

    try:
        model, names, display = load_model(args.model)
        parse_class(args.class_name, names)
        conv_layer(model, args.layer)
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
    for source in sources:
        try:
            image, label = (demo_image() if source is None else (read_image(source), source))
            path = explain_file(model, names, display, image, source or "chelsea.png", args)
            print(f"{label}: wrote {path}")
        except (ImageError, ValueError, OSError) as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
