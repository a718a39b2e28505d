"""scorecam.py through a subprocess: outputs written, one-line errors, exit codes."""
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, write_image
import kerascam  # noqa: E402


def picture(tmp_path, name="cat.png", size=(50, 70)):
    rng = np.random.default_rng(0)
    return write_image(tmp_path / name, rng.integers(0, 255, size + (3,), dtype=np.uint8))


def assert_one_line_errors(stderr, count):
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and len(lines) == count and all(x.startswith("error: ") for x in lines)


def test_good_missing_and_corrupt_images_in_one_run(tmp_path, tiny_model_path):
    good = picture(tmp_path)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    out = tmp_path / "out"
    r = run_cli("scorecam.py", good, tmp_path / "missing.png", tmp_path / "corrupt.jpg", "--model", tiny_model_path,
                "--out", out)
    assert r.returncode == 1  # not every picture gave an output
    assert_one_line_errors(r.stderr, 2)
    assert "missing.png: no such file" in r.stderr and "corrupt.jpg" in r.stderr
    written = out / "cat_scorecam.png"
    assert f"wrote {written}" in r.stdout
    assert Image.open(written).size[0] > 300  # a real figure


def test_single_output_file_all_layers_and_class(tmp_path, tiny_model_path):
    target = tmp_path / "fig.png"
    r = run_cli("scorecam.py", picture(tmp_path, size=(32, 32)), "--model", tiny_model_path, "--all-layers",
                "--class", "cat", "--out", target)
    assert r.returncode == 0, r.stderr
    assert target.is_file() and not list(tmp_path.glob(".fig*"))  # written atomically, nothing left behind


def test_all_layers_and_class_draw_the_maps_of_that_class(tmp_path, tiny_model_path, monkeypatch):
    """In-process, with the figure function captured: twelve layers, each the map of class 3 (cat)."""
    import plots
    import scorecam
    from data.images import read_image
    from model import load_model

    drawn = {}
    monkeypatch.setattr(plots, "layer_grid_figure", lambda image, maps, title, path, **kw: drawn.update(
        maps=maps, title=title, path=path))
    image = picture(tmp_path, size=(32, 32))
    with pytest.raises(SystemExit) as done:
        scorecam.main([str(image), "--model", str(tiny_model_path), "--all-layers", "--class", "cat",
                       "--out", str(tmp_path / "f.png"), "--precision", "float32"])
    assert done.value.code == 0
    model, _, _ = load_model(tiny_model_path)
    layers = [f"block{b}_conv{c}" for b in range(1, 5) for c in range(1, 4)]
    expected, _ = kerascam.scoring.score_cam_layers(model, read_image(image)[None].astype("float32"), layers, class_index=3,
                                            precision="float32")
    assert list(drawn["maps"]) == layers and "map for cat" in drawn["title"]
    for layer in layers:
        np.testing.assert_allclose(drawn["maps"][layer], expected[layer], atol=1e-6)


def nested_model_file(tmp_path):
    """A Sequential holding a nested backbone and a logits head, saved with no class file."""
    import keras

    keras.utils.set_random_seed(0)
    backbone = keras.Sequential([keras.Input((24, 24, 3)), keras.layers.Rescaling(1 / 255),
                                 keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="inner")],
                                name="backbone")
    model = keras.Sequential([keras.Input((24, 24, 3)), backbone, keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3)])
    model.save(tmp_path / "own.keras")
    return tmp_path / "own.keras"


