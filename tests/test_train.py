"""Training end to end on a tiny folder: every output file, resume after an interruption, CLI errors,
the learning-rate schedule at any step count, checkpoints on disk before their predecessor goes."""
import csv
import json
import math
import os
import random

import keras
import numpy as np
import pytest

import runtime
import train
from conftest import ROOT, run_cli
from model import load_model

TINY = ["--dataset", "folder", "--image-size", "16", "--batch-size", "8", "--quiet"]


@pytest.fixture
def deterministic_ops():
    """Bitwise comparisons of two trainings need deterministic kernels, so ask the backend for them.

    TensorFlow: its CPU kernels happen to be deterministic here, but only enable_op_determinism()
    promises it (on GPUs, and for reductions and convolutions whose algorithm it may pick per run).
    It is process-wide, so it is switched off again afterwards: other tests keep TensorFlow's defaults
    whatever order they run in. JAX: XLA on the CPU compiles one deterministic program for a given
    input, so there is nothing to ask (on a GPU it would take XLA_FLAGS=--xla_gpu_deterministic_ops=true
    before JAX starts). Seeds: keras.utils.set_random_seed seeds Python, NumPy and the backend."""
    keras.utils.set_random_seed(0)
    if keras.backend.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config  # has the switch-off the public API lacks

    was_on = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_on:
            tf_config.disable_op_determinism()


def deterministic_subprocesses(monkeypatch):
    """What deterministic_ops asks for, for a child process: TensorFlow reads TF_DETERMINISTIC_OPS at start
    (JAX ignores it and needs nothing on a CPU, see above); train.py seeds everything from --seed."""
    monkeypatch.setenv("TF_DETERMINISTIC_OPS", "1")


def history_epochs(run):
    with open(run / "history.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def test_one_epoch_writes_every_output(color_folder, tmp_path):
    """Issue 15's first try: 24 training pictures, the default batch of 32, one epoch, so one step in all,
    which the one-cycle schedule (warm-up, then decay) stopped with "decay_steps must be > 0"."""
    run = tmp_path / "run"
    args = ["--dataset", "folder", "--image-size", "16", "--quiet", "--data-dir", str(color_folder), "--epochs", "1"]
    assert train.parse_args(args).batch_size == 32 and train.parse_args(args).schedule == "onecycle"
    train.main([*args, "--out", str(run)])
    files = {p.name for p in run.iterdir()}
    assert {"model.keras", "model.classes.json", "history.csv", "acc.png", "loss.png", "confusion.png",
            "results.json"} <= files
    assert "backup" not in files  # the resume state goes once training is done
    model, names, _ = load_model(run / "model.keras")
    assert names == ["blue", "green", "red"] and model.input_shape == (None, 16, 16, 3)
    results = json.loads((run / "results.json").read_text())
    assert 0 <= results["validation_accuracy"] <= 1 and results["validation_images"] == 6
    assert 0 <= results["validation_accuracy_mirror_averaged"] <= 1
    assert results["backend"] == keras.backend.backend() and results["devices"]  # where the accuracy was measured
    assert results["machine"].startswith(runtime.cpu_name() + ", ")
    assert history_epochs(run) == [0]


def test_mirror_averaged_accuracy_is_that_of_the_mean_of_the_picture_and_its_mirror_image():
    """A known answer on two-pixel pictures [left, right]: class 0's logit is 3 * left, class 1's 0.5, so
    flipping moves the left pixel's evidence. [0.2, 0] and [0, 0.5] are right alone and wrong averaged with
    their mirror image; [0.1, 0.9] the reverse. A flip along any other axis would change nothing."""
    from keras import layers

    inputs = keras.Input(shape=(1, 2, 1))
    dense = layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, dense(layers.Flatten()(inputs)))
    dense.set_weights([np.array([[3.0, 0.0], [0.0, 0.0]]), np.array([0.0, 0.5])])
    images = np.array([[0.2, 0.0], [0.0, 0.5], [0.1, 0.9]]).reshape(3, 1, 2, 1)
    labels = np.array([0, 1, 0])
    pred, accuracy, mirrored = train.accuracies(model, images, labels)
    assert pred.tolist() == [0, 1, 1]
    assert accuracy == pytest.approx(2 / 3) and mirrored == pytest.approx(1 / 3)


