"""Beyond the single-output CNN classifier (issue 28), each case on a model built here with random weights and
checked against a plain computation written here: a vision transformer's token layer, several outputs,
several inputs, regression / segmentation / similarity targets, 1-D signals and 3-D volumes."""
import keras
import numpy as np
import pytest
from keras import layers

import kerascam
from kerascam import targets
from test_any_model import backend_gradient

GRADIENT = {"grad_cam": lambda a, g: g.mean(axis=tuple(range(1, g.ndim - 1))),
            "layer_cam": lambda a, g: np.maximum(g, 0), "hires_cam": lambda a, g: g}


def lin(x, axis, n):
    """Linear interpolation of one axis to n samples, half-pixel centres (PyTorch's align_corners=False)."""
    m = x.shape[axis]
    pos = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0, m - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, m - 1)
    shape = [1] * x.ndim
    shape[axis] = n
    frac = (pos - lo).reshape(shape)
    return np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac


def up(a, size):
    """(*grid) -> size, separably linear: a signal, a picture or a volume."""
    for axis, n in enumerate(size):
        a = lin(a, axis, n)
    return a


def normalise(m):
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else np.zeros_like(m)


def plain_score_cam(grid_acts, score, inputs, image=0):
    """Per picture: each channel of its grid activation upsampled, min-max normalised, masking the image input;
    its weight score(masked inputs, picture) (the other inputs as given); ReLU; normalise."""
    maps = []
    for i in range(len(inputs[image])):
        acts = grid_acts[i]
        size = inputs[image].shape[1:-1]
        heat = np.zeros(size)
        for k in range(acts.shape[-1]):
            u = up(acts[..., k].astype(np.float64), size)
            if acts[..., k].max() == acts[..., k].min():
                continue
            mask = (u - u.min()) / (u.max() - u.min())
            given = [a[i:i + 1] * mask[None, ..., None] if j == image else a[i:i + 1] for j, a in enumerate(inputs)]
            heat += score(given, i) * u
        maps.append(normalise(np.maximum(heat, 0)))
    return np.stack(maps)


def plain_gradient(grid_acts, grads, weigh, size):
    w = weigh(grid_acts, grads)
    low = (grid_acts * w.reshape(w.shape[:1] + (1,) * (grid_acts.ndim - 2) + w.shape[-1:])).sum(-1) if w.ndim == 2 \
        else (grid_acts * w).sum(-1)
    return np.stack([normalise(up(np.maximum(m, 0), size)) for m in low])


def close(fast, plain, r_min=0.99):
    assert fast.shape == plain.shape, (fast.shape, plain.shape)
    r = kerascam.pearson(fast, plain)
    assert r.min() >= r_min, r


# ---------------------------------------------------------------- a vision transformer

class ClassToken(layers.Layer):
    def build(self, shape):
        self.token = self.add_weight(shape=(1, 1, shape[-1]), initializer="random_normal", name="token")

    def call(self, x):
        return keras.ops.concatenate([keras.ops.broadcast_to(self.token, (keras.ops.shape(x)[0], 1, x.shape[-1])), x],
                                     axis=1)


class Positions(layers.Layer):
    def build(self, shape):
        self.table = self.add_weight(shape=tuple(shape[1:]), initializer="random_normal", name="table")

    def call(self, x):
        return x + self.table


def vit(size=(16, 16), patch=4, dim=16, classes=3):
    """Patch-embedding conv, class token, position embedding, two MultiHeadAttention blocks, a head on the
    class token."""
    keras.utils.set_random_seed(3)
    inp = keras.Input(size + (3,))
    x = layers.Conv2D(dim, patch, strides=patch, name="patches")(layers.Rescaling(1 / 255)(inp))
    x = layers.Reshape((-1, dim))(x)
    x = Positions(name="positions")(ClassToken(name="cls")(x))
    for b in (1, 2):
        y = layers.LayerNormalization(name=f"ln{b}")(x)
        x = layers.Add(name=f"attn_add{b}")([x, layers.MultiHeadAttention(2, 8, name=f"mha{b}")(y, y)])
        y = layers.Dense(dim, activation="gelu", name=f"mlp{b}")(layers.LayerNormalization(name=f"ln{b}b")(x))
        x = layers.Add(name=f"block{b}")([x, y])
    head = layers.Dense(classes, name="head")
    cls = layers.Lambda(lambda t: t[:, 0], name="take_cls")(layers.LayerNormalization(name="ln_out")(x))
    model = keras.Model(inp, layers.Softmax(name="probs")(head(cls)))
    tokens = keras.Model(inp, model.get_layer("block2").output)
    back = lambda t: head(model.get_layer("ln_out")(t)[:, 0])  # noqa: E731  (the scores, from the tokens on)
    return model, tokens, back


