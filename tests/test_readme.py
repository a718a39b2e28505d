"""The README's Python examples run as printed (a NameError there is the first thing a reader meets), with
`images` made here and, offline, `weights=None` for the one that downloads ImageNet weights. They use the
installed library, `kerascam`, never the repository's old top-level modules."""
import re

import keras
import numpy as np

import kerascam
from conftest import ROOT
from model import load_model


def python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_the_python_examples_this_file_runs():
    blocks = python_blocks()
    assert len(blocks) == 3, "a README Python example was added or removed: run it in this file too"
    assert 'load_model("models/cifar10.keras")' in blocks[0] and "MobileNetV2" in blocks[1]
    assert "targets.segmentation" in blocks[2]
    for code in blocks:
        assert re.search(r"^(import kerascam|from kerascam import )", code, flags=re.M), "examples use kerascam"
        assert not re.search(r"^\s*(from|import) (cam|gradcam|scorecam|reference)\b", code, flags=re.M), \
            "an example imports a module that moved into kerascam/"


def test_the_shipped_model_example_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    names = {"images": images}
    exec(python_blocks()[0], names)
    maps = names["maps"]  # the last line's: {layer: (N, H, W)}
    assert sorted(maps) == ["block1_conv1", "block4_conv3"] and names["probs"].shape == (2, 10)
    assert all(m.shape == (2, 32, 32) and 0 <= m.min() and m.max() <= 1 for m in maps.values())
    np.testing.assert_allclose(names["probs"].sum(axis=1), 1, atol=1e-4)
    # several layers from one pass give the one-layer call's map, and explain() is the method by name
    np.testing.assert_allclose(maps["block4_conv3"], kerascam.score_cam(names["model"], images), atol=1e-5)
    np.testing.assert_allclose(names["gradcam"], kerascam.grad_cam(names["model"], images), atol=1e-6)
    assert names["gradcam"].shape == (2, 32, 32) and np.isfinite(names["gradcam"]).all()


def test_your_own_model_example_runs(tmp_path):
    code = python_blocks()[1]
    assert 'weights="imagenet"' in code
    images = np.random.default_rng(0).integers(0, 256, (1, 96, 96, 3)).astype("float32")
    names = {"images": images}
    exec(code.replace('weights="imagenet"', "weights=None"), names)  # no download in a test
    assert names["maps"].shape == (1, 96, 96) and np.isfinite(names["maps"]).all()
    assert 0 <= names["maps"].min() and names["maps"].max() <= 1
    model = names["model"]
    assert kerascam.find_layer(model, "mobilenetv2_1.00_96/Conv_1").layer.name == "Conv_1"  # the path resolves
    # the preprocessing layer is MobileNetV2's preprocess_input, and the model loads back from a .keras file
    x = images[:, :4, :4]
    np.testing.assert_allclose(np.asarray(model.layers[0](x)),
                               keras.applications.mobilenet_v2.preprocess_input(x.copy()), atol=1e-6)
    model.save(tmp_path / "own.keras")
    loaded = load_model(tmp_path / "own.keras")[0]
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)


def test_the_beyond_classifiers_examples_run():
    """The README's models are the ones tests/test_beyond.py builds (random weights), with its inputs."""
    from keras import layers

    from test_beyond import picture_and_numbers, segmenter, two_heads, vit

    rng = np.random.default_rng(1)
    keras.utils.set_random_seed(12)
    inp = keras.Input((40, 2))
    ecg = keras.Model(inp, layers.Dense(3)(layers.Flatten()(layers.Conv1D(4, 5, activation="relu")(inp))))
    names = {"keras": keras, "kerascam": kerascam, "vit": vit()[0], "two_heads": two_heads()[0],
             "picture_and_numbers": picture_and_numbers()[0], "segmenter": segmenter()[0], "ecg": ecg,
             "images": rng.uniform(0, 255, (2, 16, 16, 3)).astype("float32"),
             "numbers": rng.normal(size=(2, 4)).astype("float32"),
             "regions": np.ones((2, 12, 12), bool), "signals": rng.normal(size=(2, 40, 2)).astype("float32")}
    code = python_blocks()[2]
    for line in code.splitlines():  # each model takes its own picture size here: one statement at a time
        if not line.startswith("maps = "):
            exec(line, names)
            continue
        model = next(name for name in ("picture_and_numbers", "two_heads", "segmenter", "vit", "ecg")
                     if f"({name}," in line)
        size = {"vit": 16, "two_heads": 12, "segmenter": 12, "picture_and_numbers": 10}.get(model)
        if size:
            names["images"] = rng.uniform(0, 1, (2, size, size, 3)).astype("float32")
        exec(line, names)
        expected = (2, 40) if model == "ecg" else (2, size, size)
        assert names["maps"].shape == expected and np.isfinite(names["maps"]).all(), line
