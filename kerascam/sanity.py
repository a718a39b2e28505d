"""The sanity check (Adebayo et al. 2018), cascading model parameter randomisation: a copy of the model
is re-initialised from the top layer down, one layer (a BatchNorm with the conv below it) at a time;
after each step, each image's map from the trained and from the randomised model are compared by their
Spearman rank correlation, for the trained model's target class. A method that explains the model
decorrelates; a floor stays at 1."""
import keras
import numpy as np
from tqdm import tqdm

from .copies import copy_model
from .layers import all_layers, path_name
from .metrics import spearman


def layer_groups(model):
    """[(name, layers)] from the top down, one per layer with weights; each BatchNorm joins the
    layer below it (the conv its block ends with), so a block is randomised as the cascade reaches it.
    The layers of nested models (a backbone) are taken one by one too, named by their path
    ("backbone/conv"), not the whole backbone in one step; a Normalization layer is left as it is
    (its mean and variance are statistics of the data, not learned, and a random variance is NaN)."""
    refs = all_layers(model)
    containers = {ref.path[:-1] for ref in refs}  # nested models: their own layers are listed
    groups, pending = [], []
    for ref in reversed(refs):
        layer = ref.layer
        if ref.path in containers or not layer.weights or isinstance(layer, keras.layers.Normalization):
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            pending.append(layer)
        else:
            groups.append((path_name(ref), [layer] + pending))
            pending = []
    if pending and groups:
        groups[-1][1].extend(pending)
    return groups


def reinitialise(layer, seed):
    """Re-draw every weight of a layer with its own initializer (seeded); weights without one get a
    seeded Glorot uniform (2-D and more) or normal (stddev 0.05). Seeds are taken modulo 2**31: JAX
    takes no larger one (sanity_check's seed * 100,000 passes 2**32 from --seed 42950)."""
    seed %= 2**31
    for i, var in enumerate(layer.weights):
        init = getattr(layer, f"{var.name}_initializer", None)
        if isinstance(init, keras.initializers.Initializer):
            config = init.get_config()
            if "seed" in config:
                config["seed"] = seed + i
            init = type(init).from_config(config)
        elif len(var.shape) >= 2:
            init = keras.initializers.GlorotUniform(seed=seed + i)
        else:
            init = keras.initializers.RandomNormal(stddev=0.05, seed=seed + i)
        var.assign(init(var.shape, dtype=var.dtype))


def sanity_sample(n, count, seed=0):
    """Indices of the sanity check's `count` images out of the sample's n: drawn at random (seeded), in
    order. The first `count` would come from the first classes only, the sample being sorted by index
    and the splits ordered by class (the first 50 of a 1,000-picture CIFAR-10 sample are all airplanes)."""
    return np.sort(np.random.default_rng(seed).choice(n, min(count, n), replace=False))


def sanity_check(model, images, methods, targets, layer=None, batch_size=256, seed=0):
    """Cascading randomisation: {method: {group: per-image Spearman (trained map vs randomised map)}}.

    Works on a copy of the model (copies.copy_model); the class is the trained model's target.
    """
    copy = copy_model(model)
    trained = {name: fn(model, images, layer, targets, batch_size) for name, fn in methods.items()}
    out = {name: {} for name in methods}
    for g, (group, layers) in enumerate(tqdm(layer_groups(copy), desc="sanity check", unit="layer", mininterval=1)):
        for j, lay in enumerate(layers):
            reinitialise(lay, seed * 100_000 + g * 100 + j * 10)
        for name, fn in methods.items():
            out[name][group] = spearman(trained[name], fn(copy, images, layer, targets, batch_size))
    return out