class Interrupt(keras.callbacks.Callback):
    """Stops training like Ctrl-C once `after` epochs are complete (and backed up)."""

    def __init__(self, after):
        super().__init__()
        self.after = after

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.after:
            raise KeyboardInterrupt


def small_model(input_shape=(32, 32, 3), num_classes=10, dtype=None):
    """build_model's roles at a fraction of its cost: rescale, conv, BatchNorm (whose statistics are not
    averaged), dropout (whose generator state the backup keeps), logits, float32 softmax."""
    from keras import layers

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale", dtype=dtype)(inputs)
    x = layers.Conv2D(4, 3, padding="same", name="block1_conv1", dtype=dtype)(x)
    x = layers.BatchNormalization(name="block1_bn1", dtype=dtype)(x)
    x = layers.Activation("relu", dtype=dtype)(x)
    x = layers.MaxPooling2D(4, name="block1_pool", dtype=dtype)(x)
    x = layers.Dropout(0.25, name="block1_dropout", dtype=dtype)(x)
    x = layers.Flatten(name="flatten", dtype=dtype)(x)
    x = layers.Dense(num_classes, name="logits", dtype=dtype)(x)
    return keras.Model(inputs, layers.Activation("softmax", name="predictions", dtype="float32")(x))


def test_interrupted_training_resumes_to_the_same_model(color_folder, tmp_path, deterministic_ops, monkeypatch):
    """Ctrl-C at an epoch's end, in-process, on a small model with build_model's roles (the SIGKILL test
    below resumes the real one): history and weights bitwise."""
    monkeypatch.setattr(train, "build_model", small_model)
    args = [*TINY, "--data-dir", str(color_folder), "--epochs", "2", "--augment", "rotate-shift-flip"]
    whole = tmp_path / "whole"
    train.train(train.parse_args([*args, "--out", str(whole)]))

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train.train(train.parse_args([*args, "--out", str(resumed)]), extra_callbacks=[Interrupt(after=1)])
    assert (resumed / "backup").is_dir() and history_epochs(resumed) == [0]
    train.train(train.parse_args([*args, "--out", str(resumed)]))
    assert history_epochs(resumed) == [0, 1]
    # Every epoch's training loss and validation scores, bitwise: the saved model alone could be an
    # early best epoch, written before the interruption, and prove nothing about the resumed epochs.
    assert (resumed / "history.csv").read_text() == (whole / "history.csv").read_text()
    a, _, _ = load_model(whole / "model.keras")
    b, _, _ = load_model(resumed / "model.keras")
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_an_interrupted_run_resumes_only_with_its_own_options(color_folder, tmp_path, monkeypatch, capsys):
    """Rerunning an interrupted run with another recipe would continue it under the new one, silently: one
    error line naming the options that differ, the run untouched; --overwrite starts afresh."""
    monkeypatch.setattr(train, "build_model", small_model)
    args = [*TINY, "--data-dir", str(color_folder), "--epochs", "2", "--out", str(tmp_path / "run")]
    with pytest.raises(KeyboardInterrupt):
        train.train(train.parse_args([*args, "--augment", "rotate-shift-flip"]), extra_callbacks=[Interrupt(after=1)])
    backup = sorted(p.name for p in (tmp_path / "run" / "backup").iterdir())
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--augment", "none", "--seed", "3"])
    assert e.value.code == (f"error: {tmp_path / 'run'} holds an interrupted run made with --seed 0 --split-seed 0 "
                            "--augment rotate-shift-flip (now --seed 3 --split-seed 3 --augment none); rerun with its "
                            "options to resume it, pass --overwrite to start afresh, or choose another --out")
    assert sorted(p.name for p in (tmp_path / "run" / "backup").iterdir()) == backup
    assert history_epochs(tmp_path / "run") == [0]
    train.train(train.parse_args([*args, "--augment", "none", "--overwrite"]))
    assert history_epochs(tmp_path / "run") == [0, 1] and not (tmp_path / "run" / "backup").exists()
    assert json.loads((tmp_path / "run" / "options.json").read_text())["augment"] == "none"


