"""Read any common image file as 8-bit RGB, and resize it, with one clear error for bad files."""
import math
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


class ImageError(ValueError):
    """A file that cannot be used as an image; the message names the file and the reason."""


def to_rgb8(im):
    """Convert a PIL image of any mode (L, LA, P, RGBA, CMYK, I;16, I, F ...) to an RGB uint8 array.

    Transparent pixels are composited onto white, as a viewer shows them; 16-bit and
    float images are scaled, not clipped, to 8 bits: white is 1.0 in float images whose values
    are all <= 1, else 255, or 65535 in 16-bit images and in any with values above 255.
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = 65535.0 if im.mode.startswith("I;16") or (a.size and a.max() > 255) else 255.0
        if im.mode == "F" and a.size and a.max() <= 1:
            top = 1.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def open_image(path):
    """Image.open, refusing pictures over Pillow's pixel limit (Image.MAX_IMAGE_PIXELS) with its
    DecompressionBombError, except JPEGs: one over the limit (a 108-megapixel phone photo) is opened to
    be decoded at 1/2, 1/4 or 1/8 of its size (Pillow's draft mode), the least reduction within the limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        with open(path, "rb") as f:
            if f.read(3) != b"\xff\xd8\xff":  # not a JPEG
                raise
    im = JpegImagePlugin.JpegImageFile(path)  # opened without Image.open's pixel check
    width, height = im.size
    scale = next((s for s in (2, 4, 8) if math.ceil(width / s) * math.ceil(height / s) <= Image.MAX_IMAGE_PIXELS), 8)
    im.draft(None, (width // scale, height // scale))
    if im.size[0] * im.size[1] > Image.MAX_IMAGE_PIXELS:  # too large even at 1/8, or draft mode refused
        im.close()
        raise Image.DecompressionBombError(f"{width}x{height} pixels")
    return im


def read_image(path):
    """Read an image file as an (H, W, 3) uint8 RGB array; ImageError when it is not one (see open_image for
    pictures over Pillow's pixel limit: a JPEG comes back at a fraction of its size)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    try:
        with open_image(path) as im:
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
