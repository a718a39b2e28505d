"""Tests that catch the bugs a person would write (issue 30).

Each test names the one-line bug it is there for: a bug that gives wrong results while every other
test of the suite still passes. Every one fails on its bug (injected by hand into a scratch copy, see
the issue) and passes on the code. Tiny models built here, 12x12 to 32x32 pictures, seconds each.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import runtime  # noqa: E402,F401  (quiet TensorFlow start-up before keras)
import keras  # noqa: E402
from keras import layers  # noqa: E402

import evaluate as ev  # noqa: E402
import kerascam  # noqa: E402
from kerascam.metrics import bootstrap_ci, chunk_bootstrap_ci, summarise  # noqa: E402

SIZE = (12, 12, 3)


def images(n=2, seed=0, size=SIZE):
    return np.random.default_rng(seed).uniform(0, 255, (n,) + tuple(size)).astype(np.float32)


def trunk(channels=4, seed=0, size=SIZE):
    """(input, pooled features) of a tiny conv classifier, the same weights for a seed."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(size)
    h = layers.Rescaling(1 / 255)(inp)
    h = layers.Conv2D(channels, 3, padding="same", activation="relu", name="conv")(h)
    return inp, layers.GlobalAveragePooling2D()(h)


# ---------------------------------------------------------------- 1. Faster-Score-CAM is not full Score-CAM

def test_the_registered_faster_score_cam_uses_16_channels_not_all():
    """Bug: the registered "Faster-Score-CAM (16 ch.)" silently runs full Score-CAM (faster_score_cam's
    default max_n changed to None, or it passes max_n=None on to score_cam): evaluate.py's row of that
    name, kerascam.explain and the function itself would then all give the every-channel maps. On a
    24-channel layer, each gives score_cam(max_n=16)'s maps, which differ from every channel's."""
    inp, h = trunk(channels=24)
    model = keras.Model(inp, layers.Dense(3, name="logits")(h))
    x = images(3)
    targets = kerascam.predict_probabilities(model, x).argmax(1)
    want = kerascam.score_cam(model, x, class_index=targets, max_n=16, precision="float32")
    every = kerascam.score_cam(model, x, class_index=targets, precision="float32")
    assert np.abs(want - every).max() > 1e-2  # 16 of 24 channels give other maps than all 24
    through_evaluate = ev.method_functions(["faster_scorecam"])["faster_scorecam"](model, x, None, targets, 256)
    np.testing.assert_allclose(through_evaluate, want, atol=1e-6)
    np.testing.assert_allclose(kerascam.explain("faster_scorecam", model, x, class_index=targets,
                                                precision="float32"), want, atol=1e-6)
    np.testing.assert_allclose(kerascam.faster_score_cam(model, x, class_index=targets, precision="float32"), want,
                               atol=1e-6)
    # and the option still reaches it: max_n=24 is every channel
    np.testing.assert_allclose(kerascam.explain("faster_scorecam", model, x, class_index=targets, max_n=24,
                                                precision="float32"), every, atol=1e-6)
    method = kerascam.METHODS["faster_scorecam"]  # what the registry records and labels
    assert method.options["max_n"] == 16 and kerascam.label("faster_scorecam") == method.label == \
        "Faster-Score-CAM (16 ch.)"


def test_evaluate_fixes_the_seed_and_float32_precision_of_the_registered_methods():
    """Bugs in evaluate.method_functions: the seed not reaching the methods that take one (the random
    floor), its default not 0, or Score-CAM's precision left to "auto" (bfloat16 where it measures
    faster: results that depend on the machine). Each function is the registered one with exactly these
    options fixed."""
    functions = ev.method_functions(["scorecam", "faster_scorecam", "gradcam", "random", "center"], seed=5)
    for name, fn in functions.items():
        want = {k: v for k, v in (("seed", 5), ("precision", "float32")) if k in kerascam.METHODS[name].options}
        assert fn.func is kerascam.METHODS[name].function and fn.keywords == want and not fn.args, name
    assert functions["random"].keywords == {"seed": 5} and functions["scorecam"].keywords == {"precision": "float32"}
    assert ev.method_functions(["random"])["random"].keywords == {"seed": 0}  # the default seed is 0


# ---------------------------------------------------------------- 2. the score rule's heads

def _softmax(h):
    return layers.Activation("softmax", name="probs")(layers.Dense(3, name="logits")(h))


