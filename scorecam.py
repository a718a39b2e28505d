"""Score-CAM (Wang et al. 2020) and its baselines from the command line, over the kerascam library.

    python scorecam.py                          # demo: the shipped CIFAR-10 model on scikit-image's cat
    python scorecam.py IMAGE [IMAGE ...] [--model ANY.keras] [--layer NAME_OR_PATH | --all-layers]
                       [--method METHOD] [--class NAME_OR_INDEX] [--out PATH] [--max-n N]
                       [--precision auto|float32|bfloat16]
                       [--preprocess none|unit|tf|torch|caffe]   # a model trained on preprocessed pictures
    python scorecam.py --folder DIR --out OUTDIR [--layer NAME] ...   # one overlay PNG per picture, streamed

For each channel k of a layer's activation A, A_k is upsampled bilinearly to the input size,
min-max normalised to a mask M_k, and weighted by the model's probability of the target class on
x * M_k; the map is ReLU(sum_k w_k A_k) min-max normalised to [0, 1]. This follows the authors'
reference code. Which layer and which probability (softmax applied once) follow the kerascam core's
rules, so any single-input Keras image classifier works. --method runs any registered method.
"""
import argparse
import collections
import sys
from pathlib import Path

import runtime  # before keras: quiet TensorFlow start-up
import keras
import numpy as np

import kerascam
from kerascam import registry
from kerascam import batching
from kerascam.devices import check_batch_size, resolve_devices
from kerascam import precision
from kerascam.precision import PRECISIONS

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "cifar10.keras"


def demo_image():
    """scikit-image's bundled cat photo, so the demo needs no download."""
    from skimage import data

    return np.ascontiguousarray(data.chelsea()), "chelsea (skimage.data)"


def parse_class(value, class_names):
    if value is None:
        return None
    if value in class_names:
        return class_names.index(value)
    if value.lstrip("-").isdecimal() and 0 <= int(value) < len(class_names):
        return int(value)
    raise ValueError(f"unknown --class {value!r}; classes: {', '.join(class_names)}")


FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg")


def output_names(sources, suffix):
    """Names of the outputs of pictures written into one folder, in order: <stem>_<suffix>.png, the whole
    file name (a.jpg: a_jpg_<suffix>.png) where stems clash, and a counter (a_jpg_2_<suffix>.png) where
    names still clash, so no output replaces another (names compared case-blind, as some file systems do)."""
    stems = collections.Counter(Path(source).stem.casefold() for source in sources)
    names, taken = [], set()
    for source in map(Path, sources):
        base = source.stem if stems[source.stem.casefold()] == 1 else source.name.replace(".", "_")
        name, count = f"{base}_{suffix}.png", 1
        while name.casefold() in taken:
            count += 1
            name = f"{base}_{count}_{suffix}.png"
        taken.add(name.casefold())
        names.append(name)
    return names


def output_paths(out, sources, suffix):
    """Where each picture's figure goes: --out itself for one picture where it names a PNG or JPEG
    file, else the folder --out, with output_names."""
    out = Path(out)
    if len(sources) == 1 and out.suffix.lower() in FIGURE_SUFFIXES:
        return [out]
    return [out / name for name in output_names(sources, suffix)]


def method_options(args):
    """The registered method's options that the command line sets: --max-n and --precision where the
    method takes them, and --batch-size (masked pictures a pass) for the masked-input (Score-CAM) kind."""
    method = registry.get(args.method)
    given = {"max_n": args.max_n, "precision": args.precision}
    if method.kind == registry.MASKED:
        given["batch_size"] = args.batch_size
    return {k: v for k, v in given.items() if k in method.options and v is not None}


def method_label(args):
    """The method's label in figures, from the channels actually used: "Faster-Score-CAM (64 ch.)" for
    --max-n 64, "Score-CAM" for faster-scorecam with --max-n 0."""
    return registry.label(args.method, **method_options(args))


def output_suffix(args):
    """The end of an output's name: the method, so that runs of several methods into one --out keep
    each other's figures (scorecam, fasterscorecam, gradcam, ...; "_layers" added for --all-layers)."""
    return args.method.replace("_", "") + ("_layers" if args.all_layers else "")


def model_input(model, image):
    """A picture (H, W, 3) uint8 as the model's input (1, H', W', C) float32: resized to the model's
    size (kept where the model takes any size), greyscale for a one-channel model."""
    import cv2

    from data.images import resize

    height, width, channels = kerascam.input_spec(model)
    x = resize(image, (height or image.shape[0], width or image.shape[1]))
    if channels == 1:
        x = cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY)[..., None]
    elif channels != 3:
        raise ValueError(f"the model takes {channels}-channel images; the command line reads RGB pictures "
                         "(use the Python API)")
    return x[None].astype(np.float32)


