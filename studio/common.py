"""Helpers shared by the tabs: user-facing errors, atomic PNG outputs, examples."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from mmie_core import models
from mmie_core.images import ImageInputError
from mmie_core.limits import deadline, time_limit
from mmie_core.models import ModelLoadError, get_preset, presets_for

log = logging.getLogger("studio")

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
OUTPUT_DIR = Path(tempfile.mkdtemp(prefix="mmie-studio-"))
MAX_KEPT_OUTPUTS = 512  # output files kept on disk; older ones are deleted

_kept: deque[Path] = deque()
_kept_lock = threading.Lock()

USER_ERRORS = (ImageInputError, ModelLoadError, ValueError)


def _as_user_error(fn, err: Exception) -> gr.Error:
    if isinstance(err, gr.Error):
        return err
    if isinstance(err, torch.OutOfMemoryError):
        log.warning("out of memory in %s; freeing the model cache", fn.__name__)
        models.MODEL_CACHE.clear()
        return gr.Error("The device ran out of memory for this request. The studio freed its memory and keeps "
                        "serving: try a smaller image, fewer tokens or a smaller model.")
    if isinstance(err, USER_ERRORS):
        return gr.Error(str(err))
    log.error("unexpected error in %s", fn.__name__, exc_info=err)
    return gr.Error(f"Something went wrong ({type(err).__name__}). The studio is still running; try again.")


DEFAULT_TIME_LIMIT = 120.0  # seconds of model work per event (MMIE_TIME_LIMIT; 0 = no limit)


def event_time_limit() -> float | None:
    """Seconds one event may spend on model work: MMIE_TIME_LIMIT, default 120, 0 for none."""
    raw = os.environ.get("MMIE_TIME_LIMIT", "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_TIME_LIMIT
    except ValueError:
        log.warning("MMIE_TIME_LIMIT=%r is not a number; using %s s", raw, DEFAULT_TIME_LIMIT)
        seconds = DEFAULT_TIME_LIMIT
    return seconds if seconds > 0 else None


def user_errors(fn):
    """Run a handler under the event time limit; turn known failures into a clear gr.Error, log
    anything else and say so without a traceback. Works for plain handlers and for generators
    (streaming handlers), whose steps may run on different threads: each step runs under the
    deadline fixed when the event started."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            seconds = event_time_limit()
            at = time.monotonic() + seconds if seconds else None
            steps = fn(*args, **kwargs)
            try:
                while True:
                    try:
                        with deadline(at):
                            value = next(steps)
                    except StopIteration:
                        return
                    except Exception as err:  # noqa: BLE001 - the app must keep serving
                        raise _as_user_error(fn, err) from None
                    yield value
            finally:  # a consumer that stops early (the Stop button) closes the handler too
                steps.close()

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with time_limit(event_time_limit()):
                return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the app must keep serving
            raise _as_user_error(fn, err) from None

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


def save_text(text: str, stem: str, suffix: str) -> str:
    """Write `text` to a fresh file (for downloads) and return its path."""
    path = OUTPUT_DIR / f"{stem}-{uuid.uuid4().hex[:12]}{suffix}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    _remember(path)
    return str(path)


def save_json(data, stem: str = "data") -> str:
    """Write `data` as a JSON file (for downloads) and return its path."""
    return save_text(json.dumps(data, indent=1), stem, ".json")


def _remember(path: Path) -> None:
    with _kept_lock:
        _kept.append(path)
        while len(_kept) > MAX_KEPT_OUTPUTS:
            _kept.popleft().unlink(missing_ok=True)


def example_images() -> list[str]:
    """Paths of the ShapesWorld example scenes shipped in assets/examples."""
    return sorted(str(p) for p in EXAMPLES_DIR.rglob("*.png"))


PHOTOS_NOTE = ("The embedded models know only ShapesWorld scenes; for photographs, pick a Hub preset "
               "(it needs network to load).")


def example_photos() -> list[str]:
    """Paths of the public-domain / CC0 example photographs (assets/examples/photos, see CREDITS.md)."""
    return sorted(str(p) for p in (EXAMPLES_DIR / "photos").glob("*.jpg"))


