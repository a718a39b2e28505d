"""bench.py --backbones: Score-CAM on the backbones people bring, against the bound, at several batch sizes.

    python bench.py --backbones [--backends tensorflow,jax] [--backbone-names VGG16,ResNet50,...]
                    [--backbone-n 1] [--repeats 2] [--json md_image/bench_backbones.json] [--resume]
    [KERAS_BACKEND=jax] python bench.py --backbones --auto-cost   # what batch_size="auto" costs here

Each backbone is keras.applications' (weights=None, include_top=True, 10 classes, 64 x 64 pictures,
seeded), explained at the layer layer=None picks (K channels). For each batch size of BATCHES, in one
process per backend and interleaved (the order alternates round by round, `--repeats` rounds, medians
reported), it times
  T_b: the model's own throughput, model.predict_on_batch on 128 pictures in batches of b (images/s);
  Score-CAM: score_cam_layers(model, images, batch_size=b, precision="float32") on --backbone-n pictures,
  after one untimed call on the same pictures that compiles every shape it uses.
T is the best of the T_b (the model's own best batched throughput) and the bound T / (K + 1); each
batch size's ratio is Score-CAM's images/s over that bound. Channels that are constant on a picture
are skipped (weight 0), so "passes/image" (1 + the varying channels) can be below K + 1 and a ratio
can pass 1. Each (backend, backbone) row runs in a subprocess of its own (KERAS_BACKEND); the JSON is
written atomically after each row, and --resume keeps the rows it holds and runs the others.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BATCHES = (32, 64, 128, 256)
BACKBONES = ("VGG16", "ResNet50", "EfficientNetB0", "ConvNeXtTiny")
SIDE = 64
T_PICTURES = 128  # pictures per measurement of T_b
GAIN = 0.10  # a batch size must beat 256 by more than this on some row for batch_size="auto" to be worth it


def build(name, seed):
    import keras

    keras.utils.set_random_seed(seed)
    return getattr(keras.applications, name)(weights=None, include_top=True, classes=10,
                                             input_shape=(SIDE, SIDE, 3))


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_row(name, n, repeats, seed, log):
    """One backbone on the running backend: T_b and Score-CAM's images/s at each batch size (medians)."""
    import numpy as np

    import kerascam

    model = build(name, seed)
    ref = kerascam.find_layer(model)
    acts = kerascam.explainable(model, [ref])
    k = int(acts.outputs[0].shape[-1])
    rng = np.random.default_rng(seed + 1)
    images = rng.uniform(0, 255, (n, SIDE, SIDE, 3)).astype(np.float32)
    flat = np.asarray(acts.predict_on_batch(images)[0]).reshape(n, -1, k)
    passes = 1 + float((flat.max(axis=1) > flat.min(axis=1)).sum(axis=1).mean())
    pictures = rng.uniform(0, 255, (T_PICTURES, SIDE, SIDE, 3)).astype(np.float32)

    def throughput(b):
        return T_PICTURES / _timed(lambda: [np.asarray(model.predict_on_batch(pictures[i:i + b]))
                                            for i in range(0, T_PICTURES, b)])

    def score_cam(b):
        return n / _timed(lambda: kerascam.score_cam_layers(model, images, [ref], batch_size=b, precision="float32"))

    start = time.perf_counter()
    for b in BATCHES:  # compile every shape of both
        throughput(b)
        score_cam(b)
    log(f"  {name}: layer {kerascam.layers.path_name(ref)} (K = {k}), warm-up {time.perf_counter() - start:.0f} s")
    t_b, sc_b = {b: [] for b in BATCHES}, {b: [] for b in BATCHES}
    for r in range(repeats):
        for b in (BATCHES if r % 2 == 0 else BATCHES[::-1]):
            t_b[b].append(throughput(b))
            sc_b[b].append(score_cam(b))
    t_med = {b: statistics.median(v) for b, v in t_b.items()}
    best_t = max(t_med.values())
    bound = best_t / (k + 1)
    rows = {b: {"images_per_s": statistics.median(sc_b[b]), "runs": sc_b[b], "T_b": t_med[b], "T_b_runs": t_b[b],
                "ratio_to_bound": statistics.median(sc_b[b]) / bound,
                "share_of_T": statistics.median(sc_b[b]) * passes / best_t} for b in BATCHES}
    fastest = max(BATCHES, key=lambda b: rows[b]["images_per_s"])
    result = {"model": name, "side": SIDE, "layer": kerascam.layers.path_name(ref), "channels": k, "images": n,
              "passes_per_image": passes, "T": best_t, "bound": bound, "batch": rows, "fastest_batch": fastest,
              "gain_of_fastest_over_256": rows[fastest]["images_per_s"] / rows[256]["images_per_s"] - 1,
              "seconds": time.perf_counter() - start}
    log(f"  {name}: T {best_t:.1f} img/s, bound {bound:.4f}; Score-CAM / bound at batch "
        + ", ".join(f"{b}: {rows[b]['ratio_to_bound']:.2f}" for b in BATCHES)
        + f"; fastest {fastest} (+{result['gain_of_fastest_over_256']:.1%} over 256); {result['seconds']:.0f} s")
    return result


