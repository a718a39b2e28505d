"""Which layer: lookup by name, path or object through nested models at any depth, and the conv rule.

  find_layer(model, layer): a layer name searched through nested models at any depth (a
  transfer-learning backbone inside a Sequential or functional model), a path such as
  "mobilenetv2_0.35_64/Conv_1" when a name is ambiguous ("/conv": the top model's own), or a
  keras.layers.Layer; any layer whose output is 4-D (N, h, w, K). None: the last Conv2D-family layer.
"""
import collections

import keras

CONV_TYPES = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)

LayerRef = collections.namedtuple("LayerRef", "path layer")  # path: names from the top model down


def is_container(layer):
    """A nested model whose graph can be re-run layer by layer (Sequential or functional)."""
    return isinstance(layer, keras.Sequential) or (isinstance(layer, keras.Model)
                                                   and hasattr(layer, "_run_through_graph"))


def children(model):
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def all_layers(model, prefix=()):
    """Every layer of the model at any depth, as LayerRefs, depth first in call order; a nested
    model comes right after its own layers."""
    refs = []
    for layer in children(model):
        path = prefix + (layer.name,)
        if is_container(layer):
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


def is_conv(layer):
    """The conv rule, the one definition of a conv layer here: a Conv2D-family layer."""
    return isinstance(layer, CONV_TYPES)


def conv_layers(model):
    """The Conv2D-family layers at any depth, in call order."""
    return [ref for ref in all_layers(model) if is_conv(ref.layer)]


def _listing(refs, limit=12):
    names = [path_name(r) for r in refs]
    return ", ".join(names if len(names) <= limit else ["..."] + names[-limit:])


def _matches(refs, layer):
    """(the LayerRefs `layer` names, how to name it in an error)."""
    if isinstance(layer, LayerRef):  # one of all_layers(model)'s, e.g. from conv_layers
        return [r for r in refs if r.path == tuple(layer.path) and r.layer is layer.layer], \
            f"layer {path_name(layer)!r}"
    if isinstance(layer, keras.layers.Layer):
        return [r for r in refs if r.layer is layer], f"layer object {layer.name!r}"
    if isinstance(layer, str) and "/" in layer:
        return [r for r in refs if path_name(r) == layer.strip("/")], f"layer path {layer!r}"
    if isinstance(layer, str):
        return [r for r in refs if r.path[-1] == layer], f"layer {layer!r}"
    raise ValueError(f"layer must be None, a name, a path or a keras layer, got {type(layer).__name__}")


def find_layer(model, layer=None):
    """The LayerRef of `layer` (None, a name, a path "outer/inner", a Layer or a LayerRef); a ValueError that
    lists the candidates otherwise."""
    refs = all_layers(model)
    convs = [r for r in refs if is_conv(r.layer)]
    if layer is None:
        if not convs:
            raise ValueError("the model has no Conv2D-family layer; pass layer= (any layer with a 4-D output)")
        return convs[-1]
    found, what = _matches(refs, layer)
    if not found:
        named = "no layer named" if isinstance(layer, str) and "/" not in layer else "no"
        subject = repr(layer) if named == "no layer named" else what
        raise ValueError(f"{named} {subject} in the model; conv layers: {_listing(convs) or 'none'}")
    if len(found) > 1:
        paths = ", ".join(passable_path(model, r) for r in found)
        raise ValueError(f"{what} is ambiguous; pass one of these paths: {paths}")
    return found[0]
