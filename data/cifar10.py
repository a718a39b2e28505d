"""CIFAR-10 from Keras's download, the python pickles, or a train/ test/ JPEG folder tree.

Every way reading it can fail (no network, a malicious, truncated or foreign pickle, a wrong
picture in the folder tree) is one ValueError naming the file and what to do about it, which the
commands print as a single `error:` line.
"""
import io
import pickle
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.images import ImageError, list_images, read_image

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_REPLACE = f"replace it with the file from {DOWNLOAD_URL}, or pass another --data-dir"
_PIXELS = 32 * 32 * 3

# The only globals a CIFAR-10 batch pickle refers to (numpy arrays): anything else is refused.
# _codecs.encode and _frombuffer are how Python 3 pickles an array with protocol 2 and 5: plain data.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _Refused(pickle.UnpicklingError):
    pass


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _Refused(f"refused to load {module}.{name}: not part of a CIFAR-10 batch")

    def persistent_load(self, pid):
        raise _Refused("refused a persistent id: not part of a CIFAR-10 batch")


def safe_unpickle(path):
    """Unpickle a CIFAR-10 batch without letting the file run code.

    ValueError, naming the file, for one that cannot be read, refers to anything but NumPy arrays
    (a malicious pickle), or is not a pickle at all (truncated, or another kind of file)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e}); {_REPLACE}") from None
    try:
        return _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as e:
        raise ValueError(f"{path}: {e}; {_REPLACE}") from None
    except RecursionError:
        raise ValueError(f"{path}: not a CIFAR-10 pickle (nested too deeply); {_REPLACE}") from None
    except Exception as e:  # a broken pickle raises nearly anything: EOFError, KeyError, TypeError, ...
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e}); {_REPLACE}") from None


def _get(d, key):
    """d[b"key"], or d["key"] in a batch re-pickled by Python 3; None when neither is there."""
    return d.get(key.encode(), d.get(key))


def _as_integers(value, path, what):
    """`value` as a 1- or 2-D integer array; ValueError naming the file if it is anything else."""
    try:
        a = np.asarray(value)
    except Exception:  # ragged, deeply nested or strange objects
        a = None
    if a is None or a.dtype == object or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{path}: its {what} are not integers, as in a CIFAR-10 batch; {_REPLACE}")
    return a


def _load_batch(path, num_classes=None):
    d = safe_unpickle(path)
    data = _get(d, "data") if isinstance(d, dict) else None
    labels = _get(d, "labels") if isinstance(d, dict) else None
    if data is None or labels is None:
        raise ValueError(f"{path}: not a CIFAR-10 batch (a dict with 'data' and 'labels'); {_REPLACE}")
    x, y = _as_integers(data, path, "pixels"), _as_integers(labels, path, "labels")
    if x.size % _PIXELS or (x.ndim > 1 and x.shape[-1] != _PIXELS and x.shape[1:] != (3, 32, 32)):
        raise ValueError(f"{path}: pixels of shape {x.shape} are not 32x32x3 images, one a row; {_REPLACE}")
    if x.size and (x.min() < 0 or x.max() > 255):
        raise ValueError(f"{path}: pixel values outside 0-255; {_REPLACE}")
    x = x.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{path}: {y.size} labels for {len(x)} images; {_REPLACE}")
    if y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        raise ValueError(f"{path}: labels outside 0-{(num_classes or 10) - 1}; {_REPLACE}")
    return x, y.astype(np.int64)


def _read_meta(path):
    """Class names from batches.meta."""
    d = safe_unpickle(path)
    names = _get(d, "label_names") if isinstance(d, dict) else None
    try:
        names = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    except (TypeError, UnicodeDecodeError):
        names = None
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names) \
            or len(names) < 2:
        raise ValueError(f"{path}: not a CIFAR-10 batches.meta (distinct 'label_names'); delete it to use the "
                         f"CIFAR-10 names, or {_REPLACE}")
    return names


def _load_pickles(folder, train=True):
    meta = folder / "batches.meta"
    names = _read_meta(meta) if meta.is_file() else CLASS_NAMES
    batches = [_load_batch(folder / f"data_batch_{i}", len(names)) for i in range(1, 6)] if train else [_EMPTY]
    x_test, y_test = _load_batch(folder / "test_batch", len(names))
    x_train, y_train = np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])
    if train and not len(x_train):
        raise ValueError(f"{folder}: the data_batch files hold no images; {_REPLACE}")
    if not len(x_test):
        raise ValueError(f"{folder / 'test_batch'}: holds no images; {_REPLACE}")
    return (x_train, y_train), (x_test, y_test), names


def _load_split(folder, class_names):
    files = []
    for label, c in enumerate(class_names):
        if not (folder / c).is_dir():
            raise ValueError(f"{folder / c}: missing; {folder} needs the same class folders as train/")
        files.extend((p, label) for p in list_images(folder / c))
    if not files:
        raise ValueError(f"{folder}: no images in its class folders; put the pictures in {folder}/<class>/")
    images, labels = [], []
    for path, label in tqdm(files, desc=f"reading {folder.name}", unit="img", mininterval=1):
        try:
            image = read_image(path)
        except ImageError as e:
            raise ValueError(f"{e}; delete or replace it") from None
        if image.shape != (32, 32, 3):
            raise ValueError(f"{path}: CIFAR-10 images are 32x32, this one is {image.shape[1]}x{image.shape[0]}; "
                             "delete it, or train on such pictures with --dataset folder")
        images.append(image)
        labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _load_jpeg_tree(folder, train=True):
    class_names = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_names) < 2:
        raise ValueError(f"{folder / 'train'}: need at least two class folders, found {len(class_names)}")
    train_split = _load_split(folder / "train", class_names) if train else _EMPTY
    return train_split, _load_split(folder / "test", class_names), class_names


_EMPTY = (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64))


def download_cifar10():
    """Keras's CIFAR-10 (downloaded once into ~/.keras/datasets), or ValueError saying to pass --data-dir.

    Keras raises a bare Exception ("URL fetch failure ...") when it cannot download, and others for a
    broken download; every command reading CIFAR-10 turns any of them into this one message."""
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as e:
        raise ValueError(f"could not download CIFAR-10 ({e}); pass --data-dir DIR (pickles or train/ test/ folders)") \
            from None
    return (x_train, y_train.ravel().astype(np.int64)), (x_test, y_test.ravel().astype(np.int64)), CLASS_NAMES


def load_cifar10(data_dir=None, train=True):
    """Return ((x_train, y_train), (x_test, y_test), class_names); x uint8 (N, 32, 32, 3), y int (N,).

    data_dir: None downloads through keras.datasets; else a folder holding the
    `cifar-10-batches-py` pickles (or being it), or `train/<class>/*` and `test/<class>/*` images.
    train=False skips reading the training split (it comes back empty).
    Any failure (no network, a bad or malicious file) is a ValueError saying what to change.
    """
    if data_dir is None:
        return download_cifar10()
    folder = Path(data_dir)
    if not folder.is_dir():
        raise ValueError(f"CIFAR-10 folder not found: {folder}; pass --data-dir DIR (pickles or train/ test/ folders)")
    for candidate in (folder, folder / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").exists():
            return _load_pickles(candidate, train)
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return _load_jpeg_tree(folder, train)
    raise ValueError(f"{folder}: neither cifar-10-batches-py pickles nor train/ and test/ class folders; pass the "
                     "folder holding data_batch_1-5 and test_batch, or train/<class>/ and test/<class>/ pictures")
