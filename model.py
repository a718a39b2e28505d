"""The original experiment's VGG-style CNN, and saving/loading it with its class names."""
import json
import zipfile
from pathlib import Path

import keras
from keras import layers

import kerascam
from atomic import atomic_path
from kerascam.errors import reason

BLOCKS = 4
CONVS_PER_BLOCK = 3
FILTERS = 64
DENSE_UNITS = (512, 128, 64)
DROPOUT = 0.25


def build_model(input_shape=(32, 32, 3), num_classes=10, dtype=None):
    """Build the network. Input: RGB pixels in [0, 255]; output: softmax probabilities.

    `dtype` is a Keras dtype policy (e.g. "mixed_bfloat16" for fast training); the softmax
    always runs in float32. The pre-softmax scores are the output of the layer "logits".
    """
    height, width = input_shape[:2]
    if min(height, width) < 2**BLOCKS or input_shape[-1] != 3:
        raise ValueError(f"input shape must be at least {2**BLOCKS}x{2**BLOCKS}x3, got {tuple(input_shape)}")
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale", dtype=dtype)(inputs)
    for b in range(1, BLOCKS + 1):
        for c in range(1, CONVS_PER_BLOCK + 1):
            x = layers.Conv2D(FILTERS, 3, padding="same", activation="relu", name=f"block{b}_conv{c}", dtype=dtype)(x)
        x = layers.BatchNormalization(name=f"block{b}_bn", dtype=dtype)(x)
        x = layers.MaxPooling2D(2, name=f"block{b}_pool", dtype=dtype)(x)
        x = layers.Dropout(DROPOUT, name=f"block{b}_dropout", dtype=dtype)(x)
    x = layers.Flatten(name="flatten", dtype=dtype)(x)
    for i, units in enumerate(DENSE_UNITS, 1):
        x = layers.Dense(units, activation="relu", name=f"fc{i}", dtype=dtype)(x)
        x = layers.Dropout(DROPOUT, name=f"fc{i}_dropout", dtype=dtype)(x)
    x = layers.Dense(num_classes, name="logits", dtype=dtype)(x)
    outputs = layers.Activation("softmax", name="predictions", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="vgg_scorecam")


def conv_layer_names(model):
    """The conv layers' names, by the library's one conv rule (kerascam.conv_layers)."""
    return [ref.layer.name for ref in kerascam.conv_layers(model)]


def single_output(model):
    """The same layers as a model whose output is one tensor, not a list of one (which calling would return)."""
    return keras.Model(model.inputs[0], model.outputs[0], name=model.name)


def for_inference(model):
    """A float32 model without optimizer state: what gets shipped (a third of a trained model's file).

    A compiled float32 model is re-wrapped uncompiled around the same layers; a mixed-precision one
    is rebuilt by build_model in float32 with its weights."""
    if any(layer.dtype_policy.name != "float32" for layer in model.layers):
        copy = build_model(model.input_shape[1:], model.output_shape[-1])
        copy.set_weights(model.get_weights())
        return copy
    return single_output(model) if getattr(model, "optimizer", None) is not None else model


def classes_path(model_path):
    """Where the class names of a model file live: `name.keras` -> `name.classes.json`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".classes.json")


def save_model(model, path, class_names, display_names=None):
    """Save a float32 `.keras` file (weights only, no optimizer) and its class names, each written atomically."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"model file must end in .keras: {path}")
    if len(class_names) != model.output_shape[-1]:
        raise ValueError(f"{len(class_names)} class names for a model with {model.output_shape[-1]} outputs")
    with atomic_path(path) as tmp:
        for_inference(model).save(tmp)
    meta = {"classes": list(class_names), "display_names": list(display_names) if display_names else None}
    with atomic_path(classes_path(path)) as tmp:
        tmp.write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")


def _is_keras_archive(path):
    """Whether `path` is a .keras archive: a zip file holding config.json."""
    try:
        with zipfile.ZipFile(path) as archive:
            return "config.json" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def load_model(path):
    """Load (model, class_names, display_names) of any single-input Keras image classifier file; a
    clear ValueError for anything else. Class names come from the class file beside the model
    (`name.classes.json`), else they are the class indices."""
    path = Path(path)
    if path.is_dir():  # a TF 2 SavedModel, or a model saved with a typo'd suffix by an older Keras
        raise ValueError(f"{path} is a folder, not a model file: Keras 3 loads .keras (and legacy .h5) files; "
                         "load the model where it was made and save it with model.save('name.keras')")
    if not path.is_file():
        raise ValueError(f"model file not found: {path}")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a bad file
        if not _is_keras_archive(path):
            raise ValueError(f"not a Keras model file: {path} ({type(e).__name__})") from None
        raise ValueError(f"{path} is a Keras model file that could not be rebuilt: {reason(e, sentence=True)} If it holds "
                         "custom layers or functions, register each (a named function, not a Python lambda) with "
                         "@keras.saving.register_keras_serializable() and import it before loading, or preprocess "
                         "with Rescaling/Normalization layers instead of a Lambda, and save the model again") from None
    try:
        num_classes = kerascam.num_classes(model)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    shapes = [tuple(t.shape) for t in model.inputs], [tuple(t.shape) for t in model.outputs]
    if len(shapes[0]) != 1 or len(shapes[1]) != 1 or len(shapes[0][0]) != 4 or len(shapes[1][0]) != 2:
        raise ValueError(f"{path}: the model takes {shapes[0]} and gives {shapes[1]}; the command line explains "
                         "image classifiers, one (N, H, W, C) input and one (N, classes) output (the Python API "
                         "takes input=, output= and target= for the others: see docs/your-own-model.md)")
    if not isinstance(model, keras.Sequential):
        model = single_output(model)  # files saved elsewhere may hold outputs=[probs]
    meta_path = classes_path(path)
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            class_names = [str(c) for c in meta["classes"]]
            display_names = meta.get("display_names") or None
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"unreadable class-name file: {meta_path}") from None
        if len(class_names) != num_classes or (display_names and len(display_names) != num_classes):
            raise ValueError(f"{meta_path} names {len(class_names)} classes but the model has {num_classes} outputs")
    else:
        class_names, display_names = [str(i) for i in range(num_classes)], None
    return model, class_names, display_names or list(class_names)
