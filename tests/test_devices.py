"""Several devices: Score-CAM's masked batches sharded over virtual CPU devices (JAX, in a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=4) give the single-device maps; bad device
options are one clear error on every backend."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_cli, write_image

FOUR_DEVICES = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import runtime, keras, numpy as np
import scorecam
from model import build_model
keras.utils.set_random_seed(0)
model = build_model((16, 16, 3), 5)
x = np.random.default_rng(0).uniform(0, 255, (5, 16, 16, 3)).astype("float32")
one = scorecam.score_cam_layers(model, x, ["block2_conv1", "block4_conv3"], precision="float32", batch_size=64)
out = {"devices": keras.distribution.list_devices()}
for devices, batch in (("all", 64), (["cpu:1", "cpu:3"], 6)):
    many = scorecam.score_cam_layers(model, x, ["block2_conv1", "block4_conv3"], batch_size=batch, devices=devices)
    out[str(devices)] = max(float(np.abs(many[0][k] - one[0][k]).max()) for k in one[0])
    out[str(devices) + "_probs"] = float(np.abs(many[1] - one[1]).max())
for devices, batch in ((5, 64), (4, 6), ("tpu:0", 4), (0, 4)):
    try:
        scorecam.score_cam(model, x, devices=devices, batch_size=batch)
        out[f"error {devices} {batch}"] = None
    except ValueError as e:
        out[f"error {devices} {batch}"] = str(e)
print(json.dumps(out))
"""


def run_python(code, env_extra, *args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def test_sharded_score_cam_equals_one_device_and_refuses_bad_device_options():
    r = run_python(SCRIPT, FOUR_DEVICES, ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    for devices in ("all", "['cpu:1', 'cpu:3']"):
        assert out[devices] < 1e-5 and out[devices + "_probs"] < 1e-6, (devices, out)
    assert "5 devices asked for, 4 present" in out["error 5 64"]
    assert "does not divide evenly over 4 devices" in out["error 4 6"]
    assert "unknown device(s) tpu:0" in out["error tpu:0 4"]
    assert "at least 1" in out["error 0 4"]


def test_folder_cli_on_two_devices_writes_the_same_overlays(tmp_path, tiny_model_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        write_image(tmp_path / "pics" / f"{i}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    runs = {}
    for name, extra in (("one", []), ("two", ["--devices", "2"])):
        env = dict(os.environ, **FOUR_DEVICES)
        r = subprocess.run([sys.executable, "scorecam.py", "--folder", tmp_path / "pics", "--out", tmp_path / name,
                            "--model", tiny_model_path, "--batch-size", "64", "--precision", "float32", *extra],
                           cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = {p.name: np.asarray(Image.open(p), np.int16) for p in (tmp_path / name).iterdir()}
    assert sorted(runs["one"]) == [f"{i}_scorecam.png" for i in range(5)] == sorted(runs["two"])
    for key, image in runs["one"].items():
        assert np.abs(image - runs["two"][key]).max() <= 1  # the same maps, up to rounding of the colours
    env = dict(os.environ, **FOUR_DEVICES)
    r = subprocess.run([sys.executable, "scorecam.py", "--folder", tmp_path / "pics", "--out", tmp_path / "bad",
                        "--model", tiny_model_path, "--batch-size", "63", "--devices", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 1 and r.stderr.strip() == ("error: --batch-size 63 does not divide evenly over 2 "
                                                      "devices; pass a multiple of 2")
    assert not (tmp_path / "bad").exists()


def test_several_devices_on_tensorflow_say_to_use_jax(tmp_path, tiny_model_path):
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("checks the TensorFlow backend's message")
    import scorecam
    from model import load_model

    model, _, _ = load_model(tiny_model_path)
    with pytest.raises(ValueError, match="KERAS_BACKEND=jax"):
        scorecam.score_cam(model, np.zeros((1, 32, 32, 3), np.float32), devices=2)
    write_image(tmp_path / "pics" / "a.png", np.zeros((32, 32, 3), np.uint8))
    r = run_cli("scorecam.py", "--folder", tmp_path / "pics", "--out", tmp_path / "o", "--model", tiny_model_path,
                "--devices", "2")
    assert r.returncode == 1 and "error: " in r.stderr and "KERAS_BACKEND=jax" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_unknown_backend_is_one_error_line(tmp_path):
    r = run_python("import runtime", {"KERAS_BACKEND": "theano"})
    assert r.returncode == 1 and r.stderr.strip() == ("error: unknown KERAS_BACKEND 'theano'; use tensorflow "
                                                      "(the default) or jax")


def test_data_parallel_training_matches_one_device(color_folder, tmp_path):
    """2 epochs on 4 virtual devices (the 6 validation pictures padded to 8, weighted 0) against one
    device: every logged loss and accuracy within 1e-4 (measured: 1e-6); an uneven batch is one error."""
    histories = {}
    common = ["--dataset", "folder", "--data-dir", color_folder, "--image-size", "16", "--epochs", "2",
              "--batch-size", "8", "--quiet"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **FOUR_DEVICES)
    for devices in ("1", "4"):
        r = subprocess.run([sys.executable, "train.py", *map(str, common), "--out", tmp_path / devices,
                            "--devices", devices], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        histories[devices] = (tmp_path / devices / "history.csv").read_text().splitlines()
    assert "data-parallel on 4 devices" in r.stdout
    one, four = ([list(map(float, row.split(","))) for row in h[1:]] for h in (histories["1"], histories["4"]))
    assert histories["1"][0] == histories["4"][0] and len(one) == len(four) == 2
    np.testing.assert_allclose(four, one, rtol=1e-4, atol=1e-5)
    results = json.loads((tmp_path / "4" / "results.json").read_text())
    assert results["devices"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"] and results["backend"] == "jax"
    r = subprocess.run([sys.executable, "train.py", *map(str, common), "--out", tmp_path / "bad", "--devices", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == ("error: --batch-size 8 does not divide "
                                                                       "evenly over 3 devices; pass a multiple of 3")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_start_up_is_quiet_on_both_backends(backend):
    r = run_python("import runtime, keras\nkeras.utils.set_random_seed(0)\nprint(keras.backend.backend())",
                   {"KERAS_BACKEND": backend})
    assert r.returncode == 0 and r.stdout.strip() == backend and r.stderr == ""
