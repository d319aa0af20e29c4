"""Image files as a user's photos: the one place where an image file's size is read and its
pixels decoded (the readers' size probe, training and cache decode, predict).

The rules (the README's data section repeats them):

- **EXIF orientation** (tags 1-8, from the EXIF block or, without one, from XMP, as
  ``PIL.ImageOps.exif_transpose`` reads them) is applied: sizes and pixels are those of the image
  as viewers and labelling tools display it, so boxes drawn on a phone photo land on the object.
  The tag is read from the file's header, before the pixels are decoded, so that the size probe
  (which does not decode) and the decode always agree (for a PNG: an ``eXIf`` chunk before the
  pixel data, where Pillow, libpng and exiftool write it). Pillow itself applies a TIFF's
  orientation when it opens the file.
- **16-bit** grayscale (Pillow modes ``I;16*``, and ``I``, read as 16-bit with values clipped to
  0..65535) is scaled to 8 bits (``round(v / 257)``), not clipped to white. Pillow reads 16-bit
  RGB(A) PNGs as 8-bit (their high bytes).
- **Colour**: CMYK, YCbCr, LAB, HSV, palette, grayscale and 1-bit images become RGB. **Alpha**
  (RGBA, LA, palettes and ``tRNS`` colours with transparency) is composited onto black: a
  transparent pixel is black whatever colour it stores (premultiplied), the same pixels for the
  same picture whichever way a tool wrote its transparent area.
- 32-bit floating-point images (mode ``F``) have no fixed range to scale to 8 bits: refused.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from distillery.platform.errors import DeterministicError

__all__ = ["IMAGE_SUFFIXES", "CorruptImageError", "ImageDecodeError", "PhotoSize", "decode_image", "probe_photo",
           "size_mismatch"]

# The image files the readers and predict take (by suffix, any case): the types Ultralytics
# trains on that Pillow decodes.
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp")

# What Pillow raises for a file that is not an image, is damaged, or declares more pixels than its
# safety limit (Image.MAX_IMAGE_PIXELS x 2, 179 million: a 200-megapixel phone photo exceeds it).
_PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class CorruptImageError(ValueError, DeterministicError):
    """An image file that is missing or cannot be decoded; the message names the file."""


class ImageDecodeError(ValueError):
    """Why image bytes cannot be used (without the file's name: callers name it their way)."""


@dataclass(frozen=True)
class PhotoSize:
    """An image's size as displayed (orientation applied) and its EXIF orientation (1: none)."""

    width: int
    height: int
    orientation: int = 1

    @property
    def stored(self) -> tuple[int, int]:
        """(width, height) of the pixels as stored in the file, before the orientation."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) the header declares; 1 when absent, out of range or unreadable
    (viewers show such a file as stored). ``Image.Image.getexif`` rather than the image's own:
    PNG's override decodes the whole file to look for EXIF after the pixels, which the size probe
    must not do."""
    if img.format == "TIFF":  # Pillow applies a TIFF's orientation itself, at open and at load
        return 1
    try:
        value = Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1)
    except Exception:  # a damaged EXIF block (Pillow raises struct, Syntax, Value or Key errors)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftyphevc", b"ftypavif"):
            raise ImageDecodeError("a HEIC/HEIF/AVIF photo (an iPhone's default format), which Pillow does not "
                                   "read: convert it to JPEG or PNG") from None
        raise ImageDecodeError("not an image file Pillow can identify (JPEG, PNG, BMP, TIFF, WebP)") from None
    except _PIL_ERRORS as exc:
        raise ImageDecodeError(str(exc)) from None


def _displayed(size: tuple[int, int], orientation: int) -> PhotoSize:
    w, h = size
    return PhotoSize(h, w, orientation) if orientation in (5, 6, 7, 8) else PhotoSize(w, h, orientation)


def _rgb8(img: Image.Image) -> np.ndarray:
    """A loaded image's pixels as (H, W, 3) uint8 RGB, by the module's rules (as stored)."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        raise ImageDecodeError("32-bit floating-point pixels (mode F) have no fixed range to scale to 8 bits; "
                               "save it as an 8- or 16-bit image")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        return ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8)  # over black
    return np.array(img if mode == "RGB" else img.convert("RGB"))  # a writable copy, as callers expect


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels as displayed (``exif_transpose``'s transposition for each tag)."""
    oriented = {1: pixels, 2: pixels[:, ::-1], 3: pixels[::-1, ::-1], 4: pixels[::-1],
                5: pixels.transpose(1, 0, 2), 6: np.rot90(pixels, k=-1), 7: np.rot90(pixels, k=2).transpose(1, 0, 2),
                8: np.rot90(pixels, k=1)}[orientation]
    return np.ascontiguousarray(oriented)


def _decode(img: Image.Image) -> np.ndarray:
    orientation = _orientation(img)  # before load: what the size probe read
    try:
        img.load()
        pixels = _rgb8(img)
    except ImageDecodeError:
        raise
    except _PIL_ERRORS as exc:
        raise ImageDecodeError(str(exc)) from None
    return _orient(pixels, orientation)


def probe_photo(data: bytes, *, decode: bool = False) -> PhotoSize:
    """The displayed size of image bytes from their header; ``decode`` also decodes the pixels
    exactly as :func:`decode_image` does, so what passes it decodes. Raises :class:`ImageDecodeError`."""
    with _open(data) as img:
        if decode:
            pixels = _decode(img)
            return PhotoSize(pixels.shape[1], pixels.shape[0], _orientation(img))
        return _displayed(img.size, _orientation(img))


def decode_image(data: bytes, uri: str) -> np.ndarray:
    """Decode image bytes to an (H, W, 3) uint8 RGB array as displayed, by the module's rules;
    :class:`CorruptImageError` names the file."""
    try:
        with _open(data) as img:
            return _decode(img)
    except ImageDecodeError as exc:
        raise CorruptImageError(f"image does not decode: {uri}: {exc}") from None


def size_mismatch(size: PhotoSize, width: int, height: int, annotation: str) -> str | None:
    """None when ``annotation`` (e.g. "the annotation", "the XML's <size>") gives the displayed
    size, else the reason: annotations are in the pixels of the displayed image, as labelling
    tools show it; a size that is the stored one of a rotated photo says how to tell."""
    if (size.width, size.height) == (width, height):
        return None
    if size.stored == (width, height):
        return (f"image is {size.width}x{size.height} as displayed (EXIF orientation {size.orientation} "
                f"turns its stored {width}x{height} pixels) but {annotation} says {width}x{height}: boxes are read "
                "in the displayed image's pixels; if they were drawn on the unrotated pixels, remove the EXIF "
                "orientation tag from the file (e.g. exiftool -Orientation= FILE)")
    return f"image is {size.width}x{size.height} but {annotation} says {width}x{height}"
