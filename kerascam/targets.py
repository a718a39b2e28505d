"""What an explanation explains: a target turns the chosen head's output into one score per picture.

A target is a callable target(values, index) -> (rows,) scores, written with keras.ops so that it runs
inside the compiled graph on every backend: `values` is the head's output for a batch of pictures,
masked or not, and `index` (rows,) int32 says which of the call's pictures each row belongs to (gather
per-picture data with keras.ops.take(data, index, axis=0)). Score-CAM weighs each masked picture by the
score, the gradient methods differentiate it. Its attribute `takes` says which values it gets:
"outputs" (what model.predict returns, the default for any function of yours), "scores" (a classifier's
pre-softmax scores) or "probabilities" (the score rule's: softmax applied once).
"""
import keras
import numpy as np

TAKES = ("outputs", "scores", "probabilities")


def takes(target):
    """Which values `target` is given (see above); a clear ValueError for anything else."""
    kind = getattr(target, "takes", "outputs")
    if kind not in TAKES:
        raise ValueError(f"a target's `takes` must be one of {', '.join(TAKES)}, got {kind!r}")
    return kind


def check_target(target, class_index=None):
    """target as given (None, or a callable); a ValueError where it is not one, or comes with class_index."""
    if target is None:
        return None
    if class_index is not None:
        raise ValueError("pass class_index or target, not both (a target decides the score itself)")
    if not callable(target):
        raise ValueError(f"target must be a callable target(values, index) -> (rows,) scores, got "
                         f"{type(target).__name__}")
    takes(target)
    return target


def _made(function, kind, name):
    function.takes, function.__name__ = kind, name
    return function


def _per_row(data, index):
    """One value for every row, or per-picture values gathered by the rows' pictures."""
    data = keras.ops.convert_to_tensor(data)
    return keras.ops.take(data, index, axis=0) if len(data.shape) else keras.ops.broadcast_to(data, index.shape)


def probability(class_index):
    """The probability of a class (one int, or one per picture), by the score rule: today's default."""
    classes = np.asarray(class_index, np.int32)

    def target(values, index):
        return keras.ops.take_along_axis(values, _per_row(classes, index)[:, None], axis=1)[:, 0]
    return _made(target, "probabilities", "probability")


def logit(class_index):
    """The pre-softmax score of a class (one int, or one per picture)."""
    classes = np.asarray(class_index, np.int32)

    def target(values, index):
        return keras.ops.take_along_axis(values, _per_row(classes, index)[:, None], axis=1)[:, 0]
    return _made(target, "scores", "logit")


def regression(unit=0, lower=False):
    """A regression output's value (one unit of it), or its negative with lower=True: what lowers it."""
    def target(values, index):
        value = keras.ops.reshape(values, (keras.ops.shape(values)[0], -1))[:, unit]
        return -value if lower else value
    return _made(target, "outputs", "regression")


def segmentation(class_index, regions):
    """The mean of class c's output (a softmax head: its probability) over a boolean region of the output
    mask, one region (H', W') per picture or one for all (pytorch-grad-cam's SemanticSegmentationTarget)."""
    regions = np.asarray(regions, np.float32)
    if regions.ndim < 2:
        raise ValueError(f"regions must be (H', W') or (N, H', W') boolean masks, got shape {regions.shape}")

    def target(values, index):
        region = keras.ops.take(regions, index, axis=0) if regions.ndim == 3 else regions[None]
        channel = values[..., class_index]
        total = keras.ops.sum(region * channel, axis=(1, 2))
        return total / keras.ops.maximum(keras.ops.sum(region * keras.ops.ones_like(channel), axis=(1, 2)), 1.0)
    return _made(target, "outputs", "segmentation")


def similarity(references):
    """Cosine similarity of an embedding output (rows, D) to a reference embedding, one per picture (N, D)
    or one for all (D,)."""
    references = np.asarray(references, np.float32)

    def target(values, index):
        ref = _per_row(references, index) if references.ndim == 2 else references[None]
        dot = keras.ops.sum(values * ref, axis=-1)
        norms = keras.ops.sqrt(keras.ops.sum(values**2, axis=-1) * keras.ops.sum(ref**2, axis=-1))
        return dot / keras.ops.maximum(norms, 1e-12)
    return _made(target, "outputs", "similarity")
