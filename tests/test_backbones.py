"""The backbones people bring: the layer layer=None picks on keras.applications models (random weights,
64 x 64 pictures), a warning where a map is all zero, and operations of a functional graph (`x + y`,
keras.ops.concatenate) explained like layers by every method, each against a plain computation written
here (Score-CAM per picture and channel; the gradient methods with the backend's own autodiff)."""
import cv2
import keras
import numpy as np
import pytest
from keras import layers

import kerascam
from conftest import ROOT, run_cli, write_image
from kerascam.layers import find_layer, path_name
from test_any_model import assert_close_maps, backend_gradient, images_for

SIDE = 64  # the smallest size that leaves every backbone below a 2 x 2 grid at its last stage


# ---------------------------------------------------------------- the default layer on keras.applications

def backbone(name, **options):
    keras.utils.set_random_seed(0)
    return getattr(keras.applications, name)(weights=None, include_top=True, classes=5,
                                             input_shape=(SIDE, SIDE, 3), **options)


def mobilenet_v3_small_pick(model, ref):
    """The hard-swish Activation after conv_1's BatchNorm, the last 2 x 2 block output: not the 1 x 1
    classifier conv `logits` (nor `conv_2`, after the global pooling)."""
    return (isinstance(ref.layer, keras.layers.Activation)
            and tuple(ref.layer.output.shape[1:]) == (2, 2, 576))


def convnext_pick(model, ref):
    """The last block's residual add, an operation of the graph (`inputs + layer(x)`), not a layer."""
    adds = [op for op in model.operations if kerascam.layers.is_operation(op) and type(op).__name__ == "Add"]
    return ref.layer is adds[-1] and ref.path == (adds[-1].name,)


BACKBONES = {  # name: (the pick, as a name or a check; options)
    "MobileNetV3Small": (mobilenet_v3_small_pick, {}),
    "ResNet50": ("conv5_block3_out", {}),  # the Activation after the add, not the branch conv5_block3_3_conv
    "ResNet50V2": ("post_relu", {}),  # after the final BatchNorm, not the pre-activation add
    "DenseNet121": ("relu", {}),
    "EfficientNetB0": ("top_activation", {}),  # not top_conv, a linear conv before top_bn
    "ConvNeXtTiny": (convnext_pick, {}),
    "VGG16": ("block5_conv3", {}),  # a conv with its ReLU, before the pooling
}
HEAVY = {"DenseNet121", "ConvNeXtTiny"}  # the slowest to build and trace (about 10 s each on 2 cores)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.heavy) if n in HEAVY else n for n in BACKBONES])
def test_default_layer_on_each_backbone_is_a_block_output_with_a_map(name):
    pick, options = BACKBONES[name]
    model = backbone(name, **options)
    ref = find_layer(model)
    assert (ref.path == (pick,)) if isinstance(pick, str) else pick(model, ref), path_name(ref)
    x = images_for((SIDE, SIDE, 3), n=2)
    default = kerascam.grad_cam(model, x)
    assert default.reshape(2, -1).max(axis=1).min() > 0  # a map on every picture, not a blank one
    np.testing.assert_array_equal(default, kerascam.grad_cam(model, x, layer=path_name(ref)))


def test_default_layer_inside_a_backbone_nested_in_a_sequential():
    keras.utils.set_random_seed(0)
    inner = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(SIDE, SIDE, 3), alpha=0.35)
    model = keras.Sequential([keras.Input((SIDE, SIDE, 3)), inner, layers.GlobalAveragePooling2D(),
                              layers.Dense(3, activation="softmax")])
    # Conv_1 is linear and feeds Conv_1_bn: the block's output is out_relu, found inside the backbone
    assert find_layer(model).path == (inner.name, "out_relu")
    assert find_layer(model, "Conv_1").path == (inner.name, "Conv_1")  # still explainable by name


@pytest.mark.parametrize("name", ["cifar10", "characters"])
def test_the_shipped_models_keep_their_last_relu_conv(name):
    from model import load_model

    model = load_model(ROOT / "models" / f"{name}.keras")[0]
    assert find_layer(model).path == ("block4_conv3",)


