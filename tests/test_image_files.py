"""Image files as cameras, phones and tools write them (distillery.platform.datasets.image_files):
EXIF orientation 1-8 applied as ``PIL.ImageOps.exif_transpose`` applies it, in the size probe and
the decode alike; 16-bit PNGs scaled to 8 bits; CMYK, palette, grayscale and alpha images to RGB;
and the readers (COCO, YOLO, VOC) and the model resize seeing the displayed image."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps

from distillery.platform.datasets.coco import AnnotationError, load_coco, load_image_resized
from distillery.platform.datasets.image_files import (CorruptImageError, ImageDecodeError, decode_image,
                                                      probe_photo)
from distillery.platform.datasets.voc import load_voc
from distillery.platform.datasets.yolo import load_yolo

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)  # 10 wide, 6 high: a turn swaps them


def _encode(image: Image.Image, fmt: str, orientation: int | None = None, **kw) -> bytes:
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def phone_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    """A JPEG as a phone writes it: the sensor's pixels stored unrotated, the turn in the EXIF."""
    return _encode(Image.fromarray(pixels), "JPEG", orientation, quality=95)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_applied_as_exif_transpose_does(fmt, orientation):
    data = _encode(Image.fromarray(PIXELS), fmt, orientation, **({"lossless": True} if fmt == "WEBP" else {}))
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    decoded = decode_image(data, f"photo.{fmt.lower()}")
    assert np.array_equal(decoded, expected)
    size = probe_photo(data)  # the header only: no decode, the same size
    assert (size.width, size.height) == (decoded.shape[1], decoded.shape[0])
    assert size.orientation == orientation
    assert size.stored == (10, 6)
    assert probe_photo(data, decode=True) == size


def test_tiff_orientation_is_applied_once():
    """Pillow turns a TIFF itself when it opens it: not turned a second time."""
    data = _encode(Image.fromarray(PIXELS), "TIFF", 6)
    decoded = decode_image(data, "scan.tif")
    assert np.array_equal(decoded, np.rot90(PIXELS, k=-1))
    assert (probe_photo(data).width, probe_photo(data).height) == (6, 10)


