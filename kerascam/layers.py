"""Which layer: lookup by name, path or object through nested models at any depth, the default rule and
the conv rule.

  find_layer(model, layer): a layer name searched through nested models at any depth (a
  transfer-learning backbone inside a Sequential or functional model), a path such as
  "mobilenetv2_0.35_64/Conv_1" when a name is ambiguous ("/conv": the top model's own), or a
  keras.layers.Layer; any layer whose output is 4-D (N, h, w, K). An operation recorded in a functional
  graph (`x + y`, keras.ops.concatenate) whose output is 4-D is addressed the same way, by the name
  model.summary() shows ("add_17"): its LayerRef holds the keras.Operation as `layer`.
  None: default_layer, the last block output on the output's path whose grid is larger than 1 x 1.
"""
import collections

import keras

from .cache import derived
from .views import token_grid

CONV_TYPES = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)
# the default rule's block outputs: nonlinear layers, merges of branches; normalisations follow linear branches
ACTIVATION_LAYERS = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.PReLU,
                     keras.layers.ELU, keras.layers.Softmax)
MERGE_LAYERS = (keras.layers.Add, keras.layers.Concatenate, keras.layers.Multiply, keras.layers.Maximum,
                keras.layers.Minimum, keras.layers.Average, keras.layers.Subtract)
NORMALIZATIONS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
                  keras.layers.GroupNormalization)
ACTIVATION_OPS = {"relu", "relu6", "elu", "selu", "celu", "gelu", "glu", "silu", "swish", "hardsilu", "hardswish",
                  "leakyrelu", "sigmoid", "hardsigmoid", "tanh", "hardtanh", "softplus", "softsign", "sparseplus",
                  "squareplus", "logsigmoid", "mish", "maximum", "minimum", "abs", "absolute", "square"}
MERGE_OPS = {"add", "subtract", "multiply", "concatenate", "average", "stack"}

LayerRef = collections.namedtuple("LayerRef", "path layer")  # path: names from the top model down


def is_container(layer):
    """A nested model whose graph can be re-run layer by layer (Sequential or functional)."""
    return isinstance(layer, keras.Sequential) or (isinstance(layer, keras.Model)
                                                   and hasattr(layer, "_run_through_graph"))


def is_operation(layer):
    """An operation recorded in a functional graph (keras.ops.add, `x + y`), not a layer."""
    return isinstance(layer, keras.Operation) and not isinstance(layer, keras.layers.Layer)


def children(model):
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _level(model):
    """[(layer or operation, its one node in this model or None)] of one model level, in call order
    (None: a layer called several times here, or a Sequential never built)."""
    if isinstance(model, keras.Sequential):
        graph, ops = getattr(model, "_functional", None), children(model)
    else:
        graph = model
        ops = [op for op in model.operations if not isinstance(op, keras.layers.InputLayer)]
    if graph is None:
        return [(op, None) for op in ops]
    ids = {id(node) for nodes in graph._nodes_by_depth.values() for node in nodes}
    level = []
    for op in ops:
        mine = [node for node in op._inbound_nodes if id(node) in ids]
        level.append((op, mine[0] if len(mine) == 1 else None))
    return level


def _output_shape(node):
    return tuple(node.outputs[0].shape) if node is not None and len(node.outputs) == 1 else None


def _is_4d(node):
    shape = _output_shape(node)
    return shape is not None and len(shape) == 4


def all_layers(model, prefix=(), operations=False):
    """Every layer of the model at any depth, as LayerRefs, depth first in call order; a nested
    model comes right after its own layers. operations=True adds the functional graphs' operations
    whose output is 4-D (the ones that can be explained), in their place."""
    refs = []
    for layer, node in (_level(model) if operations else [(layer, None) for layer in children(model)]):
        if is_operation(layer) and not _is_4d(node):
            continue
        path = prefix + (layer.name,)
        if is_container(layer):
            refs += all_layers(layer, path, operations)
        refs.append(LayerRef(path, layer))
    return refs


