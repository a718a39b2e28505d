"""Train the VGG-style CNN on CIFAR-10 or on an image folder (one subfolder per class).

    python train.py                       (CIFAR-10, downloaded through Keras, the shipped recipe)
    python train.py --dataset cifar10 [--data-dir DIR] --out runs/cifar10
    python train.py --dataset folder --data-dir FACES_DIR --image-size 64 --out runs/characters

RUN_DIR gets model.keras (+ model.classes.json), history.csv, acc.png, loss.png and
results.json. Rerunning with the same --out, options and data resumes an interrupted run where it
stopped (RUN_DIR/options.json holds them, and the classes with their numbers of pictures; others are an
error, --overwrite starts afresh). --out may not be inside --data-dir.
"""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import runtime  # noqa: E402  (before keras: quiet TensorFlow start-up)
import keras  # noqa: E402
import numpy as np  # noqa: E402

from atomic import atomic_path, discard_in_flight, write_text  # noqa: E402
from data.augment import AUGMENTATIONS, EXTRAS, MIXES, augmentation  # noqa: E402
from data.folder import SEEDS, split_options  # noqa: E402
from kerascam.devices import resolve_devices  # noqa: E402
from model import build_model, classes_path, load_model, save_model  # noqa: E402

MIN_IMAGE_SIZE = 16  # build_model's smallest input: its 4 blocks each halve the picture

# Per-dataset defaults: "cifar10" and "folder" are the recipes of the shipped models. CIFAR-10: only the length
# mattered (40 epochs 85.6 %, 70 epochs 86.4-86.9 % whatever the weight decay 0-0.05, label smoothing 0/0.1
# and peak LR 2e-3/4e-3, 100 epochs 88.0 %, 220 epochs 88.6 % (flat from epoch ~180); models/cifar10_runs/).
# A small folder needs many small batches: batch 64 for 60 epochs reached 65 % on the characters, batch 32 for
# 100 epochs over 80 %.
# "original" is the original experiment's plain Adam 3e-4, 48 epochs, no augmentation.
# No recipe mixes labels, adds Cutout or RandAugment, or averages weights: in issue 16's sweeps each of them
# lowered the validation accuracy on CIFAR-10 (70 epochs) and on the characters (models/*_runs/).
RECIPES = {
    "original": dict(epochs=48, batch_size=256, learning_rate=3e-4, schedule="constant", augment="none",
                     label_smoothing=0.0, weight_decay=0.0, precision="float32", mix="none", ema_momentum=0.0),
    "cifar10": dict(epochs=220, batch_size=256, learning_rate=2e-3, schedule="onecycle", augment="crop-flip",
                    label_smoothing=0.1, weight_decay=0.01, precision="float32", mix="none", ema_momentum=0.0),
    "folder": dict(epochs=100, batch_size=32, learning_rate=2e-3, schedule="onecycle", augment="rotate-shift-flip",
                   label_smoothing=0.1, weight_decay=0.05, precision="float32", mix="none", ema_momentum=0.0),
}


def pad_to_multiple(idx, order, multiple):
    """(indices, sample weights) with the batch padded to a multiple of `multiple` (the devices it is
    sharded over) by images from the start of `order`, weighted 0 so they count for nothing; the real
    images are weighted (padded size / real size), so the batch's mean loss, which Keras takes over
    the padded size, is their mean loss."""
    extra = -len(idx) % multiple
    weights = np.concatenate([np.full(len(idx), (len(idx) + extra) / max(len(idx), 1), np.float32),
                              np.zeros(extra, np.float32)])
    return np.concatenate([idx, np.resize(order, extra)]), weights


