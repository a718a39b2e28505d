"""Faithfulness metrics, the sanity check and the CLI of evaluate.py, on tiny models with known answers."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import runtime  # noqa: E402,F401
import keras  # noqa: E402

import evaluate as ev  # noqa: E402
from gradcam import center_map, random_map  # noqa: E402

S = 16


def softmax_head(x, inp, classes=2):
    x = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inp, keras.layers.Activation("softmax", name="predictions")(x))


def brightness_model(w=4.0):
    """p(class 0) = sigmoid(w * mean pixel / 255): every pixel counts the same."""
    inp = keras.Input((S, S, 3))
    x = keras.layers.Conv2D(1, 1, use_bias=False, name="conv")(inp)
    model = softmax_head(keras.layers.GlobalAveragePooling2D()(x), inp)
    model.get_layer("conv").set_weights([np.full((1, 1, 3, 1), 1 / (3 * 255), np.float32)])
    model.get_layer("logits").set_weights([np.array([[w, 0.0]], np.float32), np.zeros(2, np.float32)])
    return model


def contrast_model():
    """Class 0's score counts the bright-on-dark edges (a ReLU Laplacian) in the top-left quadrant
    only: blurring or zeroing that quadrant removes the evidence, the rest of the image is ignored."""
    inp = keras.Input((S, S, 3))
    x = keras.layers.Conv2D(1, 3, padding="same", use_bias=False, activation="relu", name="edges")(inp)
    model = softmax_head(keras.layers.Flatten()(x), inp)
    lap = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], np.float32) / (3 * 255)
    model.get_layer("edges").set_weights([np.repeat(lap[:, :, None, None], 3, axis=2)])
    w = np.zeros((S, S, 2), np.float32)
    w[:8, :8, 0] = 6 / 128  # 32 bright pixels x response 4 = 128: logit 6, p = 0.9975
    model.get_layer("logits").set_weights([w.reshape(-1, 2), np.zeros(2, np.float32)])
    return model


def checkerboards(n=4):
    yy, xx = np.mgrid[:S, :S]
    return np.repeat((((yy + xx) % 2) * 255.0)[None, :, :, None], 3, axis=-1).repeat(n, 0).astype(np.float32)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


# ---------------------------------------------------------------- metric definitions

def test_trapezoid_auc_by_hand():
    assert ev.auc([0, 1], [0, 1]) == pytest.approx(0.5)
    assert ev.auc([0, 0.5, 1], [1, 0, 0]) == pytest.approx(0.25)
    assert ev.auc(np.linspace(0, 1, 5), [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]) == pytest.approx([1.0, 0.125])


def test_drop_and_increase_by_hand():
    drop, increase = ev.drop_and_increase([0.8, 0.5, 0.4], [0.2, 0.5, 0.9])
    assert drop == pytest.approx([75.0, 0.0, 0.0]) and increase == pytest.approx([0.0, 0.0, 100.0])
    drop, _ = ev.drop_and_increase([0.0], [0.0])
    assert np.isfinite(drop).all()


def test_pixel_ranks_follow_the_map_and_break_ties_by_seed():
    maps = np.array([[[0.1, 0.9], [0.5, 0.3]]])
    assert ev.pixel_ranks(maps).tolist() == [[[3, 0], [1, 2]]]
    flat = np.ones((2, 4, 4))
    a, b = ev.pixel_ranks(flat, seed=0), ev.pixel_ranks(flat, seed=1)
    assert sorted(a[0].ravel()) == list(range(16)) and not np.array_equal(a, b)
    assert np.array_equal(a, ev.pixel_ranks(flat, seed=0))


def test_deletion_and_insertion_of_an_all_ones_map_by_hand():
    """On a brightness model and a white image, deleting k of 256 pixels in any order leaves the
    mean 1 - k/256: the curve is sigmoid(4 (1 - x)) at 33 points; the blur of a flat image is the
    image, so the insertion curve stays at sigmoid(4)."""
    model, images = brightness_model(), np.full((2, S, S, 3), 255.0, np.float32)
    maps, targets = np.ones((2, S, S), np.float32), np.zeros(2, np.int64)
    x, curves = ev.deletion(model, images, maps, targets)
    assert len(x) == 33 and x[0] == 0 and x[-1] == 1
    assert np.allclose(curves, sigmoid(4 * (1 - x)), atol=1e-5)
    assert ev.auc(x, curves) == pytest.approx(np.trapezoid(sigmoid(4 * (1 - x)), x), abs=1e-5)
    _, curves = ev.insertion(model, images, maps, targets)
    assert np.allclose(curves, sigmoid(4.0), atol=1e-5)


def test_the_map_of_the_used_region_beats_the_floors():
    model, images = contrast_model(), checkerboards()
    probs = ev.predict(model, images)
    targets = probs.argmax(1)
    y = probs[np.arange(len(images)), targets]
    assert (targets == 0).all() and y.min() > 0.99
    region = np.zeros((len(images), S, S), np.float32)
    region[:, :8, :8] = 1
    scores = {name: {k: v.mean() for k, v in ev.per_image_metrics(model, images, maps, targets, y)[0].items()}
              for name, maps in (("region", region), ("random", random_map(model, images)),
                                 ("center", center_map(model, images)))}
    assert scores["region"]["avg_drop"] == pytest.approx(0, abs=1e-3)  # image x map keeps all the evidence
    assert scores["region"]["insertion_auc"] > 0.95
    for floor in ("random", "center"):
        assert scores[floor]["avg_drop"] > 2
        assert scores[floor]["insertion_auc"] < scores["region"]["insertion_auc"] - 0.04
        assert scores[floor]["deletion_auc"] > scores["region"]["deletion_auc"] + 0.2


def test_bootstrap_interval():
    values = np.random.default_rng(0).normal(10, 2, 200)
    low, high = ev.bootstrap_ci(values, seed=3)
    assert low < values.mean() < high and high - low < 1.5
    assert ev.bootstrap_ci(values, seed=3) == [low, high]
    assert ev.bootstrap_ci([5.0, 5.0, 5.0]) == [5.0, 5.0]
    with pytest.raises(ValueError):
        ev.bootstrap_ci([])


def test_spearman():
    a = np.random.default_rng(0).random((3, 5, 5))
    assert ev.spearman(a, a) == pytest.approx([1, 1, 1])
    assert ev.spearman(a, a**3) == pytest.approx([1, 1, 1])  # ranks only
    assert ev.spearman(a, -a) == pytest.approx([-1, -1, -1])
    assert ev.spearman(a, np.zeros_like(a)).tolist() == [0, 0, 0]  # a constant map ranks nothing


# ---------------------------------------------------------------- sanity check

def test_cascade_order_on_the_real_architecture():
    from model import build_model

    groups = ev.layer_groups(build_model())
    names = [g for g, _ in groups]
    assert names[:5] == ["logits", "fc3", "fc2", "fc1", "block4_conv3"]
    assert names[-1] == "block1_conv1" and len(names) == 16
    assert [layer.name for layer in dict(groups)["block4_conv3"]] == ["block4_conv3", "block4_bn"]


def test_reinitialise_is_seeded_and_uses_the_layers_initializers():
    model = brightness_model()
    dense = model.get_layer("logits")
    ev.reinitialise(dense, seed=7)
    first = [w.copy() for w in dense.get_weights()]
    assert not np.allclose(first[0], [[4.0, 0.0]]) and not first[1].any()  # glorot kernel, zero bias
    ev.reinitialise(dense, seed=7)
    assert np.array_equal(first[0], dense.get_weights()[0])


def tiny_conv_model(seed=0, size=S):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.Dense(8, activation="relu", name="fc1")(keras.layers.GlobalAveragePooling2D()(x))
    return softmax_head(x, inp)


def test_sanity_check_decorrelates_and_the_floors_do_not():
    model = tiny_conv_model()
    images = np.random.default_rng(0).uniform(0, 255, (6, S, S, 3)).astype(np.float32)
    before = [w.copy() for w in model.get_weights()]
    targets = ev.predict(model, images).argmax(1)
    methods = {k: ev.METHODS[k] for k in ("gradcam", "scorecam", "random", "center")}
    out = ev.sanity_check(model, images, methods, targets, seed=0)
    assert list(out["gradcam"]) == ["logits", "fc1", "conv2", "conv1"]
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # the original is untouched
    for name in ("gradcam", "scorecam"):
        assert out[name]["conv1"].mean() < 0.5
    for name in ("random", "center"):
        assert all(np.allclose(v, 1) for v in out[name].values())


# ---------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny 32x32 two-class model file and a CIFAR-like folder tree (train/<class>, test/<class>)."""
    from model import save_model

    tmp = tmp_path_factory.mktemp("eval")
    save_model(tiny_conv_model(1, 32), tmp / "tiny.keras", ["cat", "dog"])
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp / split / name / f"{i}.png")
    return tmp


