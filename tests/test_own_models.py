"""Models as users write them, beyond tests/test_any_model.py: heads whose softmax is an op, a Lambda or
sits before a dtype cast (mixed precision's float32 Activation("linear")), and layers called twice.
Each against a known answer: the model's own predict, its logits twin, or one clear ValueError."""
import keras
import numpy as np
import pytest
from keras import layers

import kerascam  # noqa: F401
from kerascam.methods import grad_cam
from kerascam.methods import score_cam
from kerascam.scoring import score_cam_stream

SIZE = (12, 12, 3)


def images(n=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n,) + SIZE).astype(np.float32)


def trunk(seed=0):
    """(input, logits (N, 3)) of a tiny conv classifier, the same weights for a seed."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(SIZE)
    h = layers.Rescaling(1 / 255)(inp)
    h = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(h)
    h = layers.GlobalAveragePooling2D()(h)
    return inp, h


# A softmax the score rule must find, however the head spells it: the output is then probabilities, and
# a second softmax over them would flatten them (the maps change, Grad-CAM differentiates saturated values).
SOFTMAX_HEADS = {
    "ops.softmax": lambda h: keras.ops.softmax(layers.Dense(3, name="logits")(h)),
    "lambda_softmax": lambda h: layers.Lambda(keras.activations.softmax)(layers.Dense(3, name="logits")(h)),
    "float32_cast_after_softmax": lambda h: layers.Activation("linear", dtype="float32")(
        layers.Dense(3, activation="softmax", name="logits")(h)),
    "ops.cast_after_softmax": lambda h: keras.ops.cast(layers.Dense(3, activation="softmax", name="logits")(h),
                                                       "float32"),
    "identity_after_softmax": lambda h: layers.Identity()(layers.Activation("softmax")(
        layers.Dense(3, name="logits")(h))),
}


@pytest.mark.parametrize("head", sorted(SOFTMAX_HEADS))
def test_a_softmax_as_an_op_lambda_or_before_a_cast_is_applied_once(head):
    inp, h = trunk()
    model = keras.Model(inp, SOFTMAX_HEADS[head](h))
    inp, h = trunk()
    twin = keras.Model(inp, layers.Dense(3, name="logits")(h))  # logits, the same weights
    x = images()
    np.testing.assert_allclose(kerascam.graph.predict_probabilities(model, x), model.predict(x, verbose=0), atol=1e-6)
    np.testing.assert_allclose(score_cam(model, x, precision="float32"), score_cam(twin, x, precision="float32"),
                               atol=1e-5)
    np.testing.assert_allclose(grad_cam(model, x), grad_cam(twin, x), atol=1e-5)


def test_a_sequential_ending_in_a_float32_cast_after_its_softmax_gives_its_own_probabilities():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(SIZE), layers.Conv2D(4, 3, activation="relu"),
                              layers.GlobalAveragePooling2D(), layers.Dense(3, activation="softmax"),
                              layers.Activation("linear", dtype="float32")])
    x = images()
    np.testing.assert_allclose(kerascam.graph.predict_probabilities(model, x), model.predict(x, verbose=0), atol=1e-6)


def test_a_sigmoid_op_of_several_units_scores_each_units_own_probability():
    inp, h = trunk()
    model = keras.Model(inp, keras.ops.sigmoid(layers.Dense(3)(h)))
    x = images()
    np.testing.assert_allclose(kerascam.graph.predict_probabilities(model, x), model.predict(x, verbose=0), atol=1e-6)


def shared_models():
    """A conv layer called twice, in the top model and inside a nested one, and a nested model called twice."""
    keras.utils.set_random_seed(0)
    inp = keras.Input(SIZE)
    h = layers.Conv2D(3, 3, padding="same", name="first")(inp)
    shared = layers.Conv2D(3, 3, padding="same", activation="relu", name="shared")
    flat = keras.Model(inp, layers.Dense(3)(layers.GlobalAveragePooling2D()(shared(shared(h)))))
    inner = keras.Model(inp, shared(shared(h)), name="inner")
    nested = keras.Sequential([keras.Input(SIZE), inner, layers.GlobalAveragePooling2D(), layers.Dense(3)])
    block = keras.Sequential([keras.Input(SIZE), layers.Conv2D(3, 3, padding="same", name="conv")], name="block")
    inp = keras.Input(SIZE)
    twice = keras.Model(inp, layers.Dense(3)(layers.GlobalAveragePooling2D()(block(block(inp)))))
    return [(flat, "shared"), (nested, "inner/shared"), (twice, "block/conv"), (twice, "block")]


@pytest.mark.parametrize("method", [score_cam, grad_cam])
def test_a_layer_called_twice_is_one_clear_error(method):
    x = images(1)
    for model, layer in shared_models():
        with pytest.raises(ValueError, match=r"is called 2 times in the model \(a shared layer\)"):
            method(model, x, layer)
    (flat, _), (nested, _) = shared_models()[:2]
    assert method(flat, x, "first").shape == (1,) + SIZE[:2]  # a layer called once beside it is explained
    assert method(nested, x, "inner/first").shape == (1,) + SIZE[:2]


# keras.utils.image_dataset_from_directory's label modes: "int" (n,), "binary" (n, 1) floats, "categorical" one-hot
LABELS = {"int": np.array([2, 0, 1, 2]), "binary_floats": np.array([[2.0], [0.0], [1.0], [2.0]], np.float32),
          "one_hot": np.eye(3, dtype=np.float32)[[2, 0, 1, 2]]}


@pytest.mark.parametrize("kind", sorted(LABELS))
def test_labelled_batches_in_each_of_keras_label_modes_explain_their_labels(kind):
    inp, h = trunk()
    model = keras.Model(inp, layers.Dense(3)(h))
    x = images(4)
    batches = [(x[:3], LABELS[kind][:3]), (x[3:], LABELS[kind][3:])]
    got = np.concatenate(list(score_cam_stream(model, batches, class_index="labels", precision="float32")))
    np.testing.assert_allclose(got, score_cam(model, x, class_index=[2, 0, 1, 2], precision="float32"), atol=1e-6)


def test_soft_labels_are_one_clear_error():
    inp, h = trunk()
    model = keras.Model(inp, layers.Dense(3)(h))
    soft = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]], np.float32)  # mixup or label smoothing
    with pytest.raises(ValueError, match=r"labels of shape \(2, 3\) are not one-hot rows"):
        list(score_cam_stream(model, [(images(2), soft)], class_index="labels", precision="float32"))


MEAN = np.array([120.0, 110.0, 100.0], np.float32)


@keras.saving.register_keras_serializable(package="test_own_models")
def backend_centre(t):
    """A Lambda's body written with the backend's own op on a float32 constant, as users port TF or JAX code:
    it refuses a bfloat16 input instead of promoting it, as keras.ops would."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.lax.sub(t, jax.numpy.broadcast_to(MEAN, t.shape))
    import tensorflow as tf

    return tf.subtract(t, tf.constant(MEAN))


