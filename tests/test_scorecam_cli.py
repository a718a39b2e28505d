"""scorecam.py through a subprocess: outputs written, one-line errors, exit codes."""
import numpy as np
from PIL import Image

from conftest import run_cli, write_image


def picture(tmp_path, name="cat.png", size=(50, 70)):
    rng = np.random.default_rng(0)
    return write_image(tmp_path / name, rng.integers(0, 255, size + (3,), dtype=np.uint8))


def assert_one_line_errors(stderr, count):
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and len(lines) == count and all(x.startswith("error: ") for x in lines)


def test_good_missing_and_corrupt_images_in_one_run(tmp_path, tiny_model_path):
    good = picture(tmp_path)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    out = tmp_path / "out"
    r = run_cli("scorecam.py", good, tmp_path / "missing.png", tmp_path / "corrupt.jpg", "--model", tiny_model_path,
                "--out", out)
    assert r.returncode == 1  # not every picture gave an output
    assert_one_line_errors(r.stderr, 2)
    assert "missing.png: no such file" in r.stderr and "corrupt.jpg" in r.stderr
    written = out / "cat_scorecam.png"
    assert f"wrote {written}" in r.stdout
    assert Image.open(written).size[0] > 300  # a real figure


def test_single_output_file_all_layers_and_class(tmp_path, tiny_model_path):
    target = tmp_path / "fig.png"
    r = run_cli("scorecam.py", picture(tmp_path, size=(32, 32)), "--model", tiny_model_path, "--all-layers",
                "--class", "cat", "--out", target)
    assert r.returncode == 0, r.stderr
    assert target.is_file() and not list(tmp_path.glob(".fig*"))  # written atomically, nothing left behind


def test_unknown_layer_unknown_class_and_bad_model(tmp_path, tiny_model_path):
    image = picture(tmp_path)
    for extra, message in ((["--layer", "nope"], "no layer named 'nope'"),
                           (["--layer", "fc1"], "needs a 4-D"),
                           (["--class", "unicorn"], "unknown --class 'unicorn'")):
        r = run_cli("scorecam.py", image, "--model", tiny_model_path, "--out", tmp_path / "o", *extra)
        assert r.returncode == 1 and message in r.stderr
        assert_one_line_errors(r.stderr, 1)
    (tmp_path / "bad.keras").write_text("nope")
    r = run_cli("scorecam.py", image, "--model", tmp_path / "bad.keras")
    assert r.returncode == 1 and "not a Keras model file" in r.stderr
    assert not (tmp_path / "o").exists()


def test_help_and_unknown_option():
    assert run_cli("scorecam.py", "--help").returncode == 0
    r = run_cli("scorecam.py", "--bogus")
    assert r.returncode == 2 and "usage:" in r.stderr
