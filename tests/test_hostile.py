"""Hostile and broken input: a corpus the tests make themselves, run through every entry point."""
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, write_image

GOOD = (np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def make_corpus(folder):
    """{file name: True if it is a usable picture}. Mirrors what a crawl of the open web brings."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = {}

    def save(name, image, ok=True, **kw):
        image.save(folder / name, **kw)
        corpus[name] = ok

    (folder / "empty.jpg").write_bytes(b"")
    corpus["empty.jpg"] = False
    (folder / "text.jpg").write_text("<html>not a picture</html>")
    corpus["text.jpg"] = False
    for name, fmt in (("truncated.jpg", "JPEG"), ("truncated.png", "PNG")):
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / name,
                                                                                                     format=fmt)
        (folder / name).write_bytes((folder / name).read_bytes()[:400])
        corpus[name] = False
    save("cmyk.jpg", Image.fromarray(GOOD).convert("CMYK"))
    save("deep16.png", Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16)))
    save("grey.png", Image.fromarray(GOOD[..., 0]))
    save("rgba.png", Image.fromarray(np.dstack([GOOD, np.full(GOOD.shape[:2], 128, np.uint8)]), "RGBA"))
    save("palette.png", Image.fromarray(GOOD).convert("P"))
    frames = [Image.fromarray(np.full((20, 20, 3), v, np.uint8)) for v in (0, 120, 250)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    corpus["animated.gif"] = True
    save("picture.webp", Image.fromarray(GOOD))
    save("one_pixel.png", Image.fromarray(np.full((1, 1, 3), 200, np.uint8)))
    save("large.png", Image.new("RGB", (4000, 3000), (10, 200, 30)))
    # 20,000 x 20,000 pixels in a few kB: over twice Pillow's MAX_IMAGE_PIXELS, refused before decoding
    save("bomb.png", Image.new("1", (20000, 20000)), ok=False)
    (folder / "folder.png").mkdir()
    corpus["folder.png"] = False
    save("名前 with spaces ふぁいる.png", Image.fromarray(GOOD))
    return corpus


def test_read_image_accepts_or_refuses_each_corpus_file_with_image_error(tmp_path):
    from data.images import ImageError, read_image

    for name, ok in make_corpus(tmp_path / "c").items():
        if ok:
            a = read_image(tmp_path / "c" / name)
            assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3, name
        else:
            with pytest.raises(ImageError):
                read_image(tmp_path / "c" / name)


def test_folder_loading_skips_and_counts_the_bad_files(tmp_path):
    from data.folder import load_image_folder

    corpus = make_corpus(tmp_path / "data" / "web")
    write_image(tmp_path / "data" / "other" / "a.png", GOOD)
    write_image(tmp_path / "data" / "other" / "b.png", GOOD)
    with pytest.warns(UserWarning, match="skipped"):
        d = load_image_folder(tmp_path / "data", (16, 16), val_fraction=0.25, seed=0)
    bad = sorted(n for n, ok in corpus.items() if not ok)
    assert sorted(p.split("/")[-1] for p, _ in d.skipped) == bad
    assert len(d.x_train) + len(d.x_val) == sum(corpus.values()) + 2


def test_scorecam_cli_on_the_corpus_writes_every_good_picture_and_one_line_per_bad_one(tmp_path, tiny_model_path):
    corpus = make_corpus(tmp_path / "c")
    out = tmp_path / "out"
    r = run_cli("scorecam.py", *sorted(tmp_path / "c" / n for n in corpus), "--model", tiny_model_path, "--out", out)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.strip().splitlines() if not line.startswith("warning: ")]  # an all-zero map
    assert len(errors) == sum(not ok for ok in corpus.values()) and all(e.startswith("error: ") for e in errors)
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == sum(corpus.values()) and "名前 with spaces ふぁいる_scorecam.png" in written


def test_scorecam_cli_exit_status_is_zero_only_when_output_was_written(tmp_path, tiny_model_path):
    picture = write_image(tmp_path / "dir with space" / "写真.png", GOOD)
    r = run_cli("scorecam.py", picture, "--model", tiny_model_path, "--out", tmp_path / "out.png")
    assert r.returncode == 0 and (tmp_path / "out.png").is_file()
    r = run_cli("scorecam.py", tmp_path / "dir with space", "--model", tiny_model_path, "--out", tmp_path / "x.png")
    assert r.returncode == 1 and not (tmp_path / "x.png").exists() and r.stderr.startswith("error: ")


def cifar_tree(folder, classes, size=32, per_class=2):
    """A CIFAR-10-style train/<class>/ and test/<class>/ tree of size x size JPEGs."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            for i in range(per_class):
                write_image(folder / split / name / f"{i}.jpg", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    return folder


def test_model_for_another_input_size_than_the_data_is_a_clear_error(tmp_path):
    """--dataset folder resizes pictures to the model's size, so only CIFAR-10 (always 32x32) can
    meet a model of another size: a 48x48 model with the tree's 3 classes passes the class-count
    check and stops at the size check, before anything is written."""
    from model import build_model, save_model

    classes = ["cat", "dog", "frog"]
    tree = cifar_tree(tmp_path / "cifar", classes)
    model_path = tmp_path / "m48.keras"
    save_model(build_model(input_shape=(48, 48, 3), num_classes=len(classes)), model_path, classes)
    out = tmp_path / "out"
    out.mkdir()
    r = run_cli("evaluate.py", "--model", model_path, "--dataset", "cifar10", "--data-dir", tree, "--n", "2",
                "--json", out / "results.json", "--figure", out / "curves.png")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()  # tqdm's "reading test" progress, then the error in one line
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == lines[-1:] and errors[0].startswith("error: "), r.stderr
    assert "32x32" in errors[0] and "48x48" in errors[0], r.stderr
    assert "classes" not in errors[0]  # the size check, not the class-count one
    assert list(out.iterdir()) == []


def test_a_failed_atomic_write_leaves_no_temporary_file_and_one_error_line(tmp_path, tiny_model_path):
    """The figure is written to a temporary file and renamed onto --out; when the rename fails (--out
    is a folder), the temporary file is removed and the command says so in one line."""
    picture = write_image(tmp_path / "in" / "cat.png", GOOD)
    target = tmp_path / "out" / "figure.png"
    target.mkdir(parents=True)
    r = run_cli("scorecam.py", picture, "--model", tiny_model_path, "--out", target)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "figure.png" in lines[0], r.stderr
    temporary = re.findall(r"'([^']*/\.figure\.png\.[^'/]*)'", lines[0])  # the rename names what it moved
    assert temporary and not Path(temporary[0]).exists(), lines[0]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["figure.png"] and target.is_dir()
    assert list(target.iterdir()) == []


COMMANDS = [["train.py"], ["scorecam.py"], ["evaluate.py"], ["figures.py"], ["bench.py"],
            ["-m", "data.crawl"], ["-m", "data.faces"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[-1])
def test_every_command_has_help_and_rejects_unknown_options(command, capsys):
    """--help and an unknown option through the command's main() (the same argparse parser; a process
    start costs seconds). The README's two first commands also get --help as a user runs it, in a fresh
    process whose stderr must stay empty; every command runs as a subprocess in the property tests."""
    import importlib

    if command[-1] in ("train.py", "scorecam.py"):
        r = run_cli(*command, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout and r.stderr == ""
    module = importlib.import_module(command[-1].removesuffix(".py"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    out = capsys.readouterr()
    assert e.value.code == 0 and out.out.startswith("usage:") and out.err == ""
    with pytest.raises(SystemExit) as e:
        module.main(["--no-such-option"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert e.value.code == 2 and "usage:" in err and len(errors) == 1, err
    assert "unrecognized arguments: --no-such-option" in err or "arguments are required" in err, err


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from atomic import atomic_path

    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_a_process_ended_mid_write_removes_the_temporary_files_of_its_writes_in_progress(tmp_path):
    """train.py's SIGTERM handler ends the process at once (os._exit) after atomic.discard_in_flight: the
    temporary file of every write in progress goes, every target stays as it was, and a write that is
    finished is no longer in flight."""
    import atomic

    done = tmp_path / "done.json"
    atomic.write_text(done, "whole")
    first, second = tmp_path / "a.keras", tmp_path / "b.weights.h5"
    first.write_text("old a")
    with atomic.atomic_path(first) as tmp_a, atomic.atomic_path(second) as tmp_b:
        tmp_a.write_text("half a")
        tmp_b.write_text("half b")
        assert {Path(t) for t in atomic._IN_FLIGHT} == {tmp_a, tmp_b}
        atomic.discard_in_flight()  # the signal arrives here
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.keras", "done.json"]
        assert first.read_text() == "old a" and done.read_text() == "whole"
        tmp_a.write_text("half a")  # (the process would have ended; here the writes go on and finish)
        tmp_b.write_text("b")
    assert atomic._IN_FLIGHT == set() and second.read_text() == "b"
