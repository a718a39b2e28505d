"""Is the heatmap right? Faithfulness metrics, a sanity check and timing for Score-CAM and its baselines.

    python evaluate.py --model models/cifar10.keras --data-dir DIR [--n 1000] [--json OUT]
                       [--figure md_image/eval_cifar10.png] [--sanity-n 50] [--seed 0]
    python evaluate.py --dataset folder --model MODEL --data-dir FACES_DIR ...   (its validation split)
    python evaluate.py --markdown results.json                                   (the README table)

Methods: every method registered in kerascam.METHODS (--methods lists them), the floors that ignore the
model (seeded smooth noise, a centred Gaussian) included. The target class is the predicted one;
probabilities follow the kerascam score rule (softmax applied once). Score-CAM
runs in float32, so the results do not depend on the machine's choice of precision.

  Average Drop %, Increase in Confidence %, Deletion and Insertion AUC (insertion's blur: --blur-sigma
                      pixels): defined in kerascam/metrics.py, whose maths this runs.
  ms / image          wall time of the method, images in chunks of TIME_CHUNK after one warm-up call
                      (each image gets its chunk's time per image; its interval resamples the chunks,
                      the unit that was measured, not the images).
  Sanity check        cascading model parameter randomisation (Adebayo et al. 2018): a copy of the
                      model is re-initialised from the top layer down, one layer (a BatchNorm with
                      the conv below it) at a time; after each step, the mean Spearman rank
                      correlation between each image's map from the trained and the randomised
                      model, for the trained model's predicted class, on --sanity-n images drawn at
                      random from the sample. A method that explains the model should decorrelate;
                      the floors stay at 1.

Every value comes with a 95 % bootstrap interval over images (seeded, BOOTSTRAP resamples; over chunks
for ms / image).
"""
import argparse
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

import runtime  # noqa: E402  (before keras: quiet TensorFlow start-up)
import keras
import numpy as np
from tqdm import tqdm

import kerascam
from atomic import write_text
from data.folder import SEEDS, split_options
from kerascam.metrics import (BLUR_SIGMA, BOOTSTRAP, STEPS, auc, bootstrap_ci, chunk_bootstrap_ci, deletion,
                              drop_and_increase, insertion, predict, summarise, target_probs)
from kerascam.sanity import sanity_check, sanity_sample
from scorecam import DEFAULT_MODEL, PREPROCESSING, preprocess

METHODS = kerascam.METHODS
METRICS = {"avg_drop": "Average Drop % ↓", "increase": "Increase in Confidence % ↑",
           "deletion_auc": "Deletion AUC ↓", "insertion_auc": "Insertion AUC ↑", "ms_per_image": "ms / image"}
# The Score-CAM paper's Tables 1 and 2 (ImageNet validation, VGG16), as a reference point.
PAPER = {"Score-CAM": dict(avg_drop=31.5, increase=30.6, insertion_auc=0.386, deletion_auc=0.077),
         "Grad-CAM": dict(avg_drop=47.8, increase=19.6, insertion_auc=0.357, deletion_auc=0.089),
         "Grad-CAM++": dict(avg_drop=45.5, increase=18.9, insertion_auc=0.346, deletion_auc=0.082)}
MAX_BLUR_SIGMA = 1000.0  # far past any image's size (the blur is then its mean colour); OpenCV's kernel grows with it
TIME_CHUNK = 64


# ---------------------------------------------------------------- one method, all metrics

def method_functions(names, seed=0):
    """{name: f(model, images, layer, class_index, batch_size)}: a method taking a seed gets this one,
    one taking a precision float32 (reproducible on every machine); options as the registry records them."""
    functions = {}
    for name in names:
        method = kerascam.registry.get(name)
        fixed = {k: v for k, v in (("seed", seed), ("precision", "float32")) if k in method.options}
        functions[name] = functools.partial(method.function, **fixed)
    return functions


