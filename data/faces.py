"""Crop anime faces out of pictures with nagadomi's LBP cascade, one folder per class, resumably.

    python -m data.faces RAW_DIR FACES_DIR [--cascade PATH] [--scale-factor 1.1] [--min-neighbors 2]
                         [--min-size 30] [--margin 0.1] [--size 64] [--keep-whole]

Faces are looked for in each picture RAW_DIR/<class>/<file> on its histogram-equalised grey image,
by lbpcascade_animeface.xml through cv2.CascadeClassifier (the defaults are the original
experiment's). Each face, widened by --margin of its size on every side, becomes
FACES_DIR/<class>/<stem>_<i>.png at --size x --size pixels; a picture may give several.
--keep-whole keeps a picture with no face as its centre square, <stem>_whole.png, instead of
dropping it. Unreadable files are skipped and counted. A class that gives no crop at all keeps an
empty FACES_DIR/<class> (which train.py refuses, naming it) and, after the table, makes the command
end with one error line naming it and exit 1. FACES_DIR/.faces.json lists the pictures
done, so a rerun skips them and resumes without duplicates. Without --cascade the cascade is
downloaded once into the Keras cache (~/.keras/models/) and checked against its SHA-256.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from atomic import atomic_path, write_text
from data.images import ImageError, list_images, read_image, resize

CASCADE_NAME = "lbpcascade_animeface.xml"
CASCADE_URL = f"https://raw.githubusercontent.com/nagadomi/lbpcascade_animeface/master/{CASCADE_NAME}"
CASCADE_SHA256 = "9376d30ac38db6bda2a68b88b3b76bbd7e6aa33af47f7f5c76bc88ca75f1ce30"
MANIFEST = ".faces.json"
NAMES_TSV = "names.tsv"  # written by data.crawl: folder -> character name, for train.py --names
SAVE_EVERY = 25  # pictures between manifest saves: what an interrupted run may redo
MAX_STEM_BYTES = 200  # of a crop's name before "_<i>.png" / "_whole.png": within the usual 255-byte limit


@dataclasses.dataclass(frozen=True)
class FaceOptions:
    """How faces are found and cropped; a FACES_DIR is only ever resumed with the same options."""
    scale_factor: float = 1.1
    min_neighbors: int = 2
    min_size: int = 30
    margin: float = 0.1
    size: int = 64
    keep_whole: bool = False


# ---------------------------------------------------------------- the cascade

def download_cascade(origin=CASCADE_URL, file_hash=CASCADE_SHA256, cache_dir=None):
    """Path of nagadomi's cascade, downloaded once into the Keras cache ($KERAS_HOME or ~/.keras,
    or cache_dir) and checked against its SHA-256, so a changed or corrupted file is never used."""
    import runtime  # noqa: F401  (before keras: quiet TensorFlow start-up)
    import keras

    if cache_dir is not None:  # get_file silently uses /tmp/.keras instead of a folder that does not exist yet
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    try:
        return Path(keras.utils.get_file(CASCADE_NAME, origin=origin, file_hash=file_hash, cache_dir=cache_dir,
                                         cache_subdir="models"))
    except ValueError:  # get_file's "file hash does not match"
        raise ValueError(f"the cascade downloaded from {origin} does not have sha256 {file_hash}; "
                         "pass a good copy with --cascade") from None
    except Exception as e:  # get_file raises a bare Exception when the URL cannot be fetched
        raise ValueError(f"could not download the cascade from {origin} ({e}); pass a copy with --cascade") from None


def load_cascade(path=None, origin=CASCADE_URL, cache_dir=None):
    """A cv2.CascadeClassifier from `path`, or from the downloaded file when path is None;
    ValueError, not an empty classifier that finds nothing, for a file that is not a cascade."""
    path = Path(path) if path is not None else download_cascade(origin, cache_dir=cache_dir)
    if not path.is_file():
        raise ValueError(f"cascade file not found: {path}")
    try:
        cascade = cv2.CascadeClassifier(str(path))
    except (cv2.error, SystemError):  # OpenCV raises for a file that is not XML
        cascade = None
    if cascade is None or cascade.empty():
        raise ValueError(f"{path}: not an OpenCV cascade classifier file")
    return cascade


# ---------------------------------------------------------------- finding and cropping faces

def detect_faces(rgb, cascade, scale_factor=1.1, min_neighbors=2, min_size=30):
    """Face boxes (x, y, w, h) in an RGB uint8 picture, found on its equalised grey image as in the
    original experiment; sorted by position, so crop numbers are the same on every run."""
    grey = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY))
    boxes = cascade.detectMultiScale(grey, scaleFactor=scale_factor, minNeighbors=min_neighbors,
                                     minSize=(min_size, min_size))
    return sorted((tuple(int(v) for v in box) for box in boxes), key=lambda b: (b[1], b[0]))


def widen(box, margin, shape):
    """(x0, y0, x1, y1): the box grown by `margin` of its size on every side, within the picture.

    Where the picture ends, the margin is cut on all sides alike, so a square box stays square
    and the face is not stretched when the crop is resized."""
    x, y, w, h = box
    room = min(x, y, shape[1] - x - w, shape[0] - y - h)
    m = max(0, min(int(round(margin * max(w, h))), room))
    return x - m, y - m, x + w + m, y + h + m


def crop_faces(rgb, boxes, margin=0.1, size=64):
    """The faces in `boxes`, each widened by `margin` and resized to size x size (RGB uint8)."""
    crops = []
    for box in boxes:
        x0, y0, x1, y1 = widen(box, margin, rgb.shape)
        crops.append(resize(rgb[y0:y1, x0:x1], (size, size)))
    return crops


def centre_square(rgb, size=64):
    """The largest centred square of the picture, resized to size x size."""
    h, w = rgb.shape[:2]
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    return resize(rgb[y:y + side, x:x + side], (size, size))


def save_png(path, rgb):
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def process_picture(path, stem, out_dir, cascade, options):
    """Write a picture's face crops (or its centre square) to out_dir: its record {"faces", "whole"}.

    Raises ImageError when the file cannot be read as an image."""
    rgb = read_image(path)
    boxes = detect_faces(rgb, cascade, options.scale_factor, options.min_neighbors, options.min_size)
    crops = crop_faces(rgb, boxes, options.margin, options.size)
    for i, crop in enumerate(crops):
        save_png(Path(out_dir) / f"{stem}_{i}.png", crop)
    whole = not crops and options.keep_whole
    if whole:
        save_png(Path(out_dir) / f"{stem}_whole.png", centre_square(rgb, options.size))
    return {"faces": len(crops), "whole": whole}


# ---------------------------------------------------------------- folders

def check_folders(raw_dir, faces_dir):
    """The class folders of RAW_DIR, sorted; ValueError if there are none, or if RAW_DIR and
    FACES_DIR overlap (a FACES_DIR inside RAW_DIR would be read as a class on the next run)."""
    raw, faces = Path(raw_dir).resolve(), Path(faces_dir).resolve()
    if not raw.is_dir():
        raise ValueError(f"folder not found: {raw_dir}")
    if raw == faces or raw in faces.parents or faces in raw.parents:
        raise ValueError(f"RAW_DIR {raw_dir} and FACES_DIR {faces_dir} must not contain each other")
    classes = sorted(p for p in Path(raw_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{raw_dir}: no class subfolders (RAW_DIR/<class>/<picture>)")
    return classes


def output_stems(files):
    """Crop-name stem per file, a different one for each file: its stem, or stem_suffix where two files
    share a stem (a.jpg, a.png). A stem still shared (a_jpg.png beside those) or too long for a file name
    once "_whole.png" is added is cut short and given a hash of the file's name."""
    counts = Counter(p.stem for p in files)
    stems = {p.name: p.stem if counts[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.')}" for p in files}
    shared = Counter(stems.values())
    for p in files:
        stem = stems[p.name]
        raw = stem.encode("utf-8", "surrogateescape")
        if shared[stem] > 1 or len(raw) > MAX_STEM_BYTES:
            tag = hashlib.sha256(p.name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
            stems[p.name] = f"{raw[:MAX_STEM_BYTES - 9].decode('utf-8', 'ignore')}-{tag}"
    return stems


def read_manifest(faces_dir, options):
    """The pictures done so far, {class: {file: record}}; ValueError if FACES_DIR was made with other options."""
    path = Path(faces_dir) / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: unreadable ({e}); delete it to start again") from None
    if manifest.get("options") != dataclasses.asdict(options):
        old = manifest.get("options", {})
        diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in dataclasses.asdict(options).items() if old.get(k) != v)
        raise ValueError(f"{faces_dir} holds crops made with other options ({diff}); "
                         "use another FACES_DIR, or delete it to start again")
    return manifest.get("done", {})


def write_manifest(faces_dir, options, done):
    write_text(Path(faces_dir) / MANIFEST,
               # ASCII escapes: a file name that is not UTF-8 (kept by Python as lone surrogates) still fits
               json.dumps({"options": dataclasses.asdict(options), "done": done}, ensure_ascii=True, indent=1))


def copy_names(raw_dir, faces_dir):
    """Copy data.crawl's RAW_DIR/names.tsv, so train.py --names FACES_DIR/names.tsv shows character names."""
    source = Path(raw_dir) / NAMES_TSV
    if source.is_file():
        write_text(Path(faces_dir) / NAMES_TSV, source.read_text(encoding="utf-8"))


def extract_faces(raw_dir, faces_dir, cascade, options=FaceOptions()):
    """Crop every picture of RAW_DIR/<class>/ into FACES_DIR/<class>/, skipping pictures done before.

    Returns {class: {"pictures", "with faces", "faces", "whole", "skipped"}} over all the class's
    pictures, this run's and earlier ones'."""
    classes = check_folders(raw_dir, faces_dir)
    Path(faces_dir).mkdir(parents=True, exist_ok=True)
    done = read_manifest(faces_dir, options)
    files = {c.name: list_images(c) for c in classes}
    for c in files:  # every class, even one with no crop: train.py then names it instead of training without it
        (Path(faces_dir) / c).mkdir(exist_ok=True)
    stems = {c: output_stems(paths) for c, paths in files.items()}
    todo = [(c, p, stems[c][p.name]) for c, paths in files.items() for p in paths if p.name not in done.get(c, {})]
    try:
        for n, (c, path, stem) in enumerate(tqdm(todo, desc="faces", unit="img", mininterval=1), 1):
            try:
                record = process_picture(path, stem, Path(faces_dir) / c, cascade, options)
            except ImageError as e:
                record = {"skipped": str(e)}
            done.setdefault(c, {})[path.name] = record
            if n % SAVE_EVERY == 0:
                write_manifest(faces_dir, options, done)
    finally:
        write_manifest(faces_dir, options, done)
    copy_names(raw_dir, faces_dir)
    return {c: class_stats([done.get(c, {}).get(p.name, {}) for p in paths]) for c, paths in files.items()}


def class_stats(records):
    return {"pictures": len(records), "with faces": sum(r.get("faces", 0) > 0 for r in records),
            "faces": sum(r.get("faces", 0) for r in records), "whole": sum(bool(r.get("whole")) for r in records),
            "skipped": sum("skipped" in r for r in records)}


# ---------------------------------------------------------------- command line

def format_table(stats):
    """One row per class and a total; the class name comes last so wide (CJK) names keep columns aligned."""
    keys = ["pictures", "with faces", "faces", "whole", "skipped"]
    total = {k: sum(s[k] for s in stats.values()) for k in keys}
    lines = ["  ".join(f"{k:>{len(k)}}" for k in keys) + "  class"]
    for name, s in [*stats.items(), ("(total)", total)]:
        lines.append("  ".join(f"{s[k]:>{len(k)}}" for k in keys) + f"  {shown_name(name)}")
    return "\n".join(lines)


def shown_name(name):
    """A folder name as printed: one that is not UTF-8 with U+FFFD for its bad bytes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _number(kind, low, above=False, high=None):
    """An argparse type: a `kind` number >= low (> low if above), and <= high if given."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        too_low = value <= low if above else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            bound = f"> {low}" if above else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}" + (f" and <= {high}" if high is not None else "")
                                             + f", got {text}")
        return value
    return parse


def parse_args(argv=None):
    d = FaceOptions()
    p = argparse.ArgumentParser(prog="python -m data.faces", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw_dir", metavar="RAW_DIR", help="pictures, one subfolder per class (e.g. from data.crawl)")
    p.add_argument("faces_dir", metavar="FACES_DIR", help="face crops are written here, one subfolder per class")
    p.add_argument("--cascade", metavar="PATH", help=f"a local {CASCADE_NAME} (default: download it once)")
    p.add_argument("--scale-factor", type=_number(float, 1.0, above=True), default=d.scale_factor,
                   help="cascade image-pyramid step (default: %(default)s)")
    p.add_argument("--min-neighbors", type=_number(int, 0), default=d.min_neighbors,
                   help="overlapping detections needed to keep a face (default: %(default)s)")
    p.add_argument("--min-size", type=_number(int, 1), default=d.min_size,
                   help="smallest face, in pixels (default: %(default)s)")
    p.add_argument("--margin", type=_number(float, 0.0), default=d.margin,
                   help="room kept around a face, as a fraction of its size on each side (default: %(default)s)")
    p.add_argument("--size", type=_number(int, 1, high=4096), default=d.size,
                   help="crops are size x size pixels (default: %(default)s)")
    p.add_argument("--keep-whole", action="store_true",
                   help="keep a picture with no face as its centre square instead of dropping it")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    options = FaceOptions(args.scale_factor, args.min_neighbors, args.min_size, args.margin, args.size,
                          args.keep_whole)
    try:
        check_folders(args.raw_dir, args.faces_dir)  # before a possible download
        cascade = load_cascade(args.cascade)
        stats = extract_faces(args.raw_dir, args.faces_dir, cascade, options)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: rerun the same command to resume")
    print(format_table(stats))
    empty = [shown_name(c) for c, s in stats.items() if s["faces"] + s["whole"] == 0]
    if empty:
        sys.exit(f"error: no face found in {len(empty)} class(es): {', '.join(empty)} (their folders in "
                 f"{args.faces_dir} are empty, and train.py refuses them); add pictures with faces to RAW_DIR/<class> "
                 "and rerun, remove the class from RAW_DIR and FACES_DIR, or start a new FACES_DIR with --keep-whole")


if __name__ == "__main__":
    main()