class EpochBatches(keras.utils.PyDataset):
    """Shuffled, augmented one-hot batches; batch i of epoch e depends only on (seed, e, i). `augment`
    (pixels, generator) -> pixels, then `mix` (pixels, one-hot labels, generator) -> (pixels, soft labels)
    draw from one generator seeded by (seed, e, i). With `multiple` > 1 (several devices) every batch
    also has sample weights, the last one padded."""

    def __init__(self, x, y, num_classes, batch_size, seed, augment=None, multiple=1, mix=None):
        super().__init__()
        self.x, self.y, self.num_classes = x, y, num_classes
        self.batch_size, self.seed, self.augment, self.multiple, self.mix = batch_size, seed, augment, multiple, mix
        self.epoch = 0
        self._order_epoch, self._order_cache = None, None

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, i):
        idx = self._order()[i * self.batch_size:(i + 1) * self.batch_size]
        if self.multiple > 1:
            idx, weights = pad_to_multiple(idx, self._order(), self.multiple)
        x, y = self.x[idx], keras.utils.to_categorical(self.y[idx], self.num_classes)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if self.augment is not None:
            x = self.augment(x, rng)
        if self.mix is not None:  # after augment, so the draws of a run without mixing stay as they were
            x, y = self.mix(x, y, rng)
        batch = x.astype("float32", copy=False), y
        return batch + (weights,) if self.multiple > 1 else batch

    def _order(self):
        """This epoch's permutation, drawn once per epoch rather than once per batch."""
        if self._order_epoch != self.epoch:
            self._order_cache = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.x))
            self._order_epoch = self.epoch
        return self._order_cache

    def on_epoch_end(self):
        # Keras calls this before each pass over the data is fetched (the first included), so the
        # counter counts passes; a callback's on_epoch_begin comes after batches are fetched ahead.
        self.epoch += 1


class ShardableBatches(keras.utils.PyDataset):
    """Validation batches for several devices: in order, each padded to a multiple of the devices
    with images weighted 0 (accuracy and each batch's loss are exact; Keras weighs the last batch's
    loss by its padded size when it averages over batches)."""

    def __init__(self, x, y, num_classes, batch_size, multiple):
        super().__init__()
        self.x, self.y, self.num_classes, self.batch_size, self.multiple = x, y, num_classes, batch_size, multiple

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, i):
        idx = np.arange(i * self.batch_size, min(len(self.x), (i + 1) * self.batch_size))
        idx, weights = pad_to_multiple(idx, np.arange(len(self.x)), self.multiple)
        return self.x[idx].astype("float32"), keras.utils.to_categorical(self.y[idx], self.num_classes), weights


class HistoryCSV(keras.callbacks.Callback):
    """Per-epoch logs as CSV, rewritten atomically each epoch (a kill never leaves half a row); rows from
    epochs a resumed run redoes are replaced."""

    def __init__(self, path):
        super().__init__()
        self.path = Path(path)

    def on_epoch_end(self, epoch, logs=None):
        rows = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < epoch]
        row = {"epoch": epoch, **{k: float(v) for k, v in sorted((logs or {}).items())}}
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(row), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows + [row])
        write_text(self.path, buffer.getvalue())


class SaveBest(keras.callbacks.Callback):
    """Atomically save the model (float32) when `monitor` improves, or every epoch if monitor is None.

    The best score so far is read back from history.csv, so a resumed run keeps it. With `averaged`, the
    keras.callbacks.SwapEMAWeights of an optimizer with use_ema=True, the file holds the averaged weights."""

    def __init__(self, path, class_names, history_csv, monitor="val_accuracy", display_names=None, averaged=None):
        super().__init__()
        self.path, self.class_names, self.display_names = path, class_names, display_names
        self.history_csv, self.monitor, self.best, self.averaged = history_csv, monitor, None, averaged

    def on_epoch_begin(self, epoch, logs=None):
        if self.best is None and self.monitor:
            self.best = -np.inf
            if Path(self.history_csv).is_file() and Path(self.path).is_file():
                from plots import read_history

                h = read_history(self.history_csv)
                done = h["epoch"] <= epoch
                if done.any():
                    self.best = float(h[self.monitor][done].max())

    def on_epoch_end(self, epoch, logs=None):
        score = (logs or {}).get(self.monitor) if self.monitor else None
        if self.monitor is None or score > self.best:
            self.best = score
            with averaged_weights(self.averaged):
                save_model(self.model, self.path, self.class_names, self.display_names)


