"""The explainers on the models users bring, each checked against a plain computation written here:
a transfer-learning backbone nested in a Sequential (and its logits twin), a ResNet-style block, a
non-square and a greyscale model, a one-unit sigmoid model, a model of any input size, preprocessing
layers before a nested backbone; Grad-CAM and Grad-CAM++ against the backend's own autodiff; the
layer lookup rule; and one clear ValueError for what is not supported."""
import cv2
import keras
import numpy as np
import pytest
from keras import layers

import kerascam  # noqa: F401
from kerascam.methods import grad_cam, grad_cam_pp, gradcam_weights, gradcampp_weights, layer_cam
from kerascam.methods import score_cam
from kerascam.scoring import score_cam_layers, score_cam_stream


# ---------------------------------------------------------------- plain references, written out here

def plain_score_cam(acts_fn, probs_fn, images, target_fn=None):
    """Score-CAM one image at a time: acts_fn(x) -> (1, h, w, K), probs_fn(x) -> (n, C)."""
    maps = []
    for image in images:
        x = image[None]
        acts = np.asarray(acts_fn(x))[0]
        target = int(np.argmax(probs_fn(x)[0])) if target_fn is None else target_fn
        h, w = image.shape[:2]
        heat = np.zeros((h, w))
        for k in range(acts.shape[-1]):
            up = cv2.resize(acts[..., k].astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
            if up.max() == up.min():
                continue
            mask = (up - up.min()) / (up.max() - up.min())
            heat += probs_fn(x * mask[None, :, :, None])[0, target] * up
        heat = np.maximum(heat, 0)
        maps.append((heat - heat.min()) / (heat.max() - heat.min()) if heat.max() > heat.min() else heat)
    return np.stack(maps)


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def assert_close_maps(fast, plain, r_min=0.99):
    assert fast.shape == plain.shape and fast.dtype == np.float32
    assert np.isfinite(fast).all() and fast.min() >= 0 and fast.max() <= 1
    r = kerascam.maps.pearson(fast, plain)
    assert r.min() >= r_min, r


def backend_gradient(f, a):
    """d f(a) / d a with the backend's autodiff, written independently of kerascam.gradients.gradient."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        a = tf.convert_to_tensor(a)
        with tf.GradientTape() as tape:
            tape.watch(a)
            value = f(a)
        return np.asarray(tape.gradient(value, a))
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(f)(keras.ops.convert_to_tensor(a)))
    pytest.skip(f"no reference gradient written for {backend}")


def plain_gradient_cam(front, back, images, weigh, target=None):
    """ReLU(sum_k w_k A_k) from A = front(x) and the gradient of back(A)[target] (pre-softmax)."""
    acts = np.asarray(front(images))
    scores = np.asarray(back(acts))
    targets = scores.argmax(axis=1) if target is None else np.full(len(images), target)
    onehot = keras.ops.convert_to_tensor(np.eye(scores.shape[1], dtype=np.float32)[targets])
    grads = backend_gradient(lambda a: keras.ops.sum(back(a) * onehot), acts)
    low = np.maximum((weigh(acts.astype(np.float64), grads.astype(np.float64))[:, None, None, :] * acts).sum(-1)
                     if weigh is not layercam_plain else (np.maximum(grads, 0) * acts).sum(-1), 0)
    up = np.stack([cv2.resize(m.astype(np.float32), images.shape[1:3][::-1], interpolation=cv2.INTER_LINEAR)
                   for m in low])
    return kerascam.maps.normalise_maps(up)


def layercam_plain(acts, grads):  # marker: per-pixel weights, handled in plain_gradient_cam
    return None


def images_for(shape, n=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n,) + tuple(shape)).astype(np.float32)


# ---------------------------------------------------------------- models

@pytest.fixture(scope="module")
def mobilenet():
    """The issue's transfer-learning model: MobileNetV2 (alpha 0.35, random weights) in a Sequential."""
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3), alpha=0.35)
    head = layers.Dense(5, activation="softmax", name="probs")
    model = keras.Sequential([keras.Input((64, 64, 3)), backbone, layers.GlobalAveragePooling2D(name="gap"), head])
    # random BatchNorm statistics, so the untrained network's maps are not flat
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            rng = np.random.default_rng(len(layer.name))
            layer.set_weights([gamma, beta + rng.normal(0, 0.5, beta.shape).astype(np.float32), mean, var])
    w, b = head.get_weights()
    head.set_weights([w * 40, b])
    return model, backbone