def functional_head():
    """A functional head model: logits, a softmax, then a Dropout."""
    inp = keras.Input((4,))
    return keras.Model(inp, layers.Dropout(0.5)(layers.Softmax()(layers.Dense(3, name="logits")(inp))), name="head")


def dropout_model():
    """A functional model that only passes its input on: a Dropout, then an Identity."""
    inp = keras.Input((3,))
    return keras.Model(inp, layers.Identity()(layers.Dropout(0.5)(inp)), name="head")


# Heads whose output is the softmax's probabilities (the README's score rule): the explained probabilities
# must be the model's own, and the maps those of the logits twin (softmax applied once, never twice).
# Each "... after softmax" head ends in a layer or op that keeps the values, which the rule looks through.
SOFTMAX_HEADS = {
    "dropout_after_softmax": lambda h: layers.Dropout(0.5, name="drop")(_softmax(h)),
    "identity_after_softmax": lambda h: layers.Identity(name="same")(_softmax(h)),
    "float32_linear_after_softmax": lambda h: layers.Activation("linear", dtype="float32", name="to32")(_softmax(h)),
    "ops_cast_after_softmax": lambda h: keras.ops.cast(_softmax(h), "float32"),
    "dense_softmax": lambda h: layers.Dense(3, activation="softmax", name="logits")(h),
    "softmax_layer": lambda h: layers.Softmax(name="probs")(layers.Dense(3, name="logits")(h)),
    "ops_softmax": lambda h: keras.ops.softmax(layers.Dense(3, name="logits")(h)),
    "lambda_softmax": lambda h: layers.Lambda(keras.activations.softmax, name="probs")(layers.Dense(3, name="logits")(h)),
    # a nested head model whose own output is a softmax before a Dropout: the rule descends into it
    "nested_sequential_head": lambda h: keras.Sequential([keras.Input((4,)), layers.Dense(3, activation="softmax",
                                                                                      name="logits"),
                                                          layers.Dropout(0.5)], name="head")(h),
    "nested_functional_head": lambda h: functional_head()(h),
    # a nested model that only passes the softmax's probabilities on: the rule looks through it as a Dropout
    "nested_dropout_after_softmax": lambda h: keras.Sequential([layers.Dropout(0.5)], name="head")(_softmax(h)),
    "nested_functional_dropout_after_softmax": lambda h: dropout_model()(_softmax(h)),
}
TRAILING = {"dropout_after_softmax", "identity_after_softmax", "float32_linear_after_softmax",
            "ops_cast_after_softmax", "nested_dropout_after_softmax", "nested_functional_dropout_after_softmax"}


def _maps(model, x):
    return (kerascam.score_cam(model, x, precision="float32"), kerascam.grad_cam(model, x))


LOGITS = [np.random.default_rng(3).normal(0, 2, (4, 3)).astype(np.float32), np.array([0.2, -0.1, 0.0], np.float32)]


@pytest.fixture(scope="module")
def logits_twin_maps():
    """The logits twin of every head below (the same trunk and Dense weights, no softmax) and its maps."""
    inp, h = trunk()
    twin = keras.Model(inp, layers.Dense(3, name="logits")(h))
    twin.get_layer("logits").set_weights(LOGITS)
    x = images()
    return x, twin.predict(x, verbose=0), _maps(twin, x)


@pytest.mark.parametrize("head", sorted(SOFTMAX_HEADS))
def test_each_softmax_head_of_the_score_rule_gives_the_models_own_probabilities(head, logits_twin_maps):
    """Bug: a Dropout after the softmax no longer skipped by the score rule (Dropout dropped from
    graph._keeps_values), or any other head of the README's rule missed (softmax -> Identity, ->
    Activation("linear", dtype="float32"), -> keras.ops.cast, Dense(activation="softmax"), a Softmax
    layer): the output would be taken as logits and softmaxed a second time. The probabilities that
    predict_probabilities and score_cam_layers explain are model.predict's, and the maps (Score-CAM,
    Grad-CAM) are those of the logits twin and of the same model without its trailing layer."""
    x, twin_logits, (twin_score, twin_grad) = logits_twin_maps
    inp, h = trunk()
    model = keras.Model(inp, SOFTMAX_HEADS[head](h))
    kerascam.find_layer(model, "logits").layer.set_weights(LOGITS)  # the twin's (a layer made first draws seeds)
    own = model.predict(x, verbose=0)
    np.testing.assert_allclose(own, keras.ops.convert_to_numpy(keras.ops.softmax(twin_logits)), atol=1e-6)
    np.testing.assert_allclose(kerascam.predict_probabilities(model, x), own, atol=1e-6)
    maps, probs = kerascam.score_cam_layers(model, x, ["conv"], precision="float32")
    np.testing.assert_allclose(probs, own, atol=1e-6)
    score, grad = _maps(model, x)
    np.testing.assert_allclose(maps["conv"], score, atol=1e-6)
    np.testing.assert_allclose(score, twin_score, atol=1e-5)
    np.testing.assert_allclose(grad, twin_grad, atol=1e-5)
    if head in TRAILING:  # the same model without the layer that keeps the values
        bare = keras.Model(inp, model.get_layer("probs").output)
        bare_score, bare_grad = _maps(bare, x)
        np.testing.assert_allclose(score, bare_score, atol=1e-6)
        np.testing.assert_allclose(grad, bare_grad, atol=1e-6)


