"""Property tests of data/ (issue 15): generated image bytes, names, folders and pickles, and the
data.crawl / data.faces commands on generated options, with no network.

- data.images.read_image: a valid picture in any mode Pillow writes, in any format that takes it, then
  maybe truncated, bit-flipped or padded, gives an RGB uint8 (H, W, 3) array or one ImageError.
- data.crawl: names (unicode, "..", separators, very long, empty, dots) give folders directly inside
  the output folder, and nothing is written outside it.
- data.faces: class folders and pictures with generated names give crops only inside FACES_DIR.
- data.cifar10: generated or mutated pickle bytes give arrays or one ValueError naming the file.

Hypothesis runs with no example database and derandomized (the same cases on every run); failures it
found are kept as @example cases.
"""
import io
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import ROOT, budget, run_cli
from data import crawl, faces
from data.cifar10 import load_cifar10
from data.images import ImageError, read_image

SETTINGS = dict(database=None, derandomize=True, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ---------------------------------------------------------------- image bytes

FORMATS = ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr", "LAB", "HSV", "I;16B"]
COMMON = {"1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"}  # must read back when intact


def make_picture(mode, width, height, seed):
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode in ("I;16", "I", "F", "I;16B"):
        return rgb.convert("L").convert(mode)
    return rgb.convert(mode)


def encode(im, fmt):
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _saveable():
    """(mode, format) pairs this Pillow writes: tried once, on a 2x2 picture."""
    pairs = []
    for mode in MODES:
        for fmt in FORMATS:
            try:
                encode(make_picture(mode, 2, 2, 0), fmt)
            except Exception:
                continue
            pairs.append((mode, fmt))
    return pairs


SAVEABLE = _saveable()
mutations = st.one_of(
    st.just(("none",)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("pad"), st.binary(min_size=1, max_size=64)),
)


def mutate(data, mutation):
    kind = mutation[0]
    if kind == "truncate":
        return data[:int(len(data) * mutation[1])]
    if kind == "flip" and data:
        out = bytearray(data)
        for where, bit in mutation[1]:
            out[int(where * len(out))] ^= 1 << bit
        return bytes(out)
    if kind == "pad":
        return data + mutation[1]
    return data


@settings(max_examples=budget(250), **SETTINGS)
@given(kind=st.sampled_from(SAVEABLE), width=st.integers(1, 24), height=st.integers(1, 24), seed=st.integers(0, 9),
       mutation=mutations, suffix=st.sampled_from([None, ".png", ".jpg", ".bin", ""]))
def test_read_image_gives_rgb8_or_one_image_error(tmp_path_factory, kind, width, height, seed, mutation, suffix):
    mode, fmt = kind
    data = mutate(encode(make_picture(mode, width, height, seed), fmt), mutation)
    folder = tmp_path_factory.mktemp("img")
    path = folder / ("x" + (f".{fmt.lower()}" if suffix is None else suffix))
    path.write_bytes(data)
    try:
        rgb = read_image(path)
    except ImageError as e:
        event("ImageError")
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
        assert mutation[0] != "none" or mode not in COMMON, f"an intact {mode} {fmt} picture was refused: {e}"
        return
    assert isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[0] >= 1 and rgb.shape[1] >= 1 and rgb.flags.c_contiguous
    if mutation[0] == "none":
        assert rgb.shape[:2] == (height, width)


# ---------------------------------------------------------------- names and folders

SPECIAL_NAMES = ["", ".", "..", "...", "../../escape", "/abs", "a/b", "a\\b", "C:\\x", " .hidden", ".hidden",
                 "CON", "names.tsv", ".crawl", "x" * 300, "高" * 100, "a\tb", "\u202e", "e\u0301", "*?<>|\""]
names = st.one_of(st.sampled_from(SPECIAL_NAMES),
                  st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
                  st.text(st.sampled_from("./\\ a高\0"), min_size=1, max_size=300))


def snapshot(root):
    return {p for p in Path(root).rglob("*")}


class StubCrawler:
    """In place of icrawler's engines: each name's crawl 'finds' one picture, stored through the real
    FolderStore (stage, then write), so every path crawl.py makes is made; nothing touches the network."""

    def __init__(self, storage=None, **kwargs):
        self.storage = storage
        self.parser = type("Parser", (), {"parse": staticmethod(lambda response, **kw: [])})()
        self.signal = type("Signal", (), {"set": staticmethod(lambda **kw: None)})()

    def crawl(self, feeder_kwargs=None, parser_kwargs=None, downloader_kwargs=None):
        keyword = feeder_kwargs["keyword"]
        data = encode(make_picture("RGB", 4, 3, len(keyword)), "PNG")
        stored = self.storage.stage(f"http://127.0.0.1/{len(keyword)}.png", data)
        if stored:
            self.storage.write(stored, data)


@settings(max_examples=budget(60), **SETTINGS)
@given(name=names)
@example(name="")  # found: folder_name("") was "", i.e. RAW_DIR itself
@example(name="..")
@example(name="高" * 100)
def test_crawl_folder_name_is_one_component_directly_inside_raw_dir(tmp_path_factory, name):
    raw = tmp_path_factory.mktemp("raw")
    folder = crawl.folder_name(name)
    assert folder and folder not in (".", "..") and "/" not in folder and "\\" not in folder and "\0" not in folder
    assert not folder.startswith(".") and len(folder.encode()) <= crawl.MAX_FOLDER_BYTES
    assert crawl.name_folder(raw, name).parent == raw
    (raw / folder).mkdir()  # a real folder of that name can be made
    assert (raw / folder).resolve().parent == raw.resolve()


@settings(max_examples=budget(25), **SETTINGS)
@given(lines=st.lists(names, min_size=1, max_size=6))
@example(lines=["../../escape", "..", "a/b\0c", "長" * 200, "", "   "])
def test_crawling_generated_names_writes_only_inside_raw_dir(tmp_path_factory, lines):
    base = tmp_path_factory.mktemp("crawl")
    names_file = base / "names.txt"
    names_file.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    raw = base / "out" / "raw"
    try:
        wanted = crawl.read_names(names_file)
    except ValueError as e:
        assert "no names" in str(e) and not any(crawl.clean_name(n) and not crawl.clean_name(n).startswith("#")
                                                for line in lines for n in line.splitlines())
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(crawl.ENGINES, "stub", StubCrawler)
        mp.setattr(crawl, "Crawler", StubCrawler)
        rows = crawl.crawl_names(wanted, raw, "stub", max_per_name=1)
    made = snapshot(base) - {names_file, base / "out"}
    assert all(raw == p or raw in p.parents for p in made), sorted(map(str, made))
    folders = {p for p in raw.iterdir() if p.is_dir() and p.name != crawl.STATE}
    assert {raw / folder for _, folder, _, _ in rows} == folders
    assert all(len(crawl.list_images(f)) == 1 for f in folders)
    table = (raw / crawl.NAMES_TSV).read_text(encoding="utf-8").splitlines()
    assert table[0] == "folder\tname" and len(table) == 1 + len(rows)


# Folder and file names a user's RAW_DIR may hold: anything Linux allows (no "/" or NUL, not "." or "..",
# at most 255 bytes), hidden ones included (they are left out, as by every image-folder reader).
def _fits(name):
    return name not in ("", ".", "..") and len(name.encode("utf-8", "surrogatepass")) <= 255


file_names = st.one_of(
    st.sampled_from(["...png", "a.", "a..png", " ", "names.tsv", ".faces.json", "高" * 80 + ".png", "x" * 251 + ".png",
                     "a.jpg", "a.png", "a_jpg.png", "CON", "-rf", "\udcff.png", "caf\udce9"]),  # not UTF-8: b"\xff.png"
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1, max_size=30),
).filter(_fits)