def one_by_one_model():
    """A conv at 8 x 8, global pooling kept 4-D, then a 1 x 1 conv `head_conv` (a 1 x 1 grid) and the classifier."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="conv")(layers.Rescaling(1 / 255)(inp))
    x = layers.Conv2D(6, 1, activation="relu", name="head_conv")(layers.GlobalAveragePooling2D(keepdims=True)(x))
    return keras.Model(inp, layers.Dense(3, activation="softmax", name="probs")(layers.Flatten()(x)))


def test_a_one_by_one_layer_is_never_the_default_and_warns_on_the_command_line(tmp_path):
    model = one_by_one_model()
    assert find_layer(model).path == ("conv",)  # the last 4-D layer with a grid larger than 1 x 1
    model.save(tmp_path / "m.keras")
    image = write_image(tmp_path / "p.png", np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    r = run_cli("scorecam.py", image, "--model", tmp_path / "m.keras", "--layer", "head_conv", "--out",
                tmp_path / "f.png", "--precision", "float32")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "'head_conv'" in warnings[0] and "1x1" in warnings[0], r.stderr
    assert (tmp_path / "f.png").is_file()


def test_the_default_layer_gives_no_warning_and_a_folder_of_blank_maps_one(tmp_path, capsys):
    import scorecam

    model = one_by_one_model()
    model.save(tmp_path / "m.keras")
    for i in range(2):
        write_image(tmp_path / "pics" / f"{i}.png",
                    np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    common = ["--model", str(tmp_path / "m.keras"), "--precision", "float32"]
    with pytest.raises(SystemExit) as done:
        scorecam.main([str(tmp_path / "pics" / "0.png"), "--out", str(tmp_path / "a.png"), *common])
    assert done.value.code == 0 and "warning" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        scorecam.main(["--folder", str(tmp_path / "pics"), "--out", str(tmp_path / "out"), "--layer", "head_conv",
                       *common])
    err = capsys.readouterr().err
    assert done.value.code == 0 and err.count("warning: layer 'head_conv'") == 1, err


# ---------------------------------------------------------------- operations as layers

def convnext_block():
    """A ConvNeXt-style block, x + layer(x) with the add an operation of the graph: returns (model, the
    add's name, front: pictures -> the add's output, back: that output -> the pre-softmax scores)."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(6, 2, strides=2, name="stem")(layers.Rescaling(1 / 127.5, offset=-1)(inp))
    y = layers.LayerNormalization(epsilon=1e-6, name="ln")(layers.DepthwiseConv2D(3, padding="same", name="dw")(x))
    y = layers.Dense(6, name="pw2")(layers.Dense(12, activation="gelu", name="pw1")(y))
    block = x + y
    logits = layers.Dense(4, name="logits")
    model = keras.Model(inp, layers.Softmax()(logits(layers.GlobalAveragePooling2D()(block))))
    logits.set_weights([w * 8 for w in logits.get_weights()])  # confident enough to tell channels apart
    return model, block._keras_history.operation.name, keras.Model(inp, block), \
        lambda a: logits(keras.ops.mean(a, axis=(1, 2)))


def concatenated():
    """Two branches joined by keras.ops.concatenate (an operation), then a ReLU conv and the classifier."""
    keras.utils.set_random_seed(6)
    inp = keras.Input((12, 12, 3))
    x = layers.Rescaling(1 / 255)(inp)
    a = layers.Conv2D(3, 3, padding="same", activation="relu", name="a")(x)
    b = layers.Conv2D(2, 1, name="b")(layers.AveragePooling2D(1)(x))
    joined = keras.ops.concatenate([a, b], axis=-1)
    mix, head = layers.Conv2D(4, 3, padding="same", activation="relu", name="mix"), layers.Dense(3, name="head")
    model = keras.Model(inp, layers.Activation("softmax")(head(layers.GlobalAveragePooling2D()(mix(joined)))))
    head.set_weights([w * 8 for w in head.get_weights()])
    return model, joined._keras_history.operation.name, keras.Model(inp, joined), \
        lambda t: head(keras.ops.mean(mix(t), axis=(1, 2)))