class Doubled:
    """A callable object, not a function: no __name__ for the score rule to read."""

    def __call__(self, z):
        return 2 * z


# Heads whose output is not a softmax: a sigmoid of several units (its own per-unit probabilities), or any
# other output (logits, the softmax applied once by the rule).
OTHER_HEADS = {
    "ops_sigmoid": (lambda h: keras.ops.sigmoid(layers.Dense(3, name="logits")(h)), "own"),
    "lambda_sigmoid": (lambda h: layers.Lambda(keras.activations.sigmoid)(layers.Dense(3, name="logits")(h)), "own"),
    "dense_sigmoid": (lambda h: layers.Dense(3, activation="sigmoid", name="logits")(h), "own"),
    "tanh_activation": (lambda h: layers.Activation("tanh")(layers.Dense(3, name="logits")(h)), "softmax"),
    "ops_tanh": (lambda h: keras.ops.tanh(layers.Dense(3, name="logits")(h)), "softmax"),
    "lambda_double": (lambda h: layers.Lambda(lambda z: 2 * z)(layers.Dense(3, name="logits")(h)), "softmax"),
    "lambda_of_a_callable_object": (lambda h: layers.Lambda(Doubled())(layers.Dense(3, name="logits")(h)), "softmax"),
}


@pytest.mark.parametrize("head", sorted(OTHER_HEADS))
def test_a_sigmoid_head_gives_its_own_probabilities_and_any_other_output_is_logits(head):
    """Bugs in graph._link: a sigmoid op or Lambda of several units not recognised (its probabilities
    softmaxed as logits), or an output that is neither softmax nor sigmoid (a tanh Activation, an op, a
    Lambda) taken for a link (its input softmaxed instead of its output). predict_probabilities is the
    model's own output for a sigmoid head, the softmax of the model's output otherwise."""
    inp, h = trunk()
    build, rule = OTHER_HEADS[head]
    model = keras.Model(inp, build(h))
    model.get_layer("logits").set_weights(LOGITS)
    x = images()
    out = model.predict(x, verbose=0)
    want = out if rule == "own" else keras.ops.convert_to_numpy(keras.ops.softmax(out))
    np.testing.assert_allclose(kerascam.predict_probabilities(model, x), want, atol=1e-6)


def test_a_sequential_ending_in_dropout_after_its_softmax_gives_its_own_probabilities():
    """Bug: as above, for a Sequential model (graph._output_path's Sequential branch strips the trailing
    layers that keep the values): Dense(3, softmax) then Dropout is explained as its own probabilities."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(SIZE), layers.Conv2D(4, 3, activation="relu", name="conv"),
                              layers.GlobalAveragePooling2D(), layers.Dense(3, activation="softmax"),
                              layers.Dropout(0.5)])
    x = images()
    np.testing.assert_allclose(kerascam.predict_probabilities(model, x), model.predict(x, verbose=0), atol=1e-6)


# ---------------------------------------------------------------- 3. a one-unit output is (-z/2, z/2)

W_ONE = np.array([[1.0], [-1.0], [0.5], [-0.7]], np.float32)  # channels for each class: no class-0 map is blank
B_ONE = np.array([0.3], np.float32)


def one_unit_and_twin(activation=None):
    """A one-unit model (logit z, or sigmoid(z)) and its Dense(2) twin with kernel (-w/2, w/2) and bias
    (-b/2, b/2): the twin's logits are (-z/2, z/2), the softmax of which is (1 - p, p)."""
    inp, h = trunk()
    one = keras.Model(inp, layers.Dense(1, activation=activation, name="unit")(h))
    one.get_layer("unit").set_weights([W_ONE, B_ONE])
    inp, h = trunk()
    twin = keras.Model(inp, layers.Dense(2, name="pair")(h))
    twin.get_layer("pair").set_weights([np.concatenate([-W_ONE / 2, W_ONE / 2], axis=1),
                                        np.concatenate([-B_ONE / 2, B_ONE / 2])])
    return one, twin


