"""agreement.py: the same maps and predictions on TensorFlow and JAX, through its command line on a tiny
model and a tiny CIFAR-style folder (the real figures come from the shipped models: md_image/backends.json)."""
import json

import numpy as np
import pytest

from conftest import keras_seed, run_cli, write_image

CLASSES = ("cat", "dog", "ship")
PER_CLASS = 3


@pytest.fixture
def tiny_setup(tmp_path):
    """A tiny convnet saved to tmp_path (3 classes, 32x32, softmax) and a CIFAR-style folder: 3 random
    PNGs a class in test/<class>/, empty train/<class>/."""
    import keras

    keras_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(4, 3, activation="relu", padding="same"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(6, 3, activation="relu", padding="same", name="last_conv"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(CLASSES), activation="softmax"),
    ])
    model.save(tmp_path / "tiny.keras")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (tmp_path / "cifar" / "train" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            write_image(tmp_path / "cifar" / "test" / name / f"{i}.png",
                        rng.integers(0, 256, (32, 32, 3)).astype(np.uint8))
    return tmp_path / "tiny.keras", tmp_path / "cifar"


def test_backends_agree_on_a_tiny_model(tiny_setup, tmp_path):
    model, cifar = tiny_setup
    out = tmp_path / "out" / "backends.json"
    done = run_cli("agreement.py", "--cifar-dir", cifar, "--model", model, "--n", 4, "--json", out, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report["backends"]) == {"tensorflow", "jax"}
    for backend in report["backends"].values():
        assert backend["elapsed_s"] > 0 and backend["devices"]
        assert set(backend["seconds"]["cifar10"]) >= {"predict", "scorecam", "faster_scorecam", "gradcam", "gradcampp"}
    assert report["machine"]["cpu"] and report["machine"]["tensorflow"] and report["machine"]["jax"]
    assert list(report["models"]) == ["cifar10"]  # no --characters-dir
    m = report["models"]["cifar10"]
    assert m["layer"] == "last_conv" and m["maps"]["images"] == 4 and m["maps"]["of"] == len(CLASSES) * PER_CLASS
    assert {"scorecam", "faster_scorecam", "gradcam", "gradcampp"} <= set(m["maps"]["methods"])
    assert not {"random", "center"} & set(m["maps"]["methods"])  # the floors ignore the model
    for name, s in m["maps"]["methods"].items():
        assert s["min_pearson_r"] >= 0.999 and s["below_threshold"] == 0, (name, s)
        assert s["max_abs_difference"] < 1e-2, (name, s)
    p = m["predictions"]
    assert p["pictures"] == len(CLASSES) * PER_CLASS and p["disagreements"] == 0 and p["disagreeing_pictures"] == []
    assert p["max_abs_probability_difference"] < 1e-4
    assert report["agree"] is True
    assert "predicted class differs on 0 of 9 pictures" in done.stdout
    assert "load_average_1min" in report["backends"]["jax"]


def test_bad_input_is_one_error_line(tmp_path):
    done = run_cli("agreement.py", "--cifar-dir", tmp_path / "missing", timeout=60)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"error: --cifar-dir: folder not found: {tmp_path / 'missing'}"]
    done = run_cli("agreement.py", "--cifar-dir", tmp_path, "--n", 0, timeout=60)
    assert done.returncode == 2 and "--n must be at least 1" in done.stderr


def test_a_method_failing_on_one_backend_is_reported():
    """compare() and table() on made-up runs: a failed method is named with its error, never compared."""
    import agreement

    rng = np.random.default_rng(0)
    maps = rng.random((3, 4, 4)).astype(np.float32)
    probs = np.eye(3, dtype=np.float32)
    inputs = {"cifar10/sample": np.arange(3), "cifar10/y": np.arange(3)}

    def run(errors):
        return {"cifar10/probs": probs, "cifar10/layer": np.asarray("conv"), "cifar10/classes_match": np.asarray(True),
                "cifar10/maps/gradcam": maps, "cifar10/errors": np.asarray(json.dumps(errors))}

    results = {"tensorflow": run({}), "jax": run({"scorecam": "TypeError: boom"})}
    results["tensorflow"]["cifar10/maps/scorecam"] = maps
    m = agreement.compare(inputs, results, {"gradcam": "Grad-CAM", "scorecam": "Score-CAM"}, "cifar10", "m.keras")
    assert m["maps"]["methods"]["gradcam"]["min_pearson_r"] == pytest.approx(1)
    assert m["maps"]["methods"]["scorecam"] == {"label": "Score-CAM", "errors": {"jax": "TypeError: boom"}}
    assert m["predictions"]["disagreements"] == 0
    report = {"models": {"cifar10": m}, "backends": {b: {"elapsed_s": 1.0} for b in agreement.BACKENDS},
              "agree": False}
    assert "Score-CAM                    FAILED on jax: TypeError: boom" in agreement.table(report)