def explain_timed(method, model, images, targets, layer=None, batch_size=256, chunk=TIME_CHUNK):
    """(maps, seconds per image): chunks of images are timed and share their chunk's time; one
    warm-up call first, so graph tracing is not counted."""
    method(model, images[:1], layer, targets[:1], batch_size)
    maps, seconds = [], np.zeros(len(images))
    for start in range(0, len(images), chunk):
        t = time.perf_counter()
        maps.append(method(model, images[start:start + chunk], layer, targets[start:start + chunk], batch_size))
        seconds[start:start + chunk] = (time.perf_counter() - t) / len(maps[-1])
    return np.concatenate(maps), seconds


def per_image_metrics(model, images, maps, targets, y, steps=STEPS, batch_size=256, seed=0, sigma=BLUR_SIGMA,
                      desc=""):
    """{metric: per-image values} and the deletion / insertion curves for one method's maps."""
    o = target_probs(model, images * maps[..., None], targets, batch_size)
    drop, increase = drop_and_increase(y, o)
    x, del_curves = deletion(model, images, maps, targets, steps, batch_size, seed, desc=f"{desc} deletion")
    _, ins_curves = insertion(model, images, maps, targets, steps, batch_size, seed, sigma, f"{desc} insertion")
    values = {"avg_drop": drop, "increase": increase,
              "deletion_auc": auc(x, del_curves), "insertion_auc": auc(x, ins_curves)}
    return values, x, del_curves, ins_curves