def test_unreadable_or_strange_orientation_tags_leave_the_image_as_stored():
    for value in (0, 9, 65535):
        data = _encode(Image.fromarray(PIXELS), "PNG", value)
        assert np.array_equal(decode_image(data, "x.png"), PIXELS)
    damaged = _encode(Image.fromarray(PIXELS), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    assert decode_image(damaged, "x.jpg").shape == (6, 10, 3)


def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped_white():
    values = np.array([[0, 257, 32768, 65535], [1000, 12850, 51400, 65278]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = decode_image(data, "depth.png")
    assert decoded.dtype == np.uint8 and decoded.shape == (2, 4, 3)
    assert decoded[..., 0].tolist() == [[0, 1, 128, 255], [4, 50, 200, 254]]  # round(v / 257)
    assert (decoded[..., 0] == decoded[..., 2]).all()
    assert probe_photo(data, decode=True).width == 4


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def sixteen_bit_rgb_png(pixels: np.ndarray) -> bytes:
    """A 48-bit RGB PNG as OpenCV and scanners write it (Pillow cannot write one)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def test_sixteen_bit_rgb_png_reads_its_high_bytes():
    pixels = PIXELS.astype(np.uint16) * 256 + 100  # high byte: PIXELS
    assert np.array_equal(decode_image(sixteen_bit_rgb_png(pixels), "scan.png"), PIXELS)


def test_cmyk_jpeg_becomes_rgb():
    data = _encode(Image.new("CMYK", (8, 4), (0, 255, 255, 0)), "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_image(data, "print.jpg")
    assert decoded.shape == (4, 8, 3)
    assert np.abs(decoded.astype(int) - [255, 0, 0]).max() <= 2  # red


def test_palette_grayscale_and_alpha_images_become_rgb_over_black():
    palette = Image.new("P", (4, 2), 1)
    palette.putpalette([255, 255, 255, 10, 200, 30] + [0] * 762)
    palette.putpixel((0, 0), 0)
    decoded = decode_image(_encode(palette, "PNG", transparency=0), "icon.png")
    assert decoded[0, 0].tolist() == [0, 0, 0] and decoded[1, 3].tolist() == [10, 200, 30]  # transparent white

    gray = decode_image(_encode(Image.fromarray(PIXELS[..., 0]), "PNG"), "gray.png")
    assert np.array_equal(gray, np.repeat(PIXELS[..., :1], 3, axis=2))

    rgba = np.dstack([PIXELS, np.full((6, 10), 128, np.uint8)])
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    decoded = decode_image(_encode(Image.fromarray(rgba), "PNG"), "cutout.png")
    assert decoded[0, 0].tolist() == [0, 0, 0] and decoded[0, 1].tolist() == PIXELS[0, 1].tolist()
    assert np.abs(decoded[2].astype(int) - (PIXELS[2].astype(int) * 128 + 127) // 255).max() == 0

    la = decode_image(_encode(Image.new("LA", (3, 3), (200, 255)), "PNG"), "la.png")
    assert la.reshape(-1).tolist() == [200] * 27


def test_float_images_and_non_images_are_refused_naming_the_file():
    data = _encode(Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)), "TIFF")
    with pytest.raises(CorruptImageError, match=r"image does not decode: depth\.tif: 32-bit floating-point"):
        decode_image(data, "depth.tif")
    with pytest.raises(ImageDecodeError):
        probe_photo(data, decode=True)
    assert probe_photo(data).width == 4  # the header alone is readable: only the decode check refuses it
    with pytest.raises(CorruptImageError, match=r"image does not decode: notes\.jpg: "):
        decode_image(b"hello", "notes.jpg")


def test_an_image_past_pillows_pixel_limit_is_refused_naming_the_file():
    """A 200-megapixel phone photo, or a header that claims one: refused, not a traceback."""
    header = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 16384, 12288, 8, 2, 0, 0, 0))
              + _png_chunk(b"IEND", b""))
    with pytest.raises(CorruptImageError, match=r"image does not decode: huge\.png: Image size \(201326592 pixels\) "
                                                r"exceeds limit"):
        decode_image(header, "huge.png")
    with pytest.raises(ImageDecodeError, match="exceeds limit"):
        probe_photo(header)


# --------------------------------------------------------------------------- the readers

# The object: a red square in the displayed image's top-left quarter, 8..20 x 4..12 (x, y) on a
# 40 x 24 (w x h) photo; the phone stored it turned (orientation 6: 24 x 40 stored).
DISPLAYED = np.full((24, 40, 3), 90, np.uint8)
DISPLAYED[4:12, 8:20] = (220, 20, 20)
STORED_6 = np.rot90(DISPLAYED, k=1)  # what orientation 6 turns clockwise back to DISPLAYED


def test_phone_jpeg_decodes_and_resizes_as_displayed(tmp_path):
    path = tmp_path / "IMG_0001.jpg"
    path.write_bytes(phone_jpeg(STORED_6, 6))
    decoded = decode_image(path.read_bytes(), str(path))
    assert decoded.shape == (24, 40, 3)
    assert decoded[8, 14, 0] > 180 and decoded[20, 30, 0] < 130  # the red square where it is displayed
    resized = load_image_resized(str(path), 16)  # what the cache, evaluation and predict's resize see
    assert resized.shape == (3, 16, 16) and resized[0, 3, 5] > 180


def _coco_of_one(tmp_path: Path, width: int, height: int) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "IMG_0001.jpg").write_bytes(phone_jpeg(STORED_6, 6))
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "IMG_0001.jpg", "width": width, "height": height}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 4, 12, 8], "area": 96, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "red"}]}))
    return ann


def test_coco_sizes_are_the_displayed_ones(tmp_path):
    ann = _coco_of_one(tmp_path, 40, 24)
    for check in ("header", "decode"):
        ds = load_coco(str(ann), str(tmp_path / "images"), check_images=check)
        assert (ds.records[0].width, ds.records[0].height) == (40, 24)
    stored = _coco_of_one(tmp_path, 24, 40)  # a file whose width/height are the stored pixels'
    with pytest.raises(AnnotationError) as info:
        load_coco(str(stored), str(tmp_path / "images"))
    assert str(info.value).startswith(
        f"{stored}: image 1: image is 40x24 as displayed (EXIF orientation 6 turns its stored 24x40 pixels) "
        "but the annotation says 24x40: boxes are read in the displayed image's pixels")
    assert str(info.value).endswith("IMG_0001.jpg")


def test_yolo_boxes_are_placed_on_the_displayed_image(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "images" / "train" / "IMG_0001.JPG").write_bytes(phone_jpeg(STORED_6, 6))
    (tmp_path / "labels" / "train" / "IMG_0001.txt").write_text("0 0.35 0.3333333 0.3 0.3333333\n")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "names": ["red"]}))
    ds = load_yolo(str(tmp_path / "data.yaml"), "train", check_images="decode")
    rec = ds.records[0]
    assert (rec.width, rec.height) == (40, 24)
    assert np.allclose(rec.boxes, [[8, 4, 12, 8]], atol=1e-3)


def test_voc_size_is_checked_against_the_displayed_image(tmp_path):
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "JPEGImages" / "IMG_0001.jpg").write_bytes(phone_jpeg(STORED_6, 6))
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("IMG_0001\n")
    xml = ("<annotation><filename>IMG_0001.jpg</filename><size><width>{w}</width><height>{h}</height>"
           "<depth>3</depth></size><object><name>red</name><bndbox><xmin>9</xmin><ymin>5</ymin>"
           "<xmax>20</xmax><ymax>12</ymax></bndbox></object></annotation>")
    (tmp_path / "Annotations" / "IMG_0001.xml").write_text(xml.format(w=40, h=24))
    assert load_voc(str(tmp_path), "train").records[0].width == 40
    (tmp_path / "Annotations" / "IMG_0001.xml").write_text(xml.format(w=24, h=40))
    with pytest.raises(AnnotationError, match=r"image is 40x24 as displayed \(EXIF orientation 6 .* but the XML's "
                                              r"<size> says 24x40"):
        load_voc(str(tmp_path), "train")