def logits_twin(model):
    """The same layers, the head Dense without its softmax (same weights)."""
    backbone, gap, head = model.layers
    logits = layers.Dense(head.units, name="logits")
    twin = keras.Sequential([keras.Input(model.inputs[0].shape[1:]), backbone, gap, logits])
    logits.set_weights(head.get_weights())
    return twin


def resnet_block():
    """conv -> [conv -> BN] + shortcut -> Add -> Activation(relu) -> GAP -> Dense(4) -> softmax."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((16, 16, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1)(inp)
    stem = layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(x)
    y = layers.Conv2D(8, 3, padding="same", name="branch_conv")(stem)
    y = layers.BatchNormalization(name="branch_bn")(y)
    merged = layers.Activation("relu", name="block_out")(layers.Add(name="add")([stem, y]))
    logits = layers.Dense(4, name="logits")(layers.GlobalAveragePooling2D()(merged))
    model = keras.Model(inp, layers.Softmax(name="softmax")(logits))
    front = keras.Model(inp, merged)
    dense = model.get_layer("logits")
    back = lambda a: dense(keras.ops.mean(a, axis=(1, 2)))  # noqa: E731  (the head, from the activation on)
    return model, front, back


def small_cnn(shape, outputs, activation, name_prefix="m"):
    keras.utils.set_random_seed(2)
    inp = keras.Input(shape)
    x = layers.Rescaling(1 / 255)(inp)
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name=f"{name_prefix}_conv1")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name=f"{name_prefix}_conv2")(x)
    x = layers.GlobalAveragePooling2D()(x) if shape[0] is None else layers.Flatten()(x)
    return keras.Model(inp, layers.Dense(outputs, activation=activation, name="head")(x))


def submodel(model, layer_name):
    return keras.Model(model.inputs, model.get_layer(layer_name).output)


def predict(model):
    return lambda x: np.asarray(model.predict_on_batch(x))


# ---------------------------------------------------------------- Score-CAM on each kind of model

def test_nested_backbone_inner_layer_matches_the_plain_computation(mobilenet):
    model, backbone = mobilenet
    x = images_for((64, 64, 3))
    inner = keras.Model(backbone.input, backbone.get_layer("block_16_project_BN").output)
    fast = score_cam(model, x, layer="block_16_project_BN", precision="float32")  # a BatchNorm, 4-D
    assert_close_maps(fast, plain_score_cam(predict(inner), predict(model), x))
    # the default, found inside: the block output after Conv_1 (a linear conv before its BatchNorm) and the ReLU
    assert kerascam.layers.find_layer(model).path == (backbone.name, "out_relu")


def test_logits_twin_gives_the_softmax_models_maps(mobilenet):
    model, _ = mobilenet
    twin = logits_twin(model)
    x = images_for((64, 64, 3), seed=1)
    np.testing.assert_allclose(kerascam.graph.predict_probabilities(twin, x), model.predict_on_batch(x), atol=1e-5)
    a = score_cam(model, x, layer="block_16_project", precision="float32")
    b = score_cam(twin, x, layer="block_16_project", precision="float32")
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_resnet_block_activation_after_add():
    model, front, back = resnet_block()
    x = images_for((16, 16, 3), n=3)
    fast = score_cam(model, x, layer="block_out", precision="float32")
    assert_close_maps(fast, plain_score_cam(predict(front), predict(model), x))
    add_maps = score_cam(model, x, layer="add", precision="float32")  # the Add itself, 4-D too
    assert add_maps.shape == (3, 16, 16)


def test_non_square_and_greyscale_models():
    for shape in ((12, 20, 3), (16, 16, 1)):
        model = small_cnn(shape, 3, "softmax")
        x = images_for(shape, n=2)
        fast = score_cam(model, x, precision="float32")
        assert fast.shape == (2,) + shape[:2]
        assert_close_maps(fast, plain_score_cam(predict(submodel(model, "m_conv2")), predict(model), x))


def test_one_unit_sigmoid_explains_class_1_with_p_and_class_0_with_1_minus_p():
    model = small_cnn((16, 16, 3), 1, "sigmoid")
    x = images_for((16, 16, 3), n=2, seed=3)
    p = predict(model)

    def two_classes(images):
        p1 = p(images)
        return np.concatenate([1 - p1, p1], axis=1)

    np.testing.assert_allclose(kerascam.graph.predict_probabilities(model, x), two_classes(x), atol=1e-5)
    acts = predict(submodel(model, "m_conv2"))
    for target in (0, 1):
        fast = score_cam(model, x, class_index=target, precision="float32")
        assert_close_maps(fast, plain_score_cam(acts, two_classes, x, target_fn=target))


@pytest.mark.parametrize("units", [2, 3])
def test_sigmoid_head_of_several_units_scores_its_own_probabilities(units):
    """Dense(units, activation="sigmoid"), two units included: the probabilities explained are the
    model's own (no softmax over them), and Score-CAM weighs each mask by that sigmoid."""
    model = small_cnn((16, 16, 3), units, "sigmoid")
    x = images_for((16, 16, 3), n=2, seed=3)
    probs = predict(model)
    assert not np.allclose(probs(x), softmax(probs(x)), atol=1e-3)  # the two rules differ on this model
    np.testing.assert_allclose(kerascam.graph.predict_probabilities(model, x), probs(x), atol=1e-6)
    fast = score_cam(model, x, class_index=1, precision="float32")
    assert_close_maps(fast, plain_score_cam(predict(submodel(model, "m_conv2")), probs, x, target_fn=1), 0.999)