def evaluate(model, images, names=None, layer=None, steps=STEPS, batch_size=256, seed=0, sigma=BLUR_SIGMA,
             sanity_n=50, resamples=BOOTSTRAP):
    """Every metric of every method on images (N, H, W, 3) in [0, 255]: {"methods": ..., "curve_x": ...}."""
    names = list(names or METHODS)
    methods = method_functions(names, seed)
    images = kerascam.check_images(model, images)
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    if not 1 <= steps <= images.shape[1] * images.shape[2]:
        raise ValueError(f"steps must be 1 to the {images.shape[1] * images.shape[2]} pixels of an image, got {steps}")
    if not 0 < sigma <= MAX_BLUR_SIGMA:
        raise ValueError(f"the blur sigma must be above 0 and at most {MAX_BLUR_SIGMA:g} pixels, got {sigma}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    probs = predict(model, images, batch_size)
    targets = probs.argmax(axis=1)
    y = probs[np.arange(len(images)), targets]
    results, x = {}, None
    for name in tqdm(names, desc="methods", unit="method"):
        maps, seconds = explain_timed(methods[name], model, images, targets, layer, batch_size, TIME_CHUNK)
        values, x, dele, ins = per_image_metrics(model, images, maps, targets, y, steps, batch_size, seed, sigma,
                                                 desc=name)
        values["ms_per_image"] = seconds * 1000
        summary = summarise(values, seed, resamples)
        summary["ms_per_image_ci"] = chunk_bootstrap_ci(values["ms_per_image"], TIME_CHUNK, resamples, seed)
        results[name] = {"label": METHODS[name].label, **summary,
                         "deletion_curve": dele.mean(axis=0).round(5).tolist(),
                         "insertion_curve": ins.mean(axis=0).round(5).tolist()}
    groups = []
    if sanity_n > 0:
        pick = sanity_sample(len(images), sanity_n, seed)
        sanity = sanity_check(model, images[pick], methods, targets[pick], layer, batch_size, seed)
        for name, per_group in sanity.items():
            groups = list(per_group)
            results[name]["sanity_spearman"] = {g: float(v.mean()) for g, v in per_group.items()}
            results[name]["sanity_spearman_ci"] = {g: bootstrap_ci(v, resamples, seed) for g, v in per_group.items()}
    return {"methods": results, "curve_x": np.round(x, 5).tolist(), "sanity_layers": groups,
            "sanity_images": int(min(max(sanity_n, 0), len(images))),
            "sanity_sampling": "sorted(numpy.random.default_rng(seed).choice(n, sanity_images, replace=False)) "
                               "of the sample"}


# ---------------------------------------------------------------- reports

def _cell(result, key, digits):
    if key not in result:
        return "–"
    low, high = result.get(f"{key}_ci", (None, None))
    value = f"{result[key]:.{digits}f}"
    return value if low is None else f"{value} [{low:.{digits}f}, {high:.{digits}f}]"


def _table(header, rows):
    """A Markdown table with padded columns, readable as plain text too."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def markdown_report(results):
    """The results as Markdown: the metrics table (with the Score-CAM paper's ImageNet/VGG16 numbers
    as reference rows) and the sanity-check table, from the JSON that evaluate.py writes."""
    methods, sample = results["methods"], results.get("sample", {})
    digits = {"avg_drop": 1, "increase": 1, "deletion_auc": 3, "insertion_auc": 3, "ms_per_image": 2}
    rows = [[m.get("label", name)] + [_cell(m, k, digits[k]) for k in METRICS] for name, m in methods.items()]
    rows += [[f"*paper: {label}*"] + [_cell(ref, k, digits[k]) for k in METRICS] for label, ref in PAPER.items()]
    what = (f"{sample.get('n', '?')} images of the {sample.get('dataset', '?')} {sample.get('split', '')} split, "
            f"seed {sample.get('seed', '?')}, layer {sample.get('layer', '?')}; mean [95 % bootstrap CI]. "
            "*paper*: Score-CAM (Wang et al. 2020) on ImageNet with VGG16, for reference only.")
    machine = results.get("settings", {}).get("machine")
    what += f" ms / image on {machine}." if machine else ""
    out = [_table(["Method"] + list(METRICS.values()), rows), "", what]
    layers = results.get("sanity_layers") or []
    sane = [n for n in methods if "sanity_spearman" in methods[n]]
    if layers and sane:
        rows = [[f"down to {g}"] + [f"{methods[n]['sanity_spearman'][g]:.2f}" for n in sane] for g in layers]
        out += ["", _table(["Randomised"] + [methods[n].get("label", n) for n in sane], rows), "",
                f"Sanity check: mean Spearman correlation of trained vs randomised maps, "
                f"{results.get('sanity_images', '?')} images"
                f"{' drawn at random from the sample' if 'sanity_sampling' in results else ''}"
                " (1 = unchanged by randomisation)."]
    return "\n".join(out)


def curves_figure(results, path):
    """Mean deletion and insertion curves of each method, AUC in the legend."""
    import matplotlib.pyplot as plt

    from plots import save_figure

    x = results["curve_x"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for name, m in results["methods"].items():
            ax.plot(x, m[f"{kind}_curve"], label=f"{m.get('label', name)} ({m[f'{kind}_auc']:.3f})",
                    linestyle="--" if name in METHODS and METHODS[name].floor else "-")
        ax.set_title(f"{kind} ({'lower' if kind == 'deletion' else 'higher'} AUC is better)")
        ax.set_xlabel("fraction of pixels " + ("deleted" if kind == "deletion" else "inserted"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("target class probability (mean)")
    s = results.get("sample", {})
    fig.suptitle(f"{s.get('dataset', '')} {s.get('split', '')}, {s.get('n', '?')} images".strip())
    save_figure(fig, path)


# ---------------------------------------------------------------- command line

def folder_split(args, size):
    """({val_split, split_seed}, {where each came from}) of the validation split train.py held out for the model:
    the command line's, else those in the options.json train.py wrote beside the model (RUN_DIR), else
    train.py's folder defaults (0.2, seed 0: how the shipped models/characters.keras was trained)."""
    path = Path(args.model).parent / "options.json"
    run = {}
    if path.is_file():
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
            run = run if isinstance(run, dict) and run.get("dataset") == "folder" else {}
            saved = dict(val_split=float(run["val_split"]), split_seed=int(run.get("split_seed", run["seed"])),
                         image_size=int(run["image_size"])) if run else {}
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not train.py's options ({type(e).__name__}: {e}); move it away from "
                             "the model, or pass --val-split and --split-seed") from None
        if run and tuple(size) != (saved["image_size"],) * 2:
            raise ValueError(f"{path} is a run at --image-size {saved['image_size']}, the model takes "
                             f"{size[0]}x{size[1]}: not this model's run; move the model or that file")
    chosen, sources = {}, {}
    for key, default in zip(("val_split", "split_seed"), split_options("folder")):
        if getattr(args, key) is not None:
            chosen[key], sources[key] = getattr(args, key), f"--{key.replace('_', '-')}"
        elif run:
            chosen[key], sources[key] = saved[key], str(path)
        else:
            chosen[key], sources[key] = default, "train.py's default"
    if chosen["val_split"] == 0:  # only options.json can say so: the parser refuses --val-split 0
        raise ValueError(f"{path} says the model was trained on every picture (--val-split 0): none is held out to "
                         "evaluate it on; pass --val-split to evaluate it on pictures it was trained on anyway")
    return chosen, sources


