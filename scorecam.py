"""Score-CAM (Wang et al. 2020) for Keras models: a batched, backend-neutral core, overlays, and a CLI.

    python scorecam.py                          # demo: the shipped CIFAR-10 model on scikit-image's cat
    python scorecam.py IMAGE [IMAGE ...] [--model models/cifar10.keras] [--layer NAME | --all-layers]
                       [--class NAME_OR_INDEX] [--out PATH]

For each channel k of a conv layer's activation A, A_k is upsampled bilinearly to the input size,
min-max normalised to a mask M_k, and weighted by the model's probability of the target class on
x * M_k; the map is ReLU(sum_k w_k A_k) min-max normalised to [0, 1]. This follows the authors'
reference code. All masked inputs of a chunk of images go through the network as large batches.
"""
import argparse
import os
import sys
from pathlib import Path

import cv2  # noqa: E402
import runtime  # noqa: E402,F401  (before keras: quiet TensorFlow start-up)
import keras  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "cifar10.keras"
CONV_TYPES = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)


def conv_layer(model, name=None):
    """The named conv layer, or the last Conv2D-type layer when name is None; ValueError otherwise."""
    convs = [layer for layer in model.layers if isinstance(layer, CONV_TYPES)]
    if not convs:
        raise ValueError("the model has no convolutional layer to explain")
    if name is None:
        return convs[-1]
    try:
        layer = model.get_layer(name)
    except ValueError:
        raise ValueError(f"no layer named {name!r}; conv layers: {', '.join(c.name for c in convs)}") from None
    if not isinstance(layer, CONV_TYPES):
        raise ValueError(f"layer {name!r} is a {type(layer).__name__}, not a convolutional layer; "
                         f"conv layers: {', '.join(c.name for c in convs)}")
    return layer


def activation_model(model, layer_names):
    """A model giving every named layer's activation and the predictions from one forward pass."""
    outputs = [model.get_layer(n).output for n in layer_names] + [model.output]
    return keras.Model(model.inputs, outputs)


def _check_images(model, images):
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[None]
    size = tuple(model.input_shape[1:3])
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1:3] != size:
        raise ValueError(f"images must be (N, {size[0]}, {size[1]}, 3) RGB arrays in [0, 255], got {images.shape}")
    return images


def _targets(class_index, probs):
    """Target class per image: predicted (None), one int for all, or one int per image."""
    n, num_classes = probs.shape
    if class_index is None:
        return probs.argmax(axis=1)
    targets = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (n,)) if np.ndim(class_index) == 0 \
        else np.asarray(class_index, dtype=np.int64)
    if targets.shape != (n,):
        raise ValueError(f"class_index must be an int or {n} ints, got {len(targets)}")
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(f"class index out of range 0..{num_classes - 1}")
    return targets


def normalise_maps(maps):
    """Min-max normalise each (H, W) map to [0, 1]; a constant map becomes all zeros, never NaN."""
    maps = np.asarray(maps, dtype=np.float32)
    flat = maps.reshape(len(maps), -1)
    low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    span = high - low
    out = np.where(span > 0, (flat - low) / np.where(span > 0, span, 1), 0)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).reshape(maps.shape).astype(np.float32)


def upsample(activations, size):
    """Bilinear (half-pixel, like PyTorch's align_corners=False) upsampling of (N, h, w, K) to size."""
    up = keras.ops.image.resize(activations, size, interpolation="bilinear")
    return np.asarray(keras.ops.convert_to_numpy(up), dtype=np.float32)


def select_channels(activations, max_n):
    """Faster-Score-CAM: indices (N, max_n) of the channels with the largest spatial standard deviation."""
    std = activations.reshape(len(activations), -1, activations.shape[-1]).std(axis=1)
    return np.argsort(-std, axis=1, kind="stable")[:, :max_n]


def channel_weights(model, images, upsampled, targets, batch_size, channels=None):
    """w[i, k]: probability of class targets[i] for images[i] * mask_k, masks made from `upsampled`
    (N, H, W, K) chunk by chunk; constant channels get weight 0 and are never sent through the net."""
    n, _, _, k = upsampled.shape
    chosen = np.broadcast_to(np.arange(k), (n, k)) if channels is None else channels
    low = upsampled.min(axis=(1, 2))
    span = upsampled.max(axis=(1, 2)) - low
    pairs = [(i, c) for i in range(n) for c in chosen[i] if span[i, c] > 0]
    weights = np.zeros((n, k), dtype=np.float32)
    for start in range(0, len(pairs), batch_size):
        img, ch = np.array(pairs[start:start + batch_size]).T
        masks = (upsampled[img, :, :, ch] - low[img, ch, None, None]) / span[img, ch, None, None]
        probs = np.asarray(model.predict_on_batch(images[img] * masks[..., None]))
        weights[img, ch] = probs[np.arange(len(img)), targets[img]]
    return weights