def test_any_input_size_model_gives_maps_at_the_images_size():
    model = small_cnn((None, None, 3), 3, "softmax")
    acts, probs = predict(submodel(model, "m_conv2")), predict(model)
    for shape in ((20, 28, 3), (12, 12, 3)):
        x = images_for(shape, n=2)
        fast = score_cam(model, x, precision="float32")
        assert fast.shape == (2,) + shape[:2]
        assert_close_maps(fast, plain_score_cam(acts, probs, x))
        assert grad_cam(model, x).shape == (2,) + shape[:2]
    with pytest.raises(ValueError, match="share a size"):
        list(score_cam_stream(model, [images_for((20, 28, 3)), images_for((12, 12, 3))], precision="float32"))


def test_preprocessing_layers_before_a_nested_backbone():
    keras.utils.set_random_seed(3)
    backbone = keras.Sequential([keras.Input((16, 16, 3)),
                                 layers.Conv2D(4, 3, padding="same", activation="relu", name="inner_conv"),
                                 layers.Conv2D(4, 3, padding="same", name="inner_linear")], name="backbone")
    inp = keras.Input((16, 16, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1, name="pre")(inp)
    x = backbone(x)
    out = layers.Dense(3, activation="softmax")(layers.Flatten()(x))
    model = keras.Model(inp, out)
    images = images_for((16, 16, 3), n=2)
    inner = keras.Model(backbone.inputs, backbone.get_layer("inner_conv").output)
    acts = lambda v: inner.predict_on_batch(v / 127.5 - 1)  # noqa: E731
    for layer in ("inner_conv", "backbone/inner_conv", backbone.get_layer("inner_conv")):
        assert_close_maps(score_cam(model, images, layer=layer, precision="float32"),
                          plain_score_cam(acts, predict(model), images))
    # the default, found inside: the last conv, a linear one (no normalisation after it), whose activations go negative
    assert kerascam.layers.find_layer(model).path == ("backbone", "inner_linear")


# ---------------------------------------------------------------- the gradient methods

@pytest.mark.parametrize("weights", ["gradcam", "gradcampp"])
def test_gradient_methods_on_the_resnet_block_match_the_backends_autodiff(weights):
    model, front, back = resnet_block()
    x = images_for((16, 16, 3), n=3, seed=4)
    method, weigh = {"gradcam": (grad_cam, gradcam_weights), "gradcampp": (grad_cam_pp, gradcampp_weights)}[weights]
    for target in (None, 2):
        fast = method(model, x, layer="block_out", class_index=target)
        plain = plain_gradient_cam(front, back, x, weigh, target)
        np.testing.assert_allclose(fast, plain, atol=2e-4)


@pytest.mark.parametrize("method,weigh", [(grad_cam, gradcam_weights), (grad_cam_pp, gradcampp_weights),
                                          (layer_cam, layercam_plain)])
def test_gradient_methods_on_the_nested_backbone_match_the_backends_autodiff(mobilenet, method, weigh):
    model, backbone = mobilenet
    x = images_for((64, 64, 3), seed=5)
    front = keras.Model(backbone.input, backbone.get_layer("Conv_1").output)
    bn, relu = backbone.get_layer("Conv_1_bn"), backbone.get_layer("out_relu")
    dense = model.get_layer("probs")
    w, b = (keras.ops.convert_to_tensor(v) for v in dense.get_weights())
    back = lambda a: keras.ops.matmul(keras.ops.mean(relu(bn(a, training=False)), axis=(1, 2)), w) + b  # noqa: E731
    fast = method(model, x, layer="Conv_1")
    np.testing.assert_allclose(fast, plain_gradient_cam(front, back, x, weigh), atol=2e-4)


def test_layer_cam_by_hand():
    """One channel, A = [[1, 2], [3, 4]] -> score = sum(A * [[1, -1], [2, 0]]): the gradient is that
    pattern, Layer-CAM's map is ReLU(g) A = [[1, 0], [6, 0]] before upsampling (a 2x2 image here)."""
    inp = keras.Input((2, 2, 1))
    conv = layers.Conv2D(1, 1, use_bias=False, name="conv")
    x = conv(inp)
    dense = layers.Dense(2, use_bias=False)
    model = keras.Model(inp, layers.Softmax()(dense(layers.Flatten()(x))))
    conv.set_weights([np.ones((1, 1, 1, 1), np.float32)])
    dense.set_weights([np.array([[1, 0], [-1, 0], [2, 0], [0, 0]], np.float32)])
    image = np.array([[1, 2], [3, 4]], np.float32).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(layer_cam(model, image, class_index=0)[0], [[1 / 6, 0], [1, 0]], atol=1e-6)


# ---------------------------------------------------------------- the layer rule, and what is refused

def test_layer_lookup_names_paths_objects_and_ambiguity():
    def backbone(name):
        return keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(2, 3, padding="same", name="conv")], name=name)

    a, b = backbone("left"), backbone("right")
    inp = keras.Input((8, 8, 3))
    merged = layers.Concatenate()([a(inp), b(inp)])
    model = keras.Model(inp, layers.Dense(2, activation="softmax")(layers.Flatten()(merged)))
    with pytest.raises(ValueError, match="ambiguous.*left/conv.*right/conv"):
        kerascam.layers.find_layer(model, "conv")
    assert kerascam.layers.find_layer(model, "right/conv").layer is b.get_layer("conv")
    assert kerascam.layers.find_layer(model, a.get_layer("conv")).path == ("left", "conv")
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        kerascam.layers.find_layer(model, "nope")
    x = images_for((8, 8, 3), n=1)
    assert score_cam(model, x, layer="right/conv", precision="float32").shape == (1, 8, 8)
    # a backbone shared by two models is explained in each on its own path
    other = keras.Sequential([keras.Input((8, 8, 3)), a, layers.Flatten(), layers.Dense(3, activation="softmax")])
    maps, probs = score_cam_layers(other, x, ["conv"], precision="float32")
    assert list(maps) == ["left/conv"] and probs.shape == (1, 3)