def test_an_interrupted_run_resumes_only_on_its_own_data(color_folder, tmp_path, monkeypatch):
    """options.json records the classes and the pictures of each: another --data-dir, or pictures added, would
    move held-out pictures into training (another class count died in a tensor dump). One error line naming what
    changed, the run untouched; an options.json without them (an older version's) still resumes."""
    import shutil

    monkeypatch.setattr(train, "build_model", small_model)
    run = tmp_path / "run"
    args = [*TINY, "--epochs", "2", "--out", str(run)]
    with pytest.raises(KeyboardInterrupt):
        train.train(train.parse_args([*args, "--data-dir", str(color_folder)]), extra_callbacks=[Interrupt(after=1)])
    options = json.loads((run / "options.json").read_text())
    assert options["classes"] == ["blue", "green", "red"] and options["pictures"] == [10, 10, 10]
    backup = sorted(p.name for p in (run / "backup").iterdir())

    other = shutil.copytree(color_folder, tmp_path / "other")
    shutil.rmtree(other / "blue")
    (other / "pink").mkdir()
    shutil.copy(other / "red" / "0.png", other / "pink" / "0.png")
    shutil.copy(other / "red" / "1.png", other / "pink" / "1.png")
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--data-dir", str(other)])
    assert e.value.code == (f"error: {run} holds an interrupted run on classes blue, green, red (now green, pink, "
                            "red); rerun with that data to resume it, pass --overwrite to start afresh, or choose "
                            "another --out")
    shutil.copy(color_folder / "red" / "0.png", color_folder / "red" / "new.png")
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--data-dir", str(color_folder)])
    assert e.value.code.startswith(f"error: {run} holds an interrupted run on 30 pictures (now 31: red had 10, "
                                   "now 11); rerun with that data")
    assert sorted(p.name for p in (run / "backup").iterdir()) == backup and history_epochs(run) == [0]
    assert json.loads((run / "options.json").read_text()) == options

    (color_folder / "red" / "new.png").unlink()
    older = {k: v for k, v in options.items() if k not in ("classes", "pictures")}
    (run / "options.json").write_text(json.dumps(older))
    train.train(train.parse_args([*args, "--data-dir", str(color_folder)]))
    assert history_epochs(run) == [0, 1] and not (run / "backup").exists()


@pytest.mark.parametrize("dataset, out", [("folder", "data/run"), ("folder", "data"), ("cifar10", "data/train/run"),
                                          ("folder", "link/run")])
def test_out_inside_the_data_folder_is_refused(color_folder, tmp_path, monkeypatch, dataset, out):
    """A run written into --data-dir becomes a class of its own (its backup/, or itself under train/) on the next
    run: one error line, before anything is read or written."""
    monkeypatch.setattr(train, "build_model", small_model)  # were it not refused: a short run, then the failure
    data = tmp_path / "data"
    color_folder.rename(data)
    (tmp_path / "link").symlink_to(data)  # the data folder by another name
    before = sorted(map(str, tmp_path.rglob("*")))
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--dataset", dataset, "--data-dir", str(data), "--out", str(tmp_path / out),
                    "--epochs", "1"])
    assert e.value.code == (f"error: --out {tmp_path / out} is inside --data-dir {data}, where its folders would be "
                            "read as pictures; choose an --out outside it")
    assert sorted(map(str, tmp_path.rglob("*"))) == before