def score_cam_layers(model, images, layers=None, class_index=None, batch_size=256, max_n=None, chunk=None):
    """Score-CAM maps of several conv layers from one activation pass: {layer: (N, H, W) float32 in [0, 1]}.

    Also returns the predicted probabilities (N, C) as the key None. Images go in chunks so memory
    stays bounded whatever N is.
    """
    images = _check_images(model, images)
    names = [conv_layer(model, name).name for name in (layers if layers is not None else [None])]
    acts_model = activation_model(model, names)
    size = tuple(model.input_shape[1:3])
    chunk = chunk or max(1, 4 * batch_size // 64)
    out = {name: np.zeros((len(images),) + size, dtype=np.float32) for name in names}
    out[None] = np.zeros((len(images), model.output_shape[-1]), dtype=np.float32)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk]
        *acts, probs = [np.asarray(a, dtype=np.float32) for a in acts_model.predict_on_batch(x)]
        targets = _targets(class_index if np.ndim(class_index) == 0 else
                           np.asarray(class_index)[start:start + chunk], probs)
        out[None][start:start + len(x)] = probs
        for name, a in zip(names, acts):
            up = upsample(a, size)
            channels = select_channels(a, max_n) if max_n else None
            w = channel_weights(model, x, up, targets, batch_size, channels)
            cam = np.maximum(np.einsum("nhwk,nk->nhw", up, w), 0)
            out[name][start:start + len(x)] = normalise_maps(cam)
    return out


def score_cam(model, images, layer=None, class_index=None, batch_size=256, max_n=None):
    """Score-CAM maps (N, H, W) float32 in [0, 1] for images (N, H, W, 3) with pixels in [0, 255].

    layer: conv layer name (None: the last conv layer). class_index: None explains each image's
    predicted class; an int or N ints choose classes. max_n: Faster-Score-CAM, only the max_n
    channels of largest spatial standard deviation.
    """
    maps = score_cam_layers(model, images, [layer], class_index, batch_size, max_n)
    return next(v for k, v in maps.items() if k is not None)


# ---------------------------------------------------------------- overlays and the command line

def colorize(cam):
    """A [0, 1] map as an RGB uint8 jet heatmap (OpenCV colormap)."""
    heat = cv2.applyColorMap(np.uint8(np.clip(cam, 0, 1) * 255 + 0.5), cv2.COLORMAP_JET)
    return cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)


def overlay(image, cam, alpha=0.45):
    """Blend the heatmap over an RGB uint8 image of any size (the map is resized to it)."""
    h, w = image.shape[:2]
    cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.addWeighted(colorize(cam), alpha, np.ascontiguousarray(image, dtype=np.uint8), 1 - alpha, 0)


def demo_image():
    """scikit-image's bundled cat photo, so the demo needs no download."""
    from skimage import data

    return np.ascontiguousarray(data.chelsea()), "chelsea (skimage.data)"


def parse_class(value, class_names):
    if value is None:
        return None
    if value in class_names:
        return class_names.index(value)
    if value.lstrip("-").isdigit() and 0 <= int(value) < len(class_names):
        return int(value)
    raise ValueError(f"unknown --class {value!r}; classes: {', '.join(class_names)}")


def output_path(out, source, many, suffix):
    out = Path(out)
    if not many and out.suffix.lower() == ".png":
        return out
    return out / f"{Path(source).stem}_{suffix}.png"


def explain_file(model, names, display, image, source, args):
    """Compute and draw the figure for one picture; returns the written path."""
    from data.images import resize
    from plots import layer_grid_figure, single_layer_figure

    x = resize(image, tuple(model.input_shape[1:3]))[None].astype(np.float32)
    target = parse_class(args.class_name, names)
    layers = [c.name for c in model.layers if isinstance(c, CONV_TYPES)] if args.all_layers else [args.layer]
    maps = score_cam_layers(model, x, layers, target, args.batch_size, args.max_n)
    probs = maps.pop(None)[0]
    pred = int(probs.argmax())
    parent = Path(source).parent.name
    true = display[names.index(parent)] if parent in names else None
    if args.all_layers:
        title = f"{display[pred]} - {true or '?'} : {probs[pred]:.2f}"
        path = output_path(args.out, source, args.many, "layers")
        layer_grid_figure(x[0].astype(np.uint8), maps, title, path)
    else:
        (layer, cam), = maps.items()
        title = f"predicted {display[pred]} ({probs[pred]:.2f})" + (f", true {true}" if true else "")
        if target is not None:
            title += f"; map for {display[target]} ({probs[target]:.2f})"
        path = output_path(args.out, source, args.many, "scorecam")
        single_layer_figure(image, x[0].astype(np.uint8), cam[0], overlay(image, cam[0]), f"{title}\n{layer}", path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (none: scikit-image's cat, a demo)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="a .keras model (default: the shipped CIFAR-10 one)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--layer", help="conv layer to explain (default: the last one)")
    group.add_argument("--all-layers", action="store_true", help="one heatmap per conv layer, in one figure")
    p.add_argument("--class", dest="class_name", metavar="NAME_OR_INDEX", help="class to explain (default: predicted)")
    p.add_argument("--out", default="out", help="output PNG (one image) or folder (default: %(default)s/)")
    p.add_argument("--batch-size", type=int, default=256, help="masked images per forward pass")
    p.add_argument("--max-n", type=int, help="Faster-Score-CAM: use only the N most varying channels")
    args = p.parse_args(argv)
    args.many = len(args.images) > 1
    from data.images import ImageError, read_image
    from model import load_model

    try:
        model, names, display = load_model(args.model)
        parse_class(args.class_name, names)
        conv_layer(model, args.layer)
    except ValueError as e:
        sys.exit(f"error: {e}")
    failed = 0
    sources = args.images or [None]
    for source in sources:
        try:
            image, label = (demo_image() if source is None else (read_image(source), source))
            path = explain_file(model, names, display, image, source or "chelsea.png", args)
            print(f"{label}: wrote {path}")
        except (ImageError, ValueError, OSError) as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