PREPROCESSING = ("none", "unit", "tf", "torch", "caffe")


def preprocess(x, mode):
    """Pixels (N, H, W, C) in [0, 255] as a model trained on preprocessed pictures takes them (--preprocess):
    "none" as they are (preprocessing inside the model), "unit" x / 255, and keras.applications'
    ImageNet modes: "tf" [-1, 1], "torch" [0, 1] less the ImageNet mean over its std, "caffe" BGR less
    the ImageNet mean. Score-CAM then masks the preprocessed input, as the authors' code does."""
    if mode == "none":
        return x
    if mode == "unit":
        return x / np.float32(255)
    if mode in ("torch", "caffe") and x.shape[-1] != 3:
        raise ValueError(f"--preprocess {mode} is for RGB models; this one takes {x.shape[-1]}-channel images "
                         "(use --preprocess none, unit or tf)")
    return keras.applications.imagenet_utils.preprocess_input(np.array(x, np.float32), mode=mode)


def explain_maps(model, x, layers, target, args):
    """({layer: maps}, probabilities) of the chosen method for the layers."""
    return registry.explain_layers(args.method, model, x, layers, target, **method_options(args))


def warn_blank(model, layer, name, maps, x=None):
    """A `warning:` on stderr where a layer's maps are all zero for every picture (a 1x1 grid, a constant
    layer), so a blank figure is not silent; the exit status is unchanged. x: a model input, for the grid of
    a model that takes any size."""
    if not len(maps) or np.any(maps):
        return
    net = kerascam.graph.explainable_cached(model, [kerascam.find_layer(model, layer)])
    grid = tuple(net.outputs[0].shape[1:-1])
    if None in grid and x is not None:
        grid = net.predict_on_batch(x[:1])[0].shape[1:-1]
    why = (f"its grid is {'x'.join(map(str, grid))}, one value per channel, so there is nothing to locate"
           if np.prod([g or 2 for g in grid]) == 1 else
           "its activations are constant over the picture or their weighted sum is nowhere positive")
    print(f"warning: layer {name!r} gives an all-zero map for every picture: {why}; pass --layer with a "
          "4-D layer of a larger grid (see --help)", file=sys.stderr)


def explain_file(model, names, display, image, source, args, path):
    """Compute and draw the figure for one picture into `path` (output_paths)."""
    from plots import layer_grid_figure, single_layer_figure

    x = model_input(model, image)
    shown = np.clip(x[0], 0, 255).astype(np.uint8)
    shown = np.repeat(shown, 3, axis=-1) if shown.shape[-1] == 1 else shown
    target = parse_class(args.class_name, names)
    layers = kerascam.conv_layers(model) if args.all_layers else [args.layer]
    maps, probs = explain_maps(model, preprocess(x, args.preprocess), layers, target, args)
    for layer, (name, heat) in zip(layers, maps.items()):
        warn_blank(model, layer, name, heat, x)
    probs = probs[0]
    pred = int(probs.argmax())
    parent = Path(source).parent.name
    true = display[names.index(parent)] if parent in names else None
    label = method_label(args)
    if args.all_layers:
        title = f"{display[pred]} - {true or '?'} : {probs[pred]:.2f} ({label}"
        title += f", map for {display[target]})" if target is not None else ")"
        layer_grid_figure(shown, maps, title, path, label=label)
    else:
        (layer, heat), = maps.items()
        title = f"predicted {display[pred]} ({probs[pred]:.2f})" + (f", true {true}" if true else "")
        if target is not None:
            title += f"; map for {display[target]} ({probs[target]:.2f})"
        single_layer_figure(image, shown, heat[0], kerascam.overlay(image, heat[0]), f"{title}\n{label}, {layer}", path,
                            label=label)


def _folder_files(folder, out, suffix):
    """Every non-hidden file under `folder` (sorted, recursive), leaving out anything under `out`,
    each with the overlay path it gets: OUT/<same subfolders>/<stem>_<suffix>.png (output_names)."""
    out = out.resolve()
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.resolve() == out or out in path.resolve().parents:
            continue  # earlier outputs written inside the folder are not inputs
        files.append(path)
    by_folder = collections.defaultdict(list)
    for path in files:
        by_folder[path.parent].append(path)
    dest = {}
    for parent, paths in by_folder.items():
        for path, name in zip(paths, output_names(paths, suffix)):
            dest[path] = out / parent.relative_to(folder) / name
    return files, dest