def child(names, n, repeats, seed):
    """In a fresh process on one backend: every backbone's row; prints one JSON line."""
    import runtime  # noqa: F401  (before keras: quiet TensorFlow start-up)
    import keras

    def log(line):
        print(line, file=sys.stderr, flush=True)

    log(f"== {keras.backend.backend()}")
    rows = {name: bench_row(name, n, repeats, seed, log) for name in names}
    print(json.dumps({"backend": keras.backend.backend(), "rows": rows}))


def run(args, machine, log, save=lambda report: None, done=None):
    """Every backend's rows, each backbone in a subprocess of its own; the report, with the batch-size
    decision. The report is saved after each row, and `done` (an earlier report, --resume) keeps its rows,
    so a run cut short is continued, not repeated."""
    names = [s.strip() for s in args.backbone_names.split(",") if s.strip()]
    report = done or {"machine": machine, "date": time.strftime("%Y-%m-%d"), "batches": list(BATCHES),
                      "settings": {"side": SIDE, "images": args.backbone_n, "repeats": args.repeats,
                                   "seed": args.seed, "T_pictures": T_PICTURES},
                      "load": [], "backends": {}}
    for backend in [s.strip() for s in args.backends.split(",") if s.strip()]:
        rows = report["backends"].setdefault(backend, {})
        for name in [n for n in names if n not in rows]:
            load = os.getloadavg()
            command = [sys.executable, __file__, "--child", name, str(args.backbone_n), str(args.repeats),
                       str(args.seed)]
            child_run = subprocess.run(command, env=dict(os.environ, KERAS_BACKEND=backend), stdout=subprocess.PIPE,
                                       text=True, check=False)
            if child_run.returncode:
                sys.exit(f"error: the {backend} {name} row failed (exit status {child_run.returncode}); "
                         "--resume continues from the rows saved")
            rows.update(json.loads(child_run.stdout.strip().splitlines()[-1])["rows"])
            report["load"].append({"row": f"{backend}/{name}", "before": load, "after": os.getloadavg()})
            save(report)
    gains = {f"{backend}/{name}": row["gain_of_fastest_over_256"]
             for backend, rows in report["backends"].items() for name, row in rows.items()}
    report["decision"] = {"gains_over_256": gains, "threshold": GAIN,
                          "auto": any(g > GAIN for g in gains.values())}
    log(f"batch size: the fastest beats 256 by more than {GAIN:.0%} on "
        f"{sum(g > GAIN for g in gains.values())} of {len(gains)} rows")
    return report


def table(report):
    """The report as docs/performance.md's table: each row's T, bound and Score-CAM's ratio to the bound at
    each batch size, the fastest batch size and its gain over 256."""
    names = {"tensorflow": "TensorFlow", "jax": "JAX"}
    lines = ["| backbone, layer (K) | backend | T (img/s) | bound T/(K+1) | Score-CAM / bound at batch "
             + " / ".join(map(str, BATCHES)) + " | fastest (gain over 256) |", "| --- | --- | --- | --- | --- | --- |"]
    for backend, rows in report["backends"].items():
        for name, r in rows.items():
            ratios = " / ".join(f"{r['batch'][str(b)]['ratio_to_bound']:.2f}" for b in BATCHES)
            lines.append(f"| {name}, `{r['layer']}` (K = {r['channels']}) | {names.get(backend, backend)} | "
                         f"{r['T']:.1f} | {r['bound']:.4f} | {ratios} | {r['fastest_batch']} "
                         f"(+{r['gain_of_fastest_over_256']:.0%}) |")
    return "\n".join(lines)