@pytest.mark.parametrize("units", [3, 1])
def test_layer_names_that_equal_our_own_ops_names_after_a_fresh_start(tmp_path, units):
    """A loaded model's layers keep their names, and Keras's name counter restarts with each process:
    the explainer's own graph pieces must not be named like any of them (a graph's names are unique;
    "The name "cast" is used 2 times" was the message). The maps equal the same weights' before saving."""
    inp = keras.Input((8, 8, 3), name="images")
    x = layers.Conv2D(4, 3, padding="same", name="delta0")(inp)
    x = layers.Activation("relu", name="cast")(x)
    x = layers.Add(name="add")([x, layers.Conv2D(4, 1, name="concatenate")(x)])
    x = layers.Dense(units, name="softmax")(layers.GlobalAveragePooling2D(name="truediv")(x))
    model = keras.Model(inp, layers.Activation("sigmoid" if units == 1 else "softmax", name="sigmoid")(x))
    images = images_for((8, 8, 3), n=2)
    methods = [lambda m, layer: score_cam(m, images, layer=layer, precision="float32"),
               lambda m, layer: grad_cam(m, images, layer=layer), lambda m, layer: grad_cam_pp(m, images, layer=layer)]
    before = [method(model, layer) for layer in ("cast", "add") for method in methods]
    model.save(tmp_path / "named.keras")
    keras.backend.clear_session()  # what a new process starts with
    loaded = keras.saving.load_model(tmp_path / "named.keras")
    after = [method(loaded, layer) for layer in ("cast", "add") for method in methods]
    for a, b in zip(before, after):
        np.testing.assert_allclose(b, a, atol=1e-6)