def differing_classes(names, class_names):
    """What tells the data's class names from the model's, in words."""
    lacks = [n for n in class_names if n not in names]
    extra = [n for n in names if n not in class_names]
    if not lacks and not extra:
        return "the same classes in another order"
    return "; ".join(f"{what} {', '.join(found[:8])}{' and more' if len(found) > 8 else ''}" for what, found in
                     (("the data lacks the model's", lacks), ("the model lacks the data's", extra)) if found)


def load_sample(args, model, class_names):
    """(images float32, labels, description): a seeded sample of the CIFAR-10 test split or of the
    image folder's validation split (the split train.py made for the model: see folder_split)."""
    chosen = {}
    if args.dataset == "cifar10":
        from data.cifar10 import load_cifar10

        _, (x, y), names = load_cifar10(args.data_dir, train=False)  # a failed download: one ValueError
        split = "test"
    else:
        from data.folder import load_image_folder, skipped_report

        if not args.data_dir:
            raise ValueError("--dataset folder needs --data-dir")
        size = kerascam.input_spec(model)[:2]
        if None in size:
            raise ValueError("--dataset folder needs a model with a fixed input size (pictures are resized to it)")
        chosen, sources = folder_split(args, size)
        print(f"validation split: --val-split {chosen['val_split']} ({sources['val_split']}), --split-seed "
              f"{chosen['split_seed']} ({sources['split_seed']})", file=sys.stderr)
        d = load_image_folder(args.data_dir, image_size=size, val_fraction=chosen["val_split"],
                              seed=chosen["split_seed"], warn=False)
        if d.skipped:
            print(skipped_report(d.skipped), file=sys.stderr)
        chosen.update(split_from=sources, skipped_files=len(d.skipped))
        x, y, names, split = d.x_val, d.y_val, d.class_names, "validation"
    if len(names) != len(class_names):
        raise ValueError(f"the data has {len(names)} classes, the model {len(class_names)}")
    indices = [str(i) for i in range(len(class_names))]  # a model without a class file: only the count is known
    if class_names != indices and list(names) != list(class_names):
        raise ValueError(f"the data's classes are not the model's ({differing_classes(list(names), class_names)}); "
                         "pass the --data-dir the model was trained on")
    height, width, channels = kerascam.input_spec(model)
    if (height, width) != x.shape[1:3] or channels != 3:
        raise ValueError(f"the data's images are {x.shape[1]}x{x.shape[2]}x3, the model takes "
                         f"{height or 'any'}x{width or 'any'}x{channels}")
    if len(x) == 0:
        raise ValueError(f"the {split} split is empty")
    n = min(args.n, len(x))
    idx = np.sort(np.random.default_rng(args.seed).choice(len(x), n, replace=False))
    description = {"dataset": args.dataset, "split": split, "data_dir": args.data_dir and str(args.data_dir),
                   "n": int(n),
                   "of": int(len(x)), "seed": args.seed, "sampling": "sorted(numpy.random.default_rng(seed)"
                   ".choice(len(split), n, replace=False))", "classes_match_model": list(names) == list(class_names),
                   **chosen}
    return x[idx].astype(np.float32), y[idx], description