def on_grid(tokens, grid=(4, 4)):
    return np.asarray(tokens)[:, 1:].reshape((len(tokens),) + grid + (tokens.shape[-1],))


@pytest.fixture(scope="module")
def small_vit():
    return vit()


def test_a_vision_transformers_token_layer_is_laid_on_its_grid_for_every_method(small_vit):
    model, tokens, back = small_vit
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    grid = on_grid(tokens.predict(x, verbose=0))
    predict = lambda given, i: model.predict(given[0], verbose=0)[0, model.predict(x[i:i + 1], verbose=0)[0].argmax()]  # noqa
    plain = plain_score_cam(grid, predict, [x])
    close(kerascam.score_cam(model, x, "block2", precision="float32"), plain)
    assert kerascam.faster_score_cam(model, x, "block2", max_n=16, precision="float32").shape == (2, 16, 16)
    raw = np.asarray(tokens.predict(x, verbose=0))
    scores = np.asarray(back(raw))
    onehot = keras.ops.convert_to_tensor(np.eye(3, dtype=np.float32)[scores.argmax(1)])
    grads = on_grid(backend_gradient(lambda t: keras.ops.sum(back(t) * onehot), raw))
    for name, weigh in GRADIENT.items():
        close(getattr(kerascam, name)(model, x, "block2"), plain_gradient(grid.astype(np.float64), grads, weigh,
                                                                          (16, 16)))
    assert kerascam.grad_cam_pp(model, x, "block2").shape == (2, 16, 16)
    assert kerascam.find_layer(model).path == ("block2",)  # the default: the last block's output, not the patches
    np.testing.assert_array_equal(kerascam.grad_cam(model, x), kerascam.grad_cam(model, x, "block2"))
    assert kerascam.eigen_cam(model, x, "block2").shape == (2, 16, 16)
    # reshape= lays any layout out: here the same grid written by hand
    by_hand = lambda t: keras.ops.reshape(t[:, 1:], (-1, 4, 4, 16))  # noqa: E731
    np.testing.assert_allclose(kerascam.grad_cam(model, x, "block2", reshape=by_hand),
                               kerascam.grad_cam(model, x, "block2"), atol=1e-6)


def test_token_layers_refuse_what_is_no_grid(small_vit):
    model, _, _ = small_vit
    x = np.zeros((1, 16, 16, 3), np.float32)
    with pytest.raises(ValueError, match="it must return 4-D"):
        kerascam.grad_cam(model, x, "block2", reshape=lambda t: t[:, 1:])
    with pytest.raises(ValueError, match="reshape must be a callable"):
        kerascam.score_cam(model, x, "block2", reshape=3)
    assert kerascam.views.token_grid(197, (224, 224)) == (1, (14, 14))
    assert kerascam.views.token_grid(50, (64, 128)) == (0, (5, 10))
    assert kerascam.views.token_grid(21, (16, 16)) == (5, (4, 4))  # a class token and four register tokens
    with pytest.raises(ValueError, match="3 tokens form no grid"):
        kerascam.views.token_grid(3, (16, 16))
    three = layers.Lambda(lambda t: t[:, :3], name="three_tokens")(model.get_layer("block2").output)
    line = keras.Model(model.inputs, layers.Dense(2)(layers.Flatten()(three)))
    with pytest.raises(ValueError, match="3 tokens form no grid.*pass reshape="):
        kerascam.grad_cam(line, x, "three_tokens")


def test_a_keras_hub_vit_backbone_from_a_small_config():
    keras_hub = pytest.importorskip("keras_hub", reason="keras-hub not installed (requirements.txt)")
    keras.utils.set_random_seed(4)
    backbone = keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
                                            hidden_dim=16, mlp_dim=32)
    inp = keras.Input((32, 32, 3))
    cls = layers.Lambda(lambda t: t[:, 0])(backbone(inp))
    model = keras.Model(inp, layers.Dense(3, activation="softmax")(cls))
    x = np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    tokens = keras.Model(backbone.inputs, backbone.get_layer("vit_encoder").output).predict(x, verbose=0)
    grid = on_grid(tokens)
    predict = lambda given, i: model.predict(given[0], verbose=0)[0, model.predict(x[i:i + 1], verbose=0)[0].argmax()]  # noqa
    close(kerascam.score_cam(model, x, "vit_encoder", precision="float32"), plain_score_cam(grid, predict, [x]))
    assert np.isfinite(kerascam.grad_cam(model, x, "vit_encoder")).all()
    assert kerascam.find_layer(model).path[-1] == "vit_encoder"