class LiveValidation(keras.callbacks.Callback):
    """With an average of the weights, also the live weights' validation, logged as val_loss_live and
    val_accuracy_live beside the average's val_loss and val_accuracy. Keras keeps the average beside the
    live weights and never feeds it back, so the live weights train exactly as a run without an average
    would: one run measures its recipe with and without averaging, on the same trajectory."""

    def __init__(self, val, batch_size):
        super().__init__()
        self.val, self.batch_size = val, batch_size

    def on_epoch_end(self, epoch, logs=None):
        x, y = self.val if isinstance(self.val, tuple) else (self.val, None)
        scores = self.model.evaluate(x, y, batch_size=self.batch_size if y is not None else None, verbose=0,
                                     return_dict=True)
        if logs is not None:
            logs.update({f"val_{k}_live": float(v) for k, v in scores.items()})


@contextlib.contextmanager
def averaged_weights(swap):
    """The optimizer's moving averages in the model's trainable weights for the block, the live weights
    after it (nothing to do when `swap` is None). `swap` is the keras.callbacks.SwapEMAWeights that puts
    them in for validation; its hooks for an evaluation do the same swap, and keep its own record of
    which weights are in the model. (Its swap_on_epoch=True would leave them swapped for every later
    callback of the epoch, the backup included, which must save the live weights.)"""
    if swap is None:
        yield
        return
    swap.on_test_begin()
    try:
        yield
    finally:
        swap.on_test_end()


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose checkpoint survives a kill at any instant and resumes bitwise.

    Keras rewrites `latest.weights.h5` in place, so a kill mid-write leaves a file that cannot be
    opened, and weights and epoch counter are two files that a kill can split. Here each epoch's
    weights go to a new file (written whole, then renamed) and the metadata, written last and
    atomically, names the file it belongs to: the checkpoint is always the last complete one.
    Keras's weights file also leaves out the dropout layers' random-generator states; they are kept
    beside it, so a resumed epoch draws the same dropout masks as an uninterrupted one.
    """

    @property
    def async_safe(self):
        """Saving per epoch leaves the per-batch hook a no-op, so Keras may let the JAX backend run batches
        ahead instead of waiting for each step's logs: CIFAR-10 on one GPU alone went from 19-22 ms a step
        (H200) to 9-13 ms (H100), the batch preparation now overlapping the GPU's work."""
        return self.save_freq == "epoch"

    def finished_epochs(self):
        """Epochs a previous, interrupted run completed (0 when there is no checkpoint)."""
        metadata = Path(self._training_metadata_path)
        return json.loads(metadata.read_text())["epoch"] if metadata.is_file() else 0

    def _seed_states(self):
        weights = {id(v) for v in self.model.weights}
        return [v for v in self.model.variables if id(v) not in weights]  # in layer order

    def _save_model(self):
        backup, epoch = Path(self.backup_dir), self._current_epoch
        weights, seeds = backup / f"epoch{epoch:04d}.weights.h5", backup / f"epoch{epoch:04d}.seeds.npz"
        with atomic_path(weights) as tmp:
            self.model.save_weights(tmp)
        with atomic_path(seeds) as tmp:
            np.savez(tmp, *[keras.ops.convert_to_numpy(v) for v in self._seed_states()])
        write_text(self._training_metadata_path, json.dumps(
            {"epoch": epoch, "batch": self._last_batch_seen, "weights": weights.name, "seeds": seeds.name}))
        for old in [*backup.glob("*.weights.h5"), *backup.glob("*.seeds.npz")]:
            if old not in (weights, seeds):
                old.unlink()

    def _load_model(self):
        metadata = Path(self._training_metadata_path)
        if not metadata.is_file():
            return  # nothing finished yet: a fresh start
        meta = json.loads(metadata.read_text())
        self._weights_path = str(Path(self.backup_dir) / meta["weights"])
        super()._load_model()
        with np.load(Path(self.backup_dir) / meta["seeds"]) as saved:
            for i, variable in enumerate(self._seed_states()):
                variable.assign(saved[f"arr_{i}"])