def folder_record(folder, path, figure, probs, names, display):
    """What the report shows of one picture: where it and its figure are, the predicted class and its
    probability, and the true class where the picture's folder is named after one."""
    pred = int(np.argmax(probs))
    parent = path.parent.name
    return {"source": path.relative_to(folder).as_posix(), "picture": str(path), "figure": str(figure),
            "predicted": display[pred], "probability": float(probs[pred]),
            "true": display[names.index(parent)] if parent in names and path.parent != folder else None}


def folder_results(model, batches, target, args, count):
    """(maps {layer: (n, H, W)}, probabilities (n, C)) for each batch of the folder: a masked (Score-CAM)
    method streamed, its batches sharing forward passes; any other method, or a model taking any size, a
    batch at a time. "auto" precision measures a stream, unless the folder is a small call (count pictures)."""
    height, width, _ = kerascam.input_spec(model)
    if registry.get(args.method).kind == registry.MASKED and height and width:
        options = method_options(args)
        if options.get("precision") == "auto" and count < precision.AUTO_MIN_IMAGES:
            options["precision"] = "float32"
        if options.get("batch_size") == "auto":  # a small folder, like a small call, is not measured
            k = kerascam.graph.explainable_cached(model, [kerascam.find_layer(model, args.layer)]).outputs[0].shape[-1]
            if count * min(k, options.get("max_n") or k) < batching.AUTO_MIN_PASSES:
                options["batch_size"] = batching.resolve_batch_size("auto", devices=len(resolve_devices(args.devices)))
        return kerascam.score_cam_stream(model, batches, class_index=target, layers=[args.layer],
                                         devices=args.devices, **options)
    return (explain_maps(model, x, [args.layer], target, args) for x in batches)


def explain_folder(model, names, display, args):
    """One overlay PNG per picture under args.folder, streamed: pictures are read, explained and
    written a batch at a time; then the folder's report (OUT/index.html). Returns (written, skipped),
    skipped being the unreadable files' errors."""
    from PIL import Image
    from tqdm import tqdm

    import report
    from atomic import atomic_path
    from data.images import ImageError, read_image

    folder = Path(args.folder)
    if not folder.is_dir():
        raise ValueError(f"folder not found: {folder}")
    files, dest = _folder_files(folder, Path(args.out), output_suffix(args))
    target = parse_class(args.class_name, names)
    height, width, _ = kerascam.input_spec(model)
    any_size = height is None or width is None  # then each picture is explained at its own size, one at a time
    if any_size and args.devices is not None:
        raise ValueError("--devices needs a model with a fixed input size (this one explains each picture at its "
                         "own size, one at a time)")
    skipped, in_flight, records, signal, last = [], collections.deque(), [], False, None
    bar = tqdm(total=len(files), desc=method_label(args), unit="img", mininterval=1)

    def batches():
        paths, pictures = [], []
        for n, path in enumerate(files, 1):
            try:
                pictures.append(read_image(path))
                paths.append(path)
            except ImageError as e:
                skipped.append(str(e))
                bar.update(1)
            if paths and (len(paths) == (1 if any_size else args.read_batch) or n == len(files)):
                in_flight.append((paths, pictures))  # the originals of the batches in flight, no more
                yield preprocess(np.concatenate([model_input(model, p) for p in pictures]), args.preprocess)
                paths, pictures = [], []

    try:
        for layer_maps, probs in folder_results(model, batches(), target, args, len(files)):
            ((name, maps),) = layer_maps.items()
            signal, last = signal or bool(np.any(maps)), (name, maps[:1]) if len(maps) else last
            for path, picture, heat, p in zip(*in_flight.popleft(), maps, probs):
                with atomic_path(dest[path]) as tmp:
                    Image.fromarray(kerascam.overlay(picture, heat)).save(tmp, format="PNG")
                records.append(folder_record(folder, path, dest[path], p, names, display))
                bar.update(1)
    finally:
        bar.close()
    if last is not None and not signal:  # every map of the folder all zero
        warn_blank(model, args.layer, *last)
    report.update_report(args.out, records, skipped, method=output_suffix(args), label=method_label(args))
    return len(records), skipped


def method_name(value):
    """--method: a registered method that explains a model (not a floor), with '-' for '_' (faster-scorecam)."""
    name = value.replace("-", "_")
    if name not in kerascam.METHODS or kerascam.METHODS[name].floor:
        raise argparse.ArgumentTypeError(f"unknown method {value!r}; choose from {', '.join(method_choices())}")
    return name


def method_choices():
    return [name.replace("_", "-") for name, m in kerascam.METHODS.items() if not m.floor]


