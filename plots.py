"""The matplotlib figures: learning curves, confusion
matrix, CAM panels. Japanese labels render through matplotlib-fontja's IPAex Gothic; every figure
file is written atomically."""
import collections
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib_fontja  # noqa: E402,F401  (registers the Japanese font)
import numpy as np  # noqa: E402

from atomic import atomic_path  # noqa: E402
from kerascam.overlays import overlay  # noqa: E402


def save_figure(fig, path, dpi=100):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def read_history(csv_path):
    """Per-epoch rows of a history CSV as {column: array}; if an epoch repeats, its last row wins."""
    with open(csv_path, newline="") as f:
        rows = {int(r["epoch"]): r for r in csv.DictReader(f)}
    epochs = sorted(rows)
    columns = [k for k in rows[epochs[0]] if k != "epoch"] if epochs else []
    history = {k: np.array([float(rows[e].get(k) or "nan") for e in epochs]) for k in columns}
    history["epoch"] = np.array(epochs) + 1
    return history


def learning_curves(history, out_dir, title="", prefix=""):
    """PREFIXacc.png and PREFIXloss.png: train and validation per epoch."""
    for metric, label in (("accuracy", "accuracy"), ("loss", "loss")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(history["epoch"], history[metric], label="train")
        if f"val_{metric}" in history:
            ax.plot(history["epoch"], history[f"val_{metric}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{title} {label}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
        save_figure(fig, f"{out_dir}/{prefix}{'acc' if metric == 'accuracy' else 'loss'}.png")


def schedule_comparison(panels, path, title="", ymin=None):
    """Accuracy per epoch of several runs, one plot per panel: [(panel title, {label: history}, column, axis
    label)] -> PNG; column is the history's column plotted (val_accuracy, the validation data the run was
    given), axis label says what that data was (the test split, or pictures held out of training).

    The panels share the accuracy axis, so runs in different panels compare at a glance."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), sharey=True, squeeze=False)
    for ax, (panel_title, histories, column, ylabel) in zip(axes[0], panels):
        for label, history in histories.items():
            ax.plot(history["epoch"], history[column], label=label, linewidth=1.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0, 0].set_ylim(bottom=ymin)  # the early epochs' spread would squeeze the endings that matter
    fig.suptitle(title)
    save_figure(fig, path)


def confusion_matrix_figure(matrix, names, path, title=""):
    """Row-normalised confusion matrix (rows: true class) with counts in the cells."""
    n = len(names)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.45 * n + 3, 0.45 * n + 2.5))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save_figure(fig, path)


def _overlay_panel(ax, image, cam, title, fontsize=8):
    """The image with the map blended on top, both at the image's size."""
    ax.imshow(overlay(image, cam))
    ax.set_title(title, fontsize=fontsize)
    ax.axis("off")


def _colorbar(fig, axes, label="Score-CAM"):
    mappable = plt.cm.ScalarMappable(cmap="jet", norm=matplotlib.colors.Normalize(0, 1))
    fig.colorbar(mappable, ax=axes, fraction=0.02, pad=0.01, label=f"{label} (normalised)")


def panel_names(paths):
    """Short panel titles for layer paths: the layer's own name ("b1 conv2" for "block1_conv2"), the
    whole path where two layers share a name at different depths."""
    last = collections.Counter(path.split("/")[-1] for path in paths)
    names = [path.split("/")[-1] if last[path.split("/")[-1]] == 1 else path for path in paths]
    return [name.replace("block", "b").replace("_conv", " conv") for name in names]


def layer_grid_figure(image, maps, title, path, columns=7, label="Score-CAM"):
    """The original experiment's figure: the input, then one overlaid heatmap per conv layer."""
    n = len(maps) + 1
    columns = min(columns, n)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.75 * rows + 0.4), squeeze=False)
    axes = axes.ravel()
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=8)
    axes[0].axis("off")
    for ax, short, cam in zip(axes[1:], panel_names(maps), maps.values()):
        _overlay_panel(ax, image, cam[0] if cam.ndim == 3 else cam, short)
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle(title)
    _colorbar(fig, axes.tolist(), label)
    save_figure(fig, path, dpi=110)


def single_layer_figure(original, resized, cam, blended, title, path, label="Score-CAM"):
    """Input, heatmap at the model's input size, and the overlay at the original size."""
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    axes[0].imshow(original)
    axes[0].set_title("input")
    axes[1].imshow(cam, cmap="jet", vmin=0, vmax=1)
    axes[1].set_title(f"heatmap ({resized.shape[1]}x{resized.shape[0]})")
    axes[2].imshow(blended)
    axes[2].set_title(f"overlay ({original.shape[1]}x{original.shape[0]})")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    _colorbar(fig, axes.tolist(), label)
    save_figure(fig, path)


def overlay_grid(images, maps, titles, path, columns, suptitle=""):
    """Many pictures with their heatmaps overlaid, one title each; an image None leaves its cell empty."""
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.5 * columns, 1.7 * rows + 0.5), squeeze=False)
    for ax, image, cam, title in zip(axes.ravel(), images, maps, titles):
        if image is None:  # a gap keeps the columns aligned
            ax.axis("off")
        else:
            _overlay_panel(ax, image, cam, title, fontsize=7)
    for ax in axes.ravel()[len(images):]:
        ax.axis("off")
    fig.suptitle(suptitle)
    _colorbar(fig, axes.ravel().tolist())
    save_figure(fig, path, dpi=110)
