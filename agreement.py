"""Do TensorFlow and JAX give the same maps and predictions? The shipped models on both backends, compared.

    python agreement.py --cifar-dir DIR [--characters-dir FACES_DIR] [--n 100] [--seed 0]
                        [--json md_image/backends.json] [--model models/cifar10.keras]
                        [--characters-model models/characters.keras]

Keras picks its backend once, at import, so the command runs itself once per backend in a
subprocess (KERAS_BACKEND=tensorflow, then jax). Each run loads the model(s) and computes:

  maps          of every method in kerascam.METHODS but the model-blind floors (Score-CAM and
                Faster-Score-CAM with precision="float32"), at the last conv layer, for the
                predicted class, on a seeded sample of --n images (sorted(numpy.random.default_rng
                (seed).choice(len(split), n, replace=False)), as evaluate.py samples);
  probabilities of the whole split (kerascam.predict_probabilities): the 10,000 CIFAR-10 test pictures,
                and with --characters-dir the character model's validation split (the one train.py
                makes: data.folder.load_image_folder(dir, model size, val_fraction=0.2, seed=0)).

The TensorFlow run reads the data and hands the JAX run the very same arrays. The comparison, per
method: Pearson r per image between the two backends' maps (least, mean, how many below 0.999,
the worst image) and the largest absolute difference of a map value; per model: how many
pictures get a different predicted class, and the largest absolute difference of a probability.
It prints a table and writes --json (atomically) with the machine, the library versions and each
backend's time. A method that raises on one backend is recorded as failed there (its message in
the table and the JSON) and the others still run. Exit status 0 once both runs have finished,
agreeing or not; 1 with one `error:` line for bad input, a run that failed, or a method that did.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
BACKENDS = ("tensorflow", "jax")
AGREEMENT = 0.999  # least Pearson r per image for two maps to agree
LISTED = 50  # disagreeing pictures listed by index in the JSON (all are counted)
MODELS = {"cifar10": ROOT / "models" / "cifar10.keras", "characters": ROOT / "models" / "characters.keras"}


# ---------------------------------------------------------------- one backend (the child process)

def prepare_inputs(args, path):
    """Read the data (the first run does this) into `path`: per model its split's images (uint8 as
    read), labels and the sorted sample of images to explain."""
    from data.cifar10 import load_cifar10

    arrays = {}
    _, (x, y), names = load_cifar10(args.cifar_dir, train=False)
    arrays.update({"cifar10/x": x, "cifar10/y": y, "cifar10/names": np.asarray(names)})
    if args.characters_dir:
        from data.folder import load_image_folder

        import kerascam
        from model import load_model

        model, _, _ = load_model(args.characters_model)
        size = kerascam.input_spec(model)[:2]
        if None in size:
            raise ValueError(f"{args.characters_model}: needs a fixed input size (pictures are resized to it)")
        d = load_image_folder(args.characters_dir, image_size=size, val_fraction=0.2, seed=0)
        arrays.update({"characters/x": d.x_val, "characters/y": d.y_val,
                       "characters/names": np.asarray(d.class_names)})
    for key in [k[:-2] for k in arrays if k.endswith("/x")]:
        count = len(arrays[f"{key}/x"])
        if count == 0:
            raise ValueError(f"the {key} split holds no pictures")
        n = min(args.n, count)
        arrays[f"{key}/sample"] = np.sort(np.random.default_rng(args.seed).choice(count, n, replace=False))
    np.savez(path, **arrays)


def explain_model(key, model_path, data, log):
    """{name: array} of one model on this backend: the maps of each method, the probabilities of
    the split, and the seconds each took."""
    import kerascam
    from kerascam.layers import path_name
    from model import load_model

    model, class_names, _ = load_model(model_path)
    x = data[f"{key}/x"].astype(np.float32)
    names = [str(n) for n in data[f"{key}/names"]]
    if len(names) != len(class_names):
        raise ValueError(f"the {key} data has {len(names)} classes, the model {model_path} {len(class_names)}")
    kerascam.check_images(model, x[:1])  # a clear error for pictures of the wrong size
    out, seconds, errors = {}, {}, {}
    start = time.perf_counter()
    out[f"{key}/probs"] = kerascam.predict_probabilities(model, x)
    seconds["predict"] = time.perf_counter() - start
    log(f"{key}: probabilities of {len(x)} pictures in {seconds['predict']:.1f} s")
    images = x[data[f"{key}/sample"]]
    for name, method in kerascam.METHODS.items():
        if method.floor:
            continue
        options = {"precision": "float32"} if "precision" in method.options else {}
        start = time.perf_counter()
        try:
            out[f"{key}/maps/{name}"] = method.function(model, images, **options)
        except Exception as e:  # a method failing on one backend is a finding: the others still run
            errors[name] = f"{type(e).__name__}: {e}"
            log(f"{key}: {method.label} failed: {errors[name]}")
            continue
        seconds[name] = time.perf_counter() - start
        log(f"{key}: {method.label} on {len(images)} images in {seconds[name]:.1f} s")
    out[f"{key}/layer"] = np.asarray(path_name(kerascam.find_layer(model)))
    out[f"{key}/seconds"] = np.asarray(json.dumps(seconds))
    out[f"{key}/errors"] = np.asarray(json.dumps(errors))
    out[f"{key}/classes_match"] = np.asarray([str(n) for n in class_names] == names)
    return out


def child(args):
    """One backend's run: writes {work}/{backend}.npz (and inputs.npz when it is not there yet)."""
    import runtime  # noqa: F401  (before keras: quiet TensorFlow start-up)
    import keras

    import kerascam
    from bench import machine

    backend = keras.backend.backend()

    def log(line):
        print(f"[{backend}] {line}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    work = Path(args.child)
    inputs = work / "inputs.npz"
    if not inputs.exists():
        prepare_inputs(args, inputs)
    data = dict(np.load(inputs))
    out = {}
    out.update(explain_model("cifar10", args.model, data, log))
    if "characters/x" in data:
        out.update(explain_model("characters", args.characters_model, data, log))
    info = {"machine": machine(), "seconds_in_process": time.perf_counter() - start,
            "methods": {n: m.label for n, m in kerascam.METHODS.items() if not m.floor}}
    out["info"] = np.asarray(json.dumps(info))
    np.savez(work / f"{backend}.npz", **out)


# ---------------------------------------------------------------- both backends, compared

def run_backend(backend, args, work):
    """Run this command on one backend in a subprocess: {elapsed_s, the machine's load average at
    its start and end} (a busy machine slows a run). ValueError with the child's error line when it fails."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(work), "--cifar-dir", str(args.cifar_dir),
               "--n", str(args.n), "--seed", str(args.seed), "--model", str(args.model),
               "--characters-model", str(args.characters_model)]
    if args.characters_dir:
        command += ["--characters-dir", str(args.characters_dir)]
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONUNBUFFERED="1")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    lines = []
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, errors="replace") as done:
        for line in done.stderr:  # its progress, as it goes; the rest is kept for an error message
            line = line.rstrip()
            if line.startswith(f"[{backend}]"):
                print(line, flush=True)
            elif line.strip():
                lines.append(line)
    seconds = time.perf_counter() - start
    loads = [load, os.getloadavg()[0] if load is not None else None]
    if done.returncode:
        errors = [line for line in lines if line.startswith("error: ")]
        tail = errors[-1][len("error: "):] if errors else (lines[-1] if lines else f"exit status {done.returncode}")
        raise ValueError(f"the {backend} run failed: {tail}")
    return {"elapsed_s": seconds, "load_average_1min": {"start": loads[0], "end": loads[1]}}


def compare_maps(a, b):
    """Pearson r per image and the largest absolute difference of two (N, H, W) stacks."""
    from kerascam import pearson  # imports a backend here, in the parent, only once the runs are done

    r = pearson(a, b)
    return {"min_pearson_r": float(r.min()), "mean_pearson_r": float(r.mean()),
            "below_threshold": int((r < AGREEMENT).sum()), "worst_image": int(np.argmin(r)),
            "max_abs_difference": float(np.abs(a.astype(np.float64) - b).max())}


def compare(inputs, results, labels, key, model_path):
    """The figures for one model: its maps per method and its predictions, backend against backend."""
    one, two = (results[b] for b in BACKENDS)
    sample = inputs[f"{key}/sample"]
    y = inputs[f"{key}/y"]
    p1, p2 = one[f"{key}/probs"], two[f"{key}/probs"]
    differ = np.flatnonzero(p1.argmax(1) != p2.argmax(1))
    methods = {}
    for name, label in labels.items():
        errors = {b: json.loads(str(results[b][f"{key}/errors"])).get(name) for b in BACKENDS}
        if any(errors.values()):
            methods[name] = {"label": label, "errors": {b: e for b, e in errors.items() if e}}
            continue
        m1, m2 = one[f"{key}/maps/{name}"], two[f"{key}/maps/{name}"]
        methods[name] = {"label": label, **compare_maps(m1, m2)}
        methods[name]["worst_image"] = int(sample[methods[name]["worst_image"]])  # its index in the split
    return {
        "model": str(model_path), "layer": str(one[f"{key}/layer"]),
        "classes_match_model": bool(one[f"{key}/classes_match"]),
        "split": "test" if key == "cifar10" else "validation (val_fraction 0.2, seed 0)",
        "maps": {"images": int(len(sample)), "of": int(len(y)), "sampling": "sorted(numpy.random.default_rng(seed)"
                 ".choice(len(split), n, replace=False))", "predictions_differ_on_sample":
                 int(np.isin(sample, differ).sum()), "methods": methods},
        "predictions": {"pictures": int(len(y)), "disagreements": int(len(differ)),
                        "disagreeing_pictures": [int(i) for i in differ[:LISTED]],
                        "max_abs_probability_difference": float(np.abs(p1.astype(np.float64) - p2).max()),
                        "accuracy": {b: float((results[b][f"{key}/probs"].argmax(1) == y).mean()) for b in BACKENDS}},
    }


def table(report):
    lines = []
    for key, m in report["models"].items():
        p = m["predictions"]
        lines.append(f"\n{key} ({m['model']}, layer {m['layer']}): maps on {m['maps']['images']} of {m['maps']['of']} "
                     f"{m['split'].split()[0]} pictures, {' vs '.join(BACKENDS)}")
        lines.append(f"  {'method':<28} {'1 - min r':>10} {'1 - mean r':>10} {'r<' + str(AGREEMENT):>8} "
                     f"{'max |diff|':>10}")
        for s in m["maps"]["methods"].values():
            if "errors" in s:
                failed = "; ".join(f"{b}: {e}" for b, e in s["errors"].items())
                lines.append(f"  {s['label']:<28} FAILED on {failed}")
                continue
            lines.append(f"  {s['label']:<28} {1 - s['min_pearson_r']:>10.1e} {1 - s['mean_pearson_r']:>10.1e} "
                         f"{s['below_threshold']:>8d} {s['max_abs_difference']:>10.2e}")
        accuracy = ", ".join(f"{b} {a:.4f}" for b, a in p["accuracy"].items())
        lines.append(f"  predicted class differs on {p['disagreements']} of {p['pictures']} pictures; largest "
                     f"probability difference {p['max_abs_probability_difference']:.2e}; accuracy {accuracy}")
    times = ", ".join(f"{b} {v['elapsed_s']:.0f} s" for b, v in report["backends"].items())
    lines.append(f"\ntime per backend (whole run, start-up and compilation included): {times}")
    verdict = "agree" if report["agree"] else "DISAGREE"
    lines.append(f"maps {verdict}: every map r >= {AGREEMENT} on every method and model: {report['agree']}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar-dir", required=True, metavar="DIR",
                   help="CIFAR-10: the folder holding train/ and test/ class folders, or the python pickles")
    p.add_argument("--characters-dir", metavar="FACES_DIR",
                   help="also compare the character model on this image folder's validation split")
    p.add_argument("--n", type=int, default=100, help="images explained per model (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample of images explained (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file (atomically)")
    p.add_argument("--model", default=str(MODELS["cifar10"]), help="the CIFAR-10 model (default: the shipped one)")
    p.add_argument("--characters-model", default=str(MODELS["characters"]),
                   help="the character model (default: the shipped one)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    if args.child:
        try:
            return child(args)
        except ValueError as e:
            sys.exit(f"error: {e}")
    try:
        for option, path in (("--cifar-dir", args.cifar_dir), ("--characters-dir", args.characters_dir)):
            if path is not None and not Path(path).is_dir():
                raise ValueError(f"{option}: folder not found: {path}")
        for option, path in (("--model", args.model), ("--characters-model", args.characters_dir and
                                                        args.characters_model)):
            if path and not Path(path).is_file():
                raise ValueError(f"{option}: model file not found: {path}")
        start = time.perf_counter()
        backends, results = {}, {}
        with tempfile.TemporaryDirectory(prefix="agreement-") as work:
            for backend in BACKENDS:
                print(f"running on {backend} ...", flush=True)
                backends[backend] = run_backend(backend, args, work)
                with np.load(Path(work) / f"{backend}.npz") as f:
                    results[backend] = dict(f)
            with np.load(Path(work) / "inputs.npz") as f:
                inputs = dict(f)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    infos = {b: json.loads(str(results[b]["info"])) for b in BACKENDS}
    labels = infos[BACKENDS[0]]["methods"]
    machine = {k: v for k, v in infos[BACKENDS[0]]["machine"].items() if k not in ("backend", "devices")}
    for b in BACKENDS:
        seconds = {k: json.loads(str(results[b][k])) for k in results[b] if k.endswith("/seconds")}
        backends[b].update(devices=infos[b]["machine"]["devices"], seconds_in_process=infos[b]["seconds_in_process"],
                           seconds={k.split("/")[0]: v for k, v in seconds.items()})
    models = {"cifar10": args.model, "characters": args.characters_model}
    report = {"settings": {"n": args.n, "seed": args.seed, "cifar_dir": str(args.cifar_dir),
                           "characters_dir": args.characters_dir and str(args.characters_dir),
                           "threshold_pearson_r": AGREEMENT, "precision": "float32", "class": "predicted",
                           "layer": "the last conv layer"},
              "machine": machine, "backends": backends,
              "models": {key: compare(inputs, results, labels, key, path) for key, path in models.items()
                         if f"{key}/probs" in results[BACKENDS[0]]}}
    report["agree"] = all(s.get("below_threshold") == 0 for m in report["models"].values()
                          for s in m["maps"]["methods"].values())
    report["elapsed_s"] = time.perf_counter() - start
    print(table(report))
    if args.json:
        from atomic import write_text

        write_text(args.json, json.dumps(report, ensure_ascii=False, indent=1) + "\n")
        print(f"wrote {args.json}")
    failed = [f"{s['label']} ({key}) on {', '.join(s['errors'])}" for key, m in report["models"].items()
              for s in m["maps"]["methods"].values() if "errors" in s]
    if failed:
        sys.exit(f"error: failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()