def learning_rate_schedule(name, peak, steps):
    """'constant', or 'onecycle': linear warm-up over the first 15 % of steps (at least one) to `peak`, then
    cosine to ~0 over the rest (at least one step).

    Any number of steps >= 1 works: a run of one step (one batch, one epoch) is trained at `peak`, as
    there is no room for a warm-up and a decay; with 2 steps the first warms up and the second is at `peak`."""
    if steps < 1:
        raise ValueError(f"the learning-rate schedule needs at least one step, got {steps}")
    if name == "constant" or steps == 1:
        return peak
    warmup = max(1, int(0.15 * steps))
    return keras.optimizers.schedules.CosineDecay(
        peak / 25, decay_steps=max(1, steps - warmup), alpha=1e-3 / 25, warmup_target=peak, warmup_steps=warmup)


def compile_model(model, args, steps, weighted=False):
    """AdamW (Adam without weight decay) on the schedule, label-smoothed cross-entropy, accuracy;
    weighted: accuracy honours sample weights (the padded batches of several devices carry them).
    ema_momentum > 0: the optimizer also keeps an exponential moving average of the trainable weights
    (Keras's use_ema; updated every step, in the optimizer's state, so the backup holds it)."""
    lr = learning_rate_schedule(args.schedule, args.learning_rate, steps)
    ema = dict(use_ema=True, ema_momentum=args.ema_momentum) if args.ema_momentum else {}
    if args.weight_decay:
        optimizer = keras.optimizers.AdamW(lr, weight_decay=args.weight_decay, **ema)
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    else:
        optimizer = keras.optimizers.Adam(lr, **ema)
    model.compile(optimizer=optimizer, metrics=None if weighted else ["accuracy"],
                  weighted_metrics=["accuracy"] if weighted else None,
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing))


def load_data(args):
    """(x_train, y_train, x_val, y_val, class_names, display_names, what the validation set is)."""
    from data.folder import load_image_folder, skipped_report, stratified_split

    if args.dataset == "cifar10":
        from data.cifar10 import load_cifar10

        (x_train, y_train), (x_test, y_test), names = load_cifar10(args.data_dir)
        if not args.val_split:  # validate on the test split (and keep the last epoch: see fit)
            return x_train, y_train, x_test, y_test, names, None, "test"
        # choose on training pictures held out as for folders (0.1: 500 a class), never on the test split
        train, val = stratified_split(y_train, args.val_split, args.split_seed)
        return x_train[train], y_train[train], x_train[val], y_train[val], names, None, "validation"

    if not args.data_dir:
        raise ValueError("--dataset folder needs --data-dir")
    size = (args.image_size, args.image_size)
    d = load_image_folder(args.data_dir, size, val_fraction=args.val_split, seed=args.split_seed, warn=False)
    if d.skipped:
        print(skipped_report(d.skipped), file=sys.stderr)
    display = read_display_names(args.names, d.class_names) if args.names else None
    return d.x_train, d.y_train, d.x_val, d.y_val, d.class_names, display, "validation"


def read_display_names(path, class_names):
    """Display names from a TSV whose first column is the folder name (header row optional);
    the last column is the name shown. Folders it does not list keep their own name."""
    names = {}
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"--names file not found: {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--names {path}: not UTF-8 text; save it as UTF-8") from None
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("\t")]
        if len(cells) >= 2 and cells[0] and cells[0] != "folder":
            names[cells[0]] = cells[-1]
    if not set(names) & set(class_names):
        found = "its first column names none of" if names else "it has no tab-separated rows for"
        raise ValueError(f"--names {path}: {found} the class folders ({', '.join(class_names[:5])}"
                         f"{', ...' if len(class_names) > 5 else ''}); write one line per folder: "
                         f"folder<TAB>display name")
    unlisted = [c for c in class_names if c not in names]
    if unlisted:
        print(f"note: --names {path} has no row for {', '.join(unlisted)}; shown by folder name", file=sys.stderr)
    return [names.get(c, c) for c in class_names]


