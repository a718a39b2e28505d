"""Several devices: Score-CAM's masked batches sharded over virtual CPU devices (JAX, in one subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=4) give the single-device maps, the folder command
on two devices writes the single-device overlays, data-parallel training logs the single-device losses;
bad device options are one clear error on every backend."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_color_folder, run_cli, write_image

FOUR_DEVICES = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}

# Every multi-device check in one process: starting JAX with 4 virtual devices costs seconds each time.
# The commands run through their main(argv), their exit status and stderr captured as a shell sees them.
SCRIPT = r"""
import contextlib, io, json, sys
root, pics, folder, tmp = sys.argv[1:5]
sys.path.insert(0, root)
import runtime, keras, numpy as np
import scorecam, train
import kerascam  # noqa: E402


def command(main, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
            status = 0
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 1)
    return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}


keras.utils.set_random_seed(0)
L = keras.layers  # a small convnet: sharding does not depend on the model, and each shape compiles (seconds)
model = keras.Sequential([keras.Input((16, 16, 3)), L.Rescaling(1 / 255), L.Conv2D(8, 3, activation="relu", name="c1"),
                          L.MaxPooling2D(), L.Conv2D(8, 3, activation="relu", name="c2"), L.GlobalAveragePooling2D(),
                          L.Dense(5, activation="softmax")])
model.save(f"{tmp}/small.keras")
x = np.random.default_rng(0).uniform(0, 255, (5, 16, 16, 3)).astype("float32")
layers = ["c1", "c2"]
one = kerascam.scoring.score_cam_layers(model, x, layers, precision="float32", batch_size=64)
out = {"devices": keras.distribution.list_devices()}
for devices, batch, names in (("all", 64, layers), (["cpu:1", "cpu:3"], 34, layers[1:])):  # each new shape compiles
    many = kerascam.scoring.score_cam_layers(model, x, names, batch_size=batch, devices=devices)
    out[str(devices)] = max(float(np.abs(many[0][k] - one[0][k]).max()) for k in names)
    out[str(devices) + "_probs"] = float(np.abs(many[1] - one[1]).max())
for devices, batch in ((5, 64), (4, 6), ("tpu:0", 4), (0, 4)):
    try:
        kerascam.methods.score_cam(model, x, devices=devices, batch_size=batch)
        out[f"error {devices} {batch}"] = None
    except ValueError as e:
        out[f"error {devices} {batch}"] = str(e)
for name, extra in (("one", []), ("two", ["--devices", "2"]), ("bad", ["--batch-size", "63", "--devices", "2"])):
    out["folder " + name] = command(scorecam.main, ["--folder", pics, "--out", f"{tmp}/{name}", "--model",
                                                    f"{tmp}/small.keras",
                                                    "--batch-size", "64", "--precision", "float32", *extra])
common = ["--dataset", "folder", "--data-dir", folder, "--image-size", "16", "--epochs", "2", "--batch-size", "8",
          "--quiet"]
for devices in ("1", "4", "3"):
    out["train " + devices] = command(train.main, [*common, "--out", f"{tmp}/train{devices}", "--devices", devices])