# ---------------------------------------------------------------- several outputs and inputs

def two_heads():
    keras.utils.set_random_seed(5)
    inp = keras.Input((12, 12, 3), name="picture")
    feats = layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
    pooled = layers.GlobalAveragePooling2D()(feats)
    kind = layers.Dense(3, activation="softmax", name="kind")(pooled)
    age = layers.Dense(1, name="age")(layers.Flatten()(feats))
    return keras.Model(inp, [kind, age]), keras.Model(inp, feats)


def test_several_outputs_explain_the_chosen_head():
    model, feats = two_heads()
    x = np.random.default_rng(2).uniform(0, 1, (2, 12, 12, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"several outputs \(0: 'kind' .*1: 'age'.*pass output="):
        kerascam.score_cam(model, x, "conv")
    with pytest.raises(ValueError, match="no output named 'size'"):
        kerascam.grad_cam(model, x, "conv", output="size")
    acts = feats.predict(x, verbose=0)
    kind = lambda given, i: model.predict(given[0], verbose=0)[0][0, model.predict(x[i:i + 1], verbose=0)[0][0].argmax()]  # noqa
    close(kerascam.score_cam(model, x, "conv", output="kind", precision="float32"), plain_score_cam(acts, kind, [x]))
    np.testing.assert_allclose(kerascam.score_cam(model, x, "conv", output=0, precision="float32"),
                               kerascam.score_cam(model, x, "conv", output="kind", precision="float32"), atol=1e-6)
    age = lambda given, i: -model.predict(given[0], verbose=0)[1][0, 0]  # noqa: E731  (what lowers the age)
    maps = kerascam.score_cam(model, x, "conv", output="age", target=targets.regression(lower=True),
                              precision="float32")
    close(maps, plain_score_cam(acts, age, [x]))
    dense = model.get_layer("age")
    grads = backend_gradient(lambda a: keras.ops.sum(dense(keras.ops.reshape(a, (2, -1)))), acts)
    close(kerascam.grad_cam(model, x, "conv", output="age", target=targets.regression()),
          plain_gradient(acts.astype(np.float64), grads, GRADIENT["grad_cam"], (12, 12)))


def picture_and_numbers():
    keras.utils.set_random_seed(6)
    picture, numbers = keras.Input((10, 10, 3), name="picture"), keras.Input((4,), name="numbers")
    feats = layers.Conv2D(5, 3, padding="same", activation="relu", name="conv")(picture)
    merged = layers.Concatenate()([layers.GlobalAveragePooling2D()(feats), layers.Dense(5)(numbers)])
    return keras.Model([picture, numbers], layers.Dense(3, activation="softmax")(merged)), keras.Model(picture, feats)


def test_several_inputs_mask_the_chosen_one_and_pass_the_others():
    model, feats = picture_and_numbers()
    rng = np.random.default_rng(3)
    x, numbers = rng.uniform(0, 1, (2, 10, 10, 3)).astype(np.float32), rng.normal(0, 3, (2, 4)).astype(np.float32)
    acts = feats.predict(x, verbose=0)
    probs = model.predict([x, numbers], verbose=0)
    score = lambda given, i: model.predict(given, verbose=0)[0, probs[i].argmax()]  # noqa: E731
    plain = plain_score_cam(acts, score, [x, numbers])
    for given in ([x, numbers], {"picture": x, "numbers": numbers}):
        close(kerascam.score_cam(model, given, "conv", precision="float32"), plain)
    maps, explained = kerascam.score_cam_layers(model, [x, numbers], ["conv"], input="picture", precision="float32")
    np.testing.assert_allclose(explained, probs, atol=1e-5)
    assert kerascam.grad_cam(model, [x, numbers], "conv").shape == (2, 10, 10)
    with pytest.raises(ValueError, match="takes 2 inputs"):
        kerascam.score_cam(model, x, "conv")
    with pytest.raises(ValueError, match="not an image-like input"):
        kerascam.score_cam(model, [x, numbers], "conv", input="numbers")
    with pytest.raises(ValueError, match="no input named 'photo'"):
        kerascam.score_cam(model, [x, numbers], "conv", input="photo")
    with pytest.raises(ValueError, match="batched alike"):
        kerascam.grad_cam(model, [x, numbers[:1]], "conv")
    a, b = keras.Input((8, 8, 3), name="left"), keras.Input((8, 8, 3), name="right")
    two = keras.Model([a, b], layers.Dense(2)(layers.Flatten()(layers.Add()([layers.Conv2D(2, 3, name="c1")(a),
                                                                              layers.Conv2D(2, 3, name="c2")(b)]))))
    with pytest.raises(ValueError, match=r"several inputs \(0: 'left'.*1: 'right'.*pass input="):
        kerascam.score_cam(two, [np.zeros((1, 8, 8, 3))] * 2, "c1")


# ---------------------------------------------------------------- targets

def test_a_regression_on_one_quadrant_is_explained_in_that_quadrant():
    """The output is the mean of two channels over the top-left quadrant only: the methods that weigh each
    pixel by its own gradient (Layer-CAM, HiRes-CAM) put their whole map there. (Score-CAM and Grad-CAM weigh
    whole channels, which reach over the picture: they are checked against the plain computation above.)"""
    keras.utils.set_random_seed(7)
    inp = keras.Input((16, 16, 1))
    feats = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    out = layers.Lambda(lambda t: keras.ops.mean(t[:, :8, :8, :2], axis=(1, 2, 3))[:, None], name="quadrant")(feats)
    model = keras.Model(inp, out)
    x = np.random.default_rng(4).uniform(0.5, 1, (2, 16, 16, 1)).astype(np.float32)
    for method in (kerascam.layer_cam, kerascam.hires_cam):
        maps = method(model, x, "conv", target=targets.regression())
        inside = maps[:, :8, :8].sum(axis=(1, 2))
        assert (inside > 0.97 * maps.sum(axis=(1, 2))).all() and (inside > 0).all(), method.__name__
    everywhere = kerascam.layer_cam(model, x, "conv", target=targets.regression(lower=True))
    assert everywhere.max() == 0  # what lowers the output: nothing here (the ReLU drops the negative map)


def segmenter():
    keras.utils.set_random_seed(8)
    inp = keras.Input((12, 12, 3))
    feats = layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
    return keras.Model(inp, layers.Conv2D(3, 1, activation="softmax", name="mask")(feats)), keras.Model(inp, feats)


def test_a_segmentation_target_against_the_plain_computation_and_autodiff():
    model, feats = segmenter()
    x = np.random.default_rng(5).uniform(0, 1, (2, 12, 12, 3)).astype(np.float32)
    regions = np.zeros((2, 12, 12), bool)
    regions[0, 2:6, 2:6], regions[1, 6:, :] = True, True
    target = targets.segmentation(1, regions)
    acts = feats.predict(x, verbose=0)
    score = lambda given, i: model.predict(given[0], verbose=0)[0, ..., 1][regions[i]].mean()  # noqa: E731
    close(kerascam.score_cam(model, x, "conv", target=target, precision="float32"), plain_score_cam(acts, score, [x]))
    head = model.get_layer("mask")
    weight = keras.ops.convert_to_tensor((regions / regions.sum(axis=(1, 2), keepdims=True)).astype(np.float32))
    grads = backend_gradient(lambda a: keras.ops.sum(head(a)[..., 1] * weight), acts)
    close(kerascam.layer_cam(model, x, "conv", target=target),
          plain_gradient(acts.astype(np.float64), grads, GRADIENT["layer_cam"], (12, 12)))
    assert kerascam.find_layer(model).path == ("conv",)  # the default is never the model's output layer
    for method in (kerascam.score_cam, kerascam.grad_cam):  # a mask is no (N, classes) output: a target is needed
        with pytest.raises(ValueError, match=r"not \(N, classes\): pass target="):
            method(model, x, "conv")
    with pytest.raises(ValueError, match="class_index or target, not both"):
        kerascam.score_cam(model, x, "conv", class_index=1, target=target)
    with pytest.raises(ValueError, match=r"one score per row, shape \(rows,\)"):
        kerascam.score_cam(model, x, "conv", target=lambda values, index: values[:, 0, 0], precision="float32")


def test_a_similarity_target_and_the_class_targets():
    keras.utils.set_random_seed(9)
    inp = keras.Input((10, 10, 3))
    feats = layers.Conv2D(5, 3, padding="same", activation="relu", name="conv")(inp)
    embed = keras.Model(inp, layers.Dense(6, name="embedding")(layers.GlobalAveragePooling2D()(feats)))
    x = np.random.default_rng(6).uniform(0, 1, (2, 10, 10, 3)).astype(np.float32)
    refs = np.random.default_rng(7).normal(size=(2, 6)).astype(np.float32)
    acts = keras.Model(inp, feats).predict(x, verbose=0)

    def cosine(given, i):
        e = embed.predict(given[0], verbose=0)[0]
        return e @ refs[i] / np.linalg.norm(e) / np.linalg.norm(refs[i])
    close(kerascam.score_cam(embed, x, "conv", target=targets.similarity(refs), precision="float32"),
          plain_score_cam(acts, cosine, [x]))
    model, _ = two_heads()
    y = np.random.default_rng(8).uniform(0, 1, (2, 12, 12, 3)).astype(np.float32)
    np.testing.assert_allclose(kerascam.score_cam(model, y, "conv", output="kind", target=targets.probability([2, 0]),
                                                  precision="float32"),
                               kerascam.score_cam(model, y, "conv", output="kind", class_index=[2, 0],
                                                  precision="float32"), atol=1e-6)
    np.testing.assert_allclose(kerascam.grad_cam(model, y, "conv", output="kind", target=targets.logit(1)),
                               kerascam.grad_cam(model, y, "conv", output="kind", class_index=1), atol=1e-6)


# ---------------------------------------------------------------- 1-D signals and 3-D volumes

def test_a_1d_signal_model_gives_maps_of_the_signals_length():
    keras.utils.set_random_seed(10)
    inp = keras.Input((40, 2))
    feats = layers.Conv1D(4, 5, strides=2, padding="same", activation="relu", name="conv")(inp)
    model = keras.Model(inp, layers.Dense(3, activation="softmax")(layers.Flatten()(feats)))
    x = np.random.default_rng(9).normal(0, 1, (2, 40, 2)).astype(np.float32)
    acts = keras.Model(inp, feats).predict(x, verbose=0)
    probs = model.predict(x, verbose=0)
    score = lambda given, i: model.predict(given[0], verbose=0)[0, probs[i].argmax()]  # noqa: E731
    close(kerascam.score_cam(model, x, "conv", precision="float32"), plain_score_cam(acts, score, [x]))
    dense = model.layers[-1]
    onehot = keras.ops.convert_to_tensor(np.eye(3, dtype=np.float32)[probs.argmax(1)])
    kernel, bias = (np.asarray(w) for w in dense.weights)
    # the gradient methods differentiate the pre-softmax scores: the Dense without its softmax
    grads = backend_gradient(lambda a: keras.ops.sum((keras.ops.reshape(a, (2, -1)) @ kernel + bias) * onehot), acts)
    close(kerascam.hires_cam(model, x, "conv"), plain_gradient(acts.astype(np.float64), grads, GRADIENT["hires_cam"],
                                                              (40,)))
    assert kerascam.eigen_cam(model, x).shape == kerascam.center_map(model, x).shape == (2, 40)
    assert kerascam.find_layer(model).path == ("conv",)  # the default: the last layer on the signal's grid


def test_a_3d_volume_model_gives_maps_of_the_volumes_shape():
    keras.utils.set_random_seed(11)
    inp = keras.Input((6, 8, 8, 1))
    feats = layers.Conv3D(3, 3, strides=2, padding="same", activation="relu", name="conv")(inp)
    model = keras.Model(inp, layers.Dense(2, activation="softmax")(layers.Flatten()(feats)))
    x = np.random.default_rng(10).uniform(0, 1, (2, 6, 8, 8, 1)).astype(np.float32)
    acts = keras.Model(inp, feats).predict(x, verbose=0)
    probs = model.predict(x, verbose=0)
    score = lambda given, i: model.predict(given[0], verbose=0)[0, probs[i].argmax()]  # noqa: E731
    close(kerascam.score_cam(model, x, "conv", precision="float32"), plain_score_cam(acts, score, [x]))
    for method in (kerascam.grad_cam, kerascam.grad_cam_pp, kerascam.layer_cam, kerascam.random_map):
        maps = method(model, x, "conv")
        assert maps.shape == (2, 6, 8, 8) and np.isfinite(maps).all()