def test_a_fresh_start_leaves_no_output_of_an_older_run(color_folder, tmp_path, monkeypatch):
    """--overwrite (or a start without a checkpoint) that dies in its first epoch left the old model, its class
    file and curves beside the new options.json, as if they were the new run's."""
    monkeypatch.setattr(train, "build_model", small_model)
    run = tmp_path / "run"
    args = [*TINY, "--data-dir", str(color_folder), "--epochs", "1", "--out", str(run)]
    train.train(train.parse_args(args))
    old = {"model.keras", "model.classes.json", "acc.png", "loss.png", "confusion.png", "history.csv", "results.json"}
    assert old <= {p.name for p in run.iterdir()}

    class DiesAtOnce(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train(train.parse_args([*args, "--overwrite", "--seed", "1"]), extra_callbacks=[DiesAtOnce()])
    assert sorted(p.name for p in run.iterdir() if p.name != "backup") == ["options.json"]
    assert json.loads((run / "options.json").read_text())["seed"] == 1


def test_an_interrupt_before_the_first_saved_epoch_says_there_is_nothing_to_resume(color_folder, tmp_path,
                                                                                 monkeypatch):
    def interrupted_while_reading(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "load_data", interrupted_while_reading)
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--data-dir", str(color_folder), "--out", str(tmp_path / "run")])
    assert e.value.code == "interrupted before the first epoch was saved: nothing to resume"


def test_split_seed_fixes_the_validation_split_while_the_seed_varies(color_folder):
    def val(*extra):
        x_train, y_train, x_val, y_val, *_ = train.load_data(train.parse_args([*TINY, "--data-dir", str(color_folder),
                                                                              *extra]))
        return x_val

    np.testing.assert_array_equal(val("--seed", "1", "--split-seed", "0"), val("--seed", "0"))
    assert not np.array_equal(val("--seed", "1"), val("--seed", "0"))
    assert train.run_options(train.parse_args([*TINY, "--seed", "4"]))["split_seed"] == 4


def test_death_while_the_backup_is_written_resumes_from_the_last_complete_one(tmp_path):
    """Keras's own callback rewrites its weights file in place: dying mid-write left an unreadable
    checkpoint (CI saw "bad object header version number"). Ours must fall back to the last whole one.
    (Bitwise without deterministic_ops: weights are only written and read back, nothing is computed.)"""
    from pathlib import Path

    from model import build_model

    def compiled():
        m = build_model((16, 16, 3), 2)
        m.compile(optimizer="adam", loss="categorical_crossentropy")
        m.optimizer.build(m.trainable_variables)
        return m

    model, backup = compiled(), tmp_path / "backup"
    saver = train.AtomicBackupAndRestore(str(backup))
    saver.set_model(model)
    saver.on_epoch_end(0)
    saved = model.get_weights()
    model.set_weights([np.zeros_like(w) for w in saved])

    def dies_mid_write(filepath, **kwargs):
        Path(filepath).write_bytes(b"\x89HDF\r\n\x1a\n half a file")
        raise KeyboardInterrupt

    model.save_weights = dies_mid_write
    with pytest.raises(KeyboardInterrupt):
        saver.on_epoch_end(1)
    resumed = compiled()
    restorer = train.AtomicBackupAndRestore(str(backup))
    restorer.set_model(resumed)
    restorer.on_train_begin()
    assert resumed._initial_epoch == 1
    for a, b in zip(resumed.get_weights(), saved):
        np.testing.assert_array_equal(a, b)


def test_backup_claims_async_safety_only_because_its_batch_hooks_write_nothing(tmp_path):
    """`async_safe` lets Keras run batches ahead on JAX (2x on a GPU); it is only true while the
    callback saves per epoch, never inside a batch."""
    from model import build_model

    model = build_model((16, 16, 3), 2)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    backup = tmp_path / "backup"
    saver = train.AtomicBackupAndRestore(str(backup))
    saver.set_model(model)
    saver.on_train_begin()
    for batch in range(3):
        saver.on_train_batch_begin(batch)
        saver.on_train_batch_end(batch, {"loss": 1.0})
    assert saver.async_safe and not any(backup.glob("*"))
    assert not train.AtomicBackupAndRestore(str(backup), save_freq=2).async_safe
    saver.on_epoch_end(0)
    assert any(backup.glob("*.weights.h5"))


def test_finished_run_is_not_overwritten_by_accident(color_folder, tmp_path):
    args = [*TINY, "--data-dir", str(color_folder), "--epochs", "1", "--out", str(tmp_path / "run")]
    train.main(args)
    with pytest.raises(SystemExit, match="holds a finished run"):
        train.main(args)


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "data" / "only").mkdir(parents=True)
    r = run_cli("train.py", "--dataset", "folder", "--data-dir", tmp_path / "data", "--out", tmp_path / "run")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "at least two class" in r.stderr
    r = run_cli("train.py", "--dataset", "nope")
    assert r.returncode == 2 and "usage:" in r.stderr


