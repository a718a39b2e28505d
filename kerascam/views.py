"""The explained view of a model: which input is masked, which output is explained, and how a layer's
output is laid on the input's grid. Resolved once here, from the options every method takes:

  input     a name or an index: the image input that is masked and explained, where the model takes
            several inputs (the others go through unchanged with each masked picture). Without it, a
            model with one image-like input (pictures, signals, volumes) uses that one.
  output    a name or an index: the head that is explained, where the model has several outputs.
  reshape   a callable turning the layer's output into (N, *spatial, K) on the input's grid (keras.ops),
            for layouts the core cannot infer (Swin-style windows, non-square grids); by default a
            token layer (N, T, D) of a picture model is laid on a g_h x g_w grid of the picture's aspect,
            its leading extra tokens (a class token, register tokens) dropped.
"""
import collections
import math

import keras

View = collections.namedtuple("View", "input output reshape")
DEFAULT = View(0, 0, None)
GRID_AXES = {3: "l", 4: "h, w", 5: "d, h, w"}  # a layer's grid for (N, L, C), (N, H, W, C), (N, D, H, W, C) inputs
EXTRA_TOKENS = 8
ASPECT = 1.1  # a grid's aspect is the input's within this factor (patch grids of sizes not divisible by the patch)  # at most this many leading tokens (class, distillation, register tokens) are dropped


def _pick(what, given, tensors, names, candidates):
    """The index of `given` (a name or an index) among the model's tensors, or of the one candidate."""
    if given is None:
        if len(candidates) == 1:
            return candidates[0]
        listing = ", ".join(f"{i}: {names[i]!r} {tuple(tensors[i].shape)}" for i in candidates)
        raise ValueError(f"the model has several {what}s ({listing}); pass {what}= (a name or an index)")
    if isinstance(given, str):
        if given not in names:
            raise ValueError(f"no {what} named {given!r}; the model's {what}s: {', '.join(map(repr, names))}")
        return names.index(given)
    if isinstance(given, bool) or not isinstance(given, int) or not -len(tensors) <= given < len(tensors):
        raise ValueError(f"{what}= must be a name or an index below {len(tensors)}, got {given!r}")
    return given % len(tensors)


def _names(tensors):
    return [t._keras_history.operation.name if hasattr(t, "_keras_history") else f"#{i}"
            for i, t in enumerate(tensors)]


def resolve(model, input=None, output=None, reshape=None):
    """The View of these options for this model; a ValueError listing the candidates where one is needed."""
    try:
        inputs, outputs = list(model.inputs), list(model.outputs)
    except (AttributeError, TypeError, ValueError):
        raise ValueError("the model must be a built Sequential or functional Keras model (give it a keras.Input); "
                         "subclassed models cannot be explained layer by layer") from None
    image_like = [i for i, t in enumerate(inputs) if 3 <= len(t.shape) <= 5]
    if not image_like:
        raise ValueError(f"the model takes no image-like input (N, H, W, C), (N, L, C) or (N, D, H, W, C): "
                         f"{', '.join(str(tuple(t.shape)) for t in inputs)}")
    index = _pick("input", input, inputs, _names(inputs), image_like)
    if index not in image_like:
        raise ValueError(f"input {input!r} is {tuple(inputs[index].shape)}, not an image-like input")
    head = _pick("output", output, outputs, _names(outputs), list(range(len(outputs))))
    if reshape is not None and not callable(reshape):
        raise ValueError(f"reshape must be a callable (N, ...) -> (N, *spatial, K), got {type(reshape).__name__}")
    return View(index, head, reshape)


def token_grid(tokens, size):
    """(extra, (g_h, g_w)): the leading tokens to drop and the grid the others form, of the input's aspect
    (h, w; square where the size is open); a ValueError where no grid fits."""
    h, w = (size[0] or 1, size[1] or 1) if len(size) == 2 else (1, 1)
    for extra in range(0, min(EXTRA_TOKENS, tokens - 4) + 1):  # a grid has at least 2 x 2 tokens
        n = tokens - extra
        rows = max(1, round(math.sqrt(n * h / w)))
        for g_h in (rows, rows - 1, rows + 1):
            if g_h >= 1 and n % g_h == 0 and max(g_h * w / (n // g_h) / h, (n // g_h) * h / g_h / w) <= ASPECT:
                return extra, (g_h, n // g_h)
    raise ValueError(f"{tokens} tokens form no grid of the input's aspect ({h}x{w}) after dropping up to "
                     f"{EXTRA_TOKENS} leading tokens; pass reshape= to lay them out")


class Grid(keras.layers.Layer):
    """A tapped layer's output laid on the input's grid: the user's reshape, or tokens (N, T, D) without
    their leading extra ones, reshaped to (N, g_h, g_w, D)."""

    def __init__(self, extra=0, grid=None, reshape=None, **kwargs):
        super().__init__(**kwargs)
        self.extra, self.grid, self.reshape = extra, grid, reshape

    def call(self, x):
        if self.reshape is not None:
            return self.reshape(x)
        return keras.ops.reshape(x[:, self.extra:, :], (-1,) + tuple(self.grid) + (x.shape[-1],))


def grid_for(tensor, image_spec, view, name, number):
    """A Grid for a tapped tensor that is not on the image input's grid (None where it is): the user's
    reshape, or a token layer's inferred grid. A ValueError says what to pass where neither fits."""
    rank, want = len(tensor.shape), len(image_spec)
    if view.reshape is not None:
        return Grid(reshape=view.reshape, name=f"score_cam_grid{number}")
    if rank == want:
        return None
    if rank == 3 and want == 4:  # (N, T, D) tokens of a picture model: a vision transformer's layer
        extra, grid = token_grid(int(tensor.shape[1]), tuple(image_spec[1:3]))
        return Grid(extra, grid, name=f"score_cam_grid{number}")
    if rank < 3:
        raise ValueError(f"layer {name!r} outputs {tuple(tensor.shape)}; explaining a layer needs a {want}-D output on "
                         f"the input's grid, (N, {GRID_AXES.get(want, '...')}, K) (a conv, activation, add, "
                         "batch-norm or pooling layer)")
    raise ValueError(f"layer {name!r} outputs {tuple(tensor.shape)} and the input is {tuple(image_spec)}: "
                     "pass reshape= to lay the layer's output on the input's grid (N, *spatial, K)")