@settings(max_examples=budget(25), **SETTINGS)
@given(tree=st.dictionaries(file_names, st.lists(file_names, min_size=1, max_size=4, unique=True),
                            min_size=1, max_size=3),
       keep_whole=st.booleans(), found=st.integers(0, 2))
# Found: a 251-byte file name made crop names (and atomic.py's temporary names) over the 255-byte limit,
# "[Errno 36] File name too long" ended the whole run;
@example(tree={"高" * 85: ["x" * 251 + ".png", "高" * 80 + ".png"]}, keep_whole=True, found=1)
# a.jpg and a.png became a_jpg and a_png, and a_jpg.png a_jpg too: one crop overwrote another;
@example(tree={"c": ["a.jpg", "a.png", "a_jpg.png"]}, keep_whole=False, found=1)
# a file name that is not UTF-8 (b"\xff.png") could not be written to the manifest: UnicodeEncodeError.
@example(tree={"caf\udce9": ["\udcff.png"]}, keep_whole=False, found=1)
def test_faces_of_generated_folders_land_only_inside_faces_dir(tmp_path_factory, tree, keep_whole, found):
    base = tmp_path_factory.mktemp("faces")
    raw, out = base / "raw", base / "out" / "faces"
    pictures = 0
    for c, files in tree.items():
        (raw / c).mkdir(parents=True)
        for i, name in enumerate(files):
            make_picture("RGB", 40 + i, 30, i).save(raw / c / name, format="PNG")
            pictures += not c.startswith(".") and not name.startswith(".")
    before = snapshot(base)

    class Cascade:  # `found` faces in every picture (a real cascade needs ../shared)
        def detectMultiScale(self, grey, **kwargs):
            return [(2 + 5 * i, 2, 10, 10) for i in range(found)]

    visible = [c for c in tree if not c.startswith(".")]
    try:
        stats = faces.extract_faces(raw, out, Cascade(), faces.FaceOptions(size=8, keep_whole=keep_whole))
    except ValueError as e:
        assert not visible and "no class subfolders" in str(e)
        return
    made = snapshot(base) - before
    assert all(out in p.parents or p in (out, out.parent) for p in made), sorted(map(str, made - {out, out.parent}))
    crops = [p for p in out.rglob("*") if p.is_file() and p.parent != out]
    assert all(p.parent.parent == out and p.parent.name in visible for p in crops)
    per_picture = found or int(keep_whole)
    assert len(crops) == pictures * per_picture, "two pictures' crops share a name"  # one crop each, none lost
    assert sum(s["pictures"] for s in stats.values()) == pictures
    faces.format_table(stats).encode("utf-8")  # printable, whatever the folder names
    assert not [p for p in out.rglob(".*") if p.name != faces.MANIFEST]  # no temporary file left


