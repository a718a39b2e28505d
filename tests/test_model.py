import json

import numpy as np
import pytest

from model import build_model, classes_path, conv_layer_names, load_model, save_model


@pytest.mark.parametrize("shape, classes, params", [((32, 32, 3), 10, 615_178), ((64, 64, 3), 27, 1_009_499)])
def test_parameter_count_matches_the_original_summary(shape, classes, params):
    assert build_model(shape, classes).count_params() == params


def test_layers_are_named_and_logits_reachable():
    m = build_model()
    assert conv_layer_names(m) == [f"block{b}_conv{c}" for b in range(1, 5) for c in range(1, 4)]
    assert m.get_layer("logits").output.shape[-1] == 10
    assert m.layers[-1].name == "predictions"


def test_takes_pixels_in_0_255_and_outputs_probabilities():
    m = build_model((48, 40, 3), 4)
    x = np.random.default_rng(0).uniform(0, 255, (3, 48, 40, 3)).astype("float32")
    p = m.predict(x, verbose=0)
    assert p.shape == (3, 4)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    assert m.get_layer("rescale").scale == pytest.approx(1 / 255)


def test_rejects_inputs_too_small_for_four_poolings():
    with pytest.raises(ValueError, match="at least 16x16"):
        build_model((8, 8, 3), 10)


def test_save_and_load_round_trip_with_class_names(tmp_path):
    m = build_model((32, 32, 3), 3)
    path = tmp_path / "m.keras"
    save_model(m, path, ["a", "b", "c"], display_names=["エー", "ビー", "シー"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.classes.json", "m.keras"]  # no temporary left over
    loaded, names, display = load_model(path)
    assert names == ["a", "b", "c"] and display == ["エー", "ビー", "シー"]
    x = np.full((1, 32, 32, 3), 100, "float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), m.predict(x, verbose=0), rtol=1e-6)


def test_mixed_precision_model_is_saved_as_float32(tmp_path):
    m = build_model(dtype="mixed_bfloat16")
    save_model(m, tmp_path / "m.keras", [str(i) for i in range(10)])
    loaded, _, _ = load_model(tmp_path / "m.keras")
    assert {layer.dtype_policy.name for layer in loaded.layers} == {"float32"}


def test_a_trained_model_is_saved_without_its_optimizer_state(tmp_path):
    import keras

    m = build_model(num_classes=3)
    m.compile(optimizer="adam", loss="categorical_crossentropy")
    x, y = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)), np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1]]
    m.fit(x, y, epochs=1, verbose=0)
    save_model(m, tmp_path / "m.keras", ["a", "b", "c"])
    assert getattr(keras.saving.load_model(tmp_path / "m.keras"), "optimizer", None) is None
    loaded, _, _ = load_model(tmp_path / "m.keras")
    from kerascam.methods import score_cam

    assert score_cam(loaded, x[:2], precision="float32").shape == (2, 32, 32)  # one output, not a list of one
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), m.predict(x, verbose=0))
    assert m.optimizer is not None  # the model being trained keeps its optimizer


def test_a_model_saved_with_a_list_of_one_output_is_explained_like_any_other(tmp_path):
    import keras

    from kerascam.methods import score_cam

    m = build_model(num_classes=3)
    keras.Model(m.inputs, m.outputs).save(tmp_path / "listed.keras")  # outputs=[probs], as other code saves
    loaded, _, _ = load_model(tmp_path / "listed.keras")
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(score_cam(loaded, x), score_cam(m, x))


def test_class_count_mismatch_is_a_clear_error(tmp_path):
    save_model(build_model(), tmp_path / "m.keras", [str(i) for i in range(10)])
    classes_path(tmp_path / "m.keras").write_text(json.dumps({"classes": ["a", "b"]}))
    with pytest.raises(ValueError, match="names 2 classes but the model has 10 outputs"):
        load_model(tmp_path / "m.keras")


def test_not_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "x.keras").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a Keras model file"):
        load_model(tmp_path / "x.keras")
    with pytest.raises(ValueError, match="not found"):
        load_model(tmp_path / "missing.keras")
    (tmp_path / "saved_model").mkdir()  # what TF 2's model.save("dir") wrote
    with pytest.raises(ValueError, match=r"is a folder, not a model file.*model.save\('name.keras'\)"):
        load_model(tmp_path / "saved_model")


def unregistered_scale(x):  # a function Keras can save by name but not find again on loading
    return x / 255.0


def test_a_model_keras_cannot_rebuild_says_why_and_what_to_do(tmp_path):
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Lambda(unregistered_scale)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(x))
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)).save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError) as error:
        load_model(tmp_path / "lambda.keras")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'lambda.keras'} is a Keras model file that could not be rebuilt: "
                              "Could not locate function 'unregistered_scale'. ")
    assert "register_keras_serializable" in message and "Rescaling/Normalization" in message
    assert "\n" not in message and "not a Keras model file" not in message and len(message) < 600


def test_a_legacy_h5_model_file_loads_with_index_class_names(tmp_path):
    import keras

    m = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(2, 3), keras.layers.GlobalAveragePooling2D(),
                          keras.layers.Dense(3, activation="softmax")])
    m.save(tmp_path / "old.h5")
    loaded, names, display = load_model(tmp_path / "old.h5")
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-6)
    assert names == display == ["0", "1", "2"]