GRADIENT_METHODS = ["grad_cam", "grad_cam_pp", "layer_cam", "hires_cam"]


@pytest.mark.parametrize("activation", [None, "sigmoid"])
def test_class_0_of_a_one_unit_model_is_its_two_unit_twins(activation):
    """Bug: a one-unit output scored as (0, z) instead of (-z/2, z/2) in graph._ScoreHead. The softmax
    of both is (1 - p, p), so the probabilities and Score-CAM cannot tell; but class 0's score would be
    the constant 0, whose gradient is 0: every gradient method's class-0 map blank. Class 0 (and 1) of
    a one-unit model equal its Dense(2) twin's for every gradient method and Score-CAM, and are not blank."""
    one, twin = one_unit_and_twin(activation)
    x = images(3)
    p = one.predict(x, verbose=0)[:, 0]
    p = p if activation else 1 / (1 + np.exp(-p))
    np.testing.assert_allclose(kerascam.predict_probabilities(one, x), np.stack([1 - p, p], axis=1), atol=1e-6)
    np.testing.assert_allclose(kerascam.predict_probabilities(twin, x), np.stack([1 - p, p], axis=1), atol=1e-6)
    for name in GRADIENT_METHODS:
        method = getattr(kerascam, name)
        for c in (0, 1):
            got, want = method(one, x, class_index=c), method(twin, x, class_index=c)
            assert (got.reshape(len(x), -1).max(axis=1) > 0).all(), f"{name} class {c}: a blank map"
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{name} class {c}")
    for c in (0, 1):
        got = kerascam.score_cam(one, x, class_index=c, precision="float32")
        assert (got.reshape(len(x), -1).max(axis=1) > 0).all()
        np.testing.assert_allclose(got, kerascam.score_cam(twin, x, class_index=c, precision="float32"), atol=1e-5)


# ---------------------------------------------------------------- 4. and 5. the sanity check

def sanity_model(classes=10, seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input(SIZE)
    x = layers.Rescaling(1 / 255)(inp)
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.Dense(8, activation="relu", name="fc1")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inp, layers.Dense(classes, name="logits")(x))


def test_the_sanity_check_explains_the_randomised_copy_for_the_trained_models_targets(monkeypatch):
    """Bug: sanity_check explains each randomised copy for the copy's own predicted class (class_index
    None passed for the copy, or its own argmax) instead of the trained model's targets. A recording
    method sees every call's class_index: the trained model's targets at every step, the trained model
    first and then its copy, and the copy's own prediction differs from them at some step (so the bug
    would show). Also recorded: the layer asked for reaches every call, each step's Spearman is that of
    the trained map and that step's map, and the copy's layers are re-drawn with the seeds
    seed x 100,000 + step x 100 + layer x 10 (the BatchNorm after conv1 is conv1's step's layer 1)."""
    model = sanity_model()
    x = images(6, seed=1)
    targets = kerascam.predict_probabilities(model, x).argmax(1)
    calls, seeds = [], []
    redraw = kerascam.sanity.reinitialise

    def recording_redraw(layer, seed):
        seeds.append((layer.name, seed))
        redraw(layer, seed)

    def recording(net, pictures, layer=None, class_index=None, batch_size=256):
        maps = kerascam.grad_cam(net, pictures, layer, class_index, batch_size)
        calls.append((net, layer, None if class_index is None else np.array(class_index),
                      kerascam.predict_probabilities(net, pictures).argmax(1), maps))
        return maps

    monkeypatch.setattr(kerascam.sanity, "reinitialise", recording_redraw)
    out = kerascam.sanity.sanity_check(model, x, {"recording": recording}, targets, layer="conv1", seed=1)
    steps = list(out["recording"])
    assert steps == ["logits", "fc1", "conv2", "conv1"] and len(calls) == 1 + len(steps)
    assert calls[0][0] is model and all(call[0] is not model for call in calls[1:])
    for step, (_, layer, class_index, _, _) in zip(["trained"] + steps, calls):
        assert class_index is not None and np.array_equal(class_index, targets), step
        assert layer == "conv1", step
    assert any(not np.array_equal(call[3], targets) for call in calls[1:])  # the copy's own classes differ
    for step, call in zip(steps, calls[1:]):
        np.testing.assert_allclose(out["recording"][step], kerascam.metrics.spearman(calls[0][4], call[4]),
                                   atol=1e-12, err_msg=step)
    assert seeds == [("logits", 100_000), ("fc1", 100_100), ("conv2", 100_200), ("conv1", 100_300),
                     ("bn", 100_310)]


