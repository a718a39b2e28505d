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
from .graph import explainable_cached, is_classifier, num_classes
from .layers import at_path, find_layer
from .views import DEFAULT
from .maps import PIXEL_BUDGET, check_inputs, finish_maps, resize, target_classes, weighted_sum
from .targets import takes

TAIL_MIN = 16
VALUES = {"outputs": -3, "scores": -2, "probabilities": -1}  # where graph.explainable puts what a target takes


class MaskedScores(keras.Model):
    """One compiled step of Score-CAM: for P (image, channel) pairs, the score of image * mask, the mask
    being the pair's channel upsampled (bi/trilinearly) to the input size and min-max normalised; 0 for a
    constant channel (the reference skips those). The score is the target class's probability, or the
    target's score (targets.py) where one is given.

    Inputs: the distinct pictures of the pairs, one (U, ...) array per model input (`image` the masked one,
    float32); acts (P, *grid) float32, each pair's channel at the layer's resolution; index (P,) int32,
    the pair's row in the pictures; pick (P,) int32, the class to score, or with a target the pair's
    picture in the call. Output: (P,) float32. `net` is graph.explainable(model).
    """

    def __init__(self, net, size, image=0, target=None, **kwargs):
        super().__init__(**kwargs)
        self.net, self.image, self.score_target = net, image, target
        self.size = tuple(int(s) for s in size)

    def call(self, inputs):
        ops = keras.ops
        *pictures, acts, index, pick = inputs
        up = resize(ops.expand_dims(acts, -1), self.size)
        axes = tuple(range(1, len(up.shape)))
        low = ops.min(up, axis=axes, keepdims=True)
        span = ops.max(up, axis=axes, keepdims=True) - low
        varies = span > 0
        masks = ops.where(varies, (up - low) / ops.where(varies, span, ops.ones_like(span)), ops.zeros_like(up))
        given = [ops.take(p, index, axis=0) * masks if i == self.image else ops.take(p, index, axis=0)
                 for i, p in enumerate(pictures)]
        outputs = self.net(given[0] if len(given) == 1 else given, training=False)
        if self.score_target is None:
            scores = ops.take_along_axis(outputs[-1], ops.expand_dims(pick, -1), axis=1)[:, 0]
        else:
            scores = ops.cast(self.score_target(outputs[VALUES[takes(self.score_target)]], pick), "float32")
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
        """The next `take` pairs as one batch of `run` rows: (distinct pictures of each input, channels, index,
        pick)."""
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
            images.append([a[lo:hi] for a in chunk.x])
            index.append(img - lo + rows)
            rows += hi - lo
            acts.append(chunk.acts[self.name][img, ..., ch])
            target.append(chunk.targets[img])
        distinct = 1 << (rows - 1).bit_length()  # padded to a power of two: few shapes
        x = []
        for k, first in enumerate(images[0]):
            x.append(np.zeros((distinct,) + first.shape[1:], dtype=first.dtype))
            np.concatenate([batch[k] for batch in images], out=x[-1][:rows])
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

    def __init__(self, model, layers, batch_size, max_n, precision, chunk=None, devices=None, view=DEFAULT,
                 target=None):
        self.devices = check_batch_size(batch_size, devices)
        if target is None and not is_classifier(model, view.output):
            raise ValueError(f"the explained output is {tuple(model.outputs[view.output].shape)}, not (N, classes): "
                             "pass target= (kerascam.targets: regression, segmentation, similarity, or your own)")
        if len(self.devices) > 1 and precision == "bfloat16":
            raise ValueError("devices= runs in float32; pass precision='float32' (or 'auto')")
        refs = {ref.path: ref for ref in (find_layer(model, layer) for layer in layers)}
        self.names = ["/".join(path) for path in refs]
        self.precision, self.distribution = precision, None
        if len(self.devices) > 1:
            self.net, self.distribution = replicated_copy(model, self.devices)
        else:
            self.net = bfloat16_copy(model) if precision == "bfloat16" else model
        self.tapped = explainable_cached(self.net, [at_path(self.net, path) for path in refs], view=view)
        self.model, self.view, self.target = model, view, target
        self.classes = num_classes(model, view.output) if target is None else None
        self.batch_size, self.max_n = int(batch_size), max_n
        per_image = max(int(t.shape[-1]) for t in self.tapped.outputs[:-3])
        self.per_image = min(per_image, self.max_n or per_image)
        self.chunk_given = bool(chunk)
        self.chunk = int(chunk) if chunk else max(1, 4 * self.batch_size // self.per_image)
        self.size = None  # the images' (H, W): one per explainer
        self.queues = {name: PairQueue(name) for name in self.names}
        self.in_flight = collections.deque()

    def explain(self, parts):
        """Yield (maps {layer: (n, H, W)}, probabilities (n, C)) for each (images, class_index)."""
        for images, class_index in parts:
            inputs, class_index = self._check(images, class_index)
            n = len(inputs[self.view.input])
            out = ({name: np.zeros((n,) + tuple(self.size), np.float32) for name in self.names},
                   np.zeros((n,) if self.target else (n, self.classes), np.float32))
            for start in range(0, max(n, 1), self.chunk):
                rows = slice(start, min(n, start + self.chunk))
                classes = class_index if np.ndim(class_index) == 0 else np.asarray(class_index)[rows]
                self._add(out, rows, [a[rows] for a in inputs], classes, last=rows.stop >= n)
                for queue in self.queues.values():
                    while queue.queued - queue.scored >= self.batch_size:
                        self._score(queue, self.batch_size, self.batch_size)
                yield from self._finished()
        for queue in self.queues.values():
            for take, run in tail_sizes(queue.queued - queue.scored, self.batch_size, len(self.devices)):
                self._score(queue, take, run)
        yield from self._finished()

    def _check(self, images, class_index):
        """The batch's inputs checked (one size per explainer), its classes checked before any work."""
        inputs = check_inputs(self.model, images, self.view.input)
        images = inputs[self.view.input]
        if self.size is None:
            self.size = images.shape[1:-1]
            self._fit_batch()
        elif images.shape[1:-1] != self.size and len(images):
            raise ValueError(f"all images of one call must share a size: {self.size} and {images.shape[1:-1]}")
        if class_index is not None:  # ints, one for all or one per image, in range
            class_index = target_classes(class_index, np.zeros((len(images), self.classes), np.float32))
        return inputs, class_index

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
        """(activations of each layer, the explained values of the head) of the inputs x, one pass through the
        tapped graph: the probabilities, or with a target its values (VALUES). The rows are padded to a power of
        two (at most the chunk), so a shape-specialising compiler (JAX) compiles a few programs, not one per
        count of pictures a call leaves for its last chunk."""
        rows = len(x[0])
        padded = max(rows, min(1 << (rows - 1).bit_length(), self.chunk))
        if padded > rows:
            x = [np.concatenate([a, np.zeros((padded - rows,) + a.shape[1:], a.dtype)]) for a in x]
        try:
            *layer_acts, output, scores, probs = (v[:rows] for v in self.tapped.predict_on_batch(
                x[0] if len(x) == 1 else x))
        except Exception as e:  # maths that will not run in bfloat16 (a TensorFlow op on a float32 constant)
            if self.precision != "bfloat16":
                raise
            raise ValueError(f"this model does not run in bfloat16 ({reason(e)}); pass precision='float32'") from None
        acts = [np.nan_to_num(np.asarray(a, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0) for a in layer_acts]
        values = (output, scores, probs)[VALUES[takes(self.target)]] if self.target else probs
        return acts, np.asarray(values, dtype=np.float32)

    def _picks(self, rows, classes, values):
        """(what each picture's pairs score: its class, or with a target its row in the call; the pictures'
        probabilities, or their target scores)."""
        if self.target is None:
            return target_classes(classes, values).astype(np.int32), values
        index = np.arange(rows.start, rows.stop, dtype=np.int32)
        scores = np.asarray(keras.ops.convert_to_numpy(self.target(keras.ops.convert_to_tensor(values), index)))
        if scores.shape != (len(index),):
            raise ValueError(f"the target returned shape {scores.shape} for {len(index)} pictures; it must return one "
                             "score per row, shape (rows,)")
        return index, scores

    def _add(self, out, rows, x, classes, last):
        acts, pairs, targets = {}, {}, np.zeros(0, np.int32)
        if len(x[self.view.input]):
            layer_acts, values = self._activations(x)
            targets, out[1][rows] = self._picks(rows, classes, values)
            for name, a in zip(self.names, layer_acts):
                acts[name], pairs[name] = a, varying_pairs(a, self.max_n)
        for name in self.names:
            pairs.setdefault(name, (np.zeros(0, np.int64),) * 2)
        chunk = Chunk(out, rows, [a.astype(np.float32) if k == self.view.input else a for k, a in enumerate(x)],
                      acts, targets, pairs, {}, last)
        for name, queue in self.queues.items():
            chunk.ends[name] = queue.add(chunk)
        self.in_flight.append(chunk)

    def _scorer(self):
        return derived(self.net, ("masked_scores", tuple(self.size), self.view, self.target),
                       lambda: MaskedScores(explainable_cached(self.net, view=self.view), self.size, self.view.input,
                                            self.target))

    def masked_step(self, images):
        """A step that scores one full masked batch (batch_size pairs of the first layer) made of these pictures'
        varying channels, the pictures queued again until they fill it; None where no channel varies. What
        batch_size="auto" times (batching.py): the same compiled graph as a call's own batches."""
        inputs, _ = self._check(images, None)
        n, queue = len(inputs[self.view.input]), self.queues[self.names[0]]
        out = ({name: np.zeros((n,) + tuple(self.size), np.float32) for name in self.names},
               np.zeros((n,) if self.target else (n, self.classes), np.float32))
        while n and queue.queued < self.batch_size:
            before = queue.queued
            self._add(out, slice(0, n), inputs, None, last=True)
            if queue.queued == before:
                return None
        if queue.queued < self.batch_size:
            return None
        x, a, idx, tgt = queue.take(self.batch_size, self.batch_size)
        scorer = self._scorer()
        return lambda: np.asarray(scorer.predict_on_batch((*x, a, idx, tgt)))

    def _score(self, queue, take, run):
        """Score the next `take` queued pairs of one layer in one batch of `run` >= take."""
        x, a, idx, tgt = queue.take(take, run)
        scorer = self._scorer()
        if self.distribution is None:
            scores = scorer.predict_on_batch((*x, a, idx, tgt))
        else:  # the pairs sharded over the devices, the few distinct images on every device
            with self.distribution.scope():
                shard = lambda v: keras.distribution.distribute_tensor(  # noqa: E731
                    v, self.distribution.get_data_layout(v.shape))
                whole = [keras.distribution.distribute_tensor(v, keras.distribution.TensorLayout(
                    [None] * v.ndim, self.distribution.device_mesh)) for v in x]
                scores = scorer.predict_on_batch((*whole, shard(a), shard(idx), shard(tgt)))
        queue.put(scores, take)

    def _finished(self):
        """The input batches whose chunks are all finished, in order (the completion rule above)."""
        while self.in_flight and all(q.scored >= self.in_flight[0].ends[n] for n, q in self.queues.items()):
            chunk = self.in_flight.popleft()
            self._finish(chunk)
            if chunk.last:
                yield chunk.out

    def _finish(self, chunk):
        if not len(chunk.x[self.view.input]):
            return
        for name, queue in self.queues.items():
            img, ch = chunk.pairs[name]
            a = chunk.acts[name]
            weights = np.zeros((len(a), a.shape[-1]), dtype=np.float32)
            weights[img, ch] = queue.pop_scores(len(img))
            chunk.out[0][name][chunk.rows] = finish_maps(weighted_sum(a, weights), self.size, relu_first=False)
