"""data.faces: faces found in the shared illustration, the command end to end, the cascade download offline."""
import http.server
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conftest import run_cli  # noqa: E402
from data import faces  # noqa: E402
from data.images import read_image  # noqa: E402

SHARED = ROOT.parent / "shared"
CASCADE = SHARED / "cascades" / "lbpcascade_animeface.xml"
ILLUSTRATION = SHARED / "samples" / "anime_group_illustration.png"
MIN_FACES = 12  # the defaults find 17 of the illustration's faces


def shared(path):
    """A file from ../shared, or skip: CI has it, a user's clone does not."""
    if not path.is_file():
        pytest.skip(f"needs ../shared/{path.relative_to(SHARED)} (absent outside CI)")
    return path


@pytest.fixture(scope="module")
def cascade():
    return faces.load_cascade(shared(CASCADE))


def no_face_picture():
    """A smooth colour gradient: nothing the cascade takes for a face."""
    y, x = np.mgrid[0:120, 0:160]
    return np.stack([x * 255 // 160, y * 255 // 120, np.full_like(x, 128)], axis=-1).astype(np.uint8)


@pytest.fixture
def raw_dir(tmp_path):
    """RAW_DIR with a class holding the illustration, a picture without a face and a broken file,
    and a second class with only the faceless picture."""
    idol = tmp_path / "raw" / "高坂穂乃果"
    idol.mkdir(parents=True)
    shutil.copyfile(shared(ILLUSTRATION), idol / "group.png")
    Image.fromarray(no_face_picture()).save(idol / "plain.jpg")
    (idol / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (tmp_path / "raw" / "other").mkdir()
    Image.fromarray(no_face_picture()).save(tmp_path / "raw" / "other" / "plain.png")
    (tmp_path / "raw" / "names.tsv").write_text("folder\tname\n高坂穂乃果\tHonoka\n", encoding="utf-8")
    return tmp_path / "raw"


def crops(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# ---------------------------------------------------------------- detection and cropping

def test_defaults_find_the_faces_of_the_illustration(cascade):
    rgb = read_image(shared(ILLUSTRATION))
    boxes = faces.detect_faces(rgb, cascade)
    assert MIN_FACES <= len(boxes) <= 20, boxes
    assert all(w >= 30 and h >= 30 and x >= 0 and y >= 0 and x + w <= 950 and y + h <= 380 for x, y, w, h in boxes)
    assert boxes == sorted(boxes, key=lambda b: (b[1], b[0]))
    assert all(c.shape == (64, 64, 3) and c.dtype == np.uint8 for c in faces.crop_faces(rgb, boxes))
    assert faces.detect_faces(no_face_picture(), cascade) == []


def test_margin_is_clipped_alike_on_all_sides():
    shape = (100, 200, 3)
    assert faces.widen((50, 40, 20, 20), 0.1, shape) == (48, 38, 72, 62)
    assert faces.widen((50, 40, 20, 20), 0.0, shape) == (50, 40, 70, 60)
    assert faces.widen((1, 40, 20, 20), 0.5, shape) == (0, 39, 22, 61)  # 1 pixel of room on the left
    assert faces.widen((180, 80, 20, 20), 0.5, shape) == (180, 80, 200, 100)  # in the corner: no margin


def test_centre_square_takes_the_middle():
    a = np.zeros((30, 50, 3), np.uint8)
    a[:, 10:40] = 255
    assert (faces.centre_square(a, 8) == 255).all()


def test_load_cascade_refuses_what_is_not_a_cascade(tmp_path):
    for text in ("not xml at all", '<?xml version="1.0"?><opencv_storage><a>1</a></opencv_storage>'):
        (tmp_path / "bad.xml").write_text(text)
        with pytest.raises(ValueError, match="not an OpenCV cascade"):
            faces.load_cascade(tmp_path / "bad.xml")
    with pytest.raises(ValueError, match="not found"):
        faces.load_cascade(tmp_path / "missing.xml")


# ---------------------------------------------------------------- the command

def test_cli_crops_faces_skips_broken_files_and_resumes(raw_dir, tmp_path, capsys):
    out = tmp_path / "faces"
    argv = [str(raw_dir), str(out), "--cascade", str(shared(CASCADE))]
    with pytest.raises(SystemExit, match="^error: no face found in 1 class.*: other "):  # "other" has no face
        faces.main(argv)
    report = capsys.readouterr().out.splitlines()
    idol = out / "高坂穂乃果"
    names = crops(idol)
    assert len(names) >= MIN_FACES and all(n.startswith("group_") for n in names)
    assert names == sorted(f"group_{i}.png" for i in range(len(names)))
    assert all(Image.open(idol / n).size == (64, 64) and Image.open(idol / n).format == "PNG" for n in names)
    assert crops(out / "other") == []  # there, so that train.py refuses it rather than train without it
    assert (out / "names.tsv").read_text(encoding="utf-8").endswith("高坂穂乃果\tHonoka\n")
    assert report[0].split() == ["pictures", "with", "faces", "faces", "whole", "skipped", "class"]
    rows = {row.split()[-1]: row.split()[:-1] for row in report[1:]}
    assert rows == {"高坂穂乃果": ["3", "1", str(len(names)), "0", "1"], "other": ["1", "0", "0", "0", "0"],
                    "(total)": ["4", "1", str(len(names)), "0", "1"]}

    times = {n: (idol / n).stat().st_mtime_ns for n in names}
    with pytest.raises(SystemExit, match="no face found"):  # everything is done: nothing is written again
        faces.main(argv)
    assert capsys.readouterr().out.splitlines() == report
    assert {n: (idol / n).stat().st_mtime_ns for n in crops(idol)} == times

    with pytest.raises(SystemExit, match="other options .*min_neighbors 2 -> 3"):
        faces.main(argv + ["--min-neighbors", "3"])


def test_cli_keep_whole_keeps_faceless_pictures_as_centre_squares(raw_dir, tmp_path, capsys):
    out = tmp_path / "faces"
    faces.main([str(raw_dir), str(out), "--cascade", str(shared(CASCADE)), "--keep-whole", "--size", "32"])
    assert crops(out / "other") == ["plain_whole.png"]
    assert "plain_whole.png" in crops(out / "高坂穂乃果") and "broken_whole.png" not in crops(out / "高坂穂乃果")
    assert not any(n.startswith("group_whole") for n in crops(out / "高坂穂乃果"))
    assert Image.open(out / "other" / "plain_whole.png").size == (32, 32)
    rows = capsys.readouterr().out.splitlines()
    assert rows[-1].split()[3:] == ["2", "1", "(total)"]


def test_cli_a_class_without_a_face_is_an_error_and_train_refuses_it(raw_dir, tmp_path):
    out = tmp_path / "faces"
    r = run_cli("-m", "data.faces", raw_dir, out, "--cascade", shared(CASCADE))
    assert r.returncode == 1 and r.stdout.splitlines()[-1].split()[-1] == "(total)", r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: no face found in 1 class(es): other ("), r.stderr
    assert "--keep-whole" in errors[0] and "Traceback" not in r.stderr
    assert crops(out / "other") == [] and len(crops(out / "高坂穂乃果")) >= MIN_FACES
    r = run_cli("train.py", "--dataset", "folder", "--data-dir", out, "--out", tmp_path / "run", "--epochs", "1",
                "--image-size", "16")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].endswith("no readable image: other"), r.stderr
    r = run_cli("-m", "data.faces", raw_dir, tmp_path / "whole", "--cascade", shared(CASCADE), "--keep-whole")
    assert r.returncode == 0 and crops(tmp_path / "whole" / "other") == ["plain_whole.png"], r.stderr


def test_cli_errors(raw_dir, tmp_path, capsys):
    bad = tmp_path / "bad.xml"
    bad.write_text("<nope/>")
    for argv, message in (([str(raw_dir), str(tmp_path / "f"), "--cascade", str(bad)], "not an OpenCV cascade"),
                          ([str(tmp_path / "nowhere"), str(tmp_path / "f")], "folder not found"),
                          ([str(raw_dir), str(raw_dir / "faces")], "must not contain each other")):
        with pytest.raises(SystemExit) as e:
            faces.main(argv)
        assert str(e.value.code).startswith("error: ") and message in str(e.value.code)
    for argv in (["--scale-factor", "1"], ["--min-size", "0"], ["--margin", "nan"], []):
        with pytest.raises(SystemExit) as e:
            faces.main([str(raw_dir), str(tmp_path / "f")] + argv if argv else argv)
        assert e.value.code == 2 and "usage:" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "data.faces", str(raw_dir), str(tmp_path / "f"), "--cascade", str(bad)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---------------------------------------------------------------- the cascade download, offline

@pytest.fixture
def cascade_server(monkeypatch):
    """A loopback server: /good/ serves the shared cascade, /bad/ a damaged copy; hits counts requests."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    good = shared(CASCADE).read_bytes()
    files = {f"/good/{faces.CASCADE_NAME}": good, f"/bad/{faces.CASCADE_NAME}": good[:-100] + b" " * 100}
    hits = Counter()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] += 1
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def test_cascade_is_downloaded_once_and_checked(cascade_server, tmp_path):
    url, hits = cascade_server
    good = f"{url}/good/{faces.CASCADE_NAME}"
    for _ in range(2):
        cascade = faces.load_cascade(origin=good, cache_dir=tmp_path / "keras")
        assert not cascade.empty()
    assert hits == {f"/good/{faces.CASCADE_NAME}": 1}
    assert (tmp_path / "keras" / "models" / faces.CASCADE_NAME).read_bytes() == CASCADE.read_bytes()

    with pytest.raises(ValueError, match=f"does not have sha256 {faces.CASCADE_SHA256}"):
        faces.load_cascade(origin=f"{url}/bad/{faces.CASCADE_NAME}", cache_dir=tmp_path / "other")
    with pytest.raises(ValueError, match="could not download"):
        faces.load_cascade(origin=f"{url}/missing.xml", cache_dir=tmp_path / "third")
