"""Issue 16's regularisers: Cutout, RandAugment, MixUp and CutMix as pure functions of the batch's generator,
labels that match the pixels, the --augment / --mix / --ema-momentum options, CIFAR-10 validation held out
of the training split, and weight averaging that is what gets validated and saved, and resumes bitwise."""
import json

import keras
import numpy as np
import pytest

import train
from data.augment import RANDAUGMENT_OPS, augmentation, crop_flip, cutmix, cutout, mixup, rand_augment
from model import load_model
from test_train import Interrupt, deterministic_ops, history_epochs, small_model  # noqa: F401  (deterministic_ops: a fixture)


def pictures(n=32, size=16, seed=0, low=1):
    """n random uint8 pictures with no 0 pixel (low=1), so an erased pixel is one that reads 0."""
    return np.random.default_rng(seed).integers(low, 256, (n, size, size, 3), np.uint8)


def boxes_of(mask):
    """(y0, y1, x0, x1) of the bounding box of a 2-D boolean mask, or None when it is empty."""
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return (ys[0], ys[-1] + 1, xs[0], xs[-1] + 1) if len(ys) else None


@pytest.mark.parametrize("function", [cutout, rand_augment, crop_flip])
def test_each_augmentation_is_a_pure_function_of_the_generator(function):
    x = pictures()
    a, b = (function(x, np.random.default_rng(5)) for _ in range(2))
    assert a.shape == x.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, function(x, np.random.default_rng(6)))
    assert not np.array_equal(a, x)


@pytest.mark.parametrize("function", [mixup, cutmix])
def test_each_mix_is_a_pure_function_of_the_generator(function):
    x, y = pictures(), np.eye(32)
    (a, la), (b, lb) = (function(x, y, np.random.default_rng(5)) for _ in range(2))
    assert a.shape == x.shape and la.shape == y.shape and la.dtype == y.dtype
    assert a.dtype == (np.float32 if function is mixup else np.uint8)  # MixUp's blends are not whole numbers
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    c, lc = function(x, y, np.random.default_rng(6))
    assert not np.array_equal(a, c) and not np.array_equal(la, lc)


def test_cutout_zeroes_one_square_of_the_stated_size_clipped_at_the_border():
    x = pictures(n=200)
    for size in (5, None):  # None: half the side, the paper's 16 of 32
        out = cutout(x, np.random.default_rng(1), size=size)
        side, whole = size or 8, 0
        for before, after in zip(x, out):
            erased = (after == 0).all(-1)
            y0, y1, x0, x1 = boxes_of(erased)
            assert erased[y0:y1, x0:x1].all() and erased.sum() == (y1 - y0) * (x1 - x0), "not one rectangle"
            assert y1 - y0 <= side and x1 - x0 <= side
            inside = y0 > 0 and x0 > 0 and y1 < 16 and x1 < 16
            assert not inside or (y1 - y0, x1 - x0) == (side, side), "a square away from the border is whole"
            whole += inside
            assert np.array_equal(after[~erased], before[~erased]), "a pixel outside the square changed"
        assert 0 < whole < len(x), "never or always clipped at the border"


def test_mixup_labels_are_convex_weights_of_the_very_pictures_blended():
    """Each picture its own class: its soft label names the two pictures mixed and their weights,
    which must rebuild its pixels."""
    x = pictures(n=64)
    out, soft = mixup(x, np.eye(64), np.random.default_rng(2))
    assert (soft >= 0).all() and np.allclose(soft.sum(1), 1) and ((soft > 0).sum(1) <= 2).all()
    np.testing.assert_allclose(out, np.einsum("ik,khwc->ihwc", soft, x.astype(np.float64)), atol=1e-3)
    own = soft[np.arange(64), np.arange(64)]
    assert 0.1 < own.mean() < 0.9 and (own < 0.99).sum() > 32, "hardly mixed: lam should be uniform"


def test_cutmix_label_weight_is_the_share_of_pixels_pasted_from_one_box():
    """Picture k is the constant k + 1, so every pixel says which picture it came from."""
    n, size = 64, 16
    x = np.broadcast_to(np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None], (n, size, size, 3)).copy()
    out, soft = cutmix(x, np.eye(n), np.random.default_rng(3))
    assert (soft >= 0).all() and np.allclose(soft.sum(1), 1) and ((soft > 0).sum(1) <= 2).all()
    pasted_any = 0
    for i in range(n):
        source = out[i, :, :, 0].astype(int) - 1
        for k in np.unique(source):
            assert soft[i, k] == pytest.approx((source == k).mean(), abs=1e-12), (i, k)
        other = source != i
        if other.any():
            pasted_any += 1
            y0, y1, x0, x1 = boxes_of(other)
            assert other[y0:y1, x0:x1].all(), "the pasted part is not one box"
    assert pasted_any > n // 2