def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite `kind` number within [low, high] (an open end where *_open)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        ok = math.isfinite(value) and (low is None or (value > low if low_open else value >= low)) \
            and (high is None or (value < high if high_open else value <= high))
        if not ok:
            bounds = [f"{'>' if low_open else '>='} {low}"] * (low is not None) \
                + [f"{'<' if high_open else '<='} {high}"] * (high is not None)
            raise argparse.ArgumentTypeError(f"must be {' and '.join(bounds)}, got {text}")
        return value
    return parse


def _augmentation(text):
    """An argparse type: an --augment spec that data.augment.augmentation accepts."""
    try:
        augmentation(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["cifar10", "folder"], default="cifar10",
                   help="cifar10 (default; downloaded through Keras without --data-dir) or an image folder")
    p.add_argument("--data-dir", help="cifar10: pickles or train/ test/ image folders (default: Keras download); "
                                      "folder: one subfolder per class")
    p.add_argument("--image-size", type=_number(int, MIN_IMAGE_SIZE), default=64,
                   help=f"folder: images are resized to this square size, at least {MIN_IMAGE_SIZE} (default: 64)")
    p.add_argument("--val-split", type=_number(float, 0.0, 1.0, high_open=True),
                   help="fraction of the training pictures held out for validation, stratified, seeded by --split-seed "
                        "(folder default 0.2; 0 trains on every picture, without validation); cifar10 default 0: "
                        "validate on the test split and keep the last epoch; 0.1 holds out 5,000 training pictures "
                        "and keeps the best epoch on them")
    p.add_argument("--names", help="folder: TSV folder<TAB>display name, shown in figures")
    p.add_argument("--recipe", choices=["default", "original"], default="default",
                   help="default: the dataset's tuned recipe; original: plain Adam 3e-4, no augmentation, 48 epochs")
    for opt, typ in (("epochs", _number(int, 1)), ("batch-size", _number(int, 1)),
                     ("learning-rate", _number(float, 0.0, low_open=True)),
                     ("label-smoothing", _number(float, 0.0, 1.0, high_open=True)),
                     ("weight-decay", _number(float, 0.0))):
        p.add_argument(f"--{opt}", type=typ, help="(default: from the recipe)")
    p.add_argument("--schedule", choices=["constant", "onecycle"])
    p.add_argument("--augment", type=_augmentation, metavar="|".join(AUGMENTATIONS) + "[+EXTRA...]",
                   help=f"per-picture augmentation, then extras in the order written: {', '.join(EXTRAS)} "
                        "(e.g. crop-flip+cutout)")
    p.add_argument("--mix", choices=list(MIXES), help="batch-level label mixing with soft labels (default none)")
    p.add_argument("--ema-momentum", type=_number(float, 0.0, 1.0, high_open=True),
                   help="evaluate and save an exponential moving average of the weights with this momentum "
                        "(e.g. 0.999); 0 (default) trains without one")
    p.add_argument("--precision", choices=["float32", "mixed_bfloat16"], help="mixed_bfloat16 is faster on CPUs with "
                                                                              "AVX-512 BF16 and on recent GPUs")
    p.add_argument("--seed", type=_number(int, 0, SEEDS - 1), default=0,
                   help="initial weights, batch order, augmentation and dropout (default 0)")
    p.add_argument("--split-seed", type=_number(int, 0, SEEDS - 1),
                   help="the validation split (default: --seed); fixed, runs of several --seed values are compared "
                        "on the same pictures")
    p.add_argument("--out", default="runs/latest", help="RUN_DIR for the model, history, curves (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if RUN_DIR holds a finished or an "
                   "interrupted run")
    p.add_argument("--quiet", action="store_true", help="one line per epoch instead of a progress bar")
    p.add_argument("--devices", help="train data-parallel on N devices, 'all', or names gpu:0,gpu:1 (Keras's "
                   "DataParallel: batches sharded, weights replicated; KERAS_BACKEND=jax; --batch-size a multiple "
                   "of N)")
    args = p.parse_args(argv)
    args.val_split, args.split_seed = split_options(args.dataset, args.val_split, args.split_seed, args.seed)
    recipe = RECIPES["original" if args.recipe == "original" else args.dataset]
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run_options(args):
    """What a run is: its data, split, seed and recipe (not where it is written or how it reports), as
    written to RUN_DIR/options.json with data_identity's keys; a resumed run must have the same."""
    options = {"dataset": args.dataset, "image_size": args.image_size if args.dataset == "folder" else None,
               "val_split": args.val_split, "seed": args.seed, "split_seed": args.split_seed,
               **{k: getattr(args, k) for k in RECIPES["original"]}}
    return json.loads(json.dumps(options))  # as it reads back