def path_name(ref):
    return "/".join(ref.path)


def passable_path(model, ref):
    """The path as find_layer takes it back: "/conv" for the top model's own "conv" where a nested layer
    shares the name (a bare "conv" would be ambiguous), path_name otherwise."""
    refs = all_layers(model, operations=True)
    shared = len(ref.path) == 1 and sum(r.path[-1] == ref.path[0] for r in refs) > 1
    return "/" * shared + path_name(ref)


def at_path(model, path):
    """The LayerRef at exactly this path (a tuple of names), operations included."""
    found = [ref for ref in all_layers(model, operations=True) if ref.path == tuple(path)]
    if not found:
        raise ValueError(f"no layer at {'/'.join(path)!r}")
    return found[0]


def is_conv(layer):
    """The conv rule, the one definition of a conv layer here: a Conv2D-family layer."""
    return isinstance(layer, CONV_TYPES)


def conv_layers(model):
    """The Conv2D-family layers at any depth, in call order."""
    return [ref for ref in all_layers(model) if is_conv(ref.layer)]


# ---------------------------------------------------------------- the default layer

def _walk(model, prefix=(), after=()):
    """(LayerRef, its node, the layers and operations its output feeds) for every layer and operation at
    any depth, in all_layers' order; the layer giving a nested model's output feeds what that model feeds."""
    level = _level(model)
    feeds = collections.defaultdict(list)
    for op, node in level:
        for tensor in (node.input_tensors if node is not None else ()):
            feeds[id(tensor._keras_history.operation)].append(op)
    if level and model.outputs:
        feeds[id(model.outputs[0]._keras_history.operation)].extend(after)
    for op, node in level:
        path = prefix + (op.name,)
        if is_container(op):
            yield from _walk(op, path, feeds[id(op)])
        yield LayerRef(path, op), node, feeds[id(op)]


def _nonlinear(layer):
    """An activation (layer, operation or a layer's own activation="relu"), or a max/min."""
    if is_operation(layer):
        return type(layer).__name__.lower() in ACTIVATION_OPS
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", type(activation).__name__) if activation is not None else ""
    if isinstance(layer, keras.layers.Activation) or activation is not None:
        return name not in ("", "linear", "identity")
    return isinstance(layer, ACTIVATION_LAYERS)


def _merge(layer, node):
    """A merge of two branches or more (a residual add, a concatenation, a gate), as a layer or an operation."""
    kind = isinstance(layer, MERGE_LAYERS) or (is_operation(layer) and type(layer).__name__.lower() in MERGE_OPS)
    return kind and len(node.input_tensors) >= 2


def is_block_output(layer, node, feeds):
    """The default rule's block output: after the nonlinearity or the merge of a block; a linear conv
    counts only where no normalisation follows it (it is then the block's last layer, not a branch
    before its BatchNorm)."""
    if _nonlinear(layer):
        return True
    if not (_merge(layer, node) or is_conv(layer)):
        return False
    return not any(isinstance(f, NORMALIZATIONS) for f in feeds)


def _image_rank(model):
    """The rank of the model's first image-like input: 4 for pictures (N, H, W, C), 3 signals, 5 volumes."""
    ranks = [len(t.shape) for t in model.inputs if 3 <= len(t.shape) <= 5]
    return ranks[0] if ranks else 4


def _is_token_grid(shape, model):
    """(N, T, D) tokens of a picture model that form a grid of its aspect (views.token_grid)."""
    try:
        token_grid(int(shape[1]), tuple(model.inputs[0].shape[1:3]))
        return True
    except (ValueError, TypeError):
        return False


