"""Reading images of every common format, image folders, CIFAR-10 in both layouts."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, write_image
from data.cifar10 import load_cifar10, safe_unpickle
from data.folder import load_image_folder, stratified_split
from data.images import ImageError, read_image, resize

RGB = (np.arange(12 * 10 * 3).reshape(12, 10, 3) % 256).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".webp", ".gif", ".tif"])
def test_common_formats_read_as_rgb_uint8(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    Image.fromarray(RGB).save(path)
    a = read_image(path)
    assert a.shape == (12, 10, 3) and a.dtype == np.uint8
    if suffix in (".png", ".bmp", ".tif", ".webp") and suffix != ".webp":
        np.testing.assert_array_equal(a, RGB)


def test_grayscale_rgba_palette_and_16_bit_become_rgb8(tmp_path):
    grey = Image.fromarray(np.full((5, 6), 77, np.uint8))
    grey.save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), np.full((5, 6, 3), 77))

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = read_image(tmp_path / "a.png")
    assert tuple(a[0, 0]) == (200, 0, 0) and tuple(a[3, 3]) == (255, 255, 255)

    Image.fromarray(RGB).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (12, 10, 3)

    deep = np.full((3, 3), 128 * 257, np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")  # 16-bit greyscale PNG
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    np.testing.assert_array_equal(read_image(tmp_path / "d.png"), np.full((3, 3, 3), 128))

    Image.fromarray(RGB).convert("CMYK").save(tmp_path / "c.jpg")
    assert read_image(tmp_path / "c.jpg").shape == (12, 10, 3)


def test_float_images_in_0_1_are_scaled_with_1_as_white(tmp_path):
    Image.fromarray(np.tile(np.linspace(0, 1, 256, dtype=np.float32), (4, 1)), "F").save(tmp_path / "f01.tif")
    a = read_image(tmp_path / "f01.tif")
    np.testing.assert_array_equal(a[0, :, 0], np.arange(256))  # 0 -> 0, 1.0 -> 255, exactly a step apart
    assert a.shape == (4, 256, 3) and (a == a[..., :1]).all()
    Image.fromarray(np.full((2, 3), 128.0, np.float32), "F").save(tmp_path / "f255.tif")  # 0..255 as before
    np.testing.assert_array_equal(read_image(tmp_path / "f255.tif"), np.full((2, 3, 3), 128))


def test_a_108_megapixel_jpeg_is_read_at_half_size(tmp_path):
    path = tmp_path / "phone.jpg"
    big = Image.new("L", (12000, 9000), 0)
    big.paste(255, (6000, 0, 12000, 9000))  # left half black, right half white
    big.save(path, quality=90)
    del big
    assert 12000 * 9000 > Image.MAX_IMAGE_PIXELS  # Pillow's limit would refuse it as a decompression bomb
    a = read_image(path)
    assert a.shape == (4500, 6000, 3) and a.dtype == np.uint8
    assert a[:, :2990].max() <= 5 and a[:, 3010:].min() >= 250


def test_jpeg_over_the_pixel_limit_is_read_at_the_least_reduction_within_it(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.fromarray(np.full((150, 200, 3), 90, np.uint8)).save(tmp_path / "small.jpg")  # 30000 px: 1/8 fits
    a = read_image(tmp_path / "small.jpg")
    assert a.shape == (19, 25, 3) and np.abs(a.astype(int) - 90).max() <= 2
    Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(tmp_path / "large.jpg")  # 1/8 is 1900 px
    Image.fromarray(np.full((150, 200, 3), 90, np.uint8)).save(tmp_path / "large.png")  # no draft for PNG
    for name in ("large.jpg", "large.png"):
        with pytest.raises(ImageError, match="too large .*decompression-bomb"):
            read_image(tmp_path / name)


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"hello", "not an image"),
                                             ("truncated", "corrupt or truncated")])
def test_broken_files_raise_image_error(tmp_path, content, reason):
    path = tmp_path / "x.jpg"
    if content == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        read_image(path)


def test_missing_file_and_directory_raise_image_error(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageError, match="not a file"):
        read_image(tmp_path / "dir.png")


def test_resize_to_model_size():
    assert resize(RGB, (32, 32)).shape == (32, 32, 3)
    assert resize(np.zeros((300, 200, 3), np.uint8), (64, 64)).shape == (64, 64, 3)


def test_folder_loading_resizes_splits_stratified_and_counts_skipped(color_folder):
    (color_folder / "red" / "broken.jpg").write_bytes(b"junk")
    (color_folder / "green" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        d = load_image_folder(color_folder, (16, 16), val_fraction=0.2, seed=1)
    assert d.class_names == ["blue", "green", "red"]
    assert d.x_train.shape == (24, 16, 16, 3) and d.x_val.shape == (6, 16, 16, 3)
    assert np.bincount(d.y_val).tolist() == [2, 2, 2]
    assert len(d.skipped) == 2
    again = load_image_folder(color_folder, (16, 16), val_fraction=0.2, seed=1)
    np.testing.assert_array_equal(again.x_val, d.x_val)  # seeded: the same split every time


def test_stratified_split_keeps_every_class_in_train():
    y = np.array([0] * 10 + [1] * 3 + [2] * 2)
    train, val = stratified_split(y, 0.2, seed=0)
    assert set(np.bincount(y[val]).tolist()) <= {1, 2} and np.bincount(y[train]).min() >= 1
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(y)


def test_empty_class_folder_and_single_class_are_errors(color_folder):
    (color_folder / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable image: empty"):
        load_image_folder(color_folder, (16, 16))
    with pytest.raises(ValueError, match="at least two class subfolders"):
        load_image_folder(color_folder / "red", (16, 16))


def test_class_folder_name_not_utf8_is_refused_before_any_picture_is_read(color_folder, tmp_path):
    bad = os.path.join(os.fsencode(color_folder), b"caf\xe9")  # Latin-1 "café", as an old archive may unpack it
    os.mkdir(bad)
    write_image(Path(os.fsdecode(bad)) / "0.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"class folder name b'caf\\xe9' is not valid UTF-8; rename the folder"):
        load_image_folder(color_folder, (16, 16))
    r = run_cli("train.py", "--dataset", "folder", "--data-dir", color_folder, "--out", tmp_path / "run",
                "--epochs", "1", "--image-size", "16")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("error: ") and "b'caf\\xe9' is not valid UTF-8" in lines[-1]
    assert not any("Traceback" in line or "reading" in line for line in lines), r.stderr


def _write_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    data = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
    data[b"labels"] = [int(v) for v in data[b"labels"]]
    path.write_bytes(pickle.dumps(data))
    return data


def test_cifar10_from_python_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    first = _write_batch(folder / "data_batch_1", 4, 0)
    for i in range(2, 6):
        _write_batch(folder / f"data_batch_{i}", 4, i)
    _write_batch(folder / "test_batch", 3, 9)
    (x, y), (xt, yt), names = load_cifar10(tmp_path)
    assert x.shape == (20, 32, 32, 3) and xt.shape == (3, 32, 32, 3) and names[0] == "airplane"
    np.testing.assert_array_equal(x[0, :, :, 0].ravel(), first[b"data"][0, :1024])  # channel-first rows → HWC
    assert y[:4].tolist() == first[b"labels"]


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(ValueError, match="refused to load posix.system") as e:
        safe_unpickle(path)
    assert str(path) in str(e.value) and "--data-dir" in str(e.value)  # names the file and what to change


def _pickles(folder, **replace):
    """A complete cifar-10-batches-py folder of tiny batches; replace={file name: bytes} overwrites some."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        _write_batch(folder / f"data_batch_{i}", 2, i)
    _write_batch(folder / "test_batch", 2, 9)
    for name, content in replace.items():
        (folder / name).write_bytes(content)
    return folder