def data_identity(names, y_train, y_val):
    """The loaded data as options.json records it: the class names and the pictures of each class (training
    and validation), which any other --data-dir, or pictures added or removed, changes; unlike a hash of the
    pixels, moving the folder or another Pillow does not."""
    counts = np.bincount(np.concatenate([y_train, y_val]).astype(np.int64), minlength=len(names))
    return {"classes": [str(n) for n in names], "pictures": [int(c) for c in counts]}


def check_resumable(run, args):
    """A ValueError naming the options that differ from those of the interrupted run in `run`."""
    path = run / "options.json"
    if not (run / "backup").exists() or args.overwrite or not path.is_file():
        return
    before, now = json.loads(path.read_text()), run_options(args)
    changed = [k for k in now if k in before and before[k] != now[k]]  # a key it lacks: an older version's
    if changed:
        def flags(values):
            return " ".join(f"--{k.replace('_', '-')} {values.get(k)}" for k in changed)
        raise ValueError(f"{run} holds an interrupted run made with {flags(before)} (now {flags(now)}); rerun "
                         "with its options to resume it, pass --overwrite to start afresh, or choose another --out")


def _listed(names, most=8):
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_same_data(run, args, identity):
    """A ValueError when the interrupted run in `run` was made on other data than `identity` (data_identity's)
    describes: other classes, or other pictures in a class. options.json without them (an older version's): none."""
    path = run / "options.json"
    if not (run / "backup").exists() or args.overwrite or not path.is_file():
        return
    before = json.loads(path.read_text())
    if "classes" not in before or "pictures" not in before:
        return
    if before["classes"] != identity["classes"]:
        what = f"on classes {_listed(before['classes'])} (now {_listed(identity['classes'])})"
    elif before["pictures"] != identity["pictures"]:
        changed = [f"{c} had {n}, now {m}" for c, n, m in zip(before["classes"], before["pictures"],
                                                               identity["pictures"]) if n != m]
        what = f"on {sum(before['pictures'])} pictures (now {sum(identity['pictures'])}: {_listed(changed)})"
    else:
        return
    raise ValueError(f"{run} holds an interrupted run {what}; rerun with that data to resume it, pass --overwrite "
                     "to start afresh, or choose another --out")


def check_out_outside_data(args):
    """A ValueError for an --out inside --data-dir (or the folder itself): its folders (backup/, or the run itself
    under a CIFAR-10 train/) would be read as a class of pictures on the next run."""
    if not args.data_dir:
        return
    out, data = Path(args.out).resolve(), Path(args.data_dir).resolve()
    if out == data or data in out.parents:
        raise ValueError(f"--out {args.out} is inside --data-dir {args.data_dir}, where its folders would be read "
                         "as pictures; choose an --out outside it")