def test_sigterm_ends_with_one_line_leaves_no_temporary_file_and_resumes(color_folder, tmp_path):
    """`timeout` and batch schedulers stop a run with SIGTERM, which by default kills Python without
    unwinding: a file being written stayed behind as `.model.keras.XXXX.keras`."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    args = ["train.py", *TINY, "--data-dir", str(color_folder), "--epochs", "40", "--out", str(tmp_path / "run")]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    metadata = tmp_path / "run" / "backup" / "training_metadata.json"
    while not metadata.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1, f"exit {proc.returncode}; stderr: {stderr[-3000:]}"  # once -11 (SIGSEGV) under load
    assert stderr.strip().splitlines()[-1] == f"interrupted: rerun with --out {tmp_path / 'run'} to resume"
    assert "Traceback" not in stderr
    assert not [p.name for p in (tmp_path / "run").rglob(".*")], "temporary files left behind"
    assert train.AtomicBackupAndRestore(str(tmp_path / "run" / "backup")).finished_epochs() >= 1


def kill_seed(request):
    """The seed of the kill delays: $TRAIN_KILL_SEED, else pytest-randomly's seed of this run, else 0."""
    if os.environ.get("TRAIN_KILL_SEED"):
        return int(os.environ["TRAIN_KILL_SEED"])
    seed = getattr(request.config.option, "randomly_seed", None)
    return seed if isinstance(seed, int) else 0


def test_sigkill_at_a_random_point_then_rerun_gives_the_uninterrupted_model(color_folder, tmp_path, request,
                                                                          monkeypatch):
    """Batches are a pure function of (seed, epoch, batch) and the checkpoint holds weights, optimizer and
    dropout random-generator states, so the resumed run repeats the lost epoch exactly: bitwise equal
    history and weights. The kill lands a seeded random delay after the first complete checkpoint; a run
    that finishes before it is retried with a shorter delay (down to none), not counted as a failure."""
    import shutil
    import subprocess
    import sys
    import time

    seed = kill_seed(request)
    rng = random.Random(seed)
    print(f"kill delays seeded with {seed}: rerun with TRAIN_KILL_SEED={seed} to draw the same ones")
    deterministic_subprocesses(monkeypatch)
    args = ["train.py", *TINY, "--data-dir", str(color_folder), "--epochs", "6"]
    assert run_cli(*args, "--out", tmp_path / "whole").returncode == 0
    killed, window, tries = tmp_path / "killed", 0.5, []
    for attempt in range(6):
        shutil.rmtree(killed, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, *args, "--out", str(killed)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        # from the first complete checkpoint on (a kill before it is a fresh start, which tests nothing)
        while not (killed / "backup" / "training_metadata.json").exists() and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.01)
        delay = 0.0 if attempt == 5 else rng.uniform(0, window)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        done = train.AtomicBackupAndRestore(str(killed / "backup")).finished_epochs() \
            if (killed / "backup").is_dir() else None
        tries.append(f"+{delay:.3f}s: " + ("finished before the kill" if done is None else f"{done} epochs done"))
        if done is not None:
            break
        window /= 4  # the run outran the kill: try sooner
    where = f"seed {seed}, kills at " + "; ".join(tries)
    assert (killed / "backup").is_dir(), f"every run finished before its kill, even with no delay ({where})"
    r = run_cli(*args, "--out", killed)
    assert r.returncode == 0, r.stderr
    assert history_epochs(killed) == list(range(6))
    assert (killed / "history.csv").read_text() == (tmp_path / "whole" / "history.csv").read_text(), where
    a, _, _ = load_model(tmp_path / "whole" / "model.keras")
    b, _, _ = load_model(killed / "model.keras")
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb, err_msg=where)


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20])
def test_onecycle_schedule_works_for_any_number_of_steps(steps):
    """Issue 15: one step (one batch, one epoch) had no decay steps. Every step count >= 1 gives a rate in
    (0, peak] at every step; with two steps or more it warms up from peak / 25 to peak, then decays."""
    peak = 2e-3
    schedule = train.learning_rate_schedule("onecycle", peak, steps)
    rates = [float(schedule(step)) if callable(schedule) else float(schedule) for step in range(steps + 1)]
    assert all(math.isfinite(r) and 0 < r <= peak * (1 + 1e-6) for r in rates), rates
    if steps == 1:
        assert rates[0] == pytest.approx(peak)  # no room for a warm-up and a decay: the one step at peak
    else:
        assert rates[0] == pytest.approx(peak / 25) and max(rates) == pytest.approx(peak)
        assert rates.index(max(rates)) == max(1, int(0.15 * steps))
    if steps >= 3:  # then decays, to ~0 where the steps end
        assert rates[steps - 1] < peak and rates[steps] == pytest.approx(peak * 1e-3 / 25, rel=0.01)
    assert train.learning_rate_schedule("constant", peak, steps) == peak
    with pytest.raises(ValueError, match="at least one step"):
        train.learning_rate_schedule("onecycle", peak, 0)


