"""The image door: every odd input gives an RGB image or a clear ImageInputError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imagefiles import png_declaring

from mmie_core.images import ImageInputError, ImageLimits, load_image, to_rgb


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_accepts_every_source_kind(tmp_path):
    img = Image.new("RGB", (10, 6), (200, 10, 20))
    path = tmp_path / "a.png"
    img.save(path)
    data = path.read_bytes()
    for source in (str(path), path, data, bytearray(data), io.BytesIO(data), img, np.asarray(img)):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (10, 6)
        assert out.getpixel((0, 0)) == (200, 10, 20)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = load_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    r, g, b = out.getpixel((10, 2))  # the left strip is now on top
    assert b > 200 and r < 60


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_composited_on_white(mode):
    img = Image.new(mode, (8, 8), (0, 0) if mode == "LA" else (0, 0, 0, 0))
    out = load_image(encode(img, "PNG"))
    assert out.getpixel((3, 3)) == (255, 255, 255)


def test_palette_with_transparency_composited_on_white():
    img = Image.new("P", (8, 8), 1)
    img.putpalette([255, 0, 0, 0, 0, 0] + [0] * (256 * 3 - 6))
    img.info["transparency"] = 1
    out = load_image(encode(img, "PNG", transparency=1))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_to_rgb():
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = load_image(encode(img, "JPEG", quality=100))
    r, g, b = out.getpixel((4, 4))
    assert r > 230 and g < 30 and b < 30


def test_16_bit_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = load_image(encode(img, "PNG"))
    value = out.getpixel((0, 0))[0]
    assert 120 <= value <= 135, value  # clipping would give 255


def test_float_and_int32_arrays_are_scaled():
    assert load_image(np.full((4, 4), 0.5, dtype=np.float32)).getpixel((0, 0))[0] in (127, 128)
    ramp = np.arange(16, dtype=np.int32).reshape(4, 4) * 1000
    out = load_image(ramp)
    assert out.getpixel((0, 0))[0] == 0 and out.getpixel((3, 3))[0] == 255


def test_mode_f_and_1_and_l():
    f = Image.fromarray(np.full((4, 4), 0.25, dtype=np.float32), mode="F")
    assert to_rgb(f).getpixel((0, 0))[0] in (63, 64)
    one = Image.new("1", (4, 4), 1)
    assert to_rgb(one).getpixel((0, 0)) == (255, 255, 255)
    gray = Image.new("L", (4, 4), 77)
    assert to_rgb(gray).getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_takes_first_frame(fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    r, g, b = load_image(data).getpixel((8, 8))
    assert r > 200 and b < 60


def test_decompression_bomb_refused_before_decoding():
    # A tiny PNG whose header declares 50000 x 50000 pixels.
    data = png_declaring(50_000, 50_000)
    assert len(data) < 200
    with pytest.raises(ImageInputError, match="megapixels"):
        load_image(data)


def test_pixel_limit_is_configurable(monkeypatch):
    img = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageInputError, match="megapixels"):
        load_image(img, limits=ImageLimits(max_pixels=5000))
    monkeypatch.setenv("MMIE_MAX_IMAGE_PIXELS", "5000")
    with pytest.raises(ImageInputError):
        load_image(img)


def test_absurd_aspect_ratio_refused():
    with pytest.raises(ImageInputError, match="aspect ratio"):
        load_image(encode(Image.new("RGB", (1, 5000)), "PNG"))
    assert load_image(encode(Image.new("RGB", (1, 1)), "PNG")).size == (1, 1)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"hello, I am a text file\n", "not an image"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', "SVG"),
        (b"<svg width='10' height='10'></svg>", "SVG"),
        (b"<!DOCTYPE html><html><body>hi</body></html>", "HTML"),
        (bytes(range(256)) * 4, "not an image"),
    ],
)
def test_non_images_refused(data, message):
    with pytest.raises(ImageInputError, match=message):
        load_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_refused(fmt):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = encode(img, fmt)
    with pytest.raises(ImageInputError, match="damaged or truncated|could not be read"):
        load_image(data[: len(data) // 2])


def test_missing_path_and_bad_types(tmp_path):
    with pytest.raises(ImageInputError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageInputError, match="No image"):
        load_image(None)
    with pytest.raises(ImageInputError, match="Cannot read"):
        load_image(12345)
    with pytest.raises(ImageInputError, match="shape"):
        load_image(np.zeros((4, 4, 7)))


def test_nothing_else_opens_images():
    """Image.open appears in mmie_core.images only (the one door)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    offenders = [
        str(p.relative_to(root))
        for folder in ("mmie_core", "studio")
        for p in (root / folder).rglob("*.py")
        if "Image.open(" in p.read_text() and p.name != "images.py"
    ]
    assert offenders == [] and "Image.open(" not in (root / "app.py").read_text()
