"""Score-CAM at the speed limit of the hardware: measures it against the bound, side by side.

    python bench.py [--n 300] [--json bench.json] [--memory-n 2000] [--naive-n 6] [--bf16-n 100]

Score-CAM costs one forward pass per image for the activations plus one per channel of the
explained layer, so with T the model's own batched throughput (images/s: the faster of
model.predict and a compiled call of the model, batch 256) no Score-CAM explains more than
T / (K + 1) images/s at full precision. For each model size (build_model, seeded, untrained: 32x32
with 10 classes and 64x64 with 20; the last conv layer, K = 64) this prints and records:

  T and the bound T / (K + 1); score_cam's images/s and its ratio to the bound. Score-CAM skips
  channels that are constant on an image (weight 0, as the authors' code), so the ratio can pass 1;
  "passes/image" counts the forward passes really needed and "of T" is the share of the model's
  throughput that they run at (1.0 = the hardware limit).
  the straightforward implementation (naive_score_cam below, the original experiment's loop) in
  the same run: its images/s, our speed-up, and the largest difference between the two maps;
  Faster-Score-CAM at max_n 8/16/32: images/s and its cost relative to full Score-CAM, against
  the (max_n + 1) / (K + 1) it should scale as;
  the bfloat16 path (precision="bfloat16"): the bfloat16 copy's own T, Score-CAM images/s, ratio
  to the float32 bound, and agreement with the float32 maps (min Pearson r, same top class);
  peak memory of score_cam on --memory-n images at 64x64 with default settings, in a subprocess
  (VmHWM), and the machine (CPU, cores, devices, TensorFlow/Keras versions).

Every T is re-measured right before and after each timed method and the method's bound uses their
mean, so a busy machine skews ratios less than absolute figures. On an idle 2-core Xeon it takes
about 10 minutes, 6 of them the 2,000-image memory run (--memory-n 500 shortens it to 2). The JSON
file is written atomically.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import cv2
import runtime  # noqa: F401  (before keras: quiet TensorFlow start-up)
import keras
import numpy as np
from tqdm import tqdm

import scorecam
from atomic import write_text
from model import build_model

SIZES = ((32, 10), (64, 20))  # (input side, classes)
T_BATCH = 256
MAX_NS = (8, 16, 32)


# ---------------------------------------------------------------- the straightforward implementation

def naive_score_cam(model, image, layer=None, class_index=None, max_n=None):
    """The original experiment's Score-CAM for one image (H, W, 3): a sub-model built on every call,
    one activation pass, a Python loop upsampling (cv2.resize, bilinear) and min-max normalising each
    channel, then one `predict` of that image's masked batch. Also the reference for correctness:
    (H, W) float32 map in [0, 1], and the predicted probabilities."""
    name = scorecam.conv_layer(model, layer).name
    sub = keras.Model(model.inputs, [model.get_layer(name).output, model.output])
    acts, probs = sub.predict(image[None].astype(np.float32), verbose=0)
    acts, probs = acts[0], probs[0]
    target = int(np.argmax(probs)) if class_index is None else int(class_index)
    height, width = image.shape[:2]
    channels = range(acts.shape[-1])
    if max_n:  # Faster-Score-CAM: the channels of largest spatial standard deviation
        std = acts.reshape(-1, acts.shape[-1]).std(axis=0)
        channels = sorted(np.argsort(-std, kind="stable")[:max_n])
    upsampled, masks, used = {}, [], []
    for k in channels:
        up = cv2.resize(acts[..., k], (width, height), interpolation=cv2.INTER_LINEAR)
        upsampled[k] = up
        if up.max() > up.min():
            masks.append((up - up.min()) / (up.max() - up.min()))
            used.append(k)
    cam = np.zeros((height, width), dtype=np.float32)
    if masks:
        masked = np.stack([image * m[..., None] for m in masks]).astype(np.float32)
        scores = model.predict(masked, verbose=0)[:, target]
        for k, s in zip(used, scores):
            cam += s * upsampled[k]
    cam = np.maximum(cam, 0)
    span = cam.max() - cam.min()
    return ((cam - cam.min()) / span if span > 0 else np.zeros_like(cam)).astype(np.float32), probs


# ---------------------------------------------------------------- measuring

class Throughput:
    """T: the model's own inference throughput at batch 256 (images/s), the faster of
    model.predict and a compiled call (tf.function, here only, to measure the bound)."""

    def __init__(self, model, seed=0):
        import tensorflow as tf

        side = model.input_shape[1:3]
        self.model = model
        self.x = np.random.default_rng(seed).uniform(0, 255, (T_BATCH, *side, 3)).astype(np.float32)
        self.compiled = tf.function(lambda x: model(x, training=False))
        self.compiled_xla = tf.function(lambda x: model(x, training=False), jit_compile=True)
        self.compiled(self.x)
        model.predict(self.x, batch_size=T_BATCH, verbose=0)
        self.best = None

    def _predict(self, batches):
        x = np.concatenate([self.x] * batches)
        start = time.perf_counter()
        self.model.predict(x, batch_size=T_BATCH, verbose=0)
        return len(x) / (time.perf_counter() - start)

    def _call(self, fn, batches):
        start = time.perf_counter()
        for _ in range(batches):
            np.asarray(fn(self.x))
        return batches * T_BATCH / (time.perf_counter() - start)

    def full(self, batches=2, repeats=2):
        """Both ways, best of `repeats`; remembers the faster way for quick re-measurements."""
        predict = max(self._predict(batches) for _ in range(repeats))
        call = max(self._call(self.compiled, batches) for _ in range(repeats))
        self.best = "compiled call" if call >= predict else "model.predict"
        return {"images_per_s": max(predict, call), "predict": predict, "compiled_call": call, "used": self.best}

    def xla(self, batches=2, repeats=1):
        """For the record: the same compiled call with XLA (jit_compile=True)."""
        self.compiled_xla(self.x)
        return max(self._call(self.compiled_xla, batches) for _ in range(repeats))

    def quick(self, batches=1):
        return self._call(self.compiled, batches) if self.best == "compiled call" else self._predict(batches)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def beside_t(throughput, fn):
    """Run fn between two measurements of T: (fn's result, seconds, mean T around it)."""
    before = throughput.quick()
    out, seconds = timed(fn)
    after = throughput.quick()
    return out, seconds, (before + after) / 2


def pearson(a, b):
    """Per-map Pearson r of two (N, H, W) stacks; two constant maps that are equal count as 1."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    norm = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    both_flat = ((a == 0).all(axis=1)) & ((b == 0).all(axis=1))
    return np.where(both_flat, 1.0, (a * b).sum(axis=1) / np.where(norm > 0, norm, 1))


def passes_per_image(model, images, layer, max_n=None):
    """Forward passes Score-CAM really needs per image: 1 + the non-constant (chosen) channels."""
    acts = scorecam.activation_model(model, [layer]).predict(images, batch_size=64, verbose=0)[0]
    flat = acts.reshape(len(acts), -1, acts.shape[-1])
    varying = (flat.max(axis=1) > flat.min(axis=1)).sum(axis=1)
    if max_n:
        varying = np.minimum(varying, max_n)
    return 1 + float(varying.mean())


def bench_model(side, classes, args, log):
    keras.utils.set_random_seed(args.seed)
    model = build_model((side, side, 3), classes)
    layer = scorecam.conv_layer(model).name
    k = int(model.get_layer(layer).output.shape[-1])
    images = np.random.default_rng(args.seed + 1).uniform(0, 255, (args.n, side, side, 3)).astype(np.float32)
    name = f"{side}x{side}x{classes}"
    result = {"model": name, "layer": layer, "channels": k, "images": args.n}
    log(f"\n== {name}: build_model({side}x{side}, {classes} classes), layer {layer} (K = {k}), {args.n} images")

    throughput = Throughput(model, args.seed)
    t = throughput.full()
    t["xla_compiled_call"] = throughput.xla()
    result["T"] = t
    log(f"T = {t['images_per_s']:.0f} images/s ({t['used']}; model.predict {t['predict']:.0f}, compiled call "
        f"{t['compiled_call']:.0f}, the same with XLA {t['xla_compiled_call']:.0f})")
    log(f"bound T/(K+1) = {t['images_per_s'] / (k + 1):.2f} images/s")

    # Score-CAM: warm up (trace and compile every graph and shape), then time
    scorecam.score_cam_layers(model, images[:3], [layer])
    scorecam.score_cam_layers(model, images[:5], [layer])
    maps, seconds, t_around = beside_t(throughput, lambda: scorecam.score_cam_layers(model, images, [layer]))
    ours = args.n / seconds
    passes = passes_per_image(model, images, layer)
    bound = t_around / (k + 1)
    result["score_cam"] = {"images_per_s": ours, "T_around": t_around, "bound": bound, "ratio_to_bound": ours / bound,
                           "passes_per_image": passes, "share_of_T": ours * passes / t_around}
    log(f"Score-CAM: {ours:.2f} images/s = {ours / bound:.3f} x bound (T around it {t_around:.0f}); "
        f"{passes:.1f} passes/image, running at {ours * passes / t_around:.3f} of T")

    # the straightforward implementation, on the first few images
    m = min(args.naive_n, args.n)
    naive_score_cam(model, images[0], layer)  # its first predict traces the model once
    naive, seconds, t_naive = beside_t(throughput, lambda: [naive_score_cam(model, im, layer)[0]
                                                            for im in tqdm(images[:m], desc="naive", leave=False,
                                                                           disable=None, mininterval=1)])
    naive_ips = m / seconds
    diff = float(np.abs(np.stack(naive) - maps[layer][:m]).max())
    result["naive"] = {"images": m, "images_per_s": naive_ips, "T_around": t_naive,
                       "speedup": ours / naive_ips, "speedup_same_T": (ours / t_around) / (naive_ips / t_naive),
                       "speedup_at_bound": (t_naive / (k + 1)) / naive_ips, "max_abs_map_difference": diff}
    log(f"naive: {naive_ips:.3f} images/s on {m} images; Score-CAM is {ours / naive_ips:.1f}x faster "
        f"(an implementation at the bound would be {(t_naive / (k + 1)) / naive_ips:.1f}x); "
        f"largest map difference {diff:.2e}")

    # Faster-Score-CAM
    result["faster_score_cam"] = {}
    for max_n in MAX_NS:
        scorecam.score_cam(model, images[:3], max_n=max_n)
        _, seconds, t_fast = beside_t(throughput, lambda n=max_n: scorecam.score_cam(model, images, max_n=n))
        ips = args.n / seconds
        cost = (ours / t_around) / (ips / t_fast)  # cost per image relative to full Score-CAM, same T
        expected = (max_n + 1) / (k + 1)
        expected_passes = passes_per_image(model, images, layer, max_n) / passes
        result["faster_score_cam"][max_n] = {"images_per_s": ips, "T_around": t_fast, "cost_ratio": cost,
                                             "expected_ratio": expected, "expected_ratio_from_passes": expected_passes}
        log(f"Faster-Score-CAM max_n={max_n}: {ips:.2f} images/s, cost {cost:.3f} of full "
            f"(expected (max_n+1)/(K+1) = {expected:.3f}; from the passes really needed {expected_passes:.3f})")

    # the bfloat16 path
    m = min(args.bf16_n, args.n)
    copy = scorecam.bfloat16_copy(model)
    t_bf16 = Throughput(copy, args.seed).full(repeats=1)
    scorecam.score_cam_layers(model, images[:3], [layer], precision="bfloat16")
    scorecam.score_cam_layers(model, images[:5], [layer], precision="bfloat16")
    bf16, seconds, t_b = beside_t(throughput, lambda: scorecam.score_cam_layers(model, images[:m], [layer],
                                                                                precision="bfloat16"))
    ips = m / seconds
    r = pearson(bf16[layer], maps[layer][:m])
    same = bf16[None].argmax(axis=1) == maps[None][:m].argmax(axis=1)
    result["bfloat16"] = {"images": m, "T_bfloat16_copy": t_bf16["images_per_s"], "images_per_s": ips,
                          "T_around": t_b, "ratio_to_fp32_bound": ips / (t_b / (k + 1)),
                          "min_pearson_r": float(r.min()), "top_class_equal": bool(same.all()),
                          "top_class_equal_fraction": float(same.mean())}
    log(f"bfloat16: copy's T = {t_bf16['images_per_s']:.0f} images/s ({t_bf16['images_per_s'] / t['images_per_s']:.2f}"
        f" x float32 T); Score-CAM {ips:.2f} images/s = {ips / (t_b / (k + 1)):.3f} x the float32 bound; "
        f"min Pearson r {r.min():.4f}, top class equal on {same.mean():.1%}")
    return result


def peak_rss_mb():
    """This process's peak resident set size (MB): VmHWM, which starts afresh at exec; ru_maxrss
    (what is left elsewhere) keeps the parent's high-water mark across fork and exec on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(n, seed):
    """In a fresh process: score_cam with default settings on n 64x64 images; prints JSON."""
    keras.utils.set_random_seed(seed)
    model = build_model((64, 64, 3), 20)
    images = np.random.default_rng(seed).uniform(0, 255, (n, 64, 64, 3)).astype(np.float32)
    scorecam.score_cam(model, images[:2])
    rss_before = peak_rss_mb()
    maps, seconds = timed(lambda: scorecam.score_cam(model, images))
    peak = peak_rss_mb()
    print(json.dumps({"images": n, "peak_rss_mb": peak, "peak_rss_before_run_mb": rss_before,
                      "input_mb": images.nbytes / 2**20, "output_mb": maps.nbytes / 2**20,
                      "seconds": seconds, "images_per_s": n / seconds}))


def machine():
    import tensorflow as tf

    cpu = platform.processor()
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and (not cpu or cpu == platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": physical,
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_flags": sorted(f for f in flags if f.startswith(("avx2", "avx512f", "avx512_bf16", "amx"))),
            "gpus": gpus, "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__, "backend": keras.backend.backend(),
            "auto_precision": scorecam.AUTO_PRECISION}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="images explained per model size (default: %(default)s)")
    p.add_argument("--naive-n", type=int, default=6, help="images for the naive implementation (default: %(default)s)")
    p.add_argument("--bf16-n", type=int, default=100, help="images for the bfloat16 path (default: %(default)s)")
    p.add_argument("--memory-n", type=int, default=2000,
                   help="64x64 images in the peak-memory run; 0 skips it (default: %(default)s)")
    p.add_argument("--sizes", default="32,64", help="model sizes to run, of 32 and 64 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure to this JSON file (atomically)")
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child, args.seed)
    if min(args.n, args.naive_n, args.bf16_n) < 1:
        p.error("--n, --naive-n and --bf16-n must be at least 1")
    sides = {int(s) for s in args.sizes.split(",")}

    def log(line):
        print(line, flush=True)

    start = time.perf_counter()
    report = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "memory_child"},
              "models": {}}
    m = report["machine"]
    log(f"machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), GPUs: "
        f"{', '.join(m['gpus']) or 'none'}; TensorFlow {m['tensorflow']}, Keras {m['keras']}; "
        f"flags: {' '.join(m['cpu_flags'])}")
    for side, classes in SIZES:
        if side in sides:
            result = bench_model(side, classes, args, log)
            report["models"][result["model"]] = result
    if args.memory_n:
        t64 = report["models"].get("64x64x20", {}).get("T", {}).get("images_per_s")
        eta = f" (about {args.memory_n * 65 / t64 / 60:.0f} min at T = {t64:.0f})" if t64 else ""
        log(f"\n== peak memory: score_cam on {args.memory_n} images at 64x64, default settings, in a subprocess{eta}")
        child = subprocess.run([sys.executable, __file__, "--memory-child", str(args.memory_n), "--seed",
                                str(args.seed)], capture_output=True, text=True, check=False)
        if child.returncode:
            sys.exit(f"error: the memory run failed:\n{child.stderr[-2000:]}")
        report["memory"] = json.loads(child.stdout.strip().splitlines()[-1])
        mem = report["memory"]
        log(f"peak RSS {mem['peak_rss_mb']:.0f} MB ({mem['peak_rss_before_run_mb']:.0f} MB before the run; "
            f"input {mem['input_mb']:.0f} MB, output {mem['output_mb']:.0f} MB); "
            f"{mem['images_per_s']:.2f} images/s over {mem['images']} images")
    report["elapsed_s"] = time.perf_counter() - start
    log(f"\nelapsed {report['elapsed_s']:.0f} s")
    if args.json:
        write_text(args.json, json.dumps(report, indent=1) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