def test_a_checkpoint_is_on_disk_before_its_predecessor_is_removed(tmp_path, monkeypatch):
    """Power loss must not leave an empty new checkpoint with the old one gone: each file is fsynced before
    its rename, its folder after it, and only then is the previous epoch's checkpoint deleted."""
    from model import build_model

    model = build_model((16, 16, 3), 2)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    backup = tmp_path / "backup"
    saver = train.AtomicBackupAndRestore(str(backup))
    saver.set_model(model)
    saver.on_epoch_end(0)

    events, paths = [], {}
    real_open, real_fsync, real_replace, real_unlink = os.open, os.fsync, os.replace, os.unlink

    def record_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        paths[fd] = os.path.abspath(path)
        return fd

    def record_fsync(fd):
        events.append(("fsync", paths.get(fd, fd)))
        return real_fsync(fd)

    def record_replace(src, dst, **kwargs):
        events.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        return real_replace(src, dst, **kwargs)

    def record_unlink(path, **kwargs):
        events.append(("unlink", os.path.abspath(path)))
        return real_unlink(path, **kwargs)

    for name, function in (("open", record_open), ("fsync", record_fsync), ("replace", record_replace),
                           ("unlink", record_unlink)):
        monkeypatch.setattr(os, name, function)
    saver.on_epoch_end(1)
    monkeypatch.undo()

    folder = str(backup)
    old_weights = str(backup / "epoch0001.weights.h5")  # Keras counts epochs from 1 in the file names
    assert not os.path.exists(old_weights) and os.path.exists(backup / "epoch0002.weights.h5")
    unlinked = [e[1] for e in events if e[0] == "unlink"]
    first_unlink = min(events.index(("unlink", p)) for p in unlinked if ".tmp" not in p and "/." not in p)
    assert {os.path.basename(p) for p in unlinked} == {"epoch0001.weights.h5", "epoch0001.seeds.npz"}
    for target in ("epoch0002.weights.h5", "epoch0002.seeds.npz", "training_metadata.json"):
        replace = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(backup / target))
        tmp = events[replace][1]
        fsync_file = events.index(("fsync", tmp))
        fsync_dir = next(i for i, e in enumerate(events) if e == ("fsync", folder) and i > replace)
        assert fsync_file < replace < fsync_dir < first_unlink, (target, events)


