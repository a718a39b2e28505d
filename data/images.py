"""Read any common image file as 8-bit RGB, and resize it, with one clear error for bad files."""
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


class ImageError(ValueError):
    """A file that cannot be used as an image; the message names the file and the reason."""


def to_rgb8(im):
    """Convert a PIL image of any mode (L, LA, P, RGBA, CMYK, I;16, I, F ...) to an RGB uint8 array.

    Transparent pixels are composited onto white, as a viewer shows them; 16-bit and
    float images are scaled, not clipped, to 8 bits.
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = 65535.0 if im.mode.startswith("I;16") or (a.size and a.max() > 255) else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def read_image(path):
    """Read an image file as an (H, W, 3) uint8 RGB array; ImageError when it is not one."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.seek(0)  # first frame of an animation
                im = ImageOps.exif_transpose(im)
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path}: image too large (over Pillow's decompression-bomb limit)") from None
    except MemoryError:
        raise ImageError(f"{path}: image too large to read into memory") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image or an unsupported format") from None
    except Exception as e:  # a damaged file makes Pillow's decoders raise nearly anything (struct.error, KeyError...)
        raise ImageError(f"{path}: corrupt or truncated image ({e or type(e).__name__})") from None
    try:
        rgb = to_rgb8(im)
    except MemoryError:
        raise ImageError(f"{path}: image too large to read into memory") from None
    except Exception:  # Pillow cannot turn every mode (e.g. LAB) into RGB
        raise ImageError(f"{path}: unsupported colour mode {im.mode}; save it as RGB") from None
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageError(f"{path}: image has no pixels")
    return np.ascontiguousarray(rgb)


def resize(image, size):
    """Resize an (H, W, C) array to size=(height, width): area averaging down, bilinear up."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    shrinking = height * width < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def list_images(folder):
    """Files directly in `folder`, sorted, hidden files left out (broken ones are caught when read)."""
    return sorted(p for p in Path(folder).iterdir() if not p.name.startswith("."))
