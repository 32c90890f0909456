"""The one door through which every image enters the studio.

`load_image` accepts a path, bytes, a binary file-like object, a PIL image or a numpy array and
returns an RGB PIL image, or raises `ImageInputError` with a message a user can act on:
- EXIF orientation is applied;
- transparency (RGBA, LA, P with a transparent colour) is composited on white;
- CMYK, 16-bit and 32-bit integer, float, 1-bit and greyscale become RGB, with high bit
  depths scaled to 8 bits over their actual range (never clipped);
- animated images give their first frame;
- decompression bombs (more pixels than `max_pixels`), absurd aspect ratios, empty, truncated
  or non-image data (text, SVG, HTML) are refused before any large allocation.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageLike = Union[str, os.PathLike, bytes, bytearray, BinaryIO, Image.Image, np.ndarray]

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP; Pillow's own default is about 89 MP
DEFAULT_MAX_ASPECT = 20.0  # longest side / shortest side
DEFAULT_MAX_BYTES = 50 * 1024 * 1024

# Pillow's global guard, lowered as well: anything that bypasses this module is still caught.
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageInputError(ValueError):
    """An input that is not a usable image; the message is meant for the user."""


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS  # width * height
    max_aspect: float = DEFAULT_MAX_ASPECT  # longest / shortest side
    max_bytes: int = DEFAULT_MAX_BYTES  # encoded size

    @classmethod
    def from_env(cls) -> "ImageLimits":
        """Limits overridable by MMIE_MAX_IMAGE_PIXELS / MMIE_MAX_IMAGE_ASPECT / MMIE_MAX_IMAGE_BYTES."""
        def read(name: str, default, kind):
            raw = os.environ.get(name)
            if raw is None:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ImageInputError(f"{name}={raw!r} is not a number.") from None
            if value <= 0:
                raise ImageInputError(f"{name} must be positive.")
            return value

        return cls(
            max_pixels=read("MMIE_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS, int),
            max_aspect=read("MMIE_MAX_IMAGE_ASPECT", DEFAULT_MAX_ASPECT, float),
            max_bytes=read("MMIE_MAX_IMAGE_BYTES", DEFAULT_MAX_BYTES, int),
        )


_SUPPORTED = "PNG, JPEG, GIF, WebP, BMP or TIFF"


def load_image(source: ImageLike, limits: ImageLimits | None = None) -> Image.Image:
    """Open `source` safely and return an RGB image (see the module docstring)."""
    limits = limits or ImageLimits.from_env()
    if source is None:
        raise ImageInputError("No image was given: upload an image, draw one or pick an example.")
    if isinstance(source, Image.Image):
        _check_geometry(source.size, limits)
        return to_rgb(_first_frame(source))
    if isinstance(source, np.ndarray):
        return to_rgb(_from_array(source, limits))
    data = _read_bytes(source, limits)
    return _decode(data, limits)


def _read_bytes(source, limits: ImageLimits) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageInputError(f"The image file {path.name!r} does not exist.")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageInputError(_too_many_bytes(size, limits))
        data = path.read_bytes()
    elif hasattr(source, "read"):
        data = source.read(limits.max_bytes + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise ImageInputError("The file object must be opened in binary mode ('rb').")
    else:
        raise ImageInputError(f"Cannot read an image from a {type(source).__name__}.")
    if len(data) == 0:
        raise ImageInputError("The file is empty (0 bytes): it is not an image.")
    if len(data) > limits.max_bytes:
        raise ImageInputError(_too_many_bytes(len(data), limits))
    return data


def _too_many_bytes(size: int, limits: ImageLimits) -> str:
    return f"The file is {size / 1e6:.1f} MB; the limit is {limits.max_bytes / 1e6:.0f} MB."


def _sniff_text(data: bytes) -> str | None:
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "This is an SVG (vector) file; convert it to PNG first."
    if head.startswith((b"<!doctype html", b"<html")):
        return "This is an HTML page, not an image."
    if head.startswith(b"%pdf"):
        return "This is a PDF document, not an image; export a page as PNG first."
    return None


def _decode(data: bytes, limits: ImageLimits) -> Image.Image:
    hint = _sniff_text(data)
    if hint:
        raise ImageInputError(hint)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise ImageInputError(_bomb_message(None, limits)) from err
        except Image.DecompressionBombWarning as err:
            raise ImageInputError(_bomb_message(None, limits)) from err
        except UnidentifiedImageError:
            raise ImageInputError(
                f"This file is not an image this studio can read; use {_SUPPORTED}."
            ) from None
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageInputError(f"The image could not be read ({err}).") from None
        _check_geometry(img.size, limits)  # before decoding any pixel
        try:
            img = _first_frame(img)
            img.load()
            img = ImageOps.exif_transpose(img)
        except Image.DecompressionBombWarning as err:
            raise ImageInputError(_bomb_message(img.size, limits)) from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageInputError(
                f"The image file is damaged or truncated and cannot be decoded ({err})."
            ) from None
    return to_rgb(img)


def _bomb_message(size, limits: ImageLimits) -> str:
    declared = f" declares {size[0]} x {size[1]} pixels and" if size else ""
    return (
        f"The image{declared} is larger than the limit of {limits.max_pixels / 1e6:.0f} megapixels "
        "(a possible decompression bomb). Resize it and try again."
    )


def _check_geometry(size: tuple[int, int], limits: ImageLimits) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageInputError(f"The image has no pixels ({w} x {h}).")
    if w * h > limits.max_pixels:
        raise ImageInputError(_bomb_message(size, limits))
    aspect = max(w, h) / min(w, h)
    if aspect > limits.max_aspect:
        raise ImageInputError(
            f"The image is {w} x {h} pixels, an aspect ratio of {aspect:.0f}:1; the limit is "
            f"{limits.max_aspect:.0f}:1. Crop it to a less extreme shape."
        )


def _first_frame(img: Image.Image) -> Image.Image:
    if getattr(img, "is_animated", False) or getattr(img, "n_frames", 1) > 1:
        img.seek(0)
        frame = img.copy()  # decodes frame 0 only
        return frame
    return img


def _from_array(arr: np.ndarray, limits: ImageLimits) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageInputError(
            f"An image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {tuple(arr.shape)}."
        )
    _check_geometry((arr.shape[1], arr.shape[0]), limits)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = _scale_to_uint8(arr.astype(np.float64))
    mode = "L" if arr.ndim == 2 else ("RGB" if arr.shape[-1] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map numbers to 0..255: floats in [0, 1] as intensities, other ranges by min/max."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = float(finite.min()), float(finite.max())
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    elif lo >= 0 and hi <= 255 and np.all(np.mod(finite, 1) == 0):
        lo, hi = 0.0, 255.0
    span = hi - lo if hi > lo else 1.0
    scaled = (np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo) - lo) / span
    return np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB, compositing transparency on white and scaling high bit depths."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(img)
    if mode == "P":
        if "transparency" in img.info:
            return _composite_on_white(img)
        return img.convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 65535.0  # full 16-bit range: keep relative brightness
        elif mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
            arr = arr / 65535.0  # 16-bit PNGs decode as mode I
        gray = _scale_to_uint8(arr)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img.convert("RGB")  # CMYK, 1, L, YCbCr, LAB, HSV


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff")


def collect_image_files(paths) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in the given folders, each once."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{name} is neither a file nor a folder.")
    if not files:
        raise ValueError("No image files found.")
    return list(dict.fromkeys(files))
