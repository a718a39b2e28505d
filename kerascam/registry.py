"""The registry: the single list of methods, what each needs, and explain(), the one entry to all.

A method is a function f(model, images, layer=None, class_index=None, **options) -> maps (N, H, W)
float32 in [0, 1], registered with its kind:
  "masked"      masked-input scoring (Score-CAM's family): the engine scores masked copies of the images;
                several layers share one activation pass (explain_layers), `max_n` picks channels;
  "gradient"    weighs the activations with the target score's gradient (Grad-CAM's family);
  "activation"  the activations alone, no gradient and no score (class-agnostic: Eigen-CAM);
  "blind"       a floor that ignores the model's weights (a method must beat it to mean anything).
The options a method takes, with their defaults, are read from its signature once, here.
Callers (the command line, evaluate.py, figures.py, bench.py, the tests) read METHODS and choose by
kind, never by a method's name.
"""
import collections
import inspect

from .pipelines import predict_scores
from .layers import find_layer, path_name
from .scoring import score_cam_layers

MASKED, GRADIENT, ACTIVATION, BLIND = "masked", "gradient", "activation", "blind"
KINDS = (MASKED, GRADIENT, ACTIVATION, BLIND)
_POSITIONAL = ("model", "images", "layer", "class_index")
VIEW_OPTIONS = ("input", "output", "reshape", "target")  # views.py and targets.py: every built-in method takes them

Method = collections.namedtuple("Method", "name function label kind options floor")
METHODS = {}  # name -> Method, in registration order


def register(name, label, kind, floor=False):
    """Decorator adding an explainer f(model, images, layer=None, class_index=None, **options) to METHODS:
    `label` names it in figures and tables, `kind` is one of KINDS, `floor` marks a model-blind baseline."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")

    def add(function):
        params = list(inspect.signature(function).parameters.values())
        if tuple(p.name for p in params[:4]) != _POSITIONAL:
            raise ValueError(f"a method takes ({', '.join(_POSITIONAL)}, **options) first; {function.__name__} "
                             f"takes ({', '.join(p.name for p in params)})")
        options = {p.name: p.default for p in params[4:] if p.kind is not p.VAR_KEYWORD}
        if any(p.kind is p.VAR_KEYWORD for p in params):  # it passes the view options on to the core
            options.update(dict.fromkeys(VIEW_OPTIONS))
        METHODS[name] = Method(name, function, label, kind, options, floor)
        return function
    return add


def get(method):
    """The registered Method for a name (or a Method); a ValueError listing the names otherwise."""
    if isinstance(method, Method):
        return method
    found = METHODS.get(str(method).replace("-", "_"))
    if found is None:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return found


def options_for(method, **options):
    """The method's options with these given: every default, the given ones checked by name."""
    method = get(method)
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        raise ValueError(f"{method.name} takes no option {', '.join(unknown)}; its options: "
                         f"{', '.join(method.options) or 'none'}")
    return {**method.options, **options}


def label(method, **options):
    """The method's label for these options: a masked method names the channels it used ("Faster-Score-CAM
    (64 ch.)" for max_n=64, "Score-CAM" for every channel)."""
    method = get(method)
    if method.kind != MASKED or "max_n" not in method.options:
        return method.label
    max_n = options_for(method, **options)["max_n"]
    return f"Faster-Score-CAM ({max_n} ch.)" if max_n else "Score-CAM"


def explain(method, model, images, layer=None, class_index=None, **options):
    """Maps (N, H, W) float32 in [0, 1] of any registered method, by name ("scorecam", "grad-cam" ...)."""
    method = get(method)
    return method.function(model, images, layer, class_index, **options_for(method, **options))


def explain_layers(method, model, images, layers=None, class_index=None, **options):
    """(maps {layer path: (N, H, W)}, probabilities (N, C)) of a method for several layers; a masked
    method shares one activation pass between them."""
    method = get(method)
    options = options_for(method, **options)
    layers = [None] if layers is None else list(layers)
    if method.kind == MASKED:
        return score_cam_layers(model, images, layers, class_index, **options)
    maps = {path_name(find_layer(model, layer)): method.function(model, images, layer, class_index, **options)
            for layer in layers}
    view = {k: options[k] for k in VIEW_OPTIONS if k in options}
    return maps, predict_scores(model, images, class_index, **view)
