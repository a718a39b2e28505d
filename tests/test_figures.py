"""The figures command: every CIFAR-10 figure from the shipped model; the README's figures that depend on
the repository alone come out byte for byte as committed."""
import numpy as np
from PIL import Image

from conftest import ROOT, run_cli, write_image
from data.cifar10 import CLASS_NAMES

LAYER_FIGURES = {f"cifar10_layers_{i}.png" for i in range(1, 6)}
DATA_FIGURES = LAYER_FIGURES | {"cifar10_grid.png"}  # Score-CAM on the data given: here a tiny stand-in
DATA_FIGURES |= {"chelsea_scorecam.png"}  # the demo, as `python scorecam.py` draws it
HISTORY_FIGURES = {"cifar10_acc.png", "cifar10_loss.png", "cifar10_schedules.png"}  # models/ alone


def test_figures_command_reproduces_the_cifar10_figures(tmp_path):
    """A tiny CIFAR-10 layout (3 test pictures a class) through the shipped model. The learning-curve and
    recipe figures depend only on models/, so they must equal md_image/'s bytes: that the README's
    figures come back from one command, fonts and layout included. (A fixed matplotlib stack renders the
    same bytes on every machine so far; repeated Score-CAM calls are compared bitwise in
    test_scorecam and test_fast_paths.)"""
    rng = np.random.default_rng(0)
    for name in CLASS_NAMES:
        (tmp_path / "cifar" / "train" / name).mkdir(parents=True)
        for i in range(3):
            write_image(tmp_path / "cifar" / "test" / name / f"{i}.png", rng.integers(0, 256, (32, 32, 3), np.uint8))
    assert (ROOT / "models" / "cifar10.keras").is_file()
    out = tmp_path / "out"
    r = run_cli("figures.py", "--cifar-dir", tmp_path / "cifar", "--only", "cifar10", "--skip-eval", "--out", out)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} == DATA_FIGURES | HISTORY_FIGURES
    for name in sorted(HISTORY_FIGURES):
        assert (out / name).read_bytes() == (ROOT / "md_image" / name).read_bytes(), f"{name} differs from md_image/"
    for name in sorted(DATA_FIGURES):  # the same layout as the committed figure, drawn from other pictures
        with Image.open(out / name) as made, Image.open(ROOT / "md_image" / name) as shipped:
            # the tight bounding box follows the titles' text: a few pixels either way
            assert np.allclose(made.size, shipped.size, rtol=0.01) and made.mode == shipped.mode, name
            assert np.asarray(made).std() > 10, f"{name} is blank"


def test_layer_panels_are_titled_by_name_and_by_path_where_names_repeat():
    from plots import panel_names

    assert panel_names(["block1_conv2", "backbone/Conv_1"]) == ["b1 conv2", "Conv_1"]
    assert panel_names(["backbone/inner/conv", "backbone/conv", "conv", "backbone/out"]) == [
        "backbone/inner/conv", "backbone/conv", "conv", "out"]


def test_only_characters_without_characters_dir_is_a_usage_error(tmp_path):
    r = run_cli("figures.py", "--only", "characters", "--skip-eval", "--out", tmp_path / "out")
    assert r.returncode == 2 and "figures written" not in r.stdout
    assert r.stderr.strip().splitlines()[-1].endswith("error: --only characters needs --characters-dir (the face-crop "
                                                      "folder the character model was trained on)"), r.stderr
    assert not (tmp_path / "out").exists()


def tiny_character_model_and_faces(tmp_path):
    """tmp_path/models/characters.keras (16x16, classes a and b) and tmp_path/faces/{a,b}/ with 5 pictures each."""
    import keras

    from model import save_model

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv")(inputs)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    save_model(keras.Model(inputs, outputs), tmp_path / "models" / "characters.keras", ["a", "b"])
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for i in range(5):
            write_image(tmp_path / "faces" / name / f"{i}.png", rng.integers(0, 256, (16, 16, 3), np.uint8))


def test_character_figures_of_a_run_without_validation_skip_only_the_confusion_matrix(tmp_path, monkeypatch,
                                                                                      capsys):
    import json

    import figures

    tiny_character_model_and_faces(tmp_path)
    monkeypatch.setattr(figures, "MODELS", tmp_path / "models")
    argv = ["--only", "characters", "--characters-dir", str(tmp_path / "faces"), "--skip-eval"]
    for accuracy, confusion in ((None, False), (0.5, True)):  # --val-split 0 writes validation_accuracy null
        results = {"validation_accuracy": accuracy, "confusion_matrix": [[1, 0], [1, 0]], "classes": ["a", "b"]}
        (tmp_path / "models" / "characters.results.json").write_text(json.dumps(results))
        out = tmp_path / f"out{accuracy}"
        figures.main(argv + ["--out", str(out)])
        printed = capsys.readouterr()
        assert f"figures written to {out}" in printed.out
        assert {"characters_layers_1.png", "characters_layers_2.png"} <= {p.name for p in out.iterdir()}
        assert (out / "characters_confusion.png").is_file() == confusion
        assert ("skipping characters_confusion.png" in printed.err) != confusion, printed.err


def test_an_unreadable_file_in_the_characters_folder_is_one_line_not_a_python_warning(tmp_path, monkeypatch,
                                                                                      capsys):
    """load_image_folder's UserWarning (two lines pointing into data/folder.py) became one line naming the file."""
    import warnings

    import figures

    tiny_character_model_and_faces(tmp_path)
    (tmp_path / "faces" / "a" / "broken.png").write_bytes(b"not a picture")
    monkeypatch.setattr(figures, "MODELS", tmp_path / "models")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figures.main(["--only", "characters", "--characters-dir", str(tmp_path / "faces"), "--skip-eval",
                      "--out", str(tmp_path / "out")])
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    err = capsys.readouterr().err
    assert f"skipped 1 unreadable file(s): {tmp_path / 'faces' / 'a' / 'broken.png'}: not an image" in err, err