def test_layers_named_alike_at_three_depths_are_each_explained_at_their_own_place():
    """A layer "conv" inside "backbone/inner", one inside "backbone" and one outside (a backbone loaded in a
    fresh process and wrapped in new layers gets such names): each nested model is rebuilt as its own
    sub-model, so each "conv" is explained where it is, against a plain per-image Score-CAM and the
    backend's autodiff on the pre-softmax scores."""
    keras.utils.set_random_seed(3)
    convs = [layers.Conv2D(4, 3, padding="same", activation="relu", name="conv") for _ in range(3)]
    inner = keras.Sequential([keras.Input((8, 8, 3)), convs[0]], name="inner")
    mid_in = keras.Input((8, 8, 3))
    backbone = keras.Model(mid_in, convs[1](inner(mid_in)), name="backbone")
    inp = keras.Input((8, 8, 3))
    gap, dense = layers.GlobalAveragePooling2D(), layers.Dense(3, activation="softmax")
    model = keras.Model(inp, dense(gap(convs[2](backbone(inp)))))
    w, b = (keras.ops.convert_to_tensor(v) for v in dense.get_weights())
    images = images_for((8, 8, 3), n=3, seed=6)
    with pytest.raises(ValueError, match="ambiguous; pass one of these paths: backbone/inner/conv, backbone/conv, "
                                         "/conv"):
        kerascam.layers.find_layer(model, "conv")

    def run(x, start, stop):
        for conv in convs[start:stop]:
            x = conv(x)
        return x

    for depth, path in enumerate(["backbone/inner/conv", "backbone/conv", "/conv"]):
        assert kerascam.layers.find_layer(model, path).layer is convs[depth]
        front = lambda x, d=depth: run(x, 0, d + 1)  # noqa: E731
        back = lambda a, d=depth: keras.ops.matmul(keras.ops.mean(run(a, d + 1, 3), axis=(1, 2)), w) + b  # noqa: E731
        plain = plain_score_cam(front, lambda x: np.asarray(model(x)), images)
        assert_close_maps(score_cam(model, images, layer=path, precision="float32"), plain)
        np.testing.assert_allclose(grad_cam(model, images, layer=path),
                                   plain_gradient_cam(front, back, images, gradcam_weights), atol=2e-4)
    maps, _ = score_cam_layers(model, images, kerascam.layers.conv_layers(model), precision="float32")  # what --all-layers runs
    assert list(maps) == ["backbone/inner/conv", "backbone/conv", "conv"]
    np.testing.assert_array_equal(maps["conv"], score_cam(model, images, layer="/conv", precision="float32"))