def auto_cost(names, seed, log):
    """What batch_size="auto" costs here, on the running backend (KERAS_BACKEND), per backbone: the measurement
    run as for a stream (every candidate), its wall time, one compilation's time as it saw it, the rates and
    the choice, and the smallest call it measures for (batching's AUTO_SHARE gate) with that call's time at 256."""
    import keras
    import numpy as np

    import kerascam
    from kerascam import batching
    from kerascam.engine import Explainer

    for name in names:
        model = build(name, seed)
        ref = kerascam.find_layer(model)
        x = np.random.default_rng(seed + 1).uniform(0, 255, (2, SIDE, SIDE, 3)).astype(np.float32)
        kerascam.score_cam(model, x[:1], batch_size=16, precision="float32")  # the activation graph compiled
        start = time.perf_counter()
        m = batching.measure_batch_size(model, lambda b: Explainer(model, [ref], b, None, "float32").masked_step(x),
                                        ("bench", name), None)
        seconds = time.perf_counter() - start
        base = {"rate": m["pictures_per_s"][batching.DEFAULT], "compile_s": m["compile_s"]}
        passes = max(batching.AUTO_SHARE * batching._others_cost(base) * base["rate"], batching.AUTO_MIN_PASSES)
        k = int(kerascam.explainable(model, [ref]).outputs[0].shape[-1])
        log(f"{keras.backend.backend()} {name} (K = {k}): measured in {seconds:.1f} s (one compilation "
            f"{m['compile_s']:.1f} s), masked pictures/s " + ", ".join(f"{b}: {r:.1f}" for b, r in
                                                                    sorted(m["pictures_per_s"].items()))
            + f"; chose {m['choice']}; measures for calls of {passes:,.0f} masked passes ({-(-passes // k):,.0f} "
            f"pictures, {passes / base['rate']:.0f} s at 256) or more")


def add_arguments(p):
    p.add_argument("--backbones", action="store_true", help="only the backbone rows (bench_backbones.py): "
                   "keras.applications models at batch 32/64/128/256, each backend in a subprocess; JSON to --json "
                   "(default md_image/bench_backbones.json)")
    p.add_argument("--backends", default="tensorflow,jax", help="--backbones: backends (default: %(default)s)")
    p.add_argument("--backbone-names", default=",".join(BACKBONES),
                   help="--backbones: keras.applications models (default: %(default)s)")
    p.add_argument("--backbone-n", type=int, default=1, help="--backbones: pictures a timed call (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="--backbones: interleaved rounds (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="--backbones: keep the rows already in --json, run the rest")
    p.add_argument("--auto-cost", action="store_true", help="--backbones: instead of the rows, what batch_size='auto' "
                   "costs on each backbone on this backend (KERAS_BACKEND), printed")


def main(p, args, machine, write_text):
    """bench.py --backbones: the rows on each backend, written atomically to --json."""
    if args.backbone_n < 1 or args.repeats < 1:
        p.error("--backbone-n and --repeats must be at least 1")
    if args.auto_cost:
        return auto_cost([n.strip() for n in args.backbone_names.split(",") if n.strip()], args.seed,
                         lambda line: print(line, flush=True))
    path = args.json or "md_image/bench_backbones.json"

    def save(report):
        try:
            write_text(path, json.dumps(report, indent=1) + "\n")
        except OSError as e:
            sys.exit(f"error: cannot write {path}: {e.strerror or e}")

    done = json.loads(Path(path).read_text()) if args.resume and Path(path).is_file() else None
    report = run(args, machine, lambda line: print(line, flush=True), save, done)
    save(report)
    print(table(json.loads(json.dumps(report))))  # JSON's string keys, as a --resume reads them
    print(f"wrote {path}")


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    child(sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
