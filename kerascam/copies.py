"""Copies of a user's model, never the model itself: the one model-copy helper, a bfloat16 copy and
a copy replicated over several devices. Each copy is cached and its weights re-synced on every call."""
import keras

from .cache import derived
from .errors import reason
from .layers import all_layers


def sync_weights(copy, model):
    """`copy` (a clone of `model`) given the model's weights, then finalize_state() on each of its layers
    that holds weights, as Keras's own weight loading does: an adapted Normalization computes the mean and
    variance it uses there from the weights, and a clone would otherwise normalise with mean 0, variance 1."""
    copy.set_weights(model.get_weights())
    for ref in all_layers(copy):
        if ref.layer.weights and hasattr(ref.layer, "finalize_state"):
            ref.layer.finalize_state()
    return copy


def copy_model(model, dtype=None, what="a copy of this model"):
    """A new model of the same layers, nested models too, each rebuilt from its config (in `dtype` where
    given: a Keras dtype policy such as "mixed_bfloat16"), with the model's weights. A layer that cannot
    be rebuilt from its config is one ValueError naming `what` could not be made."""
    def clone(layer):
        config = layer.get_config()
        if dtype and "dtype" in config and not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = dtype
        return layer.__class__.from_config(config)

    try:
        copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    except Exception as e:  # Keras and the layers refuse in many ways
        raise ValueError(f"could not make {what} ({reason(e)})") from None
    return sync_weights(copy, model)


def bfloat16_copy(model):
    """A copy of `model` computing in bfloat16 (Keras "mixed_bfloat16": float32 weights, bfloat16
    maths); the scores are cast to float32 before the softmax."""
    def build():
        try:
            return copy_model(model, "mixed_bfloat16", "a bfloat16 copy of this model")
        except ValueError as e:
            raise ValueError(f"precision='bfloat16' {e}; pass precision='float32'") from None

    return sync_weights(derived(model, "bfloat16", build), model)


def replicated_copy(model, devices):
    """A float32 copy of `model` whose weights are replicated on every device of a Keras DataParallel
    distribution, and that distribution: batches given to it run sharded over the devices."""
    distribution = keras.distribution.DataParallel(devices=list(devices))

    def build():
        with distribution.scope():
            try:
                return copy_model(model, what="a copy of this model on the devices")
            except ValueError as e:
                raise ValueError(f"devices= {e}; use one device") from None

    return sync_weights(derived(model, ("replicated", tuple(devices)), build), model), distribution