def test_multi_input_multi_output_without_a_choice_and_subclassed_models_get_one_clear_error():
    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    conv = layers.Conv2D(2, 3, name="conv")
    two_in = keras.Model([a, b], layers.Dense(2)(layers.Flatten()(layers.Add()([conv(a), conv(b)]))))
    x = keras.Input((8, 8, 3))
    y = layers.Flatten()(layers.Conv2D(2, 3)(x))
    two_out = keras.Model(x, [layers.Dense(2)(y), layers.Dense(3)(y)])
    images = images_for((8, 8, 3), n=1)
    for model, message in ((two_in, "several inputs .*pass input="), (two_out, "several outputs .*pass output=")):
        for method in (score_cam, grad_cam):
            with pytest.raises(ValueError, match=message):
                method(model, images)
    flat = layers.Flatten(name="flat")
    one_out = keras.Model(x, layers.Dense(2)(flat(layers.Conv2D(2, 3)(x))))
    with pytest.raises(ValueError, match="needs a 4-D"):
        score_cam(one_out, images, layer="flat")

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv, self.dense = layers.Conv2D(2, 3), layers.Dense(2)

        def call(self, v):
            return self.dense(keras.ops.mean(self.conv(v), axis=(1, 2)))

    subclassed = Subclassed()
    subclassed(images)
    with pytest.raises(ValueError, match="subclassed"):
        score_cam(subclassed, images)
    # channels-first, even inside a nested backbone: masks and maps would take the wrong axes, silently
    inner = keras.Sequential([keras.Input((3, 8, 8)), layers.Conv2D(2, 3, data_format="channels_first", name="cf")],
                             name="backbone")
    first = keras.Sequential([keras.Input((3, 8, 8)), inner, layers.Flatten(), layers.Dense(2)])
    for method in (score_cam, grad_cam):
        with pytest.raises(ValueError, match="backbone/cf computes channels-first.*channels_last"):
            method(first, np.zeros((1, 3, 8, 8), np.float32))


def test_images_of_the_wrong_shape_or_values_are_clear_errors(mobilenet):
    model, _ = mobilenet
    for bad, message in ((np.zeros((1, 32, 32, 3)), r"\(N, 64, 64, 3\)"), (np.zeros((1, 64, 64, 1)), r"\(N, 64"),
                         (np.full((1, 64, 64, 3), np.nan), "NaN"), (np.array([["a"]]), "numeric")):
        with pytest.raises(ValueError, match=message):
            score_cam(model, bad)
    # the shape the caller passed is the one named, and a greyscale batch without its channel axis is told so
    grey = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(2, 3, name="conv"), layers.Flatten(),
                             layers.Dense(2)])
    with pytest.raises(ValueError, match=r"got \(5, 8, 8\); a batch of greyscale .*images\[\.\.\., None\]"):
        score_cam(grey, np.zeros((5, 8, 8)))
    assert score_cam(grey, images_for((8, 8, 1), n=5)).shape == (5, 8, 8)