def test_a_model_that_will_not_run_in_bfloat16_is_one_error_line_and_auto_keeps_float32(monkeypatch):
    import kerascam

    keras.utils.set_random_seed(0)
    inp = keras.Input(SIZE)
    h = layers.Lambda(backend_centre, output_shape=SIZE)(inp)
    h = layers.Conv2D(4, 3, padding="same", activation="relu")(h)
    model = keras.Model(inp, layers.Dense(3)(layers.GlobalAveragePooling2D()(h)))
    x = images(3)
    message = r"this model does not run in bfloat16 \(\w+Error: .*pass precision='float32'"
    with pytest.raises(ValueError, match=message) as error:
        score_cam(model, x, precision="bfloat16")
    assert "\n" not in str(error.value) and "\x1b" not in str(error.value)
    monkeypatch.setattr(kerascam.precision, "AUTO_MIN_IMAGES", 1)  # "auto" measures this small call: the bfloat16 copy
    monkeypatch.setattr(kerascam.precision, "AUTO_MIN_PASSES", 1)  # fails there, and float32 explains it
    np.testing.assert_allclose(score_cam(model, x, precision="auto"), score_cam(model, x, precision="float32"))


def test_a_model_without_a_bfloat16_copy_is_one_error_line_naming_the_reason():
    keras.utils.set_random_seed(0)
    inp = keras.Input(SIZE)
    h = layers.Lambda(lambda t: t / 255.0)(inp)  # a Python lambda: Keras will not rebuild it from its config
    h = layers.Conv2D(4, 3, padding="same", activation="relu")(h)
    model = keras.Model(inp, layers.Dense(3)(layers.GlobalAveragePooling2D()(h)))
    with pytest.raises(ValueError, match=r"could not make a bfloat16 copy of this model \(\w+Error: .*; pass "
                                         r"precision='float32'") as error:
        score_cam(model, images(1), precision="bfloat16")
    assert "\n" not in str(error.value) and "\x1b" not in str(error.value)
