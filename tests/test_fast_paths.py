"""Every fast path of Score-CAM gives the plain path's maps: the naive per-image loop (bench.py),
streaming, chunk and batch sizes, Faster-Score-CAM, the bfloat16 copy, and the --folder CLI."""
import numpy as np
import pytest
from PIL import Image

import runtime  # noqa: F401
import keras

import kerascam  # noqa: F401
import scorecam
from kerascam.maps import pearson
from conftest import run_cli, write_image
from kerascam.reference import naive_score_cam
from kerascam.methods import score_cam
from kerascam.scoring import score_cam_layers, score_cam_stream


@pytest.fixture(scope="module")
def small():
    """A small random classifier (16x16, two 8-channel conv layers, 5 classes) and 7 images."""
    keras.utils.set_random_seed(4)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5, name="logits")(x)
    model = keras.Model(inp, keras.layers.Activation("softmax", dtype="float32", name="predictions")(x))
    images = np.random.default_rng(5).uniform(0, 255, (7, 16, 16, 3)).astype(np.float32)
    images[3] = 0  # a black image: every channel constant, an all-zero map
    return model, images


def test_naive_reference_equals_score_cam(small):
    model, images = small
    for layer, max_n in (("conv2", None), ("conv1", None), ("conv2", 3)):
        fast = score_cam(model, images[:3], layer=layer, max_n=max_n)
        for i in range(3):
            cam, _ = naive_score_cam(model, images[i], layer, max_n=max_n)
            np.testing.assert_allclose(fast[i], cam, atol=1e-5)


def test_stream_of_uneven_batches_equals_one_shot(small):
    model, images = small
    one_shot, probs = score_cam_layers(model, images, ["conv1", "conv2"], batch_size=10)
    sizes = [2, 0, 1, 4]
    batches = (images[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes)))
    streamed = list(score_cam_stream(model, batches, layers=["conv1", "conv2"], batch_size=10, precision="float32"))
    assert [len(p) for _, p in streamed] == sizes
    for key in ("conv1", "conv2"):
        np.testing.assert_allclose(np.concatenate([m[key] for m, _ in streamed]), one_shot[key], atol=1e-5)
    np.testing.assert_allclose(np.concatenate([p for _, p in streamed]), probs, atol=1e-6)
    single = list(score_cam_stream(model, iter([images[:3], images[3:]]), layer="conv2", max_n=4,
                                   precision="float32"))
    np.testing.assert_allclose(np.concatenate(single), score_cam(model, images, layer="conv2", max_n=4), atol=1e-5)


def test_stream_of_a_labelled_dataset_explains_the_labels(small):
    import tensorflow as tf

    model, images = small
    labels = np.array([0, 1, 2, 3, 4, 0, 1])
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(3)
    maps = list(score_cam_stream(model, dataset.as_numpy_iterator(), class_index="labels", precision="float32"))
    np.testing.assert_allclose(np.concatenate(maps), score_cam(model, images, class_index=labels, precision="float32"),
                               atol=1e-5)
    with pytest.raises(ValueError, match="needs \\(images, labels\\) batches"):
        list(score_cam_stream(model, [images], class_index="labels"))


@pytest.mark.parametrize("batch_size,chunk", [(1, 1), (3, 2), (5, 7), (16, 3), (1000, None)])
def test_chunk_and_batch_sizes_do_not_change_the_maps(small, batch_size, chunk):
    model, images = small
    plain, _ = score_cam_layers(model, images, ["conv1", "conv2"], class_index=[0, 1, 2, 3, 4, 0, 1])
    other, _ = score_cam_layers(model, images, ["conv1", "conv2"], class_index=[0, 1, 2, 3, 4, 0, 1],
                                batch_size=batch_size, chunk=chunk)
    for key in plain:
        np.testing.assert_allclose(other[key], plain[key], atol=1e-5)
    assert (plain["conv2"][3] == 0).all()  # the black image


