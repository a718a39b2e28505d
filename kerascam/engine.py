"""Score-CAM's streaming engine: full batches of masked pictures through one compiled graph.

Score-CAM costs one forward pass per (image, channel) pair plus one activation pass per image; the
fast path keeps the network busy with full batches of masked images and does the rest in the graph:
  1. the explainable graph (graph.explainable) runs once per chunk of images;
  2. the (image, channel) pairs whose channel varies are queued per layer (PairQueue), across chunks
     and input batches, and consumed `batch_size` at a time by MaskedScores, one compiled graph that
     upsamples each pair's low-resolution channel, min-max normalises it, masks its image, runs the
     network and picks the target probability; only the low-resolution channel, the few distinct
     images and two int32 indices cross from the host, never a batch of masks;
  3. pairs are scored in the order they were queued, so chunks finish in order: a chunk is finished
     once every layer has scored as many pairs as had been queued when the chunk was added (the one
     completion rule); its map is ReLU(upsample(sum_k w_k A_k)), min-max normalised, and an input
     batch comes out with its last chunk.
Everything is keras.ops, so the graph runs wherever the backend puts it (the GPU when there is one).
Only full batches run until the input ends; the tail is cut into power-of-two batches (padded to at
least TAIL_MIN), so a compiler that specialises on shapes (XLA, JAX) compiles a handful of programs.
"""
import collections

import keras
import numpy as np

from .cache import derived
from .copies import bfloat16_copy, replicated_copy
from .devices import check_batch_size
from .errors import reason
from .graph import explainable_cached, num_classes
from .layers import at_path, find_layer
from .maps import PIXEL_BUDGET, check_images, finish_maps, target_classes, weighted_sum

TAIL_MIN = 16


class MaskedScores(keras.Model):
    """One compiled step of Score-CAM: for P (image, channel) pairs, the probability of the target
    class on image * mask, the mask being the pair's channel upsampled bilinearly to the input size
    and min-max normalised; 0 for a constant channel (the reference skips those).

    Inputs: images (U, H, W, C) float32, the distinct images of the pairs; acts (P, h, w) float32,
    each pair's channel at the layer's resolution; index (P,) int32, the pair's row in images;
    target (P,) int32, the class to score. Output: (P,) float32. `net` is graph.explainable(model).
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


def tail_sizes(count, batch_size, multiple=1):
    """(pairs taken, batch size run) for `count` leftover pairs: power-of-two batches, the last one
    padded up to TAIL_MIN, so shape-specialising compilers see few distinct shapes; every run a
    multiple of `multiple` (the devices a batch is sharded over)."""
    sizes = []
    while count > 0:
        if count >= batch_size:
            sizes.append((batch_size, batch_size))
        elif count >= TAIL_MIN:
            sizes.append((1 << (count.bit_length() - 1),) * 2)
        else:
            sizes.append((count, min(TAIL_MIN, batch_size)))
        count -= sizes[-1][0]
    return [(take, -(-run // multiple) * multiple) for take, run in sizes]


def select_channels(activations, max_n):
    """Faster-Score-CAM: indices (N, max_n) of the channels with the largest spatial standard deviation."""
    flat = activations.reshape(len(activations), -1, activations.shape[-1])
    std = flat.std(axis=1, dtype=np.float64)  # float64: a float32 variance overflows past 1e19
    return np.argsort(-std, axis=1, kind="stable")[:, :max_n]


def varying_pairs(acts, max_n):
    """(image, channel) index arrays, image-major, of the channels that vary (constant ones get weight 0),
    only the max_n most varying of each image where max_n is given."""
    flat = acts.reshape(len(acts), -1, acts.shape[-1])
    chosen = flat.max(axis=1) > flat.min(axis=1)
    if max_n:
        keep = np.zeros_like(chosen)
        np.put_along_axis(keep, select_channels(acts, max_n), True, axis=1)
        chosen &= keep
    return np.nonzero(chosen)


# A chunk of images in flight: `out` is its input batch's (maps, probabilities), `rows` its rows there;
# pairs[layer] = (image, channel) index arrays, image-major; ends[layer] = pairs queued up to and
# including this chunk's; `last`: the batch's last chunk.
Chunk = collections.namedtuple("Chunk", "out rows x acts targets pairs ends last")


class PairQueue:
    """One layer's (image, channel) pairs, queued chunk by chunk and scored in that order: how many were
    queued and scored, the next batch's inputs, and the scores not yet used by a finished chunk."""

    def __init__(self, name):
        self.name, self.queued, self.scored = name, 0, 0
        self.waiting = collections.deque()  # [chunk, pairs taken] in queue order
        self.scores = collections.deque()  # score arrays not yet used, in order

    def add(self, chunk):
        count = len(chunk.pairs[self.name][0])
        if count:
            self.waiting.append([chunk, 0])
        self.queued += count
        return self.queued

    def take(self, take, run):
        """The next `take` pairs as one batch of `run` rows: (distinct images, channels, index, target)."""
        images, acts, index, target, rows, need = [], [], [], [], 0, take
        while need:
            entry = self.waiting[0]
            chunk, pos = entry
            img, ch = (a[pos:pos + need] for a in chunk.pairs[self.name])
            entry[1] += len(img)
            need -= len(img)
            if entry[1] == len(chunk.pairs[self.name][0]):
                self.waiting.popleft()
            lo, hi = int(img[0]), int(img[-1]) + 1
            images.append(chunk.x[lo:hi])
            index.append(img - lo + rows)
            rows += hi - lo
            acts.append(chunk.acts[self.name][img, :, :, ch])
            target.append(chunk.targets[img])
        x = np.zeros((1 << (rows - 1).bit_length(),) + images[0].shape[1:], dtype=np.float32)  # few shapes
        np.concatenate(images, out=x[:rows])
        a = np.zeros((run,) + acts[0].shape[1:], dtype=np.float32)
        np.concatenate(acts, out=a[:take])
        idx, tgt = np.zeros(run, dtype=np.int32), np.zeros(run, dtype=np.int32)
        np.concatenate(index, out=idx[:take], casting="unsafe")
        np.concatenate(target, out=tgt[:take])
        return x, a, idx, tgt

    def put(self, scores, take):
        self.scores.append(np.asarray(scores, dtype=np.float32)[:take])
        self.scored += take

    def pop_scores(self, count):
        """The next `count` scores, in the order their pairs were queued."""
        taken = []
        while count:
            first = self.scores[0]
            taken.append(first[:count])
            if len(first) > count:
                self.scores[0] = first[count:]
            else:
                self.scores.popleft()
            count -= len(taken[-1])
        return np.concatenate(taken) if taken else np.zeros(0, np.float32)