def photo_examples(inputs, label: str = "Photos") -> None:
    """The example photographs, under a line saying which models can read them."""
    gr.Markdown(PHOTOS_NOTE, elem_classes=["photos-note"])
    gr.Examples(examples=[[p] for p in example_photos()], inputs=inputs, label=label)


class SafeImage(gr.Image):
    """An image input that hands the uploaded file to mmie_core's image door unopened.

    gr.Image opens uploads with Pillow before the handler runs, so a broken or hostile file
    fails there with an error the user never sees. This component only passes the file path on
    (data URLs from the clipboard or webcam are decoded by Gradio as usual), and the handler's
    `load_image` gives a clear message for anything that is not a usable image.
    """

    is_template = True  # rendered by the browser as a plain gr.Image

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):
            return super().preprocess(payload)
        if payload.path is None:
            raise gr.Error("The image upload is incomplete; try again.")
        return str(payload.path)


class RuntimeChoices(gr.Dropdown):
    """A dropdown whose choices are filled at run time (the labels, once classified) and that also takes a typed
    value (`allow_custom_value=True`). Its API and MCP schema is a plain string: Gradio's lists the choices the
    dropdown was built with (none), which tells an API client or an agent that no value is valid."""

    is_template = True  # rendered by the browser as a plain gr.Dropdown

    def api_info(self):
        info = super().api_info()
        info.pop("enum", None)
        return info


class TokenPicker(gr.Radio):
    """The chips of an answer's tokens ("k: word"), filled when the answer arrives. A call through the API or MCP
    starts a new session, which knows only the chips the picker was built with (none), so Gradio would refuse every
    value; here any value reaches the handler, which checks it (an index or a chip), and the schema says so."""

    is_template = True  # rendered by the browser as a plain gr.Radio

    def api_info(self):
        return {"type": "string", "description": 'an answer token: its index ("0" = the first) or its chip "k: word"'}

    def preprocess(self, payload):
        return payload


class AnswerJSON(gr.JSON):
    """An answer's JSON, shown to the user and passed back to explain_token. Its API schema is an object: Gradio's
    (`{"type": {}}`) is not a valid JSON schema, and an MCP client refuses to call a tool that has one."""

    is_template = True  # rendered by the browser as a plain gr.JSON

    def api_info(self):
        return {"type": "object", "description": "the answer JSON returned by chat or alt_text"}


SKETCH_COLORS = ["#d72626", "#22963c", "#2850dc", "#e8c414", "#8737af", "#f57d19", "#000000"]


def drawing_to_image(drawing):
    """The composite of a Sketchpad drawing as a PNG path for the image input."""
    if not drawing or drawing.get("composite") is None:
        raise gr.Error("Draw something first.")
    composite = drawing["composite"]
    img = composite if isinstance(composite, Image.Image) else Image.fromarray(composite)
    from mmie_core.images import to_rgb

    return save_png(to_rgb(img), "drawing")


def image_input(elem_id: str, label: str = "Image", height: int = 300):
    """An image input (upload, paste or webcam) plus a drawing pad whose drawing can be used instead."""
    image = SafeImage(label=label, type="filepath", sources=["upload", "clipboard", "webcam"], height=height,
                      elem_id=elem_id)
    with gr.Accordion("Or draw an image", open=False):
        gr.Markdown("Draw shapes (a red circle top left, say), then press **Use this drawing**.")
        sketch = gr.Sketchpad(
            type="pil", canvas_size=(256, 256), image_mode="RGBA",
            brush=gr.Brush(colors=SKETCH_COLORS, default_size=18, color_mode="fixed"),
            label="Drawing",
        )
        use = gr.Button("Use this drawing")
    use.click(drawing_to_image, inputs=sketch, outputs=image, api_name=False)
    return image


def model_note(model_name: str) -> str:
    """The picker's note for a preset: what the model is and what it can see."""
    try:
        return f"*{get_preset(model_name).about}*"
    except Exception as err:  # noqa: BLE001 - a note must never fail
        return f"*{err}*"


def model_picker(task: str, default: str, label: str = "Model") -> gr.Dropdown:
    """A dropdown of the presets serving `task`, with a note on the chosen model below it."""
    model = gr.Dropdown([p.name for p in presets_for(task)], value=default, label=label)
    note = gr.Markdown(model_note(default))
    model.change(model_note, inputs=model, outputs=note, api_name=False)
    return model
