"""Score-CAM at the speed limit of the hardware: measures it against the bound, side by side.

    python bench.py [--n 300] [--json bench.json] [--memory-n 2000] [--naive-n 6] [--bf16-n 100]
                    [--sizes 32,64,mobilenet,vit] [--mobilenet-n 6] [--vit-n 64]      (KERAS_BACKEND=jax for JAX)
    python bench.py --backbones     # keras.applications backbones at batch 32-256, TensorFlow and JAX
                                    # (bench_backbones.py; md_image/bench_backbones.json)
    python bench.py --profile --n 16  # where a call's time goes on this backend (bench_profile.py)

Score-CAM costs one forward pass per image for the activations plus one per channel of the
explained layer, so with T the model's own batched throughput (images/s: the faster of
model.predict and a loop of predict_on_batch, Keras's compiled call on every backend, batch 256) no
Score-CAM explains more than T / (K + 1) images/s at full precision. For each model size (build_model,
seeded, untrained: 32x32 with 10 classes and 64x64 with 20; the last conv layer, K = 64) this prints
and records:

  T and the bound T / (K + 1); score_cam's images/s and its ratio to the bound. Score-CAM skips
  channels that are constant on an image (weight 0, as the authors' code), so the ratio can pass 1;
  "passes/image" counts the forward passes really needed and "of T" is the share of the model's
  throughput that they run at (1.0 = the hardware limit).
  the straightforward implementation (reference.naive_score_cam, the original experiment's loop) in
  the same run: its images/s, our speed-up, and the largest difference between the two maps;
  Faster-Score-CAM at max_n 8/16/32: images/s and its cost relative to full Score-CAM, against
  the (max_n + 1) / (K + 1) it should scale as;
  the bfloat16 path (precision="bfloat16"): the bfloat16 copy's own T, Score-CAM images/s, ratio
  to the float32 bound, and agreement with the float32 maps (min Pearson r, same top class);
  what precision="auto" chooses here (kerascam.auto_precision) and both speeds it measured;
  a transfer-learning model, MobileNetV2 (alpha 0.35, 96x96, random weights) nested in a Sequential
  with a 5-class head, at its last conv layer (K = 1280): Score-CAM and max_n 64, each against its
  bound, on --mobilenet-n images;
  a small vision transformer (vit_model: 32x32, patch 4, 64 + 1 tokens of width 32) at its default
  layer, the last block's token output laid on its 8x8 grid (K = 32): Score-CAM and max_n 8 against
  their bounds, on --vit-n images;
  peak memory of score_cam on --memory-n images at 64x64 with default settings, in a subprocess
  (VmHWM), and the machine (CPU, cores, devices, backend, library versions).

Every T is re-measured right before and after each timed method and the method's bound uses their
mean, so a busy machine skews ratios less than absolute figures. On an idle 2-core CPU it takes
about 12 minutes, 6 of them the 2,000-image memory run (--memory-n 500 shortens it to 2). The JSON
file is written atomically. Every figure is for the backend Keras runs on (KERAS_BACKEND).
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

import runtime  # noqa: F401  (before keras: quiet TensorFlow start-up)
import keras
import numpy as np
from tqdm import tqdm

import bench_backbones
import bench_profile
import kerascam
from kerascam.copies import bfloat16_copy
from kerascam.layers import path_name
from atomic import write_text
from model import build_model
from kerascam import naive_score_cam

SIZES = ((32, 10), (64, 20))  # (input side, classes)
VIT = {"side": 32, "patch": 4, "dim": 32, "heads": 4, "blocks": 2, "classes": 10, "max_n": 8}  # 64 + 1 tokens
T_BATCH = 256
MAX_NS = (8, 16, 32)
MOBILENET = dict(side=96, alpha=0.35, classes=5, max_n=64)


# ---------------------------------------------------------------- measuring

class Throughput:
    """T: the model's own inference throughput at batch 256 (images/s), the faster of model.predict
    and a loop of predict_on_batch (Keras's compiled call: tf.function on TensorFlow, jax.jit on JAX)."""

    def __init__(self, model, seed=0):
        self.model = model
        shape = (T_BATCH,) + tuple(model.inputs[0].shape[1:])
        self.x = np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)
        model.predict_on_batch(self.x)
        model.predict(self.x, batch_size=T_BATCH, verbose=0)
        self.best = None

    def _predict(self, batches):
        x = np.concatenate([self.x] * batches)
        start = time.perf_counter()
        self.model.predict(x, batch_size=T_BATCH, verbose=0)
        return len(x) / (time.perf_counter() - start)

    def _call(self, batches):
        start = time.perf_counter()
        for _ in range(batches):
            np.asarray(self.model.predict_on_batch(self.x))
        return batches * T_BATCH / (time.perf_counter() - start)

    def full(self, batches=2, repeats=2):
        """Both ways, best of `repeats`; remembers the faster way for quick re-measurements."""
        predict = max(self._predict(batches) for _ in range(repeats))
        call = max(self._call(batches) for _ in range(repeats))
        self.best = "compiled call" if call >= predict else "model.predict"
        return {"images_per_s": max(predict, call), "predict": predict, "compiled_call": call, "used": self.best}

    def quick(self, batches=1):
        return self._call(batches) if self.best == "compiled call" else self._predict(batches)


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