OPERATION_MODELS = {"x + layer(x)": convnext_block, "ops.concatenate": concatenated}


def normalise(heat):
    heat = np.maximum(heat, 0)
    return (heat - heat.min()) / (heat.max() - heat.min()) if heat.max() > heat.min() else np.zeros_like(heat)


def upsample(low, size):
    return cv2.resize(np.asarray(low, np.float32), size[::-1], interpolation=cv2.INTER_LINEAR)


def plain_score_cam(front, probs, images, max_n=None):
    """Per picture: each channel (the max_n of largest spatial std) upsampled, min-max normalised, masks the
    picture; its weight is the predicted class's probability there; ReLU of the weighted sum, normalised."""
    maps = []
    for image in images:
        acts = np.asarray(front(image[None]), np.float32)[0]
        target = int(np.argmax(probs(image[None])[0]))
        channels = np.arange(acts.shape[-1])
        if max_n:
            channels = np.argsort(-acts.reshape(-1, acts.shape[-1]).std(axis=0, dtype=np.float64), kind="stable")[:max_n]
        heat = np.zeros(image.shape[:2])
        for k in channels:
            up = upsample(acts[..., k], image.shape[:2])
            if up.max() > up.min():
                mask = (up - up.min()) / (up.max() - up.min())
                heat += float(probs(image[None] * mask[None, :, :, None])[0, target]) * up
        maps.append(normalise(heat))
    return np.stack(maps)


def plain_gradient_maps(front, back, images, method):
    """Grad-CAM, Grad-CAM++, Layer-CAM and HiRes-CAM from A = front(x) and the backend's autodiff gradient g
    of the predicted class's pre-softmax score back(A); Eigen-CAM from A alone."""
    acts = np.asarray(front(images), np.float32)
    a = acts.astype(np.float64)
    if method == "eigencam":
        n, h, w, k = a.shape
        flat = a.reshape(n, h * w, k)
        centred = flat - flat.mean(axis=1, keepdims=True)
        low = []
        for c, f in zip(centred, flat):
            projection = c @ np.linalg.svd(c, full_matrices=False)[2][0]
            sign = np.sign(((projection - projection.mean()) * f.sum(axis=1)).sum()) or 1
            low.append((sign * projection).reshape(h, w))
    else:
        scores = np.asarray(back(acts))
        onehot = keras.ops.convert_to_tensor(np.eye(scores.shape[1], dtype=np.float32)[scores.argmax(axis=1)])
        g = backend_gradient(lambda t: keras.ops.sum(back(t) * onehot), acts).astype(np.float64)
        if method == "gradcam":
            low = (g.mean(axis=(1, 2), keepdims=True) * a).sum(-1)
        elif method == "gradcampp":
            denom = 2 * g**2 + a.sum(axis=(1, 2), keepdims=True) * g**3
            alpha = np.where(denom != 0, g**2 / np.where(denom != 0, denom, 1), 0)
            low = ((alpha * np.maximum(g, 0)).sum(axis=(1, 2), keepdims=True) * a).sum(-1)
        else:  # layercam: ReLU(g) per pixel; hirescam: g per pixel
            low = ((np.maximum(g, 0) if method == "layercam" else g) * a).sum(-1)
    return np.stack([normalise(upsample(np.maximum(m, 0), images.shape[1:3])) for m in low])


@pytest.mark.parametrize("which", list(OPERATION_MODELS))
def test_operation_nodes_are_found_listed_and_picked(which):
    model, name, _, _ = OPERATION_MODELS[which]()
    op = next(o for o in model.operations if o.name == name)
    assert kerascam.layers.is_operation(op)
    ref = find_layer(model, name)
    assert ref.layer is op and ref.path == (name,) and find_layer(model, op) == ref
    assert ref in kerascam.all_layers(model, operations=True) and ref not in kerascam.all_layers(model)
    with pytest.raises(ValueError, match=f"no layer named 'nope'.*4-D.*{name}"):
        find_layer(model, "nope")
    if which == "x + layer(x)":  # the block's output is the add
        assert find_layer(model) == ref