def run(args):
    from model import load_model

    model, class_names, _ = load_model(args.model)
    # reported; args.layer is what runs, also in the sanity check's copy (where this model's layer objects are not)
    layer = kerascam.layers.passable_path(model, kerascam.find_layer(model, args.layer))
    names = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    images, labels, sample = load_sample(args, model, class_names)
    images = preprocess(images, args.preprocess)
    sample["preprocess"] = args.preprocess
    sample.update(model=str(args.model), layer=layer,
                  accuracy=float((predict(model, images, args.batch_size).argmax(1) == labels).mean()))
    print(f"{sample['n']} {sample['split']} images, model accuracy on them {sample['accuracy']:.3f}, layer {layer}",
          file=sys.stderr)
    results = evaluate(model, images, names, args.layer, args.steps, args.batch_size, args.seed, args.blur_sigma,
                       args.sanity_n)
    results = {"sample": sample, "settings": {
        "steps": args.steps, "blur_sigma": args.blur_sigma, "batch_size": args.batch_size,
        "bootstrap_resamples": BOOTSTRAP, "confidence": 0.95, "time_chunk": TIME_CHUNK,
        "machine": f"{runtime.cpu_name()}, {os.cpu_count()} cores, keras "
                   f"{keras.__version__} ({keras.backend.backend()})"}, **results}
    print(markdown_report(results))
    if args.json:
        write_text(args.json, json.dumps(results, ensure_ascii=False, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.figure:
        curves_figure(results, args.figure)
        print(f"wrote {args.figure}", file=sys.stderr)
    return results


def read_results(path):
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(results.get("methods"), dict):
            raise KeyError("methods")
        return results
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: not a results file of evaluate.py ({type(e).__name__})") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="a .keras model (default: %(default)s)")
    p.add_argument("--dataset", choices=["cifar10", "folder"], default="cifar10")
    p.add_argument("--data-dir", help="cifar10: pickles or train/ test/ folders (default: Keras download); "
                                      "folder: one subfolder per class")
    p.add_argument("--val-split", type=float,
                   help="folder: train.py's --val-split (default: from the options.json train.py wrote beside the "
                        "model, else train.py's default 0.2)")
    p.add_argument("--split-seed", type=int,
                   help="folder: train.py's --split-seed (its --seed unless given; default: from that options.json, "
                        "else 0), to get its validation split")
    p.add_argument("--n", type=int, default=1000, help="images in the sample (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sample, tie-break, noise floor and bootstrap seed")
    p.add_argument("--layer", help="conv layer to explain (default: the last)")
    p.add_argument("--preprocess", choices=PREPROCESSING, default="none",
                   help="a model trained on preprocessed pictures without the step inside it: as scorecam.py's "
                   "(the maps, deletion (to 0) and insertion (blur) then work on the preprocessed input)")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--steps", type=int, default=STEPS, help="deletion/insertion steps (default %(default)s)")
    p.add_argument("--blur-sigma", type=float, default=BLUR_SIGMA, help="insertion blur (default %(default)s px)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--sanity-n", type=int, default=50,
                   help="images for the sanity check, drawn at random from the sample (0: skip it)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--figure", help="write the mean deletion/insertion curves here (PNG)")
    p.add_argument("--markdown", metavar="RESULTS_JSON", help="only print the Markdown tables of a results file")
    args = p.parse_args(argv)
    for name in ("n", "steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.sanity_n < 0:
        p.error("--sanity-n must be at least 0 (0: skip the sanity check)")
    if args.val_split is not None and not 0 < args.val_split < 1:  # NaN too
        p.error("--val-split must be above 0 and below 1 (0 holds out no picture to evaluate on)")
    for name in ("seed", "split_seed"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) < SEEDS:
            p.error(f"--{name.replace('_', '-')} must be 0 to {SEEDS - 1}")
    if not 0 < args.blur_sigma <= MAX_BLUR_SIGMA:  # NaN too
        p.error(f"--blur-sigma must be above 0 and at most {MAX_BLUR_SIGMA:g} (pixels)")
    if args.figure and Path(args.figure).suffix.lower() != ".png":
        p.error(f"--figure must name a .png file, got {args.figure!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # Score-CAM's per-call models warn of retracing
    try:
        if args.markdown:
            results = read_results(args.markdown)
            try:
                print(markdown_report(results))
            except (KeyError, TypeError, AttributeError, ValueError) as e:
                raise ValueError(f"{args.markdown}: incomplete results file ({type(e).__name__}: {e})") from None
        else:
            run(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