def test_randaugment_draws_operations_per_picture_and_every_operation_does_something():
    same = np.repeat(pictures(n=1, size=32), 64, axis=0)
    out = rand_augment(same, np.random.default_rng(4))
    assert len({o.tobytes() for o in out}) > 20, "the pictures of a batch should get different operations"
    low_contrast = pictures(n=4, size=32, seed=1, low=60) // 3 + 60  # room for autocontrast and equalize
    for name, op in RANDAUGMENT_OPS.items():
        for s in (-1.0, 1.0):
            changed = op(low_contrast, np.full(4, s))
            assert changed.shape == low_contrast.shape and changed.dtype == np.uint8, name
            assert (name == "identity") == np.array_equal(changed, low_contrast), name


def test_augment_specs_chain_extras_after_the_geometric_augmentation():
    x, seed = pictures(), 9
    assert augmentation("crop-flip") is crop_flip and augmentation("none") is None
    rng = np.random.default_rng(seed)
    expected = cutout(rand_augment(crop_flip(x, rng), rng), rng)  # one generator, in the order written
    assert np.array_equal(augmentation("crop-flip+randaugment+cutout")(x, np.random.default_rng(seed)), expected)
    assert np.array_equal(augmentation("none+cutout")(x, np.random.default_rng(seed)),
                          cutout(x, np.random.default_rng(seed)))


@pytest.mark.parametrize("argv, named", [
    (["--augment", "mixup"], "crop-flip"), (["--augment", "crop-flip+mixup"], "cutout"),
    (["--augment", "cutout"], "rotate-shift-flip"), (["--augment", "crop-flip+cutout+cutout"], "randaugment"),
    (["--mix", "crop-flip"], "cutmix"), (["--ema-momentum", "1"], "< 1.0"),
])
def test_unknown_regularisers_are_usage_errors_naming_the_valid_ones(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: argument {argv[0]}" in err and named in err, err


def test_recipes_keep_their_defaults_and_the_new_options_parse():
    for dataset, augment in (("cifar10", "crop-flip"), ("folder", "rotate-shift-flip")):
        args = train.parse_args(["--dataset", dataset])
        assert (args.augment, args.mix, args.ema_momentum) == (augment, "none", 0.0)
    assert train.parse_args([]).val_split == 0.0 and train.parse_args(["--dataset", "folder"]).val_split == 0.2
    args = train.parse_args(["--augment", "crop-flip+randaugment", "--mix", "cutmix", "--ema-momentum", "0.999"])
    assert (args.augment, args.mix, args.ema_momentum) == ("crop-flip+randaugment", "cutmix", 0.999)


def test_batches_with_mixing_are_a_pure_function_of_seed_epoch_and_batch():
    x, y = pictures(n=20), np.arange(20) % 4

    def batches(epoch, mix=None):
        b = train.EpochBatches(x, y, 4, batch_size=8, seed=3, augment=augmentation("crop-flip+cutout"), mix=mix)
        b.epoch = epoch  # as a resumed run sets it
        return b

    for i in range(3):
        (xa, ya), (xb, yb) = batches(1, cutmix)[i], batches(1, cutmix)[i]
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb) and np.allclose(ya.sum(1), 1)
        assert xa.dtype == np.float32
    assert not np.array_equal(batches(1, cutmix)[0][0], batches(2, cutmix)[0][0])
    # Mixing draws after the augmentation: a run without it sees the batches it saw before issue 16.
    b, rng = batches(1), np.random.default_rng([3, 1, 0])
    assert np.array_equal(b[0][0], cutout(crop_flip(x[b._order()[:8]], rng), rng))


def test_cifar10_val_split_holds_out_a_stratified_seeded_part_of_the_training_split(monkeypatch):
    """--val-split 0.1 on CIFAR-10's 50,000 training pictures: 5,000 validation pictures, 500 a class, none
    of them trained on and none from the test split; the default stays the test split."""
    import data.cifar10

    labels = np.arange(50000) % 10
    x_train = np.arange(50000).reshape(-1, 1, 1, 1)  # each picture is its own index
    x_test = -1 - np.arange(100).reshape(-1, 1, 1, 1)
    monkeypatch.setattr(data.cifar10, "load_cifar10", lambda data_dir=None: (
        (x_train, labels), (x_test, np.arange(100) % 10), data.cifar10.CLASS_NAMES))

    def split(*argv):
        return train.load_data(train.parse_args(["--dataset", "cifar10", *argv]))

    xt, yt, xv, yv, names, _, what = split("--val-split", "0.1", "--seed", "4")
    assert what == "validation" and len(xv) == 5000 and np.bincount(yv).tolist() == [500] * 10
    assert len(xt) == 45000 and not set(xt.ravel()) & set(xv.ravel()) and (xv >= 0).all()
    assert np.array_equal(labels[xv.ravel()], yv) and np.array_equal(labels[xt.ravel()], yt)
    assert np.array_equal(split("--val-split", "0.1", "--seed", "4")[2], xv)  # seeded
    assert not np.array_equal(split("--val-split", "0.1", "--seed", "5")[2], xv)
    xt, _, xv, _, _, _, what = split()
    assert what == "test" and len(xt) == 50000 and np.array_equal(xv, x_test)