def test_pictures_over_the_pixel_budget_are_scored_in_smaller_batches_with_the_same_maps(small, monkeypatch):
    """A 12-megapixel photo in a model of any input size would fill 256 x 12e6 x C floats a batch: batches are
    capped at PIXEL_BUDGET pixels (here lowered to 3 of the test's pictures) and the maps stay the same."""
    model, images = small
    plain, _ = score_cam_layers(model, images, ["conv1", "conv2"], batch_size=16, precision="float32")
    pixels = int(np.prod(images.shape[1:3]))
    runs = []
    original = kerascam.engine.MaskedScores.predict_on_batch

    def recording(self, inputs):
        runs.append(len(inputs[1]))  # the masked pictures of the step (pairs, padding included)
        return original(self, inputs)

    monkeypatch.setattr(kerascam.engine.MaskedScores, "predict_on_batch", recording)
    monkeypatch.setattr(kerascam.engine, "PIXEL_BUDGET", 3 * pixels + pixels // 2)
    capped, _ = score_cam_layers(model, images, ["conv1", "conv2"], batch_size=16, precision="float32")
    assert runs and max(runs) == 3
    for key in plain:
        np.testing.assert_allclose(capped[key], plain[key], atol=1e-5)
    runs.clear()
    monkeypatch.setattr(kerascam.engine, "PIXEL_BUDGET", 256 * pixels)  # within the budget: the batch asked for
    score_cam_layers(model, images, ["conv1", "conv2"], batch_size=16, precision="float32")
    assert max(runs) == 16


def test_faster_score_cam_scores_only_max_n_pairs_per_image(small, monkeypatch):
    model, images = small
    scored = []
    original = kerascam.engine.MaskedScores.predict_on_batch

    def counting(self, inputs):  # masked images really scored: pairs whose channel varies
        scored.append(int((np.ptp(inputs[1].reshape(len(inputs[1]), -1), axis=1) > 0).sum()))
        return original(self, inputs)

    monkeypatch.setattr(kerascam.engine.MaskedScores, "predict_on_batch", counting)
    score_cam(model, images, layer="conv2", max_n=3)
    assert sum(scored) == 3 * 6  # 3 channels of each image but the black one (no varying channel)
    every = score_cam(model, images, layer="conv2")
    np.testing.assert_allclose(score_cam(model, images, layer="conv2", max_n=8), every, atol=1e-6)  # K = 8


def test_tail_batches_cover_the_pairs_with_few_shapes():
    for batch_size in (1, 7, 16, 256):
        for count in (0, 1, 15, 16, 17, 100, 255, 256, 1000):
            sizes = kerascam.engine.tail_sizes(count, batch_size)
            assert sum(take for take, _ in sizes) == count
            assert all(1 <= take <= run <= batch_size for take, run in sizes)
            assert all(run in (batch_size, min(16, batch_size)) or run & (run - 1) == 0 for _, run in sizes)


def test_bfloat16_copy_agrees_and_leaves_the_model_alone(small):
    model, images = small
    policies = [layer.dtype_policy.name for layer in model.layers]
    fp32, _ = score_cam_layers(model, images, ["conv2"], precision="float32")
    bf16, _ = score_cam_layers(model, images, ["conv2"], precision="bfloat16")
    assert [layer.dtype_policy.name for layer in model.layers] == policies
    assert pearson(bf16["conv2"], fp32["conv2"]).min() >= 0.99
    copy = kerascam.copies.bfloat16_copy(model)
    assert copy is kerascam.copies.bfloat16_copy(model)  # built once
    assert copy.get_layer("conv1").dtype_policy.name == "mixed_bfloat16"
    with pytest.raises(ValueError, match="precision must be one of"):
        score_cam(model, images, precision="float16")


def test_bfloat16_copy_follows_weight_changes(small):
    model, _ = small
    kerascam.copies.bfloat16_copy(model)
    saved = model.get_weights()
    try:
        model.set_weights([w * 0.5 for w in saved])
        copy = kerascam.copies.bfloat16_copy(model)
        np.testing.assert_allclose(copy.get_layer("logits").get_weights()[0], saved[-2] * 0.5)
    finally:
        model.set_weights(saved)


def test_copies_of_a_model_with_an_adapted_normalization_predict_as_it_does():
    """An adapted Normalization (inside a nested backbone) computes its mean and variance from its weights
    in finalize_state(), which set_weights does not call: the bfloat16 and the replicated copies must
    normalise with the adapted ones, not mean 0 / variance 1, and explain as the model does."""
    keras.utils.set_random_seed(6)
    rng = np.random.default_rng(6)
    norm = keras.layers.Normalization()
    norm.adapt(rng.uniform(0, 255, (64, 16, 16, 3)).astype(np.float32))
    backbone = keras.Sequential([keras.Input((16, 16, 3)), norm,
                                 keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")])
    model = keras.Sequential([keras.Input((16, 16, 3)), backbone, keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3)])
    images = rng.uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    expected = model.predict_on_batch(images)
    replicated, _ = kerascam.copies.replicated_copy(model, keras.distribution.list_devices()[:1])
    np.testing.assert_allclose(replicated.predict_on_batch(images), expected, atol=1e-5)
    bf16 = np.asarray(kerascam.copies.bfloat16_copy(model).predict_on_batch(images), np.float32)
    np.testing.assert_allclose(bf16, expected, atol=0.05 * np.abs(expected).max())  # bfloat16: 8 bits of mantissa
    fp32 = score_cam(model, images, precision="float32")
    assert pearson(score_cam(model, images, precision="bfloat16"), fp32).min() >= 0.99


def test_bfloat16_on_the_known_answer_model():
    from test_scorecam import colour_model, red_square

    model, x = colour_model(), red_square(top=2, left=3)
    cam = score_cam(model, x, layer="conv", precision="bfloat16")
    expected = np.zeros((8, 8))
    expected[2:6, 3:7] = 1
    np.testing.assert_allclose(cam[0], expected, atol=1e-2)


def test_folder_cli_streams_pictures_and_counts_unreadable_files(tmp_path, tiny_model_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "pictures"
    for name in ("a.png", "b.jpg", "sub/c.png", "sub/a.png", "sub/a.jpg"):
        write_image(folder / name, rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    (folder / "notes.txt").write_text("not a picture")
    (folder / ".hidden.png").write_bytes(b"")
    out = tmp_path / "out"
    r = run_cli("scorecam.py", "--folder", folder, "--out", out, "--model", tiny_model_path, "--read-batch", "2",
                "--max-n", "4")
    assert r.returncode == 1, r.stderr  # not every file gave an overlay
    assert "wrote 5 overlay(s)" in r.stdout and "skipped 2 unreadable file(s)" in r.stdout
    assert "skipped: " in r.stderr and "broken.jpg" in r.stderr and "notes.txt" in r.stderr
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["a_scorecam.png", "b_scorecam.png", "index.html", "report.json", "sub/a_jpg_scorecam.png",
                       "sub/a_png_scorecam.png", "sub/c_scorecam.png"]  # no temporary file left behind
    assert Image.open(out / "b_scorecam.png").size == (50, 40)  # the overlay is at the picture's size
    # then in-process (the same main(); a process start costs seconds): a clean folder exits 0, and a rerun
    # does not take the overlays it wrote inside the folder for inputs
    import scorecam

    clean = tmp_path / "clean"
    write_image(clean / "x.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for _ in range(2):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            scorecam.main(["--folder", str(clean), "--out", str(clean / "out"), "--model", str(tiny_model_path),
                           "--max-n", "2"])
        assert e.value.code == 0 and (clean / "out" / "x_scorecam.png").is_file()
        assert "wrote 1 overlay(s)" in capsys.readouterr().out


def fresh_model(seed):
    """A new small model (auto's choice is remembered per model)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(keras.layers.Rescaling(1 / 255)(inp))
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(x))
    return keras.Model(inp, out)


@pytest.mark.parametrize("bf16_seconds,agreement,expected", [(0.5, 0.999, "bfloat16"), (2.0, 0.999, "float32"),
                                                              (0.5, 1.01, "float32")])
def test_auto_precision_measures_and_keeps_the_faster_agreeing_one(monkeypatch, bf16_seconds, agreement, expected):
    """A stubbed timer forces each outcome: bfloat16 faster and agreeing; slower; faster but its maps
    disagree (an agreement threshold no map can reach)."""
    model = fresh_model({0.5: 11, 2.0: 12}[bf16_seconds] + int(agreement > 1))
    images = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    ticks = iter([0.0, 1.0, 0.0, bf16_seconds])  # float32 start, end; bfloat16 start, end
    monkeypatch.setattr(kerascam.precision, "_timer", lambda: next(ticks))
    monkeypatch.setattr(kerascam.precision, "AUTO_AGREEMENT", agreement)
    monkeypatch.setattr(kerascam.precision, "AUTO_MIN_PASSES", 1)
    monkeypatch.setattr(kerascam.precision, "AUTO_MIN_IMAGES", 1)
    auto = kerascam.scoring.auto_precision(model, [None], images)
    assert auto["choice"] == expected
    assert auto["images_per_s"]["float32"] == pytest.approx(2.0)
    assert auto["images_per_s"]["bfloat16"] == pytest.approx(2 / bf16_seconds)
    assert auto["min_pearson_r"] > 0.99 and auto["top_class_equal"]
    # remembered for the process: the same call again reads no timer, and "auto" follows the choice
    monkeypatch.setattr(kerascam.precision, "_timer", lambda: pytest.fail("measured twice"))
    np.testing.assert_array_equal(score_cam(model, images, precision="auto"),
                                  score_cam(model, images, precision=expected))


def test_auto_precision_runs_small_calls_in_float32_without_measuring(monkeypatch, small):
    model, images = small
    monkeypatch.setattr(kerascam.precision, "_timer", lambda: pytest.fail("a small call was measured"))
    assert kerascam.precision.resolve_precision("auto", model, None, images, passes=10) == "float32"
    np.testing.assert_array_equal(score_cam(model, images[:2]), score_cam(model, images[:2], precision="float32"))


def test_auto_precision_measures_only_large_calls_with_their_layers_and_max_n(monkeypatch, tmp_path, capsys):
    """A call of fewer than AUTO_MIN_IMAGES images runs in float32 unmeasured, however many its passes; a
    larger one is measured with its own layers and max_n (every explainer the measurement makes has
    them), once per (layers, max_n). The same for --folder, by its number of pictures."""
    keras.utils.set_random_seed(14)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(keras.layers.Rescaling(1 / 255)(inp))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(x)
    model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
    images = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    monkeypatch.setattr(kerascam.precision, "AUTO_MIN_PASSES", 1)
    monkeypatch.setattr(kerascam.precision, "AUTO_MIN_IMAGES", 4)
    ticks = []

    def timer():  # a stubbed clock: both precisions take one tick, so the choice is float32
        ticks.append(len(ticks))
        return float(ticks[-1])

    monkeypatch.setattr(kerascam.precision, "_timer", timer)
    made = []

    class Recording(kerascam.engine.Explainer):
        def __init__(self, model, layers, batch_size, max_n, precision, *args, **kwargs):
            made.append((tuple(layers), max_n, precision))
            super().__init__(model, layers, batch_size, max_n, precision, *args, **kwargs)

    monkeypatch.setattr(kerascam.scoring, "Explainer", Recording)
    score_cam(model, images[:1], layer="c1", max_n=2, precision="auto")
    score_cam(model, images[:3], layer="c1", precision="auto")
    assert not ticks and made == [(("c1",), 2, "float32"), (("c1",), None, "float32")]
    for layer, max_n, measured in (("c1", 2, True), ("c2", 2, True), ("c2", 3, True), ("c1", 2, False),
                                   ("c2", 3, False)):
        made.clear()
        before = len(ticks)
        score_cam(model, images, layer=layer, max_n=max_n, precision="auto")
        assert {(layers, n) for layers, n, _ in made} == {((layer,), max_n)}  # the measurement's explainers too
        assert [p for _, _, p in made] == ["float32"] * (2 * measured) + ["bfloat16"] * (2 * measured) + ["float32"]
        assert len(ticks) - before == 4 * measured  # each precision's timed call: a start and an end
    model.save(tmp_path / "m.keras")
    rng = np.random.default_rng(1)
    for count, measured in ((3, False), (4, True)):
        for i in range(count):
            write_image(tmp_path / f"pictures{count}" / f"{i}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        before = len(ticks)
        with pytest.raises(SystemExit) as done:
            scorecam.main(["--folder", str(tmp_path / f"pictures{count}"), "--out", str(tmp_path / "out"), "--model",
                           str(tmp_path / "m.keras"), "--max-n", "1"])
        assert done.value.code == 0, capsys.readouterr().err
        assert len(ticks) - before == 4 * measured
