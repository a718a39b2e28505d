"""The explainable graph: a model rebuilt from its layers to return the explained layers' activations
and the target's scores, by the score rule.

  score     the authors' probabilities, softmax applied once: a model ending in a softmax (a
            Softmax layer, or an Activation or any layer with activation="softmax") gives its
            probabilities, a sigmoid output of several units its own per-unit probabilities, any
            other output is taken as logits; a one-unit output (sigmoid or logit z) is two classes
            with scores (-z/2, z/2), i.e. class 1 has p and class 0 1 - p.
            The gradient methods differentiate the pre-softmax scores.

explainable(model, layers) rebuilds the model's graph from its layers, descending into the
nested models on the way to each explained layer and to the output, so the activations are
those on the path that produces the output (never a second copy of a backbone run beside it).
Each nested model on the way is rebuilt as its own sub-model under its own name, so its layers'
names need to be unique only among themselves, as they are in the model.
"""
import keras
import numpy as np

from .cache import derived
from . import views
from .layers import all_layers, children, is_container, path_name


def check_model(model):
    """A built Sequential or functional model of channels-last layers; a ValueError saying what to change."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"expected a keras.Model, got {type(model).__name__}")
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs or not is_container(model):
        raise ValueError("the model must be a built Sequential or functional Keras model (give it a keras.Input); "
                         "subclassed models cannot be explained layer by layer")
    first = next((ref for ref in all_layers(model) if getattr(ref.layer, "data_format", None) == "channels_first"),
                 None)
    if first is not None:  # masks, activations and maps are all (N, H, W, C): the wrong axes would pass silently
        raise ValueError(f"layer {path_name(first)} computes channels-first (data_format='channels_first'); the "
                         "explainers take channels-last models, images (N, H, W, C): build the model with "
                         "data_format='channels_last' (Keras's default)")


def _keeps_values(layer):
    """A layer or op that leaves the values as they are at inference: a dtype cast (mixed precision's
    Activation("linear", dtype="float32"), keras.ops.cast), Identity, Dropout, or a nested model made of
    only those (a head Sequential([Dropout(0.5)]) after the softmax)."""
    if isinstance(layer, keras.layers.Activation):
        return _activation_name(layer) == "linear"
    if isinstance(layer, (keras.layers.Identity, keras.layers.Dropout)):
        return True
    if is_container(layer):
        return _passes_input_on(layer)
    return not isinstance(layer, keras.layers.Layer) and type(layer).__name__ == "Cast"


def _source(model, output=0):
    """The layer or op that produces output `output`'s values, before any trailing layers and ops that keep
    them (casts, Identity, Dropout, nested models of only those), which would hide a softmax from the score
    rule; None where the output is the model's input itself."""
    if isinstance(model, keras.Sequential):
        layers = children(model)
        while layers and _keeps_values(layers[-1]):
            layers = layers[:-1]
        return layers[-1] if layers else None
    history = model.outputs[output]._keras_history
    while _keeps_values(history.operation):
        inputs = history.operation._inbound_nodes[history.node_index].arguments.keras_tensors
        if len(inputs) != 1:
            break
        history = inputs[0]._keras_history
    return None if isinstance(history.operation, keras.layers.InputLayer) else history.operation


def _passes_input_on(model):
    """Whether a nested model's output is its single input through layers and ops that keep the values."""
    return len(model.inputs) == 1 and len(model.outputs) == 1 and _source(model) is None


def _output_path(model, output=0):
    """Names from the top model down to the layer that produces output `output`'s values (graph._source)."""
    last = _source(model, output)
    if last is None:  # a model that computes nothing (its output is its input): its last layer or op
        last = children(model)[-1] if isinstance(model, keras.Sequential) else \
            model.outputs[output]._keras_history.operation
    return (last.name,) + (_output_path(last) if is_container(last) else ())


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


def rerun(model, x, wanted, found):
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
        for layer in children(model):
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
    out = rerun(model, level_in, wanted, inner)
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


def _inputs(model):
    """Fresh symbolic inputs like the model's, and what to call its graph with (one tensor, or the list)."""
    fresh = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=f"score_cam_input{i}")
             for i, t in enumerate(model.inputs)]
    return fresh, fresh[0] if len(fresh) == 1 else fresh


def _tap(model, layers, view, found):
    """Re-run the model with the layers and the chosen head's scores tapped into `found`; returns the
    fresh inputs and the chosen output (what model.predict returns for it)."""
    fresh, given = _inputs(model)
    wanted = {tuple(ref.path): i for i, ref in enumerate(layers)}
    out_path = _output_path(model, view.output)
    if out_path in wanted:
        raise ValueError(f"layer {'/'.join(out_path)!r} is the model's output, not a feature map")
    wanted[out_path] = "scores"
    outputs = rerun(model, given, wanted, found)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    for i, ref in enumerate(layers):
        if found.get(("calls", i), 1) > 1:
            raise ValueError(f"layer {path_name(ref)!r} is called {found['calls', i]} times in the model (a shared "
                             "layer), so it has no one feature map to explain; pass a layer that is called once")
    return fresh, outputs[view.output]