# ---------------------------------------------------------------- training with the new options

REGULARISED = ["--dataset", "folder", "--image-size", "16", "--batch-size", "8", "--quiet",
               "--augment", "crop-flip+randaugment+cutout", "--mix", "cutmix", "--ema-momentum", "0.9"]


@pytest.mark.usefixtures("deterministic_ops")
def test_interrupted_regularised_run_with_averaging_resumes_to_the_same_model(color_folder, tmp_path, monkeypatch):
    """The backup holds the live weights and the optimizer's averages (the saved model holds the
    averages), so a resumed run repeats the uninterrupted one bitwise: history and saved model."""
    monkeypatch.setattr(train, "build_model", small_model)
    args = [*REGULARISED, "--data-dir", str(color_folder), "--epochs", "3"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train.train(train.parse_args([*args, "--out", str(whole)]))
    with pytest.raises(KeyboardInterrupt):
        train.train(train.parse_args([*args, "--out", str(resumed)]), extra_callbacks=[Interrupt(after=2)])
    assert history_epochs(resumed) == [0, 1]
    train.train(train.parse_args([*args, "--out", str(resumed)]))
    assert (resumed / "history.csv").read_text() == (whole / "history.csv").read_text()
    for a, b in zip(load_model(whole / "model.keras")[0].get_weights(),
                    load_model(resumed / "model.keras")[0].get_weights()):
        np.testing.assert_array_equal(a, b)


class Weights(keras.callbacks.Callback):
    """The live weights once the epoch's callbacks are done, and the model's weights once fit has ended,
    after Keras's finalize_variable_values has put the optimizer's averages in."""

    def on_epoch_end(self, epoch, logs=None):
        self.live = [w.copy() for w in self.model.get_weights()]

    def on_train_end(self, logs=None):
        self.final = [w.copy() for w in self.model.get_weights()]


def test_with_averaging_the_saved_and_validated_model_is_the_average(color_folder, tmp_path, monkeypatch):
    """One epoch, so the best epoch is the last: the saved model is what Keras's finalize_variable_values
    leaves in the model at the end (the optimizer's averages), not the live weights, and it is the model
    whose validation loss the history logs."""
    monkeypatch.setattr(train, "build_model", small_model)
    run, weights = tmp_path / "run", Weights()
    train.train(train.parse_args([*REGULARISED, "--data-dir", str(color_folder), "--epochs", "1", "--out", str(run)]),
                extra_callbacks=[weights])
    saved, _, _ = load_model(run / "model.keras")
    # (to rounding: on TensorFlow, Keras's SwapEMAWeights swaps by adding and subtracting)
    for s, f in zip(saved.get_weights(), weights.final):
        np.testing.assert_allclose(s, f, rtol=1e-6, atol=1e-7)
    assert max(np.abs(s - live).max() for s, live in zip(saved.get_weights(), weights.live)) > 1e-3, \
        "the saved model holds the live weights, not their average"
    # the validation logged during training is the saved model's (the average), which report() measures again
    x_val, y_val = train.load_data(train.parse_args([*REGULARISED, "--data-dir", str(color_folder)]))[2:4]
    probabilities = saved.predict(x_val.astype("float32"), verbose=0)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(np.eye(3)[y_val], probabilities)
    history = (run / "history.csv").read_text().splitlines()
    logged = dict(zip(history[0].split(","), map(float, history[1].split(","))))
    assert logged["val_loss"] == pytest.approx(float(loss), rel=1e-5)
    live = small_model((16, 16, 3), 3)
    live.set_weights(weights.live)
    live_loss = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(
        np.eye(3)[y_val], live.predict(x_val.astype("float32"), verbose=0))
    assert abs(float(live_loss) - logged["val_loss"]) > 1e-4, "validated with the live weights"
    # ... and the live weights' validation is logged beside it (the recipe without averaging, same trajectory)
    assert logged["val_loss_live"] == pytest.approx(float(live_loss), rel=1e-5)
    live_accuracy = float((live.predict(x_val.astype("float32"), verbose=0).argmax(1) == y_val).mean())
    assert logged["val_accuracy_live"] == pytest.approx(live_accuracy)
    results = json.loads((run / "results.json").read_text())
    assert results["recipe"]["ema_momentum"] == 0.9 and results["recipe"]["mix"] == "cutmix"
    assert results["validation_accuracy"] == pytest.approx(logged["val_accuracy"])