@pytest.mark.parametrize("which", list(OPERATION_MODELS))
def test_operation_nodes_explained_by_score_cam_match_the_plain_computation(which):
    model, name, front, _ = OPERATION_MODELS[which]()
    x = images_for(model.inputs[0].shape[1:], n=3, seed=2)
    probs = lambda v: np.asarray(model.predict_on_batch(v))  # noqa: E731
    plain = plain_score_cam(lambda v: front.predict_on_batch(v), probs, x)
    assert plain.reshape(len(x), -1).max(axis=1).min() > 0  # a map on every picture
    assert_close_maps(kerascam.score_cam(model, x, layer=name, precision="float32"), plain)
    fast = kerascam.faster_score_cam(model, x, layer=name, max_n=3, precision="float32")
    assert_close_maps(fast, plain_score_cam(lambda v: front.predict_on_batch(v), probs, x, max_n=3))


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "layercam", "hirescam", "eigencam"])
@pytest.mark.parametrize("which", list(OPERATION_MODELS))
def test_operation_nodes_explained_by_gradient_and_activation_methods_match_autodiff(which, method):
    model, name, front, back = OPERATION_MODELS[which]()
    x = images_for(model.inputs[0].shape[1:], n=3, seed=3)
    fast = kerascam.explain(method, model, x, layer=name)
    plain = plain_gradient_maps(front, back, x, method)
    assert plain.reshape(len(x), -1).max(axis=1).min() > 0
    assert_close_maps(fast, plain, 0.999)
    np.testing.assert_allclose(fast, plain, atol=1e-3)


# ---------------------------------------------------------------- batch_size="auto"

def small_cnn():
    keras.utils.set_random_seed(7)
    inp = keras.Input((None, None, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(layers.Rescaling(1 / 255)(inp))
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="c2")(layers.MaxPooling2D()(x))
    return keras.Model(inp, layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling2D()(x)))


def forced(fastest, compile_s=0.0):
    """A stub for batching._timer: every candidate runs at 100 pictures/s, `fastest` at 1000, and compiling
    takes compile_s; in the order batching times them (256 compiled and timed, then 32, 64, 128). Counts its calls."""
    from kerascam.batching import CANDIDATES, DEFAULT

    def run(b):
        return b / (1000.0 if b == fastest else 100.0)
    ticks = [0.0, compile_s + run(DEFAULT), compile_s + 2 * run(DEFAULT)]
    for b in CANDIDATES:
        if b != DEFAULT:
            ticks += [ticks[-1], ticks[-1] + run(b)]
    clock = iter(ticks)

    def timer():
        timer.calls += 1
        return next(clock)
    timer.calls = 0
    return timer


@pytest.fixture
def explainers(monkeypatch):
    """The batch size of every Explainer built, the call's own last."""
    from kerascam import engine, scoring

    sizes, original = [], engine.Explainer.__init__

    def init(self, model, layers, batch_size, *args, **kwargs):
        sizes.append(batch_size)
        original(self, model, layers, batch_size, *args, **kwargs)
    monkeypatch.setattr(scoring.Explainer, "__init__", init)
    return sizes


@pytest.mark.parametrize("fastest", [32, 64, 128, 256])
def test_auto_batch_size_keeps_the_fastest_and_the_maps_do_not_change(monkeypatch, explainers, fastest):
    from kerascam import batching

    model, x = small_cnn(), images_for((16, 16, 3), n=5)
    monkeypatch.setattr(batching, "AUTO_MIN_PASSES", 0)  # this small call measured as a large one would be
    monkeypatch.setattr(batching, "AUTO_SHARE", 0)
    monkeypatch.setattr(batching, "_timer", forced(fastest))
    auto = kerascam.score_cam(model, x, precision="float32")
    assert explainers[-1] == fastest and batching._timer.calls == 2 * len(batching.CANDIDATES) + 1
    for b in (32, 256, 7):
        np.testing.assert_allclose(kerascam.score_cam(model, x, batch_size=b, precision="float32"), auto, atol=1e-5)
    assert explainers[-1] == 7  # an int is used as it is, nothing measured
    kerascam.score_cam(model, x, precision="float32")
    assert explainers[-1] == fastest and batching._timer.calls == 2 * len(batching.CANDIDATES) + 1  # remembered