# ---------------------------------------------------------------- CIFAR-10 pickles

def _batch(n, protocol, str_keys, extra):
    rng = np.random.default_rng(n)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    d = {"data": data, "labels": [int(v) for v in rng.integers(0, 10, n)]} if str_keys else \
        {b"data": data, b"labels": [int(v) for v in rng.integers(0, 10, n)]}
    d.update(extra)
    return pickle.dumps(d, protocol=protocol)


payloads = st.one_of(
    st.builds(_batch, st.integers(0, 3), st.integers(0, 5), st.booleans(),
              st.dictionaries(st.sampled_from([b"data", b"labels", b"batch_label", "x"]),
                              st.one_of(st.none(), st.integers(-300, 300), st.binary(max_size=8),
                                        st.lists(st.integers(-2, 300), max_size=4),
                                        st.builds(lambda n: np.zeros((n, 3072), np.int16) + n, st.integers(0, 2))),
                              max_size=2)),
    st.builds(lambda obj, protocol: pickle.dumps(obj, protocol=protocol),
              st.recursive(st.one_of(st.none(), st.integers(), st.binary(max_size=10), st.text(max_size=5)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.binary(max_size=6), inner,
                                                                                        max_size=3), max_leaves=8),
              st.integers(0, 5)),
    st.binary(max_size=200),
)


@settings(max_examples=budget(150), **SETTINGS)
@given(payload=payloads, mutation=mutations, which=st.sampled_from(["test_batch", "batches.meta"]))
@example(payload=pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}), mutation=("none",),
         which="batches.meta")
def test_cifar10_pickles_give_arrays_or_one_value_error(tmp_path_factory, payload, mutation, which):
    folder = tmp_path_factory.mktemp("cifar")
    (folder / "data_batch_1").write_bytes(b"not read: train=False")
    (folder / "test_batch").write_bytes(_batch(2, 2, False, {}))
    (folder / which).write_bytes(mutate(payload, mutation))
    try:
        (x_train, y_train), (x, y), class_names = load_cifar10(folder, train=False)
    except ValueError as e:
        event("ValueError")
        assert type(e) is ValueError and str(e).startswith(f"{folder / which}: ") and "--data-dir" in str(e), e
        return
    assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (32, 32, 3) and len(x) >= 1
    assert y.dtype == np.int64 and y.shape == (len(x),) and 0 <= y.min() and y.max() < len(class_names)
    assert len(x_train) == 0 and all(isinstance(n, str) for n in class_names)


# ---------------------------------------------------------------- the commands, in subprocesses, offline

# data.crawl with every engine replaced by a stub (no network) that finds one picture for a name whose
# length is even, none for the others. (Self-contained: importing this module would import Keras.)
CRAWL_WRAPPER = """
import io, sys
sys.path.insert(0, {root!r})
from PIL import Image
from data import crawl


class Stub:
    def __init__(self, storage=None, **kwargs):
        self.storage = storage
        self.parser = type("Parser", (), {{"parse": staticmethod(lambda response, **kw: [])}})()
        self.signal = type("Signal", (), {{"set": staticmethod(lambda **kw: None)}})()

    def crawl(self, feeder_kwargs=None, **kwargs):
        keyword = feeder_kwargs["keyword"]
        if len(keyword) % 2 == 0:
            buf = io.BytesIO()
            Image.new("RGB", (4, 3), (len(keyword) % 256, 0, 0)).save(buf, format="PNG")
            stored = self.storage.stage("http://127.0.0.1/" + str(len(keyword)), buf.getvalue())
            if stored:
                self.storage.write(stored, buf.getvalue())


crawl.ENGINES = {{"bing": Stub, "google": Stub, "baidu": Stub}}
crawl.Crawler = Stub
crawl.main(sys.argv[1:])
"""