def default_layer(model):
    """The layer None picks, on the input's grid ((N, h, w, K) for pictures, (N, l, K) signals, (N, d, h, w, K)
    volumes), never the model's output layer: the last block output (is_block_output) whose grid is larger than
    1 x 1; failing that the last layer with such a grid, then the last on the grid. In a picture model whose
    last such layer is followed by token layers (a vision transformer: no conv after its patch embedding), the
    last token block's output, its residual add, instead (failing that the last token layer)."""
    def find():
        rank, tiers, tokens, last_grid = _image_rank(model), ([], [], []), ([], []), -1
        outputs = {id(t._keras_history.operation) for t in model.outputs}
        for i, (ref, node, feeds) in enumerate(_walk(model)):
            shape = _output_shape(node)
            if is_container(ref.layer) or shape is None or id(ref.layer) in outputs:
                continue
            if rank == 4 and len(shape) == 3 and _is_token_grid(shape, model):
                tokens[0 if _merge(ref.layer, node) else 1].append((i, ref))  # a block ends in its residual add
                continue
            if len(shape) != rank:
                continue
            last_grid, wide = i, any(s != 1 for s in shape[1:-1])
            if wide and is_block_output(ref.layer, node, feeds):
                tiers[0].append(ref)
            if wide:
                tiers[1].append(ref)
            tiers[2].append(ref)
        late = [[ref for i, ref in tier if i > last_grid] for tier in tokens]
        found = next((tier[-1] for tier in late + list(tiers) if tier), None)
        if found is None:
            raise ValueError(f"the model has no layer with a {rank}-D output on the input's grid to explain; "
                             "pass layer= (and reshape= for a layout of your own)")
        return found

    return derived(model, ("default_layer",), find)


# ---------------------------------------------------------------- lookup

def candidates(model):
    """The LayerRefs that can be explained: every layer and operation with an output on the input's grid
    (4-D for pictures, and token layers (N, T, D) too; nested models themselves left out: name their layers)."""
    rank = _image_rank(model)
    return [ref for ref, node, _ in _walk(model) if not is_container(ref.layer) and _output_shape(node) is not None
            and (len(_output_shape(node)) == rank or rank == 4 and len(_output_shape(node)) == 3)]


def _listing(refs, limit=12):
    names = [path_name(r) for r in refs]
    return ", ".join(names if len(names) <= limit else ["..."] + names[-limit:])


def _matches(refs, layer):
    """(the LayerRefs `layer` names, how to name it in an error)."""
    if isinstance(layer, LayerRef):  # one of all_layers(model)'s, e.g. from conv_layers
        return [r for r in refs if r.path == tuple(layer.path) and r.layer is layer.layer], \
            f"layer {path_name(layer)!r}"
    if isinstance(layer, keras.Operation):
        return [r for r in refs if r.layer is layer], f"layer object {layer.name!r}"
    if isinstance(layer, str) and "/" in layer:
        return [r for r in refs if path_name(r) == layer.strip("/")], f"layer path {layer!r}"
    if isinstance(layer, str):
        return [r for r in refs if r.path[-1] == layer], f"layer {layer!r}"
    raise ValueError(f"layer must be None, a name, a path or a keras layer, got {type(layer).__name__}")


def find_layer(model, layer=None):
    """The LayerRef of `layer` (None, a name, a path "outer/inner", a Layer, an Operation or a LayerRef); a
    ValueError that lists the 4-D candidates otherwise."""
    if layer is None:
        return default_layer(model)
    found, what = _matches(all_layers(model, operations=True), layer)
    if not found:
        named = "no layer named" if isinstance(layer, str) and "/" not in layer else "no"
        subject = repr(layer) if named == "no layer named" else what
        raise ValueError(f"{named} {subject} in the model; layers with a {_image_rank(model)}-D output: "
                         f"{_listing(candidates(model)) or 'none'}")
    if len(found) > 1:
        paths = ", ".join(passable_path(model, r) for r in found)
        raise ValueError(f"{what} is ambiguous; pass one of these paths: {paths}")
    return found[0]