def test_auto_batch_size_is_measured_once_per_model_layer_input_shape_precision_backend_and_device(monkeypatch):
    from kerascam import batching, cache
    from kerascam.devices import first_device

    model = small_cnn()
    monkeypatch.setattr(batching, "AUTO_MIN_PASSES", 0)  # these small calls measured as large ones would be
    monkeypatch.setattr(batching, "AUTO_SHARE", 0)
    monkeypatch.setattr(batching, "_timer", lambda: 0.0)  # every candidate as fast
    for layer, side, precision in (("c2", 16, "float32"), ("c2", 16, "float32"), ("c1", 16, "float32"),
                                   ("c2", 12, "float32"), ("c2", 16, "bfloat16")):
        kerascam.score_cam(model, images_for((side, side, 3), n=2), layer=layer, precision=precision)
    keys = [key for key in cache._cache[id(model)][1] if key[0] == "auto_batch_size"]
    measured = [key for key in keys if key[-1] != "default"]
    assert len(measured) == 4 and len(keys) == 8  # the second call found the first's measurement
    assert {key[1:3] for key in keys} == {(first_device(), keras.backend.backend())}
    assert {(key[3], key[5], key[6]) for key in measured} == {((("c2",),), "float32", (16, 16, 3)),
                                                           ((("c1",),), "float32", (16, 16, 3)),
                                                           ((("c2",),), "float32", (12, 12, 3)),
                                                           ((("c2",),), "bfloat16", (16, 16, 3))}


def test_a_call_too_small_to_pay_for_the_measurement_keeps_256(monkeypatch, explainers):
    from kerascam import batching

    model, x = small_cnn(), images_for((16, 16, 3), n=3)
    monkeypatch.setattr(batching, "_timer", forced(32))
    kerascam.score_cam(model, x, precision="float32")  # 3 pictures x 6 channels: far below AUTO_MIN_PASSES
    assert explainers == [256] and batching._timer.calls == 0
    monkeypatch.setattr(batching, "AUTO_MIN_PASSES", 3 * 6 + 1)  # one pass short
    kerascam.score_cam(model, x, precision="float32")
    assert explainers[-1] == 256 and batching._timer.calls == 0
    monkeypatch.setattr(batching, "AUTO_MIN_PASSES", 3 * 6)  # 256 is timed; the others would cost more than
    kerascam.score_cam(model, x, precision="float32")  # 1/AUTO_SHARE of the call's 18 passes at its speed
    assert explainers[-1] == 256 and batching._timer.calls == 3
    monkeypatch.setattr(batching, "AUTO_SHARE", 0)  # a call long enough: the others measured, 256's time kept
    kerascam.score_cam(model, x, precision="float32")
    assert explainers[-1] == 32 and batching._timer.calls == 3 + 2 * (len(batching.CANDIDATES) - 1)
    with pytest.raises(ValueError, match='batch_size must be "auto" or an int'):
        kerascam.score_cam(model, x, batch_size="fast")


def test_slow_compilation_keeps_256_for_a_call_that_would_pay_it_back_only_when_long(monkeypatch):
    from kerascam import batching

    model = small_cnn()
    monkeypatch.setattr(batching, "_timer", forced(64, compile_s=60.0))  # a minute a program, as JAX on a big model
    step = lambda: None  # noqa: E731
    key = ("layer",)
    short = batching.measure_batch_size(model, lambda b: step, key, passes=100_000)  # 1,000 s at 100 pictures/s
    assert short["choice"] == 256 and not short["measured"] and batching._timer.calls == 3
    long = batching.measure_batch_size(model, lambda b: step, key, passes=10_000_000)
    assert long["choice"] == 64 and long["measured"] and long["compile_s"] == pytest.approx(60.0)


def test_the_command_line_takes_batch_size_auto_or_an_int():
    import scorecam

    p = scorecam.parser()
    assert p.parse_args([]).batch_size == "auto" and p.parse_args(["--batch-size", "64"]).batch_size == 64
    with pytest.raises(SystemExit):
        p.parse_args(["--batch-size", "fast"])
