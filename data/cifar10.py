"""CIFAR-10 from Keras's download, the python pickles, or a train/ test/ JPEG folder tree."""
import io
import pickle
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.images import read_image

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# The only globals a CIFAR-10 batch pickle refers to (numpy arrays): anything else is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of a CIFAR-10 batch")


def safe_unpickle(path):
    """Unpickle a CIFAR-10 batch without letting the file run code."""
    with open(path, "rb") as f:
        return _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()


def _load_batch(path):
    d = safe_unpickle(path)
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"{path}: not a CIFAR-10 batch")
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, np.asarray(d[b"labels"], dtype=np.int64)


def _load_pickles(folder, train=True):
    batches = [_load_batch(folder / f"data_batch_{i}") for i in range(1, 6)] if train else [_EMPTY]
    x_test, y_test = _load_batch(folder / "test_batch")
    names = CLASS_NAMES
    meta = folder / "batches.meta"
    if meta.is_file():
        names = [n.decode() for n in safe_unpickle(meta)[b"label_names"]]
    x_train, y_train = np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])
    return (x_train, y_train), (x_test, y_test), names


def _load_split(folder, class_names):
    images, labels = [], []
    files = [(p, i) for i, c in enumerate(class_names) for p in sorted((folder / c).iterdir())]
    for path, label in tqdm(files, desc=f"reading {folder.name}", unit="img", mininterval=1):
        images.append(read_image(path))
        labels.append(label)
    x = np.stack(images)
    if x.shape[1:] != (32, 32, 3):
        raise ValueError(f"{folder}: CIFAR-10 images are 32x32, found {x.shape[1]}x{x.shape[2]}")
    return x, np.asarray(labels, dtype=np.int64)


def _load_jpeg_tree(folder, train=True):
    class_names = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    train_split = _load_split(folder / "train", class_names) if train else _EMPTY
    return train_split, _load_split(folder / "test", class_names), class_names


_EMPTY = (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64))


def load_cifar10(data_dir=None, train=True):
    """Return ((x_train, y_train), (x_test, y_test), class_names); x uint8 (N, 32, 32, 3), y int (N,).

    data_dir: None downloads through keras.datasets; else a folder holding the
    `cifar-10-batches-py` pickles (or being it), or `train/<class>/*` and `test/<class>/*` images.
    train=False skips reading the training split (it comes back empty).
    """
    if data_dir is None:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        return (x_train, y_train.ravel().astype(np.int64)), (x_test, y_test.ravel().astype(np.int64)), CLASS_NAMES
    folder = Path(data_dir)
    for candidate in (folder, folder / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            return _load_pickles(candidate, train)
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return _load_jpeg_tree(folder, train)
    raise ValueError(f"{folder}: neither cifar-10-batches-py pickles nor train/ and test/ class folders")
