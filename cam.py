"""The CAM core every explainer shares: which layer, which score, which images, how a map is
finished, the gradient on each backend, and the registry of methods.

Any single-input Keras image classifier can be explained:

  layer     find_layer(model, layer): a layer name searched through nested models at any depth
            (a transfer-learning backbone inside a Sequential or functional model), a path such as
            "mobilenetv2_0.35_64/Conv_1" when a name is ambiguous ("/conv": the top model's own),
            or a keras.layers.Layer; any layer whose output is 4-D (N, h, w, K). None: the last
            Conv2D-family layer.
  score     the authors' probabilities, softmax applied once: a model ending in a softmax (a
            Softmax layer, or an Activation or any layer with activation="softmax") gives its
            probabilities, a sigmoid output of several units its own per-unit probabilities, any
            other output is taken as logits; a one-unit output (sigmoid or logit z) is two classes
            with scores (-z/2, z/2), i.e. class 1 has p and class 0 1 - p.
            The gradient methods differentiate the pre-softmax scores.
  images    (N, H, W, C) at the model's input size (any size where the model has None), pixels as
            the model takes them: preprocessing belongs inside the model.

explainable(model, layers) rebuilds the model's graph from its layers, descending into the
nested models on the way to each explained layer and to the output, so the activations are
those on the path that produces the output (never a second copy of a backbone run beside it).
Each nested model on the way is rebuilt as its own sub-model under its own name, so its layers'
names need to be unique only among themselves, as they are in the model.
Nothing here imports another module of this repository; every method module imports this one.
"""
import collections

import runtime  # noqa: F401  (before keras: quiet TensorFlow start-up)
import keras
import numpy as np

CONV_TYPES = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)
# A batch through the network holds its pictures at the input size and the activations for all of them, so
# its memory grows with batch x H x W: every method caps a batch at PIXEL_BUDGET pixels, Score-CAM's default
# 256 masked pictures at ImageNet's 224 x 224, which leaves 32 x 32 to 224 x 224 inputs their full batch and
# lets a model that takes any size explain a 12-megapixel photo a picture at a time instead of running out
# of memory.
PIXEL_BUDGET = 256 * 224 * 224

# ---------------------------------------------------------------- the method registry

Method = collections.namedtuple("Method", "name function label floor")
METHODS = {}  # name -> Method, in registration order; evaluate.py, figures.py and the CLI read it


def register(name, label, floor=False):
    """Decorator adding an explainer f(model, images, layer=None, class_index=None, batch_size=...)
    -> maps (N, H, W) float32 in [0, 1] to METHODS. floor: a model-blind baseline."""
    def add(function):
        METHODS[name] = Method(name, function, label, floor)
        return function
    return add


# ---------------------------------------------------------------- layers

LayerRef = collections.namedtuple("LayerRef", "path layer")  # path: names from the top model down


def _is_container(layer):
    """A nested model whose graph can be re-run layer by layer (Sequential or functional)."""
    return isinstance(layer, keras.Sequential) or (isinstance(layer, keras.Model)
                                                   and hasattr(layer, "_run_through_graph"))


def _children(model):
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def all_layers(model, prefix=()):
    """Every layer of the model at any depth, as LayerRefs, depth first in call order; a nested
    model comes right after its own layers."""
    refs = []
    for layer in _children(model):
        path = prefix + (layer.name,)
        if _is_container(layer):
            refs += all_layers(layer, path)
        refs.append(LayerRef(path, layer))
    return refs


def path_name(ref):
    return "/".join(ref.path)


def passable_path(model, ref):
    """The path as find_layer takes it back: "/conv" for the top model's own "conv" where a nested layer
    shares the name (a bare "conv" would be ambiguous), path_name otherwise."""
    shared = len(ref.path) == 1 and sum(r.path[-1] == ref.path[0] for r in all_layers(model)) > 1
    return "/" * shared + path_name(ref)


def at_path(model, path):
    """The LayerRef at exactly this path (a tuple of names)."""
    found = [ref for ref in all_layers(model) if ref.path == tuple(path)]
    if not found:
        raise ValueError(f"no layer at {'/'.join(path)!r}")
    return found[0]


def conv_layers(model):
    """The Conv2D-family layers at any depth, in call order."""
    return [ref for ref in all_layers(model) if isinstance(ref.layer, CONV_TYPES)]