def test_malicious_or_broken_cifar10_pickles_end_in_one_error_line(tmp_path):
    """Issue 15: the safe unpickler refused a malicious batch, but train.py ended in a traceback."""
    from test_data import BROKEN_BATCHES, _pickles

    for case in ("malicious", "truncated", "label 10"):
        folder = _pickles(tmp_path / case, data_batch_2=BROKEN_BATCHES[case][0])
        with pytest.raises(SystemExit) as e:
            train.main(["--data-dir", str(folder), "--out", str(tmp_path / "run"), "--quiet"])
        message = str(e.value.code)
        assert message.startswith(f"error: {folder / 'data_batch_2'}: ") and "\n" not in message, message
        assert "--data-dir" in message and not (tmp_path / "run").exists()
    r = run_cli("train.py", "--data-dir", tmp_path / "malicious", "--out", tmp_path / "run")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "refused to load posix.system" in r.stderr


@pytest.mark.parametrize("option, value, reason", [
    ("--batch-size", "0", "must be >= 1"),  # was a ZeroDivisionError traceback (found by the generated options)
    ("--epochs", "0", "must be >= 1"),  # was "error: model file not found", after building the model
    ("--learning-rate", "nan", "must be > 0.0"), ("--learning-rate", "0", "must be > 0.0"),  # trained on NaN
    ("--val-split", "1", "must be >= 0.0 and < 1.0"), ("--val-split", "-0.1", "must be >= 0.0"),
    ("--label-smoothing", "1.5", "must be >= 0.0 and < 1.0"), ("--weight-decay", "-1", "must be >= 0.0"),
    ("--seed", "-5", "must be >= 0"), ("--image-size", "8", "must be >= 16"), ("--epochs", "2.5", "not an integer"),
])
def test_out_of_range_options_are_usage_errors_naming_the_option(option, value, reason, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--dataset", "folder", option, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: argument {option}: {reason}" in err, err


OFFLINE_TRAIN = """
import runpy, sys
sys.path.insert(0, {root!r})
import runtime  # quiet TensorFlow start-up, as train.py does
import keras.src.datasets.cifar10 as keras_cifar10

real_get_file = keras_cifar10.get_file
keras_cifar10.get_file = lambda *a, **k: real_get_file(*a, **{{**k, "origin": {url!r}}})
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path({train!r}, run_name="__main__")
"""


def test_no_arguments_trains_cifar10_and_a_failed_download_is_one_error_line(tmp_path, monkeypatch):
    """`python train.py` alone means CIFAR-10 with its shipped recipe, downloaded through Keras. Offline
    here: Keras's real download code runs in the child, pointed at a closed loopback port, with an empty
    HOME and KERAS_HOME (no cached ~/.keras/datasets)."""
    from test_data import closed_port_url

    args = train.parse_args([])
    assert args.dataset == "cifar10" and args.data_dir is None
    assert {k: getattr(args, k) for k in train.RECIPES["cifar10"]} == train.RECIPES["cifar10"]
    url = closed_port_url()
    for var in ("HOME", "KERAS_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    script = OFFLINE_TRAIN.format(root=str(ROOT), url=url, train=str(ROOT / "train.py"))
    r = run_cli("-c", script, cwd=tmp_path / "work")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not download CIFAR-10 (URL fetch failure on {url}")
    assert last.endswith("; pass --data-dir DIR (pickles or train/ test/ folders)")
    assert not (tmp_path / "work" / "runs").exists()  # nothing written for a run that never started


def test_skipped_files_are_named_up_to_three_with_their_reasons(color_folder, capsys):
    for i in range(4):
        (color_folder / "red" / f"broken{i}.png").write_bytes(b"not a picture")
    train.load_data(train.parse_args([*TINY, "--data-dir", str(color_folder)]))
    err = capsys.readouterr().err
    assert "skipped 4 unreadable file(s): " in err and "; and 1 more" in err
    assert sum(f"broken{i}.png: not an image" in err for i in range(4)) == 3