def test_the_sanity_checks_copy_has_the_trained_weights(monkeypatch):
    """Bug: the sanity check's copy never receives the trained weights (copies.copy_model without its
    sync_weights, or a bare keras.models.clone_model): it is a randomly initialised model from the first
    step on. With reinitialise made a no-op the copy is the trained model at every step, so a real
    method's maps agree: Spearman 1 at every step."""
    seeds = []
    monkeypatch.setattr(kerascam.sanity, "reinitialise", lambda layer, seed: seeds.append(seed))
    model = sanity_model(classes=3)
    x = images(4, seed=2)
    targets = kerascam.predict_probabilities(model, x).argmax(1)
    methods = ev.method_functions(["gradcam", "scorecam"])
    for layer in (None, "conv1"):  # the default layer (conv2) and another: both explanations at the layer asked for
        out = kerascam.sanity.sanity_check(model, x, methods, targets, layer=layer)
        for name, per_step in out.items():
            assert list(per_step) == ["logits", "fc1", "conv2", "conv1"]
            for step, rho in per_step.items():
                assert rho.shape == (4,) and (rho > 0.999).all(), (name, layer, step, rho)
    assert seeds == [0, 100, 200, 300, 310] * 2  # the default seed is 0
    at = {layer: methods["gradcam"](model, x, layer, targets, 256) for layer in ("conv1", "conv2")}
    assert (kerascam.metrics.spearman(at["conv1"], at["conv2"]) < 0.99).all()  # so the layer asked for matters


def test_the_sanity_sample_is_a_seeded_sorted_draw_without_repeats():
    """Bug: sanity_sample takes the sample's first pictures (one class of a class-ordered split), repeats a
    picture, or ignores its seed. By hand: numpy's seeded choice without replacement, sorted; at most the
    whole sample; another seed another draw. NumPy only (the mutation run's test of it)."""
    pick = kerascam.sanity.sanity_sample(40, 8, seed=2)
    assert pick.tolist() == sorted(np.random.default_rng(2).choice(40, 8, replace=False).tolist())
    assert len(set(pick.tolist())) == 8 and pick.tolist() != list(range(8)) and pick.max() < 40
    assert kerascam.sanity.sanity_sample(40, 8, seed=3).tolist() != pick.tolist()
    assert kerascam.sanity.sanity_sample(40, 8).tolist() == kerascam.sanity.sanity_sample(40, 8, seed=0).tolist()
    assert kerascam.sanity.sanity_sample(5, 100).tolist() == [0, 1, 2, 3, 4]  # at most the whole sample
    assert kerascam.sanity.sanity_sample(5, 0).tolist() == []


# ---------------------------------------------------------------- 6. and 7. the summaries

SKEWED = [0.0, 0.0, 90.0, 10.0, 0.0]  # mean 20, median 0


def test_the_summary_is_the_mean_not_the_median():
    """Bug: kerascam.metrics.summarise (evaluate's summary) reports the median instead of the mean. On a
    skewed sample, Average Drop [0, 0, 90, 10, 0] is 20 (its median is 0), with its bootstrap interval."""
    out = summarise({"avg_drop": np.array(SKEWED), "increase": np.array([100.0, 0, 0, 0, 0])}, seed=3, resamples=200)
    assert out["avg_drop"] == pytest.approx(20.0, abs=1e-12) and out["increase"] == pytest.approx(20.0, abs=1e-12)
    assert out["avg_drop_ci"] == bootstrap_ci(SKEWED, 200, 3) and out["avg_drop_ci"][0] <= 20 <= out["avg_drop_ci"][1]
    assert set(out) == {"avg_drop", "avg_drop_ci", "increase", "increase_ci"}
    spread = np.random.default_rng(0).gamma(1.0, 20.0, 30)  # continuous values: every seed its own interval
    assert summarise({"v": spread}, seed=3)["v_ci"] == bootstrap_ci(spread, seed=3) != bootstrap_ci(spread, seed=0)
    assert summarise({"v": spread})["v_ci"] == bootstrap_ci(spread, seed=0)  # the default seed is 0