def assert_result_or_one_error_line(r, prog):
    event({0: "result", 1: "error line", 2: "usage error"}.get(r.returncode, f"exit {r.returncode}"))
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    if r.returncode == 0:
        assert not errors, r.stderr
        return
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr
    if r.returncode == 2:
        assert "usage:" in r.stderr and errors[0].startswith(f"{prog}: error: ")
    else:
        assert r.returncode == 1 and errors[0].startswith("error: ")


@settings(max_examples=budget(4), **SETTINGS)
@given(names_file=st.sampled_from(["names", "missing", "latin-1", "empty", "default"]),
       out=st.sampled_from(["fresh", "a file", "nested"]),
       opts=st.fixed_dictionaries({}, optional={"--engine": st.sampled_from(["bing", "google", "altavista"]),
                                               "--max-per-name": st.sampled_from(["1", "0", "1001", "x"]),
                                               "--threads": st.sampled_from(["1", "0", "33"])}))
def test_crawl_command_with_generated_options_gives_a_result_or_one_error_line(tmp_path_factory, names_file, out,
                                                                                opts):
    base = tmp_path_factory.mktemp("crawlcli")
    names = base / "names.txt"
    if names_file == "names":
        names.write_text("ab\n../../up\n高坂穂乃果\n", encoding="utf-8")
    elif names_file == "latin-1":
        names.write_bytes("café\n".encode("latin-1"))
    elif names_file == "empty":
        names.write_text("# nothing\n\n", encoding="utf-8")
    raw = {"fresh": base / "raw", "a file": base / "names.txt", "nested": base / "a" / "b" / "raw"}[out]
    argv = ([] if names_file == "default" else [str(names)]) + ["--out", str(raw)]
    argv += [str(v) for kv in opts.items() for v in kv]
    script = CRAWL_WRAPPER.format(root=str(ROOT))
    before = snapshot(base)
    r = run_cli("-c", script, *argv, cwd=base, timeout=120)
    assert_result_or_one_error_line(r, "python -m data.crawl")
    made = snapshot(base) - before
    assert all(raw in p.parents or p == raw or p in raw.parents for p in made), sorted(map(str, made))


@settings(max_examples=budget(4), **SETTINGS)
@given(raw=st.sampled_from(["pictures", "missing", "a file", "empty", "same as faces"]),
       cascade=st.sampled_from(["shared", "missing", "not xml"]),
       opts=st.fixed_dictionaries({}, optional={"--scale-factor": st.sampled_from(["1.1", "1", "nan"]),
                                               "--min-neighbors": st.sampled_from(["0", "-1"]),
                                               "--min-size": st.sampled_from(["1", "0"]),
                                               "--margin": st.sampled_from(["0.5", "-1", "inf"]),
                                               "--size": st.sampled_from(["8", "4097"]),
                                               "--keep-whole": st.just(None)}))
@example(raw="pictures", cascade="shared", opts={"--keep-whole": None, "--size": "8"})
def test_faces_command_with_generated_options_gives_a_result_or_one_error_line(tmp_path_factory, raw, cascade, opts):
    base = tmp_path_factory.mktemp("facescli")
    raw_dir, faces_dir = base / "raw", base / "faces"
    if raw == "pictures":
        for c in ("高坂穂乃果", "other"):
            (raw_dir / c).mkdir(parents=True)
            make_picture("RGB", 50, 40, 0).save(raw_dir / c / "p.png")
            (raw_dir / c / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    elif raw == "a file":
        raw_dir.write_text("x")
    elif raw == "empty":
        raw_dir.mkdir()
    elif raw == "same as faces":
        faces_dir = raw_dir / "faces"
        (raw_dir / "c").mkdir(parents=True)
    cascade_path = {"shared": ROOT.parent / "shared" / "cascades" / faces.CASCADE_NAME, "missing": base / "no.xml",
                    "not xml": base / "bad.xml"}[cascade]
    if cascade == "not xml":
        cascade_path.write_text("<nope/>")
    argv = ["-m", "data.faces", str(raw_dir), str(faces_dir), "--cascade", str(cascade_path)]
    argv += [str(v) for kv in opts.items() for v in kv if v is not None]
    r = run_cli(*argv, cwd=ROOT, timeout=120)
    assert_result_or_one_error_line(r, "python -m data.faces")
    if r.returncode == 0:
        assert "(total)" in r.stdout and not [p for p in faces_dir.rglob(".*") if p.name != faces.MANIFEST]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-p", "no:randomly"]))