def _listing(refs, limit=12):
    names = [path_name(r) for r in refs]
    return ", ".join(names if len(names) <= limit else ["..."] + names[-limit:])


def find_layer(model, layer=None):
    """The LayerRef of `layer` (None, a name, a path "outer/inner", a Layer or a LayerRef); a ValueError that
    lists the candidates otherwise."""
    refs = all_layers(model)
    convs = [r for r in refs if isinstance(r.layer, CONV_TYPES)]
    if layer is None:
        if not convs:
            raise ValueError("the model has no Conv2D-family layer; pass layer= (any layer with a 4-D output)")
        return convs[-1]
    if isinstance(layer, LayerRef):  # one of all_layers(model)'s, e.g. from conv_layers
        found = [r for r in refs if r.path == tuple(layer.path) and r.layer is layer.layer]
        what = f"layer {path_name(layer)!r}"
    elif isinstance(layer, keras.layers.Layer):
        found = [r for r in refs if r.layer is layer]
        what = f"layer object {layer.name!r}"
    elif isinstance(layer, str) and "/" in layer:
        found = [r for r in refs if path_name(r) == layer.strip("/")]
        what = f"layer path {layer!r}"
    elif isinstance(layer, str):
        found = [r for r in refs if r.path[-1] == layer]
        what = f"layer {layer!r}"
    else:
        raise ValueError(f"layer must be None, a name, a path or a keras layer, got {type(layer).__name__}")
    if not found:
        named = "no layer named" if isinstance(layer, str) and "/" not in layer else "no"
        subject = repr(layer) if named == "no layer named" else what
        raise ValueError(f"{named} {subject} in the model; conv layers: {_listing(convs) or 'none'}")
    if len(found) > 1:
        paths = ", ".join(passable_path(model, r) for r in found)
        raise ValueError(f"{what} is ambiguous; pass one of these paths: {paths}")
    return found[0]


# ---------------------------------------------------------------- the explainable graph

def _check_classifier(model):
    if not isinstance(model, keras.Model):
        raise ValueError(f"expected a keras.Model, got {type(model).__name__}")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not _is_container(model):
        raise ValueError("the model must be a built Sequential or functional Keras model (give it a keras.Input); "
                         "subclassed models cannot be explained layer by layer")
    if len(inputs) != 1:
        raise ValueError(f"the model has {len(inputs)} inputs; only single-input image classifiers are supported")
    if len(outputs) != 1:
        raise ValueError(f"the model has {len(outputs)} outputs; only classifiers with one (N, classes) output "
                         "are supported")
    if len(inputs[0].shape) != 4:
        raise ValueError(f"the model's input is {tuple(inputs[0].shape)}; images (N, H, W, C) are supported")
    if len(outputs[0].shape) != 2:
        raise ValueError(f"the model's output is {tuple(outputs[0].shape)}; classifiers with one (N, classes) "
                         "output are supported")
    first = next((ref for ref in all_layers(model) if getattr(ref.layer, "data_format", None) == "channels_first"),
                 None)
    if first is not None:  # masks, activations and maps are all (N, H, W, C): the wrong axes would pass silently
        raise ValueError(f"layer {path_name(first)} computes channels-first (data_format='channels_first'); the "
                         "explainers take channels-last models, images (N, H, W, C): build the model with "
                         "data_format='channels_last' (Keras's default)")


def _keeps_values(layer):
    """A layer or op that leaves the values as they are at inference: a dtype cast (mixed precision's
    Activation("linear", dtype="float32"), keras.ops.cast), Identity, Dropout."""
    if isinstance(layer, keras.layers.Activation):
        return _activation_name(layer) == "linear"
    if isinstance(layer, (keras.layers.Identity, keras.layers.Dropout)):
        return True
    return not isinstance(layer, keras.layers.Layer) and type(layer).__name__ == "Cast"


def _output_path(model):
    """Names from the top model down to the layer that produces the output's values (before any
    trailing cast, Identity or Dropout, which would hide a softmax from the score rule)."""
    if isinstance(model, keras.Sequential):
        children = _children(model)
        while len(children) > 1 and _keeps_values(children[-1]):
            children = children[:-1]
        last = children[-1]
    else:
        history = model.outputs[0]._keras_history
        while _keeps_values(history.operation):
            inputs = history.operation._inbound_nodes[history.node_index].arguments.keras_tensors
            before = inputs[0]._keras_history
            if len(inputs) != 1 or isinstance(before.operation, keras.layers.InputLayer):
                break
            history = before
        last = history.operation
    return (last.name,) + (_output_path(last) if _is_container(last) else ())


