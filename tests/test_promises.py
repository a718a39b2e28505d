"""README promises checked by content, not only by shape: EXIF rotation, the first frame of an
animated GIF, the reason given for a decompression bomb, and Score-CAM's memory staying flat in the
number of pictures."""
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.images import ImageError, read_image  # noqa: E402

ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation -> np.rot90 k that displays the stored pixels upright (k > 0: counter-clockwise).
ROT90 = {3: 2, 6: -1, 8: 1}


def quadrants(height=32, width=48):
    """Four flat colours in 8-aligned blocks: no rotation or flip maps the picture onto itself, and
    JPEG (4:4:4, quality 95) keeps flat 8x8 blocks within a grey level or two."""
    a = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    a[:h, :w], a[:h, w:], a[h:, :w], a[h:, w:] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
    return a


@pytest.mark.parametrize("orientation", sorted(ROT90))
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_exif_rotation_is_applied(tmp_path, fmt, orientation):
    stored = quadrants()
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[ORIENTATION] = orientation
    path = tmp_path / f"rotated.{fmt}"
    im.save(path, exif=exif.tobytes(), **({"quality": 95, "subsampling": 0} if fmt == "jpg" else {}))
    with Image.open(path) as check:  # the file really carries the tag and the unrotated pixels
        assert check.getexif().get(ORIENTATION) == orientation and check.size == (48, 32)
    got = read_image(path)
    want = np.rot90(stored, ROT90[orientation])
    assert got.shape == want.shape
    assert np.abs(got.astype(np.int16) - want).max() <= (0 if fmt == "png" else 8)


def test_animated_gif_gives_its_first_frame(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (20, 12), c) for c in colours]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as check:  # three frames of different colours were written
        assert check.n_frames == 3
        check.seek(2)
        assert tuple(np.asarray(check.convert("RGB"))[0, 0]) == colours[2]
    got = read_image(path)
    assert got.shape == (12, 20, 3)
    assert (got == colours[0]).all()


def png_header(path, width, height):
    """A PNG that declares width x height RGB pixels and holds none: a bomb in a few bytes."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [
    10_000,  # 1e8 pixels: over Pillow's limit (89.5 M), under twice it: Pillow only warns
    20_000,  # 4e8 pixels: over twice the limit: Pillow raises
])
def test_decompression_bomb_is_refused_with_its_reason(tmp_path, side):
    assert Image.MAX_IMAGE_PIXELS < side * side  # Pillow's default limit holds
    path = png_header(tmp_path / f"bomb{side}.png", side, side)
    with pytest.raises(ImageError) as error:
        read_image(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "too large" in message and "decompression-bomb" in message


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import runtime  # noqa: F401
    import keras
    import numpy as np
    from kerascam.methods import score_cam

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))

    N, K, BATCH = 64, 16, 64
    keras.utils.set_random_seed(0)
    inp = keras.Input((64, 64, 3))
    x = keras.layers.Conv2D(K, 3, padding="same", activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax")(x))
    rng = np.random.default_rng(0)

    def images(n):
        x = rng.random((n, 64, 64, 3), dtype=np.float32)
        x *= 255
        return x

    score_cam(model, images(N), batch_size=BATCH, precision="float32")  # warm-up: every shape traced once
    extra = {N: [], 4 * N: []}
    for n in (N, 4 * N, N, 4 * N):
        x = images(n)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
        before = status("VmRSS")
        maps = score_cam(model, x, batch_size=BATCH, precision="float32")
        extra[n].append(status("VmHWM") - before - maps.nbytes / 2**20)
        del x, maps
    print(json.dumps({str(k): v for k, v in extra.items()}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM reset)")
def test_streaming_memory_is_flat_in_the_number_of_pictures():
    """Peak memory a score_cam call needs beyond its input (already resident) and its output maps,
    for N = 64 and 4N = 256 pictures at 64x64 of a one-conv model (16 channels, batch 64, so 16
    pictures per chunk). Measured on the 2-core CPU: -4 to +24 MB per call at either size; the
    growth from 64 to 256 (the smaller of two calls each) -4 to +6 MB. Holding every chunk's
    activations and pictures to the end (no streaming) grows it by about 192 x 304 KB = 57 MB
    (measured 54-77 MB). Bound: 25 MB. A fresh process, so the rest of the session sets no peak."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(ROOT)], capture_output=True, text=True,
                          env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    extra = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    growth = min(extra[256]) - min(extra[64])
    assert growth < 25, f"peak memory beyond input and output grew {growth:.1f} MB from 64 to 256 pictures: {extra}"