pearson = kerascam.pearson


def passes_per_image(model, images, layer, max_n=None):
    """Forward passes Score-CAM really needs per image: 1 + the non-constant (chosen) channels."""
    acts = kerascam.explainable(model, [kerascam.find_layer(model, layer)]).predict(images, batch_size=64, verbose=0)[0]
    flat = acts.reshape(len(acts), -1, acts.shape[-1])
    varying = (flat.max(axis=1) > flat.min(axis=1)).sum(axis=1)
    if max_n:
        varying = np.minimum(varying, max_n)
    return 1 + float(varying.mean())


def measure_t(model, args, log):
    throughput = Throughput(model, args.seed)
    t = throughput.full()
    log(f"T = {t['images_per_s']:.0f} images/s ({t['used']}; model.predict {t['predict']:.0f}, compiled call "
        f"{t['compiled_call']:.0f})")
    return throughput, t


def time_score_cam(model, images, layer, throughput, k, max_n=None):
    """Score-CAM (float32) after a warm-up call on the same images that traces and compiles every graph and shape:
    (maps, probabilities, {images_per_s, T_around, bound, ratio_to_bound})."""
    run = lambda x: kerascam.score_cam_layers(model, x, [layer], max_n=max_n, precision="float32")  # noqa: E731
    run(images)  # the same call once: every shape it uses compiled (JAX compiles each new shape)
    (maps, probs), seconds, t_around = beside_t(throughput, lambda: run(images))
    ips = len(images) / seconds
    used = min(k, max_n) if max_n else k
    bound = t_around / (used + 1)
    return maps[path_name(kerascam.find_layer(model, layer))], probs, {
        "images_per_s": ips, "T_around": t_around, "bound": bound, "bound_channels": used,
        "ratio_to_bound": ips / bound}


def bench_auto(model, layer, images, log):
    """What precision="auto" chooses for this model here, and the speeds it measured."""
    auto = kerascam.auto_precision(model, [layer], images)
    speeds = ", ".join(f"{p} {v:.2f}" for p, v in auto["images_per_s"].items())
    log(f"precision auto: {auto['choice']} (measured images/s: {speeds}; min Pearson r "
        f"{auto['min_pearson_r'] if auto['min_pearson_r'] is None else round(auto['min_pearson_r'], 5)}, "
        f"same top class: {auto['top_class_equal']})")
    return auto