def _activation_name(layer):
    return getattr(getattr(layer, "activation", None), "__name__", "")


def _link(layer):
    """"softmax" or "sigmoid" where the output layer or op is itself that function of its input (a Softmax
    layer, an Activation, a Lambda of keras.activations.softmax, keras.ops.softmax in a functional graph),
    else None."""
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    if isinstance(layer, keras.layers.Activation):
        name = _activation_name(layer)
    elif isinstance(layer, keras.layers.Lambda):
        name = getattr(layer.function, "__name__", "")
    elif not isinstance(layer, keras.layers.Layer):  # an op: keras.ops.softmax(x) is an Operation "Softmax"
        name = type(layer).__name__.lower()
    else:
        return None
    return name if name in ("softmax", "sigmoid") else None


class _PreActivation(keras.layers.Layer):
    """`layer` called with its activation switched off: the scores under a Dense(..., activation="softmax")."""

    def __init__(self, layer, **kwargs):
        super().__init__(name="score_cam_scores", dtype=layer.dtype_policy, **kwargs)
        self.inner = layer

    def call(self, x):
        activation, self.inner.activation = self.inner.activation, keras.activations.linear
        try:
            return self.inner(x)
        finally:
            self.inner.activation = activation


def _scores(layer, inputs, output):
    """(pre-activation scores, link) at the output layer: link "softmax" or "sigmoid"."""
    link = _link(layer)
    if link:
        return inputs, link
    activation = _activation_name(layer)
    if activation in ("softmax", "sigmoid"):
        return _PreActivation(layer)(inputs), activation
    return output, "logits"


def _rerun(model, x, wanted, found):
    """Call the model's layers on the symbolic tensor x, descending into the nested models on a
    wanted path; found[key] gets the tensor of each wanted (path -> key). Returns the output."""
    def call(layer, *args, **kwargs):
        here = {path[1:]: key for path, key in wanted.items() if path[0] == layer.name}
        inner = {path: key for path, key in here.items() if path}
        out = _rerun_nested(layer, args[0], inner, found) if inner else layer(*args, **kwargs)
        key = here.get(())
        if key == "scores":
            found[key] = _scores(layer, args[0], out)
        elif key in found:  # a shared layer called again: counted, and explainable() refuses it
            found[("calls", key)] = found.get(("calls", key), 1) + 1
        elif key is not None:
            found[key] = out
            if ("delta", key) in found:  # the zero perturbation the gradient is taken against; named, as
                # keras.ops.add's automatic name can be the model's own "add" (a fresh name counter)
                out = keras.layers.Add(name=f"score_cam_delta{key}")([out, found[("delta", key)]])
        return out

    if isinstance(model, keras.Sequential):
        for layer in _children(model):
            x = call(layer, x)
        return x
    # Keras's own graph walker, the one clone_model uses, with our call in place of each layer's
    return model._run_through_graph(x, operation_fn=lambda op: op, call_fn=call)


def _rerun_nested(model, x, wanted, found):
    """A nested model on a wanted path, rebuilt as its own sub-model that also returns the wanted
    tensors inside it, and called on x in its place under its own name. Its layers' names then need
    to be unique only among themselves, as they are in the model (a nested `conv` beside an outer one)."""
    keys = list(dict.fromkeys(wanted.values()))
    level = {("delta", key): keras.Input(batch_shape=found[("delta", key)].shape,
                                         dtype=found[("delta", key)].dtype, name=f"score_cam_delta_input{key}")
             for key in keys if ("delta", key) in found}
    level_in = keras.Input(batch_shape=x.shape, dtype=x.dtype, name="score_cam_level_input")
    inner = dict(level)
    out = _rerun(model, level_in, wanted, inner)
    keys = [key for key in keys if key in inner]
    tensors = [inner[key][0] if key == "scores" else inner[key] for key in keys]
    sub = keras.Model([level_in] + list(level.values()), [out] + tensors, name=model.name)
    results = sub([x] + [found[d] for d in level])
    for key, tensor in zip(keys, results[1:]):
        calls = inner.get(("calls", key), 1)
        if key != "scores" and key in found:  # the nested model itself called again
            found[("calls", key)] = found.get(("calls", key), 1) + calls
            continue
        found[key] = (tensor, inner[key][1]) if key == "scores" else tensor
        if calls > 1:
            found[("calls", key)] = calls
    return results[0]


