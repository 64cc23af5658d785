"""Image files as uint8 RGB arrays, with one rule for every bit depth, mode and frame count.

:func:`read_image` is what the image-folder PCam dataset and ``python -m benchmarks.predict`` read images with
(Pillow decodes them; needs the ``images`` extra or any Pillow):

* 8-bit RGB is taken as it is; 8-bit grayscale, palette, RGBA/LA (alpha dropped) and CMYK are converted to
  RGB by Pillow.
* 16-bit grayscale (``I;16`` PNG/TIFF) is scaled to 8 bits (``round(v / 257)``: 65535 -> 255), not clipped.
  32-bit integer (``I``) and float (``F``) images carry no known white level and are refused.
* Every frame of a multi-frame file (TIFF pages, animated PNG/GIF) is returned, in order.
* An EXIF orientation tag (cameras, phones and some scanners store pixels sideways or mirrored and tag them)
  is applied: the pixels come as a viewer shows the image, so ``--tiles`` positions and centre crops refer
  to the image the user sees, not to the stored grid. An EXIF block that cannot be parsed counts as no tag.
* An embedded ICC colour profile is not applied: pixel values are taken as stored, as PCam's patches (scanner
  RGB without a profile) were and as torchvision reads images. Converting them to sRGB would move patches
  tagged with a scanner's profile away from the values the models were trained on.
* A file that declares more pixels than Pillow's decompression-bomb limit, a truncated or corrupt file and
  an unknown format raise :class:`ImageError` naming the file.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np

from rotconv.files import check_path

__all__ = ["ImageError", "IMAGE_SUFFIXES", "read_image", "require_pillow"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_CONVERTIBLE = {"RGB", "L", "P", "RGBA", "LA", "CMYK", "YCbCr", "1", "PA", "RGBX", "La"}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
# the oldest Pillow read correctly: 16-bit grayscale PNGs open as ``I;16`` from 10.3 on (as 32-bit ``I``
# before), and TIFF orientation is applied once from 10.1 on (twice with ImageOps.exif_transpose before)
_PILLOW_MINIMUM = (10, 3)
_ORIENTATION = 0x0112  # the EXIF orientation tag; values 2-8 are mirrored or turned storage
_TURNED = range(2, 9)


class ImageError(ValueError):
    """An image file cannot be read as 8-bit RGB (the message names the file and why)."""


def require_pillow(path: str):
    """The ``PIL.Image`` module; :class:`ImageError` naming ``path`` when Pillow is not installed or older
    than 10.3 (older ones read 16-bit PNGs as 32-bit and turn oriented TIFFs twice)."""
    try:
        import PIL
        from PIL import Image
    except ImportError:
        raise ImageError(f"{path}: reading image files needs Pillow (pip install pillow, or the "
                         "'images' extra)") from None
    if tuple(int(part) for part in PIL.__version__.split(".")[:2]) < _PILLOW_MINIMUM:  # "11.0.0.dev0" too
        wanted = ".".join(map(str, _PILLOW_MINIMUM))
        raise ImageError(f"{path}: reading image files needs Pillow {wanted} or later, found {PIL.__version__} "
                         f"(pip install 'pillow>={wanted}')")
    return Image


def _frame_rgb(frame, path: str) -> np.ndarray:
    mode = frame.mode
    if mode in _SIXTEEN_BIT:
        values = np.asarray(frame, dtype=np.uint16) if mode != "I;16B" else np.asarray(frame).astype(np.uint16)
        gray = np.floor(values.astype(np.float64) / 257 + 0.5).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "RGB":
        return np.asarray(frame, dtype=np.uint8)
    if mode in _CONVERTIBLE:
        return np.asarray(frame.convert("RGB"), dtype=np.uint8)
    raise ImageError(f"{path}: image mode {mode!r} has no known white level (32-bit integer or float pixels); "
                     "save it as 8-bit RGB (or 16-bit grayscale)")


def _orientation(frame) -> int:
    """The frame's EXIF orientation tag; 1 (as stored) without one or when the EXIF block cannot be parsed
    (its pixels are intact: viewers show such a file as stored)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Corrupt EXIF", category=UserWarning)
            return int(frame.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - Pillow's metadata parser raises many types for malformed bytes
        return 1


def _upright(frame):
    """``frame`` turned and mirrored as its EXIF orientation tag says (itself when it has none)."""
    from PIL import ImageOps  # Pillow is there: the frame came from it
    return ImageOps.exif_transpose(frame) if _orientation(frame) in _TURNED else frame


def read_image(path: str, max_frames: int | None = None) -> np.ndarray:
    """Every frame of the image file ``path`` as uint8 RGB ``(frames, H, W, 3)`` (rules: module docstring).

    ``max_frames``: refuse files with more frames than this (``ImageError``); None accepts any count.
    """
    check_path(path)
    Image = require_pillow(path)
    if not os.path.isfile(path):
        raise ImageError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # decoded from the file's bytes, not opened by name: Pillow then never memory-maps an uncompressed
            # file, and it scrambles mapped grayscale TIFFs when it turns them upright on load (orientations
            # 5-8; seen in Pillow 11-13)
            with open(path, "rb") as handle:
                content = io.BytesIO(handle.read())
            with Image.open(content) as image:
                frames = getattr(image, "n_frames", 1)
                if max_frames is not None and frames > max_frames:
                    raise ImageError(f"{path}: {frames} frames, expected at most {max_frames}")
                arrays = []
                for index in range(frames):
                    image.seek(index)
                    arrays.append(_frame_rgb(_upright(image), path))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{path}: declares too many pixels to decode safely ({error})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as error:  # truncated data, corrupt chunks
        raise ImageError(f"{path}: not a readable image (truncated or corrupt?): {error}") from None
    shapes = {array.shape for array in arrays}
    if len(shapes) != 1:
        raise ImageError(f"{path}: its frames differ in size ({sorted(shapes)}); expected one size")
    return np.stack(arrays)