def parser():
    """The command line's parser; --method's choices and help come from the registry."""
    methods = ", ".join(f"{name} ({kerascam.METHODS[name.replace('-', '_')].label})" for name in method_choices())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (none: scikit-image's cat, a demo)")
    p.add_argument("--folder", metavar="DIR", help="explain every picture under DIR (recursively): one overlay "
                   "PNG each in --out, same subfolders; unreadable files are skipped and counted")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="a .keras model (default: the shipped CIFAR-10 one)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--layer", help="layer to explain: a name, or a path outer/inner inside nested models; "
                       "any layer with a 4-D output (default: the last conv layer)")
    group.add_argument("--all-layers", action="store_true", help="one heatmap per conv layer, in one figure")
    p.add_argument("--method", type=method_name, default="scorecam", help=f"default scorecam; one of {methods}")
    p.add_argument("--class", dest="class_name", metavar="NAME_OR_INDEX", help="class to explain (default: predicted)")
    p.add_argument("--out", default="out", help="output PNG or JPEG (one image) or folder (default: %(default)s/)")
    p.add_argument("--batch-size", type=batch_size_arg, default="auto", help="masked images per forward pass "
                   "(fewer for pictures over 224 x 224: at most 256 x 224 x 224 pixels a pass); auto (default): "
                   "32, 64, 128 or 256, the fastest measured here for a large call, else 256")
    p.add_argument("--max-n", type=int, help="Faster-Score-CAM: use only the N most varying channels")
    p.add_argument("--preprocess", choices=PREPROCESSING, default="none",
                   help="how the model takes pixels, where it was trained on preprocessed pictures without that "
                   "step inside it: none (default: [0, 255], or preprocessing inside the model), unit ([0, 1]), "
                   "or keras.applications' ImageNet modes tf ([-1, 1]), torch, caffe")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="forward passes in float32 or bfloat16 (default: %(default)s, measured on this machine)")
    p.add_argument("--read-batch", type=int, default=16, help="--folder: pictures read and explained together")
    p.add_argument("--devices", help="--folder with Score-CAM: shard the masked batches over N devices, 'all', "
                   "or names cpu:0,cpu:1 (KERAS_BACKEND=jax; --batch-size a multiple of N)")
    return p


def batch_size_arg(value):
    """--batch-size: "auto" or an int."""
    try:
        return value if value == "auto" else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or an int, got {value!r}") from None


def check_args(p, args):
    """The arguments' own checks (p.error), before the model is loaded."""
    if args.folder and (args.images or args.all_layers):
        p.error("--folder takes no IMAGE arguments and no --all-layers")
    if args.batch_size != "auto" and args.batch_size < 1 or args.read_batch < 1:
        p.error("--batch-size and --read-batch must be at least 1")
    if args.max_n is not None and args.max_n < 0:
        p.error("--max-n must be at least 0 (0: every channel)")


def load_checked(args):
    """(model, class names, display names), with everything about the model checked once, before any picture:
    the class, the layer (its graph built: a layer without a 4-D output is one error, not one per picture),
    --preprocess and --devices. A ValueError says what to change."""
    from kerascam.graph import explainable_cached
    from model import load_model

    model, names, display = load_model(args.model)
    parse_class(args.class_name, names)
    explainable_cached(model, kerascam.conv_layers(model) if args.all_layers else
                       [kerascam.find_layer(model, args.layer)])
    preprocess(np.zeros((1, 1, 1, kerascam.input_spec(model)[2]), np.float32), args.preprocess)
    if args.devices is not None:
        if not args.folder:
            raise ValueError("--devices works with --folder (many pictures); one picture runs on one device")
        if args.batch_size != "auto":
            check_batch_size(args.batch_size, args.devices, "--batch-size")
    return model, names, display


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    from data.images import ImageError, read_image

    try:
        model, names, display = load_checked(args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.folder:
        try:
            written, skipped = explain_folder(model, names, display, args)
        except (ValueError, OSError) as e:
            sys.exit(f"error: {e}")
        for message in skipped:
            print(f"skipped: {message}", file=sys.stderr)
        print(f"{args.folder}: wrote {written} overlay(s) to {args.out}; skipped {len(skipped)} unreadable file(s); "
              f"report: {Path(args.out) / 'index.html'}")
        sys.exit(1 if skipped else 0)
    failed = 0
    sources = args.images or [None]
    paths = output_paths(args.out, [source or "chelsea.png" for source in sources], output_suffix(args))
    for source, path in zip(sources, paths):
        try:
            image, label = (demo_image() if source is None else (read_image(source), source))
            explain_file(model, names, display, image, source or "chelsea.png", args, path)
            print(f"{label}: wrote {path}")
        except (ImageError, ValueError, OSError) as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