def explainable(model, layers=(), perturb=False, view=views.DEFAULT):
    """A keras.Model: the model's inputs -> [activation of each layer (LayerRefs) on the image input's grid...,
    the chosen output (float32, as model.predict gives it), scores (N, C), probabilities (N, C)], scores and
    probabilities float32 by the score rule (a head that is no (N, classes) classifier: its output for both).
    perturb=True adds an input per layer, added to its raw output (feed zeros): the gradient with respect to
    it is the gradient there; the model's attribute `grids` then lays such a gradient on the grid too.
    """
    check_model(model)
    found, deltas = {}, []
    if perturb:
        _, raw_shapes = _raw_layer_shapes(model, layers, view)
        for i, shape in enumerate(raw_shapes):
            deltas.append(keras.Input(batch_shape=(None,) + shape[1:], name=f"score_cam_delta_input{i}"))
            found[("delta", i)] = deltas[-1]
    fresh, output = _tap(model, layers, view, found)
    image_spec = tuple(model.inputs[view.input].shape)
    grids = [views.grid_for(found[i], image_spec, view, path_name(ref), i) for i, ref in enumerate(layers)]
    acts = [grid(found[i]) if grid is not None else found[i] for i, grid in enumerate(grids)]
    for grid, ref, act in zip(grids, layers, acts):
        if grid is not None and len(act.shape) != len(image_spec):
            raise ValueError(f"reshape= gave layer {path_name(ref)!r} the shape {tuple(act.shape)}; it must return "
                             f"{len(image_spec)}-D (N, *spatial, K) on the input's grid")
    outputs = acts + list(_ScoreHead(found["scores"][1])(found["scores"][0], output))
    net = keras.Model(fresh + deltas if perturb else (fresh[0] if len(fresh) == 1 else fresh), outputs)
    net.grids = grids
    return net


def _raw_layer_shapes(model, layers, view):
    """(fresh inputs, each layer's raw output shape), None for a batch or a size the model leaves open."""
    found = {}
    fresh, _ = _tap(model, layers, view, found)
    return fresh, [tuple(found[i].shape) for i in range(len(layers))]


class _ScoreHead(keras.layers.Layer):
    """(output, scores, probabilities), float32, from the output layer's pre-activation scores. One layer, not
    loose keras.ops calls: an op's automatic name ("cast", "softmax") can equal one of the model's
    layer names once Keras's name counter has been reset, and a graph's names must be unique."""

    def __init__(self, link):
        super().__init__(name="score_cam_head", dtype="float32")
        self.link = link

    def call(self, scores, output):
        output = keras.ops.cast(output, "float32")
        if len(output.shape) != 2:  # no (N, classes) classifier: a target= decides the score
            return output, output, output
        scores = keras.ops.cast(scores, "float32")
        one_unit = scores.shape[-1] == 1
        if one_unit:  # one unit: class 1 has p = sigmoid(z), class 0 has 1 - p (the softmax of the two)
            scores = keras.ops.concatenate([-scores / 2, scores / 2], axis=-1)
        sigmoid = self.link == "sigmoid" and not one_unit  # each unit of a sigmoid head its own probability
        return output, scores, keras.ops.sigmoid(scores) if sigmoid else keras.ops.softmax(scores)


def num_classes(model, output=0):
    """Classes the explainers see: the output's units, 2 for a one-unit output."""
    check_model(model)
    return max(2, int(model.outputs[output].shape[-1]))


def is_classifier(model, output=0):
    """Whether the output is (N, classes), which the score rule and class_index apply to."""
    return len(model.outputs[output].shape) == 2


def input_spec(model, input=0):
    """(*spatial, channels) the model's input takes: (height, width, channels) for pictures, None where any
    size goes."""
    check_model(model)
    return tuple(model.inputs[input].shape[1:])


def explainable_cached(model, refs=(), perturb=False, view=views.DEFAULT):
    refs = tuple(refs)
    return derived(model, ("explainable", tuple(r.path for r in refs), perturb, view),
                   lambda: explainable(model, refs, perturb, view))


def predict_probabilities(model, images, batch_size=256):
    """The probabilities (N, C) float32 that the explainers score, by the rule above."""
    net = explainable_cached(model)
    out = [np.asarray(net.predict_on_batch(images[i:i + batch_size])[-1], dtype=np.float32)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, num_classes(model)), np.float32)