def test_evaluate_reports_the_mean_of_the_per_picture_metrics(monkeypatch):
    """Bug: as above, through evaluate.evaluate: each metric of a method is the mean of its per-picture
    values (per_image_metrics replaced by skewed values here), not their median."""
    values = {"avg_drop": np.array(SKEWED), "increase": np.array([0.0, 0, 100, 0, 0]),
              "deletion_auc": np.array([0.1, 0.1, 0.1, 0.1, 0.6]), "insertion_auc": np.array([0.9, 0.9, 0.9, 0, 0.3])}

    def skewed(model, pictures, maps, targets, y, steps=1, batch_size=256, seed=0, sigma=5, desc=""):
        curves = np.zeros((len(pictures), steps + 1), np.float32)
        return {k: v.copy() for k, v in values.items()}, np.linspace(0, 1, steps + 1), curves, curves

    monkeypatch.setattr(ev, "per_image_metrics", skewed)
    inp, h = trunk()
    model = keras.Model(inp, layers.Dense(3)(h))
    result = ev.evaluate(model, images(5), names=["center"], steps=1, sanity_n=0, resamples=50)["methods"]["center"]
    for key, v in values.items():
        assert result[key] == pytest.approx(v.mean(), abs=1e-12), key
    assert result["avg_drop"] == pytest.approx(20.0)


def weighted_chunk_interval(values, chunk, resamples=1000, seed=0, level=0.95):
    """The chunk bootstrap written out: the chunks are resampled with replacement, each standing for its
    images (its value counted chunk-size times), the same seeded draws as kerascam.metrics'."""
    values = np.asarray(values, np.float64)
    starts = list(range(0, len(values), chunk))
    per_chunk = np.array([values[s] for s in starts])
    sizes = np.array([min(chunk, len(values) - s) for s in starts], np.float64)
    pick = np.random.default_rng(seed).integers(0, len(starts), (resamples, len(starts)))
    means = np.array([np.dot(per_chunk[p], sizes[p]) / sizes[p].sum() for p in pick])
    return list(np.percentile(means, [50 * (1 - level), 50 * (1 + level)]))


def test_the_time_interval_weights_each_chunk_by_its_pictures():
    """Bug: chunk_bootstrap_ci averages the resampled chunks' values without weighting them by their
    sizes. 192 pictures timed at 1 ms and 8 at 30 ms, chunks of 64: chunks of 64, 64, 64 and 8 pictures.
    The interval is the size-weighted one written out here (upper bound 8.91 ms: the slow chunk holds 8
    of 200 pictures), far below the unweighted one's 22.75 ms."""
    values = np.repeat([1.0, 30.0], [192, 8])
    got = chunk_bootstrap_ci(values, 64)
    want = weighted_chunk_interval(values, 64)
    assert got == pytest.approx(want, abs=1e-9)
    assert got[1] == pytest.approx(8.91, abs=0.01) and got[0] == pytest.approx(1.0)
    per_chunk = np.array([1.0, 1.0, 1.0, 30.0])  # the unweighted resampling, for the record: 22.75 ms
    pick = np.random.default_rng(0).integers(0, 4, (1000, 4))
    assert np.percentile(per_chunk[pick].mean(axis=1), 97.5) == pytest.approx(22.75)
    # other seeds and sizes: always the weighted resampling
    ragged = np.repeat(np.random.default_rng(5).gamma(2.0, 3.0, 7), [10, 10, 10, 10, 10, 10, 3])
    assert chunk_bootstrap_ci(ragged, 10, 300, 7) == pytest.approx(weighted_chunk_interval(ragged, 10, 300, 7),
                                                                   abs=1e-9)
    assert chunk_bootstrap_ci(ragged, 10) == pytest.approx(weighted_chunk_interval(ragged, 10), abs=1e-9)  # seed 0
    assert chunk_bootstrap_ci(ragged, 10) != chunk_bootstrap_ci(ragged, 10, seed=1)
    assert chunk_bootstrap_ci([4.0], 64) == [4.0, 4.0]  # one picture, one chunk
    with pytest.raises(ValueError, match="^no values to bootstrap$"):
        chunk_bootstrap_ci([], 64)


# ---------------------------------------------------------------- 8. the insertion's blur sigma

