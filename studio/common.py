"""Helpers shared by the tabs: user-facing errors, atomic PNG outputs, examples."""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import threading
import uuid
from collections import deque
from pathlib import Path

import gradio as gr
from PIL import Image

from mmie_core.images import ImageInputError
from mmie_core.models import ModelLoadError

log = logging.getLogger("studio")

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
OUTPUT_DIR = Path(tempfile.mkdtemp(prefix="mmie-studio-"))
MAX_KEPT_OUTPUTS = 512  # output files kept on disk; older ones are deleted

_kept: deque[Path] = deque()
_kept_lock = threading.Lock()

USER_ERRORS = (ImageInputError, ModelLoadError, ValueError)


def user_errors(fn):
    """Turn known failures into a clear gr.Error; log anything else and say so without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as err:
            raise gr.Error(str(err)) from None
        except Exception as err:  # noqa: BLE001 - the app must keep serving
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"Something went wrong ({type(err).__name__}). The studio is still running; try again.") from None

    return wrapper


def save_png(image: Image.Image, stem: str = "image") -> str:
    """Write `image` to a fresh PNG file and return its path.

    Returning paths (not PIL images) makes Gradio copy the file atomically into its cache, which
    avoids truncated downloads when many clients get the same image at once.
    """
    path = OUTPUT_DIR / f"{stem}-{uuid.uuid4().hex[:12]}.png"
    tmp = path.with_suffix(".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    _remember(path)
    return str(path)


def save_json(data, stem: str = "data") -> str:
    """Write `data` as a JSON file (for downloads) and return its path."""
    import json

    path = OUTPUT_DIR / f"{stem}-{uuid.uuid4().hex[:12]}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    _remember(path)
    return str(path)


def _remember(path: Path) -> None:
    with _kept_lock:
        _kept.append(path)
        while len(_kept) > MAX_KEPT_OUTPUTS:
            _kept.popleft().unlink(missing_ok=True)


def example_images() -> list[str]:
    """Paths of the example images shipped in assets/examples."""
    return sorted(str(p) for p in EXAMPLES_DIR.rglob("*.png"))