class Explainer:
    """Streams (images, class_index) batches through the explainable graph and the masked-scores graph."""

    def __init__(self, model, layers, batch_size, max_n, precision, chunk=None, devices=None):
        self.devices = check_batch_size(batch_size, devices)
        if len(self.devices) > 1 and precision == "bfloat16":
            raise ValueError("devices= runs in float32; pass precision='float32' (or 'auto')")
        refs = {ref.path: ref for ref in (find_layer(model, layer) for layer in layers)}
        self.names = ["/".join(path) for path in refs]
        self.precision, self.distribution = precision, None
        if len(self.devices) > 1:
            self.net, self.distribution = replicated_copy(model, self.devices)
        else:
            self.net = bfloat16_copy(model) if precision == "bfloat16" else model
        self.tapped = explainable_cached(self.net, [at_path(self.net, path) for path in refs])
        self.model, self.classes = model, num_classes(model)
        self.batch_size, self.max_n = int(batch_size), max_n
        per_image = max(int(t.shape[-1]) for t in self.tapped.outputs[:-2])
        self.per_image = min(per_image, self.max_n or per_image)
        self.chunk_given = bool(chunk)
        self.chunk = int(chunk) if chunk else max(1, 4 * self.batch_size // self.per_image)
        self.size = None  # the images' (H, W): one per explainer
        self.queues = {name: PairQueue(name) for name in self.names}
        self.in_flight = collections.deque()

    def explain(self, parts):
        """Yield (maps {layer: (n, H, W)}, probabilities (n, C)) for each (images, class_index)."""
        for images, class_index in parts:
            images, class_index = self._check(images, class_index)
            n = len(images)
            out = ({name: np.zeros((n,) + tuple(images.shape[1:3]), np.float32) for name in self.names},
                   np.zeros((n, self.classes), np.float32))
            for start in range(0, max(n, 1), self.chunk):
                rows = slice(start, min(n, start + self.chunk))
                classes = class_index if np.ndim(class_index) == 0 else np.asarray(class_index)[rows]
                self._add(out, rows, images[rows], classes, last=rows.stop >= n)
                for queue in self.queues.values():
                    while queue.queued - queue.scored >= self.batch_size:
                        self._score(queue, self.batch_size, self.batch_size)
                yield from self._finished()
        for queue in self.queues.values():
            for take, run in tail_sizes(queue.queued - queue.scored, self.batch_size, len(self.devices)):
                self._score(queue, take, run)
        yield from self._finished()

    def _check(self, images, class_index):
        """The batch's images checked (one size per explainer), its classes checked before any work."""
        images = check_images(self.model, images)
        if self.size is None:
            self.size = images.shape[1:3]
            self._fit_batch()
        elif images.shape[1:3] != self.size and len(images):
            raise ValueError(f"all images of one call must share a size: {self.size} and {images.shape[1:3]}")
        if class_index is not None:  # ints, one for all or one per image, in range
            class_index = target_classes(class_index, np.zeros((len(images), self.classes), np.float32))
        return images, class_index

    def _fit_batch(self):
        """batch_size (and the chunk it sets) lowered to PIXEL_BUDGET pixels a masked batch for the images'
        size, kept a multiple of the devices; the maps do not change, only how many pictures a step runs."""
        k = len(self.devices)
        fits = max(k, PIXEL_BUDGET // int(np.prod(self.size)) // k * k)
        if fits < self.batch_size:
            self.batch_size = fits
            if not self.chunk_given:
                self.chunk = max(1, 4 * fits // self.per_image)

    def _activations(self, x):
        """(activations of each layer, probabilities) of the images x, one pass through the tapped graph."""
        try:
            *layer_acts, _, probs = self.tapped.predict_on_batch(x)
        except Exception as e:  # maths that will not run in bfloat16 (a TensorFlow op on a float32 constant)
            if self.precision != "bfloat16":
                raise
            raise ValueError(f"this model does not run in bfloat16 ({reason(e)}); pass precision='float32'") from None
        acts = [np.nan_to_num(np.asarray(a, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0) for a in layer_acts]
        return acts, np.asarray(probs, dtype=np.float32)

    def _add(self, out, rows, x, classes, last):
        acts, pairs, targets = {}, {}, np.zeros(0, np.int32)
        if len(x):
            layer_acts, probs = self._activations(x)
            targets = target_classes(classes, probs).astype(np.int32)
            out[1][rows] = probs
            for name, a in zip(self.names, layer_acts):
                acts[name], pairs[name] = a, varying_pairs(a, self.max_n)
        for name in self.names:
            pairs.setdefault(name, (np.zeros(0, np.int64),) * 2)
        chunk = Chunk(out, rows, x, acts, targets, pairs, {}, last)
        for name, queue in self.queues.items():
            chunk.ends[name] = queue.add(chunk)
        self.in_flight.append(chunk)

    def _score(self, queue, take, run):
        """Score the next `take` queued pairs of one layer in one batch of `run` >= take."""
        x, a, idx, tgt = queue.take(take, run)
        scorer = derived(self.net, ("masked_scores", tuple(self.size)),
                         lambda: MaskedScores(explainable_cached(self.net), self.size))
        if self.distribution is None:
            scores = scorer.predict_on_batch((x, a, idx, tgt))
        else:  # the pairs sharded over the devices, the few distinct images on every device
            with self.distribution.scope():
                shard = lambda v: keras.distribution.distribute_tensor(  # noqa: E731
                    v, self.distribution.get_data_layout(v.shape))
                whole = keras.distribution.TensorLayout([None] * x.ndim, self.distribution.device_mesh)
                scores = scorer.predict_on_batch((keras.distribution.distribute_tensor(x, whole), shard(a),
                                                  shard(idx), shard(tgt)))
        queue.put(scores, take)

    def _finished(self):
        """The input batches whose chunks are all finished, in order (the completion rule above)."""
        while self.in_flight and all(q.scored >= self.in_flight[0].ends[n] for n, q in self.queues.items()):
            chunk = self.in_flight.popleft()
            self._finish(chunk)
            if chunk.last:
                yield chunk.out

    def _finish(self, chunk):
        if not len(chunk.x):
            return
        for name, queue in self.queues.items():
            img, ch = chunk.pairs[name]
            a = chunk.acts[name]
            weights = np.zeros((len(a), a.shape[-1]), dtype=np.float32)
            weights[img, ch] = queue.pop_scores(len(img))
            chunk.out[0][name][chunk.rows] = finish_maps(weighted_sum(a, weights), self.size, relu_first=False)