def train(args, extra_callbacks=()):
    run = Path(args.out)
    backup = run / "backup"
    if run.exists() and not run.is_dir():
        raise ValueError(f"--out {run} is a file, not a folder; choose another --out")
    if (run / "results.json").is_file() and not backup.exists() and not args.overwrite:
        raise ValueError(f"{run} holds a finished run; pass --overwrite or choose another --out")
    check_out_outside_data(args)
    check_resumable(run, args)
    devices = resolve_devices(args.devices)
    if args.batch_size % len(devices):
        raise ValueError(f"--batch-size {args.batch_size} does not divide evenly over {len(devices)} devices; "
                         f"pass a multiple of {len(devices)}")
    keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_val, y_val, names, display, val_name = load_data(args)  # may fail: change nothing before
    identity = data_identity(names, y_train, y_val)
    check_same_data(run, args, identity)
    if args.overwrite:
        shutil.rmtree(backup, ignore_errors=True)
    if not backup.exists():  # a fresh start: nothing from an older run (a run dying in its first epoch leaves none)
        for stale in ("results.json", "history.csv", "confusion.png", "acc.png", "loss.png", "model.keras",
                      classes_path("model.keras")):
            (run / stale).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    write_text(run / "options.json", json.dumps({**run_options(args), **identity}, indent=1))
    print(f"{len(x_train)} training and {len(x_val)} {val_name} images, {len(names)} classes; recipe: "
          + ", ".join(f"{k}={getattr(args, k)}" for k in RECIPES["original"]))
    if not len(x_val):
        print("no validation images (--val-split 0, or one picture a class): the last epoch's model is kept, "
              "and no accuracy is measured", file=sys.stderr)
    if len(devices) > 1:
        print(f"data-parallel on {len(devices)} devices: {', '.join(devices)}")
        with keras.distribution.DataParallel(devices=devices).scope():
            seconds = fit(args, run, x_train, y_train, x_val, y_val, names, display, val_name, len(devices),
                          extra_callbacks)
    else:
        seconds = fit(args, run, x_train, y_train, x_val, y_val, names, display, val_name, 1, extra_callbacks)
    report(args, run, run / "model.keras", x_val, y_val, val_name, seconds)  # the saved model, on one device
    shutil.rmtree(backup, ignore_errors=True)


def fit(args, run, x_train, y_train, x_val, y_val, names, display, val_name, multiple, extra_callbacks):
    """Build, compile and fit the model (on the devices of the distribution in scope); returns the seconds."""
    backup, history_csv, model_path = run / "backup", run / "history.csv", run / "model.keras"
    model = build_model(x_train.shape[1:], len(names), dtype=args.precision)
    batches = EpochBatches(x_train, y_train, len(names), args.batch_size, args.seed, augmentation(args.augment),
                           multiple, MIXES[args.mix])
    backup_and_restore = AtomicBackupAndRestore(str(backup))
    batches.epoch = backup_and_restore.finished_epochs()  # a resumed run draws the batches it would have
    compile_model(model, args, steps=args.epochs * len(batches), weighted=multiple > 1)
    # With an average of the weights: validation (inside fit, before the epoch's callbacks) and the saved model
    # use the average; training and the backup, the live weights (the average is in the optimizer's state).
    # BatchNormalization's moving mean and variance are not averaged (Keras averages trainable weights only),
    # so the model pairs averaged weights with statistics gathered over the last ~100 steps (momentum 0.99)
    # of the live ones. Validation measures exactly that pairing, so any harm shows in the accuracy a run is
    # chosen on; and at the end of a one-cycle schedule the weights hardly move, so the two agree.
    averaged = keras.callbacks.SwapEMAWeights() if args.ema_momentum else None
    val = (x_val.astype("float32"), keras.utils.to_categorical(y_val, len(names))) if len(x_val) else None
    if val is not None and multiple > 1:
        val = ShardableBatches(x_val, y_val, len(names), args.batch_size, multiple)
    callbacks = [
        *([averaged] if averaged is not None else []),  # first: the average is in place for validation
        # then the live weights' validation (back in place after it), before the history writes the logs
        *([LiveValidation(val, args.batch_size)] if averaged is not None and val is not None else []),
        HistoryCSV(history_csv),
        # Keep the best validation model; for CIFAR-10 the validation set is the test split, so keep the last
        # epoch instead of choosing on the test set (and without validation images, the last one too).
        SaveBest(model_path, names, history_csv, monitor="val_accuracy" if val_name != "test" and len(x_val) else None,
                 display_names=display, averaged=averaged),
        backup_and_restore,  # after the epoch's files are written
        *extra_callbacks,
    ]
    start = time.time()
    # shuffle=False: EpochBatches already shuffles, as a pure function of (seed, epoch); Keras would also
    # shuffle the batch order with Python's global random state, which a resumed process does not share.
    model.fit(batches, validation_data=val, epochs=args.epochs, callbacks=callbacks, shuffle=False,
              verbose=2 if args.quiet else 1)
    return time.time() - start