print(json.dumps(out))
"""


def run_python(code, env_extra, *args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def test_four_virtual_devices_give_the_single_device_results_and_refuse_bad_options(tmp_path):
    """One JAX process with 4 virtual devices (SCRIPT): sharded Score-CAM equals one device (maps 1e-5);
    the folder command on two devices writes the single-device overlays; 2 epochs of data-parallel
    training on 4 devices (the 6 validation pictures padded to 8, weighted 0) log every loss and
    accuracy within 1e-4 of one device's (measured: 1e-6); bad device options are one clear error."""
    rng = np.random.default_rng(0)
    for i in range(5):
        write_image(tmp_path / "pics" / f"{i}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    make_color_folder(tmp_path / "colors")
    r = run_python(SCRIPT, FOUR_DEVICES, ROOT, tmp_path / "pics", tmp_path / "colors", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])

    # score_cam(..., devices=)
    assert out["devices"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    for devices in ("all", "['cpu:1', 'cpu:3']"):
        assert out[devices] < 1e-5 and out[devices + "_probs"] < 1e-6, (devices, out)
    assert "5 devices asked for, 4 present" in out["error 5 64"]
    assert "does not divide evenly over 4 devices" in out["error 4 6"]
    assert "unknown device(s) tpu:0" in out["error tpu:0 4"]
    assert "at least 1" in out["error 0 4"]

    # scorecam.py --folder --devices 2
    runs = {}
    for name in ("one", "two"):
        assert out["folder " + name]["status"] == 0, out["folder " + name]["stderr"][-2000:]
        runs[name] = {p.name: np.asarray(Image.open(p), np.int16) for p in (tmp_path / name).iterdir() if p.suffix == ".png"}
    assert sorted(runs["one"]) == [f"{i}_scorecam.png" for i in range(5)] == sorted(runs["two"])
    for key, image in runs["one"].items():
        assert np.abs(image - runs["two"][key]).max() <= 1  # the same maps, up to rounding of the colours
    bad = out["folder bad"]
    assert bad["status"] == 1 and bad["stderr"].strip() == ("error: --batch-size 63 does not divide evenly over 2 "
                                                            "devices; pass a multiple of 2")
    assert not (tmp_path / "bad").exists()

    # train.py --devices 4
    for devices in ("1", "4"):
        assert out["train " + devices]["status"] == 0, out["train " + devices]["stderr"][-2000:]
    assert "data-parallel on 4 devices" in out["train 4"]["stdout"]
    histories = {d: (tmp_path / f"train{d}" / "history.csv").read_text().splitlines() for d in ("1", "4")}
    one, four = ([list(map(float, row.split(","))) for row in h[1:]] for h in (histories["1"], histories["4"]))
    assert histories["1"][0] == histories["4"][0] and len(one) == len(four) == 2
    np.testing.assert_allclose(four, one, rtol=1e-4, atol=1e-5)
    results = json.loads((tmp_path / "train4" / "results.json").read_text())
    assert results["devices"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"] and results["backend"] == "jax"
    bad = out["train 3"]
    assert bad["status"] == 1 and bad["stderr"].strip().splitlines()[-1] == (
        "error: --batch-size 8 does not divide evenly over 3 devices; pass a multiple of 3")
    assert not (tmp_path / "train3").exists()


def test_several_devices_on_tensorflow_say_to_use_jax(tmp_path, tiny_model_path):
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("checks the TensorFlow backend's message")
    import kerascam
    from model import load_model

    model, _, _ = load_model(tiny_model_path)
    with pytest.raises(ValueError, match="KERAS_BACKEND=jax"):
        kerascam.methods.score_cam(model, np.zeros((1, 32, 32, 3), np.float32), devices=2)
    write_image(tmp_path / "pics" / "a.png", np.zeros((32, 32, 3), np.uint8))
    r = run_cli("scorecam.py", "--folder", tmp_path / "pics", "--out", tmp_path / "o", "--model", tiny_model_path,
                "--devices", "2")
    assert r.returncode == 1 and "error: " in r.stderr and "KERAS_BACKEND=jax" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_unknown_backend_is_one_error_line(tmp_path):
    r = run_python("import runtime", {"KERAS_BACKEND": "theano"})
    assert r.returncode == 1 and r.stderr.strip() == ("error: unknown KERAS_BACKEND 'theano'; use tensorflow "
                                                      "(the default) or jax")


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_start_up_is_quiet_on_both_backends(backend):
    r = run_python("import runtime, keras\nkeras.utils.set_random_seed(0)\nprint(keras.backend.backend())",
                   {"KERAS_BACKEND": backend})
    assert r.returncode == 0 and r.stdout.strip() == backend and r.stderr == ""


def test_many_models_predicting_print_no_tensorflow_retracing_notice():
    """Every figure and --folder of an any-size model builds or feeds models many times: TensorFlow's Python
    logger would print "triggered tf.function retracing" from the sixth call on; runtime keeps it to errors."""
    code = ("import runtime, keras, numpy as np\n"
            "for _ in range(8):\n"
            "    m = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3), keras.layers.Flatten()])\n"
            "    m.predict(np.zeros((1, 8, 8, 3)), verbose=0)\n")
    r = run_python(code, {"KERAS_BACKEND": "tensorflow"})
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_cpu_name_is_the_model_name_not_the_architecture(monkeypatch):
    """platform.processor() is "x86_64" or empty on Linux: the name comes from /proc/cpuinfo there."""
    import platform

    import runtime

    monkeypatch.setattr(platform, "processor", lambda: platform.machine())
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    assert runtime.cpu_name() == (names[0] if names else platform.machine())
    monkeypatch.setattr(platform, "processor", lambda: "Intel64 Family 6 Model 85")  # Windows, macOS
    assert runtime.cpu_name() == "Intel64 Family 6 Model 85"