def edge_model(size=16, seed=0):
    """Class 0's logit counts the fine detail (a ReLU Laplacian, averaged over the picture), so its
    probability depends on how much a blur smooths: sigma 1 and sigma 5 give other starts. "valid"
    padding: the picture's border (OpenCV reflects it) makes no edge of its own."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = layers.Conv2D(1, 3, use_bias=False, activation="relu", name="edges")(inp)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, layers.Activation("softmax")(layers.Dense(2, name="logits")(x)))
    lap = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], np.float32) / (3 * 255)
    model.get_layer("edges").set_weights([np.repeat(lap[:, :, None, None], 3, axis=2)])
    model.get_layer("logits").set_weights([np.array([[100.0, 0.0]], np.float32), np.array([-1.0, 0.0], np.float32)])
    return model


def read_model(size=16, seed=7):
    """Class 0's logit is a fixed random read-out of the grey pixels (centred): linear, never saturated,
    so which pixels a deletion or insertion step has switched shows in the probability."""
    inp = keras.Input((size, size, 3))
    x = layers.Conv2D(1, 1, use_bias=False, name="grey")(inp)
    model = keras.Model(inp, layers.Activation("softmax")(layers.Dense(2, name="logits")(layers.Flatten()(x))))
    model.get_layer("grey").set_weights([np.full((1, 1, 3, 1), 1 / (3 * 255), np.float32)])
    w = np.random.default_rng(seed).normal(0, 0.3, size * size).astype(np.float32)
    model.get_layer("logits").set_weights([np.stack([w, np.zeros_like(w)], axis=1), np.array([-w.sum() / 2, 0],
                                                                                                np.float32)])
    return model


def blurred_start(model, pictures, sigma):
    """Target (predicted class) probability of each picture blurred with OpenCV at sigma: the insertion
    curve's first point, computed here without kerascam.metrics.blur."""
    start = np.stack([cv2.GaussianBlur(np.float32(p), (0, 0), sigma) for p in pictures])
    targets = model.predict(pictures, verbose=0).argmax(1)
    return model.predict(start, verbose=0)[np.arange(len(pictures)), targets], targets


SIGMA = 1.0


def curve_by_hand(model, start, end, maps, targets, steps, seed):
    """The target probability as the pixels of seeded rank (kerascam.metrics.pixel_ranks) below k switch
    from `start` to `end`, at the curve's steps + 1 counts k."""
    ranks = kerascam.metrics.pixel_ranks(maps, seed)
    counts = np.round(np.linspace(0, maps[0].size, steps + 1)).astype(int)
    rows = np.arange(len(maps))
    return np.stack([model.predict(np.where((ranks < k)[..., None], end, start), verbose=0)[rows, targets]
                     for k in counts], axis=1)


def tied_maps(n, size=16):
    """Maps of one bright square on 0: the ties make the seed's order count."""
    maps = np.zeros((n, size, size), np.float32)
    maps[:, 4:8, 4:8] = 1
    return maps


def test_insertion_starts_from_the_blur_of_the_sigma_given():
    """Bug: insertion(sigma=s) silently blurs with sigma 5 (the default) while the caller and the JSON
    record s. The curve's first point is the target's probability on blur(images, s) for s = 1,
    which differs from sigma 5's; the whole curve restores the pictures onto that blur in the order of
    the seeded ranks, up to the pictures themselves."""
    model = edge_model()
    x = images(3, size=(16, 16, 3))
    want, targets = blurred_start(model, x, SIGMA)
    at5, _ = blurred_start(model, x, 5.0)
    assert np.abs(want - at5).min() > 0.05  # the picture tells the two blurs apart
    maps = tied_maps(3)
    _, curves = kerascam.metrics.insertion(model, x, maps, targets, steps=4, sigma=SIGMA, seed=3)
    np.testing.assert_allclose(curves[:, 0], want, atol=1e-5)
    start = np.stack([cv2.GaussianBlur(p, (0, 0), SIGMA) for p in x])
    np.testing.assert_allclose(curves, curve_by_hand(model, start, x, maps, targets, 4, seed=3), atol=1e-5)
    _, curves5 = kerascam.metrics.insertion(model, x, maps, targets, steps=4)  # sigma 5
    np.testing.assert_allclose(curves5[:, 0], at5, atol=1e-5)
    # the seed orders the tied pixels (0 by default): on a model that reads every pixel, the curve shows it
    model = read_model()
    start5 = np.stack([cv2.GaussianBlur(p, (0, 0), 5.0) for p in x])
    for seed in (0, 3):
        _, curves = kerascam.metrics.insertion(model, x, maps, targets, steps=4, **({"seed": seed} if seed else {}))
        np.testing.assert_allclose(curves, curve_by_hand(model, start5, x, maps, targets, 4, seed), atol=1e-5)
    assert np.abs(curve_by_hand(model, start5, x, maps, targets, 4, seed=0) - curves).max() > 1e-3  # seeds differ