def bench_model(side, classes, args, log):
    keras.utils.set_random_seed(args.seed)
    model = build_model((side, side, 3), classes)
    layer = path_name(kerascam.find_layer(model))
    k = int(kerascam.explainable(model, [kerascam.find_layer(model)]).outputs[0].shape[-1])
    images = np.random.default_rng(args.seed + 1).uniform(0, 255, (args.n, side, side, 3)).astype(np.float32)
    name = f"{side}x{side}x{classes}"
    result = {"model": name, "layer": layer, "channels": k, "images": args.n}
    log(f"\n== {name}: build_model({side}x{side}, {classes} classes), layer {layer} (K = {k}), {args.n} images")

    throughput, t = measure_t(model, args, log)
    result["T"] = t
    log(f"bound T/(K+1) = {t['images_per_s'] / (k + 1):.2f} images/s")

    maps, probs, sc = time_score_cam(model, images, layer, throughput, k)
    ours, t_around = sc["images_per_s"], sc["T_around"]
    passes = passes_per_image(model, images, layer)
    sc.update(passes_per_image=passes, share_of_T=ours * passes / t_around)
    result["score_cam"] = sc
    log(f"Score-CAM: {ours:.2f} images/s = {sc['ratio_to_bound']:.3f} x bound (T around it {t_around:.0f}); "
        f"{passes:.1f} passes/image, running at {ours * passes / t_around:.3f} of T")

    # the straightforward implementation, on the first few images
    m = min(args.naive_n, args.n)
    naive_score_cam(model, images[0], layer)  # its first predict traces the model once
    naive, seconds, t_naive = beside_t(throughput, lambda: [naive_score_cam(model, im, layer)[0]
                                                            for im in tqdm(images[:m], desc="naive", leave=False,
                                                                           disable=None, mininterval=1)])
    naive_ips = m / seconds
    diff = float(np.abs(np.stack(naive) - maps[:m]).max())
    result["naive"] = {"images": m, "images_per_s": naive_ips, "T_around": t_naive,
                       "speedup": ours / naive_ips, "speedup_same_T": (ours / t_around) / (naive_ips / t_naive),
                       "speedup_at_bound": (t_naive / (k + 1)) / naive_ips, "max_abs_map_difference": diff}
    log(f"naive: {naive_ips:.3f} images/s on {m} images; Score-CAM is {ours / naive_ips:.1f}x faster "
        f"(an implementation at the bound would be {(t_naive / (k + 1)) / naive_ips:.1f}x); "
        f"largest map difference {diff:.2e}")

    # Faster-Score-CAM
    result["faster_score_cam"] = {}
    for max_n in MAX_NS:
        _, _, fast = time_score_cam(model, images, layer, throughput, k, max_n)
        cost = (ours / t_around) / (fast["images_per_s"] / fast["T_around"])  # relative to full Score-CAM, same T
        expected = (max_n + 1) / (k + 1)
        expected_passes = passes_per_image(model, images, layer, max_n) / passes
        fast.update(cost_ratio=cost, expected_ratio=expected, expected_ratio_from_passes=expected_passes)
        result["faster_score_cam"][max_n] = fast
        log(f"Faster-Score-CAM max_n={max_n}: {fast['images_per_s']:.2f} images/s, cost {cost:.3f} of full "
            f"(expected (max_n+1)/(K+1) = {expected:.3f}; from the passes really needed {expected_passes:.3f})")

    # the bfloat16 path
    m = min(args.bf16_n, args.n)
    copy = bfloat16_copy(model)
    t_bf16 = Throughput(copy, args.seed).full(repeats=1)
    bf16_run = lambda x: kerascam.score_cam_layers(model, x, [layer], precision="bfloat16")  # noqa: E731
    bf16_run(images[:3])
    bf16_run(images[:5])
    (bf16, bf16_probs), seconds, t_b = beside_t(throughput, lambda: bf16_run(images[:m]))
    ips = m / seconds
    r = pearson(bf16[layer], maps[:m])
    same = bf16_probs.argmax(axis=1) == probs[:m].argmax(axis=1)
    result["bfloat16"] = {"images": m, "T_bfloat16_copy": t_bf16["images_per_s"], "images_per_s": ips,
                          "T_around": t_b, "ratio_to_fp32_bound": ips / (t_b / (k + 1)),
                          "min_pearson_r": float(r.min()), "top_class_equal": bool(same.all()),
                          "top_class_equal_fraction": float(same.mean())}
    log(f"bfloat16: copy's T = {t_bf16['images_per_s']:.0f} images/s ({t_bf16['images_per_s'] / t['images_per_s']:.2f}"
        f" x float32 T); Score-CAM {ips:.2f} images/s = {ips / (t_b / (k + 1)):.3f} x the float32 bound; "
        f"min Pearson r {r.min():.4f}, top class equal on {same.mean():.1%}")
    result["auto_precision"] = bench_auto(model, layer, images, log)
    return result