def explainable(model, layers=(), perturb=False):
    """A keras.Model: images -> [activation of each layer (LayerRefs)..., scores (N, C), probabilities (N, C)],
    scores and probabilities float32. perturb=True adds a second input per layer, added to its
    activation (feed zeros): the gradient with respect to it is the gradient at the activation.
    """
    _check_classifier(model)
    spec = model.inputs[0]
    images = keras.Input(batch_shape=spec.shape, dtype=spec.dtype, name="score_cam_images")
    found, deltas = {}, []
    for i, ref in enumerate(layers):
        if perturb:
            deltas.append(keras.Input(batch_shape=(None,) + _layer_shape(model, ref)[1:],
                                      name=f"score_cam_delta_input{i}"))
            found[("delta", i)] = deltas[-1]
    wanted = {tuple(ref.path): i for i, ref in enumerate(layers)}
    out_path = _output_path(model)
    if out_path in wanted:
        raise ValueError(f"layer {'/'.join(out_path)!r} is the model's output, not a feature map")
    wanted[out_path] = "scores"
    _rerun(model, images, wanted, found)
    for i, ref in enumerate(layers):
        if found.get(("calls", i), 1) > 1:
            raise ValueError(f"layer {path_name(ref)!r} is called {found['calls', i]} times in the model (a shared "
                             "layer), so it has no one feature map to explain; pass a layer that is called once")
    acts = [found[i] for i in range(len(layers))]
    for ref, act in zip(layers, acts):
        if len(act.shape) != 4:
            raise ValueError(f"layer {path_name(ref)!r} outputs {tuple(act.shape)}; explaining a layer needs a "
                             "4-D (N, h, w, K) output (a conv, activation, add, batch-norm or pooling layer)")
    scores, probs = _ScoreHead(found["scores"][1])(found["scores"][0])
    return keras.Model([images] + deltas if perturb else images, acts + [scores, probs])


class _ScoreHead(keras.layers.Layer):
    """(scores, probabilities), float32, from the output layer's pre-activation scores. One layer, not
    loose keras.ops calls: an op's automatic name ("cast", "softmax") can equal one of the model's
    layer names once Keras's name counter has been reset, and a graph's names must be unique."""

    def __init__(self, link):
        super().__init__(name="score_cam_head", dtype="float32")
        self.link = link

    def call(self, scores):
        scores = keras.ops.cast(scores, "float32")
        one_unit = scores.shape[-1] == 1
        if one_unit:  # one unit: class 1 has p = sigmoid(z), class 0 has 1 - p (the softmax of the two)
            scores = keras.ops.concatenate([-scores / 2, scores / 2], axis=-1)
        sigmoid = self.link == "sigmoid" and not one_unit  # each unit of a sigmoid head its own probability
        return scores, keras.ops.sigmoid(scores) if sigmoid else keras.ops.softmax(scores)


def _layer_shape(model, ref):
    """The explained layer's output shape (None for a batch or a spatial size the model leaves open)."""
    return tuple(explainable(model, [ref]).outputs[0].shape)


def num_classes(model):
    """Classes the explainers see: the output's units, 2 for a one-unit output."""
    _check_classifier(model)
    return max(2, int(model.outputs[0].shape[-1]))


def input_spec(model):
    """(height, width, channels) the model takes; height and width None where any size goes."""
    _check_classifier(model)
    return tuple(model.inputs[0].shape[1:4])


# ---------------------------------------------------------------- derived models, built once

_CACHE_MODELS = 4
_cache = collections.OrderedDict()  # id(model) -> (model, {key: derived}), the most recent few


def derived(model, key, build):
    """Something built from `model` (the explainable graph, a compiled step, a bfloat16 copy),
    built once and reused so that it is traced and compiled once, not on every call."""
    entry = _cache.get(id(model))
    if entry is None or entry[0] is not model:
        entry = _cache[id(model)] = (model, {})
    _cache.move_to_end(id(model))
    while len(_cache) > _CACHE_MODELS:
        _cache.popitem(last=False)
    if key not in entry[1]:
        entry[1][key] = build()
    return entry[1][key]


