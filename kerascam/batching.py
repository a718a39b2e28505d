"""batch_size="auto": how many masked pictures a Score-CAM forward pass runs, measured on the machine it runs on.

A model's throughput depends on its batch size; on a CPU, by how much of a batch's activations stay in the
caches: bench.py --backbones measured Score-CAM's best batch size 4 % to 33 % faster than 256 on TensorFlow
(VGG16, ResNet50, EfficientNetB0, ConvNeXtTiny at 64 x 64 on a 2-core CPU), 0 % to 7 % on JAX
(docs/performance.md). So "auto" times one full masked
batch at each of CANDIDATES, made of the call's first pictures and run through the call's own compiled
step, after a run that compiles it, and keeps the fastest per picture. Measured once per model, layers,
max_n, input shape, precision, backend and device in this process (cache.derived, like precision.py's
"auto"). The maps do not depend on the choice, only the speed.

What it costs, and when it is skipped: a call of fewer than AUTO_MIN_PASSES masked passes keeps DEFAULT
(256) and measures nothing. Otherwise DEFAULT is timed first (twice: compiling, as the call would, then
timed), which also gives the time one compilation takes here; the other three candidates cost about
three compilations and 2 x (32 + 64 + 128) masked pictures more, and are measured only where that is at
most 1/AUTO_SHARE of the call's own time at DEFAULT's speed (JAX compiles a large model for a minute on a
2-core CPU, TensorFlow traces it in seconds, so a small call keeps 256). A stream (length unknown) is
measured on its first batch. An int keeps today's behaviour: that batch size, nothing measured.
"""
import numbers
import time

import keras

from .cache import derived
from .devices import first_device

CANDIDATES = (32, 64, 128, 256)
DEFAULT = 256
AUTO_SHARE = 16  # the measurement at most 1/16 of the call it chooses for
AUTO_MIN_PASSES = AUTO_SHARE * 2 * DEFAULT  # timing DEFAULT's step: one more run of 256 than the call makes
AUTO_PICTURES = 2  # the call's first pictures the masked batches are made of (queued again until they fill one)
_timer = time.perf_counter  # tests stub it to force each choice


def check_batch(batch_size, option="batch_size"):
    """"auto" or an int of at least 1; a clear ValueError otherwise."""
    if isinstance(batch_size, str) and batch_size == "auto":
        return batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f'{option} must be "auto" or an int of at least 1, got {batch_size!r}')
    return int(batch_size)


def _time_default(prepare):
    """{"rate": DEFAULT's pictures/s, "compile_s": one compilation's seconds}, or None (nothing to mask with)."""
    step = prepare(DEFAULT)
    if step is None:
        return None
    start = _timer()
    step()  # compiles, as the call's own first batch would
    middle = _timer()
    step()
    run = max(_timer() - middle, 1e-9)
    return {"rate": DEFAULT / run, "compile_s": max(middle - start - run, 0.0)}


def _others_cost(base):
    """Seconds the other candidates are expected to take: a compilation and two batches each."""
    return sum(base["compile_s"] + 2 * b / base["rate"] for b in CANDIDATES if b != DEFAULT)


def measure_batch_size(model, prepare, key, passes=None):
    """What batch_size="auto" means for a call of `passes` masked passes (None: a stream) here: prepare(b) ->
    a step that scores one full masked batch of b pictures (None where no channel varies), run once to
    compile, then timed. Returns {"choice", "pictures_per_s": {b: rate}, "compile_s", "measured"}; measured
    once per `key` (the caller's layers, options and input shape), device and backend."""
    key = ("auto_batch_size", first_device(), keras.backend.backend()) + tuple(key)
    base = derived(model, key + ("default",), lambda: _time_default(prepare))
    if base is None:
        return {"choice": DEFAULT, "pictures_per_s": {}, "compile_s": None, "measured": False}
    if passes is not None and AUTO_SHARE * _others_cost(base) > passes / base["rate"]:
        return {"choice": DEFAULT, "pictures_per_s": {DEFAULT: base["rate"]}, "compile_s": base["compile_s"],
                "measured": False}

    def others():
        rates = {DEFAULT: base["rate"]}
        for b in CANDIDATES:
            step = None if b == DEFAULT else prepare(b)
            if step is not None:
                step()  # compiles
                start = _timer()
                step()
                rates[b] = b / max(_timer() - start, 1e-9)
        return {"choice": max(rates, key=rates.get), "pictures_per_s": rates, "compile_s": base["compile_s"],
                "measured": True}

    return derived(model, key, others)


def resolve_batch_size(batch_size, model=None, prepare=None, passes=None, key=(), devices=1):
    """The int batch size for a batch_size option: an int as it is; "auto" measure_batch_size's choice for a
    call of `passes` masked passes (None: a stream), DEFAULT for a call of fewer than AUTO_MIN_PASSES or
    where there is nothing to measure on; over several devices DEFAULT, rounded down to a multiple of their
    number (each batch is sharded over them)."""
    if check_batch(batch_size) != "auto":
        return batch_size
    if devices > 1:
        return max(devices, DEFAULT // devices * devices)
    if prepare is None or (passes is not None and passes < AUTO_MIN_PASSES):
        return DEFAULT
    return measure_batch_size(model, prepare, key, passes)["choice"]