_ARRAY = np.zeros((2, 3072), np.uint8)
BROKEN_BATCHES = {
    "malicious": (pickle.dumps({b"data": _Evil(), b"labels": []}), "refused to load"),
    "truncated": (pickle.dumps({b"data": _ARRAY, b"labels": [0, 1]})[:-40], "not a readable CIFAR-10 pickle"),
    "not a pickle": (b"\x89PNG\r\n\x1a\n not a pickle", "not a readable CIFAR-10 pickle|refused"),
    "text": (b"hello, world\n", "not a readable CIFAR-10 pickle"),
    "empty file": (b"", "not a readable CIFAR-10 pickle"),
    "a list": (pickle.dumps([1, 2, 3]), "not a CIFAR-10 batch"),
    "no labels": (pickle.dumps({b"data": _ARRAY}), "not a CIFAR-10 batch"),
    "wrong image size": (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
                         "not 32x32x3 images"),
    "float pixels": (pickle.dumps({b"data": np.zeros((2, 3072)), b"labels": [0, 1]}), "not integers"),
    "pixels over 255": (pickle.dumps({b"data": np.full((2, 3072), 300), b"labels": [0, 1]}), "outside 0-255"),
    "labels too few": (pickle.dumps({b"data": _ARRAY, b"labels": [0]}), "1 labels for 2 images"),
    "label 10": (pickle.dumps({b"data": _ARRAY, b"labels": [0, 10]}), "labels outside 0-9"),
    "string labels": (pickle.dumps({b"data": _ARRAY, b"labels": ["cat", "dog"]}), "not integers"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_BATCHES))
