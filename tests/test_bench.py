"""bench.py --backbones (bench_backbones.py): one row's arithmetic on a tiny model timed for real, and a run's
bookkeeping (a subprocess per backend and backbone, the JSON saved after each row, --resume, the batch-size
decision, the docs table) with the subprocesses replaced by recorded rows."""
import json
import subprocess

import keras
import pytest
from keras import layers

import bench
import bench_backbones


def tiny(name, seed):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(layers.Rescaling(1 / 255)(inp))
    return keras.Model(inp, layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling2D()(x)), name=name)


def test_a_row_is_the_ratio_of_score_cams_rate_to_the_bound_at_each_batch_size(monkeypatch):
    monkeypatch.setattr(bench_backbones, "SIDE", 16)
    monkeypatch.setattr(bench_backbones, "T_PICTURES", 8)
    monkeypatch.setattr(bench_backbones, "build", tiny)
    lines = []
    row = bench_backbones.bench_row("Tiny", 2, 1, 0, lines.append)
    assert row["layer"] == "conv" and row["channels"] == 6 and row["images"] == 2 and 1 < row["passes_per_image"] <= 7
    batch = {b: row["batch"][b] for b in bench_backbones.BATCHES}
    assert row["T"] == max(v["T_b"] for v in batch.values()) and row["bound"] == pytest.approx(row["T"] / 7)
    for v in batch.values():
        assert v["ratio_to_bound"] == pytest.approx(v["images_per_s"] / row["bound"])
        assert v["images_per_s"] == v["runs"][0] > 0  # one round: its median is its run
    assert row["fastest_batch"] == max(batch, key=lambda b: batch[b]["images_per_s"])
    assert row["gain_of_fastest_over_256"] == pytest.approx(
        batch[row["fastest_batch"]]["images_per_s"] / batch[256]["images_per_s"] - 1) and row["gain_of_fastest_over_256"] >= 0
    assert "Tiny: layer conv (K = 6)" in lines[0] and "fastest" in lines[1]


def recorded_row(gain):
    ratios = {str(b): {"ratio_to_bound": 0.5 + b / 1000} for b in bench_backbones.BATCHES}
    return {"layer": "conv", "channels": 8, "T": 90.0, "bound": 10.0, "batch": ratios, "fastest_batch": 64,
            "gain_of_fastest_over_256": gain}


def test_each_row_runs_once_in_its_own_process_is_saved_and_resumed_and_decides_the_batch_size(monkeypatch, tmp_path,
                                                                                                capsys):
    gains = {("tensorflow", "A"): 0.04, ("tensorflow", "B"): 0.02, ("jax", "A"): 0.08, ("jax", "B"): 0.31}
    calls, fail = [], {("jax", "B")}

    def child(command, env, **_):
        key = (env["KERAS_BACKEND"], command[-4])
        calls.append(key)
        if key in fail:
            return subprocess.CompletedProcess(command, -15, stdout="")
        return subprocess.CompletedProcess(command, 0, stdout="log\n" + json.dumps({"rows": {key[1]: recorded_row(gains[key])}}))

    monkeypatch.setattr(bench_backbones.subprocess, "run", child)
    path = tmp_path / "rows.json"
    argv = ["--backbones", "--backbone-names", "A,B", "--json", str(path)]
    with pytest.raises(SystemExit, match="the jax B row failed .*--resume continues"):
        bench.main(argv)
    saved = json.loads(path.read_text())  # the rows before the failure are on disk
    assert {b: list(r) for b, r in saved["backends"].items()} == {"tensorflow": ["A", "B"], "jax": ["A"]}
    assert [r["row"] for r in saved["load"]] == ["tensorflow/A", "tensorflow/B", "jax/A"]
    assert calls == [("tensorflow", "A"), ("tensorflow", "B"), ("jax", "A"), ("jax", "B")]

    fail.clear()
    calls.clear()
    bench.main(argv + ["--resume"])
    assert calls == [("jax", "B")]  # only the row missing
    report = json.loads(path.read_text())
    assert report["decision"]["auto"] is True and report["decision"]["gains_over_256"]["jax/B"] == 0.31
    out = capsys.readouterr().out
    assert "more than 10% on 1 of 4 rows" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 4 and table[2] == "| A, `conv` (K = 8) | TensorFlow | 90.0 | 10.0000 | 0.53 / 0.56 / 0.63 / 0.76 | 64 (+4%) |"

    gains[("jax", "B")] = 0.09  # no row beats 256 by more than 10 %: 256 stays
    path.unlink()
    bench.main(argv)
    assert json.loads(path.read_text())["decision"]["auto"] is False


def test_bad_counts_are_one_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--backbones", "--repeats", "0"])
    assert e.value.code == 2 and "--backbone-n and --repeats must be at least 1" in capsys.readouterr().err
