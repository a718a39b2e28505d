"""Which precision Score-CAM's forward passes run in: "float32", "bfloat16" (a bfloat16 copy of the
model) or "auto", measured on the machine it runs on, once per model, device, backend, input shape,
layers and max_n."""
import time

import keras
import numpy as np

from .cache import derived
from .devices import first_device
from .maps import pearson

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


def measure_precision(model, run, images, key):
    """What precision="auto" means for this model here: run(precision, images) -> (maps {layer: (n, H, W)},
    probabilities) explains AUTO_MEASURED of the caller's images in each precision (after a warm-up call
    that compiles), timed; bfloat16 is chosen only where it is faster and its maps agree with float32's
    (Pearson r >= AUTO_AGREEMENT on every map) with the same top classes. Measured once per `key` (the
    caller's layers and options) and device, backend and input shape in this process; returns {"choice",
    "images_per_s": {precision: speed}, "min_pearson_r", "top_class_equal"}."""
    images = np.asarray(images, dtype=np.float32)[:AUTO_MEASURED]

    def measure():
        speed, maps, probs = {}, {}, {}
        for precision in ("float32", "bfloat16"):
            try:
                run(precision, images)  # compiles
                start = _timer()
                maps[precision], probs[precision] = run(precision, images)
                speed[precision] = len(images) / max(_timer() - start, 1e-9)
            except ValueError:  # no bfloat16 copy of this model, or one that does not run in bfloat16
                return {"choice": "float32", "images_per_s": speed, "min_pearson_r": None, "top_class_equal": None}
        r = min(float(pearson(maps["float32"][k], maps["bfloat16"][k]).min()) for k in maps["float32"])
        same = bool((probs["float32"].argmax(-1) == probs["bfloat16"].argmax(-1)).all()) \
            if probs["float32"].ndim == 2 else True  # a target's scores: no classes to compare
        faster = speed["bfloat16"] > speed["float32"]
        return {"choice": "bfloat16" if faster and same and r >= AUTO_AGREEMENT else "float32",
                "images_per_s": speed, "min_pearson_r": r, "top_class_equal": same}

    full_key = ("auto_precision", first_device(), keras.backend.backend(), images.shape[1:]) + tuple(key)
    return derived(model, full_key, measure)


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def resolve_precision(precision, model=None, run=None, images=None, passes=None, key=()):
    """'float32' or 'bfloat16' for a precision option. "auto" is measure_precision's choice for
    a call on `images` of `passes` masked passes (None: a stream, of unknown length, `images` its first
    batch), and float32 when there are no images to measure on, or a call of fewer than AUTO_MIN_IMAGES
    images or AUTO_MIN_PASSES passes."""
    if check_precision(precision) != "auto":
        return precision
    if model is None or images is None or len(images) == 0:
        return "float32"
    if passes is not None and (len(images) < AUTO_MIN_IMAGES or passes < AUTO_MIN_PASSES):
        return "float32"
    return measure_precision(model, run, images, key)["choice"]