def mobilenet_model(seed=0):
    """MobileNetV2 (alpha 0.35, 96x96, random weights) nested in a Sequential with a softmax head:
    the transfer-learning shape of model people bring."""
    keras.utils.set_random_seed(seed)
    side = MOBILENET["side"]
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(side, side, 3),
                                              alpha=MOBILENET["alpha"])
    return keras.Sequential([keras.Input((side, side, 3)), backbone, keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(MOBILENET["classes"], activation="softmax")], name="mobilenet_head")


def vit_model(seed=0):
    """A small vision transformer of Keras layers (VIT: patch-embedding conv, a class token, MultiHeadAttention
    blocks, a softmax head on the class token), random weights: the speed of its token layers is what is
    measured, so the class token is zeros and there is no position embedding."""
    keras.utils.set_random_seed(seed)
    side, patch, dim = VIT["side"], VIT["patch"], VIT["dim"]
    inp = keras.Input((side, side, 3))
    x = keras.layers.Conv2D(dim, patch, strides=patch, name="patches")(keras.layers.Rescaling(1 / 255)(inp))
    x = keras.layers.Reshape((-1, dim))(x)
    cls = keras.layers.Lambda(lambda t: keras.ops.zeros_like(t[:, :1]), name="class_token")(x)
    x = keras.layers.Concatenate(axis=1)([cls, x])
    for b in range(1, VIT["blocks"] + 1):
        y = keras.layers.LayerNormalization()(x)
        x = keras.layers.Add()([x, keras.layers.MultiHeadAttention(VIT["heads"], dim // VIT["heads"])(y, y)])
        y = keras.layers.Dense(2 * dim, activation="gelu")(keras.layers.LayerNormalization()(x))
        x = keras.layers.Add(name=f"block{b}")([x, keras.layers.Dense(dim)(y)])
    head = keras.layers.Lambda(lambda t: t[:, 0], name="take_class")(keras.layers.LayerNormalization()(x))
    return keras.Model(inp, keras.layers.Dense(VIT["classes"], activation="softmax")(head), name="vit")


def bench_nested(name, model, description, n, max_n, args, log):
    """Score-CAM and Faster-Score-CAM (max_n) of a model's default layer, each against its bound."""
    ref = kerascam.find_layer(model)
    layer = path_name(ref)
    k = int(kerascam.explainable(model, [ref]).outputs[0].shape[-1])
    side = int(model.inputs[0].shape[1])
    images = np.random.default_rng(args.seed + 1).uniform(0, 255, (n, side, side, 3)).astype(np.float32)
    result = {"model": name, "layer": layer, "channels": k, "images": n}
    log(f"\n== {description}, layer {layer} (K = {k}), {n} images")
    throughput, t = measure_t(model, args, log)
    result["T"] = t
    _, _, result["score_cam"] = time_score_cam(model, images, layer, throughput, k)
    sc = result["score_cam"]
    log(f"Score-CAM: {sc['images_per_s']:.3f} images/s = {sc['ratio_to_bound']:.3f} x bound T/(K+1) = "
        f"{sc['bound']:.3f}")
    _, _, fast = time_score_cam(model, images, layer, throughput, k, max_n)
    result["faster_score_cam"] = {max_n: fast}
    log(f"Faster-Score-CAM max_n={max_n}: {fast['images_per_s']:.2f} images/s = {fast['ratio_to_bound']:.3f} x its "
        f"bound T/(max_n+1) = {fast['bound']:.2f}")
    return result


def bench_mobilenet(args, log):
    side = MOBILENET["side"]
    return bench_nested("mobilenetv2_nested", mobilenet_model(args.seed),
                        f"nested MobileNetV2 (alpha {MOBILENET['alpha']}, {side}x{side}, random weights)",
                        args.mobilenet_n, MOBILENET["max_n"], args, log)


def bench_vit(args, log):
    return bench_nested("vit", vit_model(args.seed), f"vision transformer ({VIT['side']}x{VIT['side']}, patch "
                        f"{VIT['patch']}, {VIT['blocks']} blocks of width {VIT['dim']}, random weights; token layer)",
                        args.vit_n, VIT["max_n"], args, log)


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
    """In a fresh process: score_cam (default settings, float32) on n 64x64 images; prints JSON."""
    keras.utils.set_random_seed(seed)
    model = build_model((64, 64, 3), 20)
    images = np.random.default_rng(seed).uniform(0, 255, (n, 64, 64, 3)).astype(np.float32)
    kerascam.score_cam(model, images[:2], precision="float32")
    rss_before = peak_rss_mb()
    maps, seconds = timed(lambda: kerascam.score_cam(model, images, precision="float32"))
    peak = peak_rss_mb()
    print(json.dumps({"images": n, "peak_rss_mb": peak, "peak_rss_before_run_mb": rss_before,
                      "input_mb": images.nbytes / 2**20, "output_mb": maps.nbytes / 2**20,
                      "seconds": seconds, "images_per_s": n / seconds}))


def machine():
    from importlib import metadata

    cpu = runtime.cpu_name()
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    versions = {}
    for package in ("tensorflow", "jax", "jaxlib", "torch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": physical,
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_flags": sorted(f for f in flags if f.startswith(("avx2", "avx512f", "avx512_bf16", "amx"))),
            "devices": keras.distribution.list_devices(), "python": platform.python_version(),
            "backend": keras.backend.backend(), "keras": keras.__version__, "numpy": np.__version__, **versions}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="images explained per model size (default: %(default)s)")
    p.add_argument("--naive-n", type=int, default=6, help="images for the naive implementation (default: %(default)s)")
    p.add_argument("--bf16-n", type=int, default=100, help="images for the bfloat16 path (default: %(default)s)")
    p.add_argument("--memory-n", type=int, default=2000,
                   help="64x64 images in the peak-memory run; 0 skips it (default: %(default)s)")
    p.add_argument("--sizes", default="32,64,mobilenet,vit",
                   help="models to run, of 32, 64, mobilenet and vit (default: %(default)s)")
    p.add_argument("--mobilenet-n", type=int, default=6, help="images for the nested MobileNetV2 (default: %(default)s)")
    p.add_argument("--vit-n", type=int, default=64, help="images for the vision transformer (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure to this JSON file (atomically)")
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    bench_backbones.add_arguments(p)
    p.add_argument("--profile", action="store_true", help="where a call's time goes (bench_profile.py): T, the "
                   "activation pass, the masked step, the masking alone, a profile of a call of --n pictures (at most 64)")
    args = p.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child, args.seed)
    if args.backbones:
        return bench_backbones.main(p, args, machine(), write_text)
    if args.profile:
        print(f"{runtime.cpu_name()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}", flush=True)
        return bench_profile.main(p, args)
    if min(args.n, args.naive_n, args.bf16_n, args.mobilenet_n, args.vit_n) < 1:
        p.error("--n, --naive-n, --bf16-n, --mobilenet-n and --vit-n must be at least 1")
    if args.memory_n < 0:
        p.error("--memory-n must be at least 0 (0 skips the memory run)")
    if not 0 <= args.seed < 2**32:
        p.error(f"--seed must be 0 to {2**32 - 1}")
    sides = {s.strip() for s in args.sizes.split(",")}
    if not sides <= {"32", "64", "mobilenet", "vit"}:
        p.error(f"--sizes takes 32, 64, mobilenet and vit, got {args.sizes!r}")

    def log(line):
        print(line, flush=True)

    start = time.perf_counter()
    report = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "memory_child"},
              "models": {}}
    m = report["machine"]
    log(f"machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), devices: "
        f"{', '.join(m['devices'])}; Keras {m['keras']} on {m['backend']}; flags: {' '.join(m['cpu_flags'])}")
    for side, classes in SIZES:
        if str(side) in sides:
            result = bench_model(side, classes, args, log)
            report["models"][result["model"]] = result
    if "mobilenet" in sides:
        report["models"]["mobilenetv2_nested"] = bench_mobilenet(args, log)
    if "vit" in sides:
        report["models"]["vit"] = bench_vit(args, log)
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
        try:
            write_text(args.json, json.dumps(report, indent=1) + "\n")
        except OSError as e:
            sys.exit(f"error: cannot write {args.json}: {e.strerror or e}")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
