"""Hostile and broken input: a corpus the tests make themselves, run through every entry point."""
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
    errors = r.stderr.strip().splitlines()
    assert len(errors) == sum(not ok for ok in corpus.values()) and all(e.startswith("error: ") for e in errors)
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == sum(corpus.values()) and "名前 with spaces ふぁいる_scorecam.png" in written


def test_scorecam_cli_exit_status_is_zero_only_when_output_was_written(tmp_path, tiny_model_path):
    picture = write_image(tmp_path / "dir with space" / "写真.png", GOOD)
    r = run_cli("scorecam.py", picture, "--model", tiny_model_path, "--out", tmp_path / "out.png")
    assert r.returncode == 0 and (tmp_path / "out.png").is_file()
    r = run_cli("scorecam.py", tmp_path / "dir with space", "--model", tiny_model_path, "--out", tmp_path / "x.png")
    assert r.returncode == 1 and not (tmp_path / "x.png").exists() and r.stderr.startswith("error: ")


def test_model_for_another_input_size_than_the_data_is_a_clear_error(tmp_path, tiny_model_path, color_folder):
    r = run_cli("evaluate.py", "--model", tiny_model_path, "--dataset", "folder", "--data-dir", color_folder,
                "--n", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "error: " in r.stderr


COMMANDS = [["train.py"], ["scorecam.py"], ["evaluate.py"], ["figures.py"], ["bench.py"],
            ["-m", "data.crawl"], ["-m", "data.faces"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[-1])
def test_every_command_has_help_and_rejects_unknown_options(command):
    r = run_cli(*command, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout
    r = run_cli(*command, "--no-such-option")
    assert r.returncode == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr


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