def test_cli_writes_json_and_figure(saved):
    out, fig = saved / "out" / "results.json", saved / "out" / "curves.png"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(saved / "tiny.keras"),
                           "--data-dir", str(saved), "--n", "4", "--sanity-n", "2", "--json", str(out),
                           "--figure", str(fig)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert list(results["methods"]) == list(ev.METHODS)
    for m in results["methods"].values():
        for key in ev.METRICS:
            low, high = m[f"{key}_ci"]
            assert np.isfinite(m[key]) and low <= m[key] + 1e-9 and m[key] <= high + 1e-9
        assert len(m["deletion_curve"]) == len(m["insertion_curve"]) == 33
        assert list(m["sanity_spearman"]) == results["sanity_layers"] == ["logits", "fc1", "conv2", "conv1"]
    assert results["sample"]["n"] == 4 and results["sample"]["split"] == "test"
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Score-CAM" in proc.stdout and "Traceback" not in proc.stderr


def test_markdown_from_json(saved, capsys):
    ev.main(["--markdown", str(saved / "out" / "results.json")])
    text = capsys.readouterr().out
    assert text.startswith("| Method") and "Grad-CAM++" in text and "random floor" in text
    assert "| *paper: Score-CAM*" in text and "31.5" in text and "0.386" in text
    assert "down to conv1" in text