def accuracies(model, images, labels, batch_size=256):
    """The predicted classes, their accuracy, and the accuracy of the mean of the probabilities of each
    picture and its mirror image (test-time flip: reported beside the headline, never as it, since the
    heatmaps explain the single view)."""
    probabilities = model.predict(images.astype("float32"), batch_size=batch_size, verbose=0)
    mirrors = model.predict(images[:, :, ::-1].astype("float32"), batch_size=batch_size, verbose=0)
    pred = probabilities.argmax(axis=1)
    return pred, float((pred == labels).mean()), float(((probabilities + mirrors).argmax(axis=1) == labels).mean())


def report(args, run, model_path, x_val, y_val, val_name, seconds):
    """Evaluate the saved model, draw its curves (and confusion matrix for folders), write results.json."""
    from plots import confusion_matrix_figure, learning_curves, read_history

    model, names, display = load_model(model_path)
    history = read_history(run / "history.csv")
    learning_curves(history, run, title=args.dataset)
    matrix = np.zeros((len(names), len(names)), dtype=np.int64)
    accuracy = mirrored = None
    if len(x_val):
        pred, accuracy, mirrored = accuracies(model, x_val, y_val)
        np.add.at(matrix, (y_val, pred), 1)
        confusion_matrix_figure(matrix, display, run / "confusion.png", title=f"{val_name} accuracy {accuracy:.1%}")
    results = {f"{val_name}_accuracy": accuracy, f"{val_name}_images": int(len(y_val)),
               f"{val_name}_accuracy_mirror_averaged": mirrored, "epochs": int(args.epochs),
               "wall_seconds_this_session": round(seconds, 1),
               "machine": f"{runtime.cpu_name()}, {os.cpu_count()} cores",
               "recipe": {k: getattr(args, k) for k in RECIPES["original"]},
               "val_split": args.val_split, "seed": args.seed, "split_seed": args.split_seed,
               "backend": keras.backend.backend(),
               "devices": resolve_devices(args.devices),
               "confusion_matrix": matrix.tolist(), "classes": names}
    write_text(run / "results.json", json.dumps(results, ensure_ascii=False, indent=1))
    if accuracy is not None:
        print(f"{val_name} accuracy: {accuracy:.4f} ({len(y_val)} images); averaged with each picture's mirror "
              f"image (test-time flip, not the explained model): {mirrored:.4f}")


_OUT = None  # the run's --out once parsed: the stop message names it


def _interrupted_message(out):
    if out is None or not (Path(out) / "backup" / "training_metadata.json").is_file():  # no epoch saved yet
        return "interrupted before the first epoch was saved: nothing to resume"
    return f"interrupted: rerun with --out {out} to resume"


def _terminated(signum, frame):
    """SIGTERM (`kill`, `timeout`, batch schedulers) or Ctrl-C: end at once, as a kill would, which the
    checkpoint is made to survive (AtomicBackupAndRestore), less the temporary file of any write in progress,
    with the line that says how to resume. (Unwinding a KeyboardInterrupt through a running TensorFlow step
    instead ended the process in SIGSEGV once and in an abort in free() once, under load.) The line goes to
    fd 2 directly: the handler may run inside a write of tqdm's to sys.stderr."""
    discard_in_flight()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(OSError):
        os.write(2, (_interrupted_message(_OUT) + "\n").encode())
    os._exit(1)


class Interrupted(SystemExit):
    """The exit of a run stopped by a KeyboardInterrupt raised inside it (exit status 1, the message on stderr)."""


def main(argv=None):
    global _OUT
    args = parse_args(argv)
    _OUT = args.out
    try:
        train(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_message(args.out)) from None


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)  # ends at once, no temporary file left behind
    signal.signal(signal.SIGINT, _terminated)
    try:
        main()
    except Interrupted as stop:
        # Stopped mid-step, with the checkpoint already safe: the message, then out without the interpreter's
        # teardown, which can meet TensorFlow's threads still running (one CI run ended in SIGSEGV, not exit 1).
        print(stop.code, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