@pytest.mark.parametrize("method", ["faster-scorecam", "gradcampp"])
def test_any_method_on_a_users_nested_model_writes_a_jpeg(tmp_path, method):
    path = nested_model_file(tmp_path)
    out = tmp_path / "figure.jpg"
    r = run_cli("scorecam.py", picture(tmp_path), "--model", path, "--layer", "backbone/inner", "--class", "2",
                "--method", method, "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:3] == b"\xff\xd8\xff" and Image.open(out).format == "JPEG"  # a file, not a folder
    assert f"wrote {out}" in r.stdout


def test_unknown_method_and_unknown_class_index_of_a_model_without_class_file(tmp_path):
    path = nested_model_file(tmp_path)
    r = run_cli("scorecam.py", picture(tmp_path), "--model", path, "--method", "magic")
    assert r.returncode == 2 and "unknown method 'magic'" in r.stderr and "faster-scorecam" in r.stderr
    r = run_cli("scorecam.py", picture(tmp_path), "--model", path, "--class", "7", "--out", tmp_path / "x.png")
    assert r.returncode == 1 and "unknown --class '7'; classes: 0, 1, 2" in r.stderr


def test_unknown_layer_unknown_class_and_bad_model(tmp_path, tiny_model_path, capsys):
    """The messages through main() in-process (one process start each would cost seconds); the
    exit status and stderr of a bad model file through the command itself."""
    import scorecam

    image = picture(tmp_path)
    for extra, message in ((["--layer", "nope"], "no layer named 'nope'"),
                           (["--layer", "fc1"], "needs a 4-D"),
                           (["--class", "unicorn"], "unknown --class 'unicorn'")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:  # two pictures: still one line, before either is read
            scorecam.main([str(image), str(image), "--model", str(tiny_model_path), "--out", str(tmp_path / "o"),
                           *extra])
        stderr = capsys.readouterr().err + (e.value.code + "\n" if isinstance(e.value.code, str) else "")
        assert e.value.code not in (0, None) and message in stderr, stderr
        assert_one_line_errors(stderr, 1)
    (tmp_path / "bad.keras").write_text("nope")
    r = run_cli("scorecam.py", image, "--model", tmp_path / "bad.keras")
    assert r.returncode == 1 and "not a Keras model file" in r.stderr
    assert_one_line_errors(r.stderr, 1)
    assert not (tmp_path / "o").exists()


def test_preprocess_feeds_a_model_trained_on_preprocessed_pictures_what_it_was_trained_on(tmp_path, monkeypatch,
                                                                                        capsys):
    """--preprocess unit / caffe: the maps and probabilities are those of the model on x / 255 and on
    BGR - ImageNet mean (written out here), x being the resized picture; the figure still shows the
    picture. A one-channel model with caffe: one error line."""
    import keras

    import plots
    import scorecam
    from data.images import read_image, resize

    keras.utils.set_random_seed(1)
    inp = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)))
    model.save(tmp_path / "m.keras")
    image = picture(tmp_path)
    pixels = resize(read_image(image), (24, 24)).astype(np.float32)[None]
    drawn = {}
    monkeypatch.setattr(plots, "single_layer_figure", lambda original, shown, heat, *a, **kw: drawn.update(
        shown=shown, heat=heat, title=a[1]))
    by_hand = {"unit": pixels / 255, "caffe": pixels[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)}
    for mode, x in by_hand.items():
        with pytest.raises(SystemExit) as done:
            scorecam.main([str(image), "--model", str(tmp_path / "m.keras"), "--preprocess", mode, "--precision",
                           "float32", "--out", str(tmp_path / f"{mode}.png")])
        assert done.value.code == 0
        probs = model.predict(x, verbose=0)[0]
        np.testing.assert_allclose(drawn["heat"], kerascam.methods.score_cam(model, x, precision="float32")[0], atol=1e-6)
        assert f"({probs.max():.2f})" in drawn["title"]
        np.testing.assert_array_equal(drawn["shown"], pixels[0].astype(np.uint8))
    assert not np.allclose(*(kerascam.methods.score_cam(model, x, precision="float32") for x in by_hand.values()))
    (tmp_path / "pics").mkdir()
    image.rename(tmp_path / "pics" / image.name)
    with pytest.raises(SystemExit) as done:  # --folder: the same preprocessing, batch by batch
        scorecam.main(["--folder", str(tmp_path / "pics"), "--model", str(tmp_path / "m.keras"), "--preprocess",
                       "unit", "--precision", "float32", "--out", str(tmp_path / "outs")])
    assert done.value.code in (0, None)
    heat = kerascam.methods.score_cam(model, by_hand["unit"], precision="float32")[0]
    written = np.asarray(Image.open(tmp_path / "outs" / "cat_scorecam.png"))
    assert np.abs(written.astype(int) - kerascam.overlay(read_image(tmp_path / "pics" / image.name), heat)).max() <= 1
    grey = keras.Sequential([keras.Input((24, 24, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                             keras.layers.Dense(2)])
    grey.save(tmp_path / "grey.keras")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        scorecam.main([str(image), "--model", str(tmp_path / "grey.keras"), "--preprocess", "caffe"])
    assert e.value.code == "error: --preprocess caffe is for RGB models; this one takes 1-channel images " \
                           "(use --preprocess none, unit or tf)"


def colour_picture(path, channel, rng, size=(40, 50)):
    """Noise with one colour channel high: red (0), green (1) or blue (2)."""
    pixels = rng.integers(0, 40, size + (3,), dtype=np.uint8)
    pixels[..., channel] += 200
    return write_image(path, pixels)


def dominant_colours(figure_path):
    """The colour channels (0 red, 1 green, 2 blue) that dominate some pixel of the figure's left quarter,
    where single_layer_figure draws the input picture (and nothing else)."""
    figure = np.asarray(Image.open(figure_path).convert("RGB")).astype(int)
    left = figure[:, :figure.shape[1] // 4].reshape(-1, 3)
    strong = (left.max(axis=1) > 150) & (np.sort(left, axis=1)[:, 1] < 90)
    return set(np.unique(left[strong].argmax(axis=1)).tolist())


def test_pictures_with_the_same_stem_get_distinct_outputs_each_of_its_own_picture(tmp_path, tiny_model_path):
    """a/cat.png, b/cat.png and cat.jpg into one --out: three figures, none replacing another, each
    drawn from its own picture (its input panel has that picture's colour, and no other's)."""
    rng = np.random.default_rng(0)
    sources = {colour_picture(tmp_path / name, channel, rng): channel
               for name, channel in (("a/cat.png", 0), ("b/cat.png", 2), ("cat.jpg", 1))}
    out = tmp_path / "out"
    r = run_cli("scorecam.py", *sources, "--model", tiny_model_path, "--out", out, "--precision", "float32")
    assert r.returncode == 0, r.stderr
    written = dict(line.split(": wrote ") for line in r.stdout.splitlines() if ": wrote " in line)
    names = ["cat_png_scorecam.png", "cat_png_2_scorecam.png", "cat_jpg_scorecam.png"]
    assert written == {str(source): str(out / name) for source, name in zip(sources, names)}
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for source, channel in sources.items():
        assert dominant_colours(written[str(source)]) == {channel}


def test_folder_outputs_are_named_after_the_method_and_never_clash(tmp_path, tiny_model_path):
    """--folder with a.jpg, a.png and a_jpg.png, run with Score-CAM then Grad-CAM into one --out: six
    overlays, each named after its method and written from its own picture (an overlay has its
    picture's size, and the pictures' sizes differ)."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "pictures"
    sizes = {"a.jpg": (40, 50), "a.png": (30, 60), "a_jpg.png": (44, 36)}
    for name, size in sizes.items():
        write_image(folder / name, rng.integers(0, 255, size + (3,), dtype=np.uint8))
    out = tmp_path / "out"
    for method in ("scorecam", "gradcam"):
        r = run_cli("scorecam.py", "--folder", folder, "--out", out, "--model", tiny_model_path, "--method", method,
                    "--max-n", "2", "--precision", "float32")
        assert r.returncode == 0, r.stderr
        assert "wrote 3 overlay(s)" in r.stdout
    expected = {f"{stem}_{method}.png": sizes[source] for method in ("scorecam", "gradcam")
                for source, stem in (("a.jpg", "a_jpg"), ("a.png", "a_png"), ("a_jpg.png", "a_jpg_2"))}
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == sorted(expected)
    assert {p.name for p in out.iterdir() if p.suffix != ".png"} == {"index.html", "report.json"}
    for name, (height, width) in expected.items():
        assert Image.open(out / name).size == (width, height), name


@pytest.mark.parametrize("method,max_n,label,used", [("faster-scorecam", None, "Faster-Score-CAM (16 ch.)", 16),
                                                     ("faster-scorecam", "20", "Faster-Score-CAM (20 ch.)", 20),
                                                     ("scorecam", "16", "Faster-Score-CAM (16 ch.)", 16),
                                                     ("faster-scorecam", "0", "Score-CAM", None),
                                                     ("scorecam", None, "Score-CAM", None)])
def test_figure_label_names_the_channels_used(tmp_path, monkeypatch, method, max_n, label, used):
    """The figure's label and title follow --max-n (in-process, the figure function captured), and the
    map drawn is Score-CAM's on those channels of the 24 the layer has."""
    import keras

    import plots
    import scorecam
    from data.images import read_image, resize

    keras.utils.set_random_seed(2)
    inp = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(24, 3, padding="same", activation="relu", name="conv")(keras.layers.Rescaling(1 / 255)(inp))
    model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
    model.save(tmp_path / "m.keras")
    image = picture(tmp_path)
    drawn = {}
    monkeypatch.setattr(plots, "single_layer_figure", lambda original, shown, heat, blended, title, path, label: (
        drawn.update(heat=heat, title=title, label=label)))
    with pytest.raises(SystemExit) as done:
        scorecam.main([str(image), "--model", str(tmp_path / "m.keras"), "--method", method, "--precision", "float32",
                       "--out", str(tmp_path / "f.png")] + (["--max-n", max_n] if max_n else []))
    assert done.value.code == 0
    assert drawn["label"] == label and f"\n{label}, conv" in drawn["title"]
    x = resize(read_image(image), (24, 24)).astype(np.float32)[None]
    np.testing.assert_allclose(drawn["heat"], kerascam.methods.score_cam(model, x, max_n=used, precision="float32")[0],
                               atol=1e-6)
    if used:  # the channels used change the map: a wrong max_n would not pass unseen
        assert not np.allclose(drawn["heat"], kerascam.methods.score_cam(model, x, precision="float32")[0], atol=1e-3)


def test_folder_through_a_model_of_any_input_size_explains_each_picture_at_its_own_size(tmp_path):
    """An any-size model has no one size to batch the folder at: each picture is explained at its own size
    (as IMAGE arguments are), and --devices, which shards batches, is one error line."""
    import keras

    import plots
    import scorecam
    from data.images import read_image
    from model import save_model

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(keras.layers.Rescaling(1 / 255)(inp))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)))
    save_model(model, tmp_path / "any.keras", ["a", "b", "c"])
    sizes = {"wide": (30, 44), "square": (33, 33), "tall": (40, 18)}
    for name, size in sizes.items():
        picture(tmp_path / "pics", f"{name}.png", size)
    r = run_cli("scorecam.py", "--folder", tmp_path / "pics", "--model", tmp_path / "any.keras", "--precision",
                "float32", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    for name, size in sizes.items():
        image = read_image(tmp_path / "pics" / f"{name}.png")
        heat = kerascam.methods.score_cam(model, image[None].astype(np.float32), precision="float32")[0]
        written = np.asarray(Image.open(tmp_path / "out" / f"{name}_scorecam.png"))
        assert written.shape == size + (3,) and heat.shape == size
        assert np.abs(written.astype(int) - kerascam.overlay(image, heat)).max() <= 1
    r = run_cli("scorecam.py", "--folder", tmp_path / "pics", "--model", tmp_path / "any.keras", "--devices", "1",
                "--out", tmp_path / "out2")
    assert r.returncode == 1 and r.stderr.strip() == ("error: --devices needs a model with a fixed input size (this "
                                                      "one explains each picture at its own size, one at a time)")