def explainable_cached(model, refs=(), perturb=False):
    refs = tuple(refs)
    return derived(model, ("explainable", tuple(r.path for r in refs), perturb),
                   lambda: explainable(model, refs, perturb))


def predict_probabilities(model, images, batch_size=256):
    """The probabilities (N, C) float32 that the explainers score, by the rule above."""
    net = explainable_cached(model)
    out = [np.asarray(net.predict_on_batch(images[i:i + batch_size])[-1], dtype=np.float32)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, num_classes(model)), np.float32)


# ---------------------------------------------------------------- images, classes, maps

def check_images(model, images):
    """Images as float32 (N, H, W, C) the model takes; a clear ValueError otherwise."""
    height, width, channels = input_spec(model)
    try:
        images = np.asarray(images, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError("images must be a numeric array (N, H, W, C)") from None
    given = images.shape
    if images.ndim == 3:
        images = images[None]
    want = (height or "H", width or "W", channels)
    if images.ndim != 4 or images.shape[-1] != channels or any(
            s is not None and s != got for s, got in zip((height, width), images.shape[1:3])) or 0 in images.shape[1:3]:
        hint = ""
        if len(given) == 3 and channels == 1 and given[-1] != 1:  # (N, H, W): greyscale pictures without their axis
            hint = "; a batch of greyscale pictures (N, H, W) needs its channel axis: images[..., None]"
        raise ValueError(f"images must be (N, {want[0]}, {want[1]}, {want[2]}) arrays (or one (H, W, C) picture) "
                         f"for this model, got {given}{hint}")
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    if height is None or width is None:
        problem = _size_problem(model, images.shape[1:3])
        if problem:
            raise ValueError(f"the model cannot take {images.shape[1]}x{images.shape[2]} images: {problem}; "
                             "pass larger images")
    return images


def _size_problem(model, size):
    """Why a model that takes any size cannot take images of this (H, W) (too small for its kernels
    and poolings: a layer refuses the size, or an output is left with no pixels), or None. Worked out
    once per size on symbolic tensors, through the nested models too; nothing runs."""
    def find():
        refs = all_layers(model)
        spec = model.inputs[0]
        x = keras.Input(batch_shape=(1,) + tuple(size) + tuple(spec.shape[3:]), dtype=spec.dtype)
        found = {}
        try:
            _rerun(model, x, {ref.path: i for i, ref in enumerate(refs)}, found)
        except Exception as e:  # Keras and the backends refuse a size in many ways
            return f"its layers refuse that size ({type(e).__name__})"
        empty = [path_name(refs[i]) for i, out in found.items() if len(out.shape) == 4 and 0 in out.shape[1:3]]
        return f"layer {empty[0]!r} has no pixels left" if empty else None

    return derived(model, ("size_problem", tuple(size)), find)


def target_classes(class_index, probs):
    """Target class per image: predicted (None), one int for all, or one int per image."""
    n, count = probs.shape
    if class_index is None:
        return probs.argmax(axis=1)
    try:
        targets = np.asarray(class_index)
        if (targets.dtype.kind not in "iu" and targets.size) or targets.ndim > 1:  # [] is 0 ints
            raise TypeError
    except (TypeError, ValueError):  # ValueError: ragged lists
        raise ValueError(f"class_index must be None, an int or {n} ints, got {class_index!r}") from None
    targets = np.broadcast_to(targets.astype(np.int64), (n,)) if targets.ndim == 0 else targets.astype(np.int64)
    if targets.shape != (n,):
        raise ValueError(f"class_index must be an int or {n} ints, got {len(targets)}")
    if n and (targets.min() < 0 or targets.max() >= count):
        raise ValueError(f"class index out of range 0..{count - 1}")
    return targets


def normalise_maps(maps):
    """Min-max normalise each (H, W) map to [0, 1]; a constant map becomes all zeros, never NaN."""
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    flat = maps.reshape(len(maps), -1)
    if flat.shape[1] == 0:
        return maps
    low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    span = high - low
    out = np.where(span > 0, (flat - low) / np.where(span > 0, span, 1), 0)
    return np.clip(out, 0, 1).reshape(maps.shape).astype(np.float32)


def upsample(activations, size):
    """Bilinear (half-pixel, like PyTorch's align_corners=False) upsampling of (N, h, w, K) to size."""
    up = keras.ops.image.resize(np.asarray(activations, dtype=np.float32), tuple(size), interpolation="bilinear")
    return np.asarray(keras.ops.convert_to_numpy(up), dtype=np.float32)


def weighted_sum(acts, weights):
    """sum_k w_k A_k: weights (N, K) per channel, or (N, h, w, K) per pixel."""
    acts = np.asarray(acts, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim == 2:
        return np.einsum("nhwk,nk->nhw", acts, weights)
    return (acts * weights).sum(axis=-1)


def finish_maps(low_res, size, relu_first):
    """(N, h, w) weighted sums -> maps (N, H, W) in [0, 1]: ReLU, bilinear upsampling to size and
    min-max normalisation; relu_first puts the ReLU before the upsampling (Grad-CAM's order),
    else after it (Score-CAM's, whose masks are upsampled first)."""
    low_res = np.nan_to_num(np.asarray(low_res, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if relu_first:
        low_res = np.maximum(low_res, 0)
    up = upsample(low_res[..., None], size)[..., 0]
    return normalise_maps(up if relu_first else np.maximum(up, 0))


def pearson(a, b):
    """Per-map Pearson r of two (N, H, W) stacks; two constant maps that are equal count as 1."""
    a = np.asarray(a).reshape(len(a), -1).astype(np.float64)
    b = np.asarray(b).reshape(len(b), -1).astype(np.float64)
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    norm = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    both_flat = ((a == 0).all(axis=1)) & ((b == 0).all(axis=1))
    return np.where(both_flat, 1.0, (a * b).sum(axis=1) / np.where(norm > 0, norm, 1))


# ---------------------------------------------------------------- the gradient, one function per backend

def _gradient_tensorflow(f, x):
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value, aux = f(x)
    return tape.gradient(value, x, unconnected_gradients=tf.UnconnectedGradients.ZERO), aux


def _gradient_jax(f, x):
    import jax

    return jax.grad(f, has_aux=True)(keras.ops.convert_to_tensor(x))


def _gradient_torch(f, x):  # not run in CI: the PyTorch wheel is too large to install there
    import torch

    x = torch.as_tensor(x).requires_grad_(True)
    value, aux = f(x)
    (grad,) = torch.autograd.grad(value, x, allow_unused=False)
    return grad, aux


GRADIENTS = {"tensorflow": _gradient_tensorflow, "jax": _gradient_jax, "torch": _gradient_torch}


def gradient(f, x):
    """(df/dx, aux) for f(x) -> (scalar, aux), with the running backend's automatic differentiation."""
    backend = keras.backend.backend()
    if backend not in GRADIENTS:
        raise ValueError(f"no gradient for the {backend!r} backend; use tensorflow, jax or torch")
    return GRADIENTS[backend](f, x)


def layer_gradients(model, ref, images, class_index):
    """(A, dS/dA) as float64 arrays (N, h, w, K): the layer's activation and the gradient of the
    target class's pre-softmax score S there. class_index: per-image ints, -1 for the predicted class."""
    net = explainable_cached(model, [ref], perturb=True)
    x = keras.ops.convert_to_tensor(images)
    shape = net.inputs[1].shape
    if any(s is None for s in shape[1:]):
        shape = explainable_cached(model, [ref]).predict_on_batch(images)[0].shape
    zero = np.zeros((len(images),) + tuple(shape[1:]), np.float32)
    given = keras.ops.convert_to_tensor(np.asarray(class_index, dtype=np.int32))

    def picked_score(delta):
        acts, scores, _ = net([x, delta], training=False)
        predicted = keras.ops.cast(keras.ops.argmax(scores, axis=-1), "int32")
        targets = keras.ops.where(given >= 0, given, predicted)
        value = keras.ops.sum(keras.ops.take_along_axis(scores, targets[:, None], axis=1))
        return value, acts

    grads, acts = gradient(picked_score, zero)
    return (np.asarray(keras.ops.convert_to_numpy(acts), dtype=np.float64),
            np.asarray(keras.ops.convert_to_numpy(grads), dtype=np.float64))
