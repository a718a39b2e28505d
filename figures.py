"""Regenerate every figure in md_image/ from the shipped models and the data.

    python figures.py --cifar-dir DIR [--characters-dir FACES_DIR] [--skip-eval]

--cifar-dir: CIFAR-10 as pickles or train/ test/ folders (default: Keras's download).
--characters-dir: the face-crop folder the character model was trained on (its figures are
skipped without it). Deterministic: the same models and data give the same figures (Score-CAM runs
in float32 here, whatever precision="auto" would choose on this machine).
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path

import runtime  # noqa: F401  (before keras: quiet TensorFlow start-up)
import numpy as np

from model import load_model
from plots import (confusion_matrix_figure, layer_grid_figure, learning_curves, overlay_grid, read_history,
                   schedule_comparison)
import kerascam
from kerascam import score_cam, score_cam_layers

ROOT = Path(__file__).resolve().parent
MODELS = ROOT / "models"


def pick(n, count, seed):
    """`count` fixed indices out of n, the same on every run."""
    return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))


def layer_figures(model, names, images, labels, prefix, out, count=5, seed=0):
    """The original experiment's figure for `count` fixed pictures: input + one heatmap per conv layer."""
    layers = kerascam.conv_layers(model)
    idx = pick(len(images), min(count, len(images)), seed)
    x = images[idx].astype(np.float32)
    maps, probs = score_cam_layers(model, x, layers, precision="float32")
    for j, i in enumerate(idx):
        pred = int(probs[j].argmax())
        title = f"{names[pred]} - {names[labels[i]]} : {probs[j, pred]:.2f}"
        layer_grid_figure(images[i], {k: v[j] for k, v in maps.items()}, title, out / f"{prefix}_layers_{j + 1}.png")


def right_and_wrong_grid(model, names, images, labels, path, seed=0):
    """Last-conv-layer overlays of one correctly and one wrongly classified picture per class, side by side."""
    probs = kerascam.predict_probabilities(model, images.astype(np.float32))
    pred = probs.argmax(axis=1)
    rng = np.random.default_rng(seed)
    chosen, titles = [], []
    for c in range(len(names)):
        for correct in (True, False):
            pool = np.flatnonzero((labels == c) & ((pred == c) == correct))
            i = int(rng.choice(pool)) if len(pool) else None
            chosen.append(i)
            titles.append("" if i is None else f"{'right' if correct else 'wrong'}: {names[pred[i]]} "
                                               f"({probs[i, pred[i]]:.2f})\ntrue {names[c]}")
    found = [i for i in chosen if i is not None]
    maps = dict(zip(found, score_cam(model, images[found].astype(np.float32), precision="float32")))
    overlay_grid([None if i is None else images[i] for i in chosen], [maps.get(i) for i in chosen], titles, path,
                 columns=10, suptitle="Score-CAM, last conv layer: one right and one wrong prediction per class")


def shipped(name):
    """(model, class names, display names, history csv, results) of models/NAME.keras, or None if absent."""
    path = MODELS / f"{name}.keras"
    if not path.is_file():
        print(f"skipping {name}: {path} not found", file=sys.stderr)
        return None
    model, names, display = load_model(path)
    results_path = MODELS / f"{name}.results.json"
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else None
    return model, names, display, MODELS / f"{name}.history.csv", results


def curves(history_csv, title, prefix, out):
    if history_csv.is_file():
        learning_curves(read_history(history_csv), out, title=title, prefix=prefix)


def schedule_figure(runs_dir, path):
    """Accuracy of the recipe runs in runs_dir/runs.json's panels (histories NAME.history.csv, where NAME
    starts with epochsNNN, the planned length: a run stopped short says where). A panel plots its "column"
    (default val_accuracy) under its "ylabel" (default test accuracy: runs validated on the test split)."""
    manifest = runs_dir / "runs.json"
    if not manifest.is_file():
        return
    panels = []
    for panel in json.loads(manifest.read_text())["panels"]:
        histories = {}
        for name, label in panel["runs"].items():
            history = read_history(runs_dir / f"{name}.history.csv")
            planned, done = int(re.match(r"epochs(\d+)", name).group(1)), int(history["epoch"][-1])
            histories[label + ("" if done >= planned else f" (stopped at {done})")] = history
        panels.append((panel["title"], histories, panel.get("column", "val_accuracy"),
                       panel.get("ylabel", "test accuracy")))
    schedule_comparison(panels, path, title="CIFAR-10: one-cycle recipe runs", ymin=0.6)