def test_every_bad_cifar10_batch_is_one_value_error_naming_the_file(tmp_path, case):
    content, reason = BROKEN_BATCHES[case]
    folder = _pickles(tmp_path / "cifar-10-batches-py", data_batch_3=content)
    with pytest.raises(ValueError, match=reason) as e:
        load_cifar10(tmp_path)
    assert str(folder / "data_batch_3") in str(e.value) and ("--data-dir" in str(e.value))


def test_missing_batch_and_bad_meta_are_value_errors(tmp_path):
    folder = _pickles(tmp_path)
    (folder / "data_batch_5").unlink()
    with pytest.raises(ValueError, match="data_batch_5: cannot be read"):
        load_cifar10(folder)
    _pickles(folder, **{"batches.meta": pickle.dumps({b"label_names": [b"only one"]})})
    with pytest.raises(ValueError, match="batches.meta: not a CIFAR-10 batches.meta"):
        load_cifar10(folder)
    _pickles(folder, **{"batches.meta": pickle.dumps({b"label_names": [b"a", b"b"]})})
    with pytest.raises(ValueError, match="labels outside 0-1"):  # labels must fit the named classes
        load_cifar10(folder)


def test_python3_pickles_of_every_protocol_are_read(tmp_path):
    """Batches re-saved by Python 3 (str keys, protocol 2's _codecs, protocol 5's buffers) are plain data too."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    for protocol in (2, 4, 5):
        folder = _pickles(tmp_path / str(protocol), test_batch=pickle.dumps({"data": x, "labels": [1, 2, 3]},
                                                                            protocol=protocol))
        _, (xt, yt), _ = load_cifar10(folder, train=False)
        np.testing.assert_array_equal(xt.transpose(0, 3, 1, 2).reshape(3, -1), x)
        assert yt.tolist() == [1, 2, 3]


def closed_port_url():
    """An http URL on the loopback interface where nothing listens: a download from it fails at once,
    without touching the network."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


def test_failed_download_is_one_value_error_saying_to_pass_data_dir(tmp_path, monkeypatch):
    """keras.datasets.cifar10 raises a bare Exception("URL fetch failure ...") when offline; load_cifar10
    owns turning it into the message every command prints. Keras's real get_file runs, pointed at a
    closed loopback port and an empty cache."""
    import keras.src.datasets.cifar10 as keras_cifar10

    real_get_file, url = keras_cifar10.get_file, closed_port_url()

    def offline_get_file(*args, **kwargs):
        return real_get_file(*args, **{**kwargs, "origin": url, "cache_dir": str(tmp_path / "keras")})

    monkeypatch.setattr(keras_cifar10, "get_file", offline_get_file)
    for train in (True, False):
        with pytest.raises(ValueError) as e:
            load_cifar10(None, train=train)
        message = str(e.value)
        assert message.startswith("could not download CIFAR-10 (URL fetch failure on " + url)
        assert message.endswith("; pass --data-dir DIR (pickles or train/ test/ folders)") and "\n" not in message


def test_cifar10_tree_with_a_bad_picture_names_it(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ["airplane", "cat"]:
            write_image(tmp_path / split / c / "0.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    write_image(tmp_path / "test" / "cat" / "big.png", np.zeros((40, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="big.png: CIFAR-10 images are 32x32, this one is 32x40"):
        load_cifar10(tmp_path)
    (tmp_path / "test" / "cat" / "big.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="big.png: not an image.*; delete or replace it"):
        load_cifar10(tmp_path)
    (tmp_path / "test" / "cat" / "big.png").unlink()
    (tmp_path / "test" / "cat" / ".DS_Store").write_bytes(b"junk")  # hidden files are not pictures
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(ValueError, match="dog: missing"):
        load_cifar10(tmp_path)


def test_cifar10_from_jpeg_tree(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("test", 1)):
        for c in ["airplane", "cat"]:
            for i in range(n):
                write_image(tmp_path / split / c / f"{i}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    (x, y), (xt, yt), names = load_cifar10(tmp_path)
    assert names == ["airplane", "cat"] and x.shape == (4, 32, 32, 3) and yt.tolist() == [0, 1]


def test_cifar10_unknown_layout_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        load_cifar10(tmp_path)
    with pytest.raises(ValueError, match="CIFAR-10 folder not found"):
        load_cifar10(tmp_path / "missing")