def test_per_image_metrics_are_the_metrics_of_its_parts():
    """Bugs in evaluate.per_image_metrics: the explanation image not image x map, Average Drop or Increase
    from the wrong probabilities, the seed or sigma not passed on to deletion and insertion, a metric
    under another name. Each value is that of kerascam.metrics' parts called by hand, with the seed and
    sigma given, and with seed 0 and sigma 5 by default."""
    model = read_model()
    x = images(3, size=(16, 16, 3))
    probs = model.predict(x, verbose=0)
    targets = probs.argmax(1)
    y = probs[np.arange(3), targets]
    maps = tied_maps(3) * 0.75
    maps[:, 12:, :8] = 0.25
    for options, seed, sigma in (({"seed": 3, "sigma": SIGMA}, 3, SIGMA), ({}, 0, 5.0)):
        values, curve_x, dele, ins = ev.per_image_metrics(model, x, maps, targets, y, steps=4, **options)
        assert set(values) == {"avg_drop", "increase", "deletion_auc", "insertion_auc"}
        o = model.predict(x * maps[..., None], verbose=0)[np.arange(3), targets]
        drop, increase = kerascam.metrics.drop_and_increase(y, o)
        np.testing.assert_allclose(values["avg_drop"], drop, atol=1e-4)
        np.testing.assert_array_equal(values["increase"], increase)
        np.testing.assert_allclose(curve_x, np.linspace(0, 1, 5))
        np.testing.assert_allclose(dele, curve_by_hand(model, x, np.zeros_like(x), maps, targets, 4, seed), atol=1e-5)
        start = np.stack([cv2.GaussianBlur(p, (0, 0), sigma) for p in x])
        np.testing.assert_allclose(ins, curve_by_hand(model, start, x, maps, targets, 4, seed), atol=1e-5)
        np.testing.assert_allclose(values["deletion_auc"], kerascam.metrics.auc(curve_x, dele), atol=1e-12)
        np.testing.assert_allclose(values["insertion_auc"], kerascam.metrics.auc(curve_x, ins), atol=1e-12)
    other = curve_by_hand(model, x, np.zeros_like(x), maps, targets, 4, seed=3)
    assert np.abs(other - dele).max() > 1e-3  # the seed changes the deletion curve here


def test_evaluate_passes_its_blur_sigma_to_the_insertion():
    """Bug: evaluate.evaluate(..., sigma=s) (per_image_metrics, the insertion it calls) blurs with sigma 5.
    The mean insertion curve's first point is the mean target probability on the sigma-s blur."""
    model = edge_model()
    x = images(3, size=(16, 16, 3))
    want, _ = blurred_start(model, x, SIGMA)
    at5, _ = blurred_start(model, x, 5.0)
    result = ev.evaluate(model, x, names=["center"], steps=2, sanity_n=0, resamples=20, sigma=SIGMA)
    curve = result["methods"]["center"]["insertion_curve"]
    assert curve[0] == pytest.approx(want.mean(), abs=2e-5) and abs(curve[0] - at5.mean()) > 0.05


def test_the_command_lines_blur_sigma_reaches_the_insertion(tmp_path, capsys):
    """Bug: evaluate.py --blur-sigma s is recorded in the JSON's settings but the run uses sigma 5. The
    JSON's mean insertion curve starts at the mean target probability of the sample blurred with s."""
    from model import save_model

    model = edge_model(size=32)
    save_model(model, tmp_path / "edges.keras", ["cat", "dog"])
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / split / name / f"{i}.png")
    argv = ["--model", str(tmp_path / "edges.keras"), "--data-dir", str(tmp_path), "--n", "4", "--sanity-n", "0",
            "--methods", "center", "--steps", "2", "--blur-sigma", str(SIGMA), "--json", str(tmp_path / "out.json")]
    ev.main(argv)
    capsys.readouterr()
    results = json.loads((tmp_path / "out.json").read_text())
    assert results["settings"]["blur_sigma"] == SIGMA
    loaded, class_names, _ = __import__("model").load_model(tmp_path / "edges.keras")
    sample, _, _ = ev.load_sample(ev.parse_args(argv), loaded, class_names)
    want, _ = blurred_start(model, sample, SIGMA)
    at5, _ = blurred_start(model, sample, 5.0)
    curve = results["methods"]["center"]["insertion_curve"]
    assert curve[0] == pytest.approx(want.mean(), abs=2e-5) and abs(curve[0] - at5.mean()) > 0.05