def demo_figure(model, names, display, path):
    """The README's first picture: what `python scorecam.py` draws (scikit-image's cat), in float32."""
    import scorecam

    args = scorecam.parser().parse_args(["--precision", "float32"])
    image, _ = scorecam.demo_image()
    scorecam.explain_file(model, names, display, image, "chelsea.png", args, path)


def cifar_figures(data_dir, out):
    from data.cifar10 import load_cifar10

    found = shipped("cifar10")
    if found is None:
        return
    model, names, display, history_csv, _ = found
    demo_figure(model, names, display, out / "chelsea_scorecam.png")
    _, (x_test, y_test), data_names = load_cifar10(data_dir, train=False)
    if len(data_names) != len(names):
        raise ValueError(f"the CIFAR-10 data has {len(data_names)} classes, the model {len(names)}")
    layer_figures(model, names, x_test, y_test, "cifar10", out)
    right_and_wrong_grid(model, names, x_test, y_test, out / "cifar10_grid.png")
    curves(history_csv, "CIFAR-10", "cifar10_", out)
    schedule_figure(MODELS / "cifar10_runs", out / "cifar10_schedules.png")


def character_figures(faces_dir, out):
    from data.folder import load_image_folder, skipped_report

    found = shipped("characters")
    if found is None or faces_dir is None:
        return
    model, names, display, history_csv, results = found
    data = load_image_folder(faces_dir, tuple(model.input_shape[1:3]), val_fraction=0.2, seed=0, warn=False)
    if data.skipped:
        print(skipped_report(data.skipped), file=sys.stderr)
    if data.class_names != names:
        raise ValueError(f"{faces_dir} has classes {data.class_names[:3]}..., the model {names[:3]}...")
    layer_figures(model, display, data.x_val, data.y_val, "characters", out)
    curves(history_csv, "characters", "characters_", out)
    if results and "confusion_matrix" in results:
        acc = results.get("validation_accuracy")
        if acc is None:  # a run trained with --val-split 0: no validation picture was counted
            print("skipping characters_confusion.png: the model's results.json has no validation accuracy "
                  "(trained with --val-split 0)", file=sys.stderr)
        else:
            confusion_matrix_figure(np.array(results["confusion_matrix"]), display, out / "characters_confusion.png",
                                    title=f"validation accuracy {acc:.1%}")


def evaluation_figures(cifar_dir, faces_dir, out, n=1000, which=("cifar10", "characters")):
    """The faithfulness tables (JSON beside the figures) and mean deletion/insertion curves of both models."""
    import evaluate

    runs = []
    if "cifar10" in which:
        runs.append(("cifar10", ["--dataset", "cifar10"] + (["--data-dir", str(cifar_dir)] if cifar_dir else [])))
    if faces_dir and "characters" in which:
        runs.append(("characters", ["--dataset", "folder", "--data-dir", str(faces_dir)]))
    for name, data_args in runs:
        if (MODELS / f"{name}.keras").is_file():
            evaluate.run(evaluate.parse_args([
                "--model", os.path.relpath(MODELS / f"{name}.keras"), *data_args, "--n", str(n),
                "--json", str(out / f"eval_{name}.json"), "--figure", str(out / f"eval_{name}.png")]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar-dir", help="CIFAR-10 pickles or train/ test/ folders (default: Keras download)")
    p.add_argument("--characters-dir", help="face-crop folder of the character model (one subfolder per class)")
    p.add_argument("--out", default=str(ROOT / "md_image"), help="figure folder (default: md_image/)")
    p.add_argument("--skip-eval", action="store_true", help="skip the faithfulness evaluation (slowest part)")
    p.add_argument("--eval-n", type=int, default=1000, help="images per model in the evaluation (default %(default)s)")
    p.add_argument("--only", choices=["cifar10", "characters"], help="regenerate one model's figures (default: both)")
    args = p.parse_args(argv)
    if args.eval_n < 1:
        p.error("--eval-n must be at least 1")
    if args.only == "characters" and not args.characters_dir:
        p.error("--only characters needs --characters-dir (the face-crop folder the character model was trained on)")
    out = Path(args.out)
    which = [args.only] if args.only else ["cifar10", "characters"]
    try:
        if "cifar10" in which:
            cifar_figures(args.cifar_dir, out)
        if "characters" in which:
            character_figures(args.characters_dir, out)
        if not args.skip_eval:
            evaluation_figures(args.cifar_dir, args.characters_dir, out, args.eval_n, which)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"figures written to {out}")


if __name__ == "__main__":
    main()
