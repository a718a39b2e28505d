"""An image folder with one subfolder per class, as arrays with a stratified, seeded split."""
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.images import ImageError, list_images, read_image, resize


@dataclass
class FolderData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    class_names: list
    skipped: list = field(default_factory=list)  # (path, reason) of files that could not be read


# The split options train.py and evaluate.py share: seeds are 0 .. SEEDS - 1; a folder holds out
# FOLDER_VAL_SPLIT of its pictures for validation by default (CIFAR-10 has its own test split: 0).
SEEDS = 2**32
FOLDER_VAL_SPLIT = 0.2


def split_options(dataset, val_split=None, split_seed=None, seed=0):
    """(val_split, split_seed) of a run: the given ones, else the defaults (FOLDER_VAL_SPLIT for a folder,
    0 for CIFAR-10; the split seeded by the run's seed)."""
    if val_split is None:
        val_split = FOLDER_VAL_SPLIT if dataset == "folder" else 0.0
    return val_split, seed if split_seed is None else split_seed


def class_folders(root):
    """The class subfolders of `root`, sorted; a clear error when there are fewer than two, or when a
    folder's name is not UTF-8 (it could not be saved as a class name after training)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        try:
            folder.name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{root}: class folder name {os.fsencode(folder.name)!r} is not valid UTF-8; "
                             "rename the folder") from None
    if len(folders) < 2:
        raise ValueError(f"{root}: need at least two class subfolders, found {len(folders)}")
    return folders


def read_folder(root, image_size):
    """Read every image under root/<class>/ resized to image_size=(h, w) -> (x, y, class_names, skipped)."""
    folders = class_folders(root)
    files = [(path, label) for label, folder in enumerate(folders) for path in list_images(folder)]
    images, labels, skipped = [], [], []
    for path, label in tqdm(files, desc=f"reading {Path(root).name}", unit="img", mininterval=1):
        try:
            images.append(resize(read_image(path), image_size))
            labels.append(label)
        except ImageError as e:
            skipped.append((str(path), str(e)))
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(folders))
    empty = [folders[i].name for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(f"{root}: class folder(s) with no readable image: {', '.join(empty)}")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable file(s) of {len(files)} in {root}", stacklevel=2)
    return np.stack(images), np.asarray(labels, dtype=np.int64), [f.name for f in folders], skipped


def stratified_split(labels, val_fraction, seed):
    """Indices (train, val): each class split in the same proportion, reproducibly for a seed."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        n_val = min(max(n_val, 1 if val_fraction > 0 and len(idx) > 1 else 0), len(idx) - 1)
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))


def skipped_report(skipped, shown=3):
    """One line for the unreadable files of a FolderData: their count and the first reasons (each names its file)."""
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"skipped {len(skipped)} unreadable file(s): {'; '.join(reason for _, reason in skipped[:shown])}{more}"


def load_image_folder(root, image_size=(64, 64), val_fraction=0.2, seed=0, warn=True):
    """Read an image folder and split it: see FolderData. warn=False leaves the unreadable files to the caller
    (FolderData.skipped, skipped_report) instead of a Python warning."""
    with warnings.catch_warnings():
        if not warn:
            warnings.simplefilter("ignore", UserWarning)
        x, y, class_names, skipped = read_folder(root, image_size)
    train, val = stratified_split(y, val_fraction, seed)
    return FolderData(x[train], y[train], x[val], y[val], class_names, skipped)
