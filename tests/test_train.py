"""Training end to end on a tiny folder: every output file, resume after an interruption, CLI errors."""
import csv
import json

import keras
import numpy as np
import pytest

import train
from conftest import run_cli
from model import load_model

TINY = ["--dataset", "folder", "--image-size", "16", "--batch-size", "8", "--quiet"]


def history_epochs(run):
    with open(run / "history.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def test_one_epoch_writes_every_output(color_folder, tmp_path):
    run = tmp_path / "run"
    train.main([*TINY, "--data-dir", str(color_folder), "--epochs", "1", "--out", str(run)])
    files = {p.name for p in run.iterdir()}
    assert {"model.keras", "model.classes.json", "history.csv", "acc.png", "loss.png", "confusion.png",
            "results.json"} <= files
    assert "backup" not in files  # the resume state goes once training is done
    model, names, _ = load_model(run / "model.keras")
    assert names == ["blue", "green", "red"] and model.input_shape == (None, 16, 16, 3)
    results = json.loads((run / "results.json").read_text())
    assert 0 <= results["validation_accuracy"] <= 1 and results["validation_images"] == 6
    assert results["backend"] == keras.backend.backend() and results["devices"]  # where the accuracy was measured
    assert history_epochs(run) == [0]


class Interrupt(keras.callbacks.Callback):
    """Stops training like Ctrl-C once `after` epochs are complete (and backed up)."""

    def __init__(self, after):
        super().__init__()
        self.after = after

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.after:
            raise KeyboardInterrupt


def test_interrupted_training_resumes_to_the_same_model(color_folder, tmp_path):
    args = [*TINY, "--data-dir", str(color_folder), "--epochs", "3", "--augment", "rotate-shift-flip"]
    whole = tmp_path / "whole"
    train.train(train.parse_args([*args, "--out", str(whole)]))

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train.train(train.parse_args([*args, "--out", str(resumed)]), extra_callbacks=[Interrupt(after=2)])
    assert (resumed / "backup").is_dir() and history_epochs(resumed) == [0, 1]
    train.train(train.parse_args([*args, "--out", str(resumed)]))
    assert history_epochs(resumed) == [0, 1, 2]
    # Every epoch's training loss and validation scores, bitwise: the saved model alone could be an
    # early best epoch, written before the interruption, and prove nothing about the resumed epochs.
    assert (resumed / "history.csv").read_text() == (whole / "history.csv").read_text()
    a, _, _ = load_model(whole / "model.keras")
    b, _, _ = load_model(resumed / "model.keras")
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_death_while_the_backup_is_written_resumes_from_the_last_complete_one(tmp_path):
    """Keras's own callback rewrites its weights file in place: dying mid-write left an unreadable
    checkpoint (CI saw "bad object header version number"). Ours must fall back to the last whole one."""
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
    assert proc.returncode == 1
    assert stderr.strip().splitlines()[-1] == f"interrupted: rerun with --out {tmp_path / 'run'} to resume"
    assert "Traceback" not in stderr
    assert not [p.name for p in (tmp_path / "run").rglob(".*")], "temporary files left behind"
    assert train.AtomicBackupAndRestore(str(tmp_path / "run" / "backup")).finished_epochs() >= 1


def test_sigkill_at_a_random_point_then_rerun_gives_the_uninterrupted_model(color_folder, tmp_path):
    """Batches are a pure function of (seed, epoch, batch) and the checkpoint holds weights, optimizer and
    dropout random-generator states, so the resumed run repeats the lost epoch exactly: bitwise equal
    history and weights."""
    import random
    import shutil
    import subprocess
    import sys
    import time

    from conftest import ROOT

    args = ["train.py", *TINY, "--data-dir", str(color_folder), "--epochs", "6"]
    assert run_cli(*args, "--out", tmp_path / "whole").returncode == 0
    killed, window = tmp_path / "killed", 0.5
    for _ in range(6):  # a kill that lands after the (fast) run ends tests nothing: retry, sooner
        shutil.rmtree(killed, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, *args, "--out", str(killed)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        # from the first complete checkpoint on (a kill before it is a fresh start, which tests nothing)
        while not (killed / "backup" / "training_metadata.json").exists() and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.01)
        delay = random.uniform(0, window)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if (killed / "backup").is_dir():
            break
        window /= 2
    assert (killed / "backup").is_dir(), "every run finished before its kill"
    r = run_cli(*args, "--out", killed)
    assert r.returncode == 0, r.stderr
    assert history_epochs(killed) == list(range(6))
    assert (killed / "history.csv").read_text() == (tmp_path / "whole" / "history.csv").read_text()
    a, _, _ = load_model(tmp_path / "whole" / "model.keras")
    b, _, _ = load_model(killed / "model.keras")
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb, err_msg=f"killed at +{delay:.2f}s after the first epoch")