def test_folder_dataset_uses_the_validation_split(saved, capsys):
    ev.main(["--model", str(saved / "tiny.keras"), "--dataset", "folder", "--data-dir", str(saved / "train"),
             "--methods", "gradcam,center", "--sanity-n", "0", "--steps", "4"])
    text = capsys.readouterr().out
    assert "Grad-CAM" in text and "centre floor" in text and "Score-CAM " not in text.split("*paper")[0]


@pytest.mark.parametrize("argv, message", [
    (["--model", "missing.keras"], "error: model file not found"),
    (["--data-dir", "nowhere"], "error: "),
    (["--dataset", "folder"], "error: --dataset folder needs --data-dir"),
    (["--methods", "gradcam,magic"], "error: unknown method(s) magic"),
    (["--markdown", "missing.json"], "error: missing.json: not a results file"),
    (["--markdown", "BROKEN"], "error: BROKEN_PATH: incomplete results file"),
])
def test_errors_are_one_line(saved, argv, message):
    broken = saved / "broken.json"
    broken.write_text(json.dumps({"methods": {"gradcam": {"avg_drop": "x"}}}))
    argv = [str(broken) if a == "BROKEN" else a for a in argv]
    message = message.replace("BROKEN_PATH", str(broken))
    if "--model" not in argv and "--markdown" not in argv:
        argv = argv + ["--model", str(saved / "tiny.keras")]
    with pytest.raises(SystemExit) as exit_:
        ev.main(argv)
    assert str(exit_.value.code).startswith(message) and "\n" not in str(exit_.value.code)


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        ev.main(["--help"])
    assert exit_.value.code == 0 and "Average Drop" in capsys.readouterr().out
