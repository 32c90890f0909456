"""Studio handlers as plain functions: error wrapping, chat history parsing, the drawing input."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from studio.chat_tab import token_index, turns_from_messages
from studio.common import drawing_to_image, save_json, save_png, user_errors


def test_user_errors_wraps_known_and_unknown_failures():
    @user_errors
    def bad_value():
        raise ValueError("clear message")

    @user_errors
    def crash():
        raise KeyError("internal detail")

    with pytest.raises(gr.Error, match="clear message"):
        bad_value()
    with pytest.raises(gr.Error) as err:
        crash()
    assert "internal detail" not in str(err.value) and "still running" in str(err.value)


def test_user_errors_wraps_generators():
    @user_errors
    def stream():
        yield 1
        raise ValueError("midway")

    gen = stream()
    assert next(gen) == 1
    with pytest.raises(gr.Error, match="midway"):
        next(gen)


def test_turns_from_chatbot_messages():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "q1"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a1"}]},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "unanswered"},
    ]
    turns = turns_from_messages(messages)
    assert [(t.user, t.assistant) for t in turns] == [("q1", "a1"), ("q2", "a2")]
    assert turns_from_messages(None) == []


def test_token_index_parsing():
    assert token_index("3: red") == 3 and token_index(2) == 2 and token_index(2.0) == 2 and token_index("0") == 0
    # through the API or MCP any value reaches the handler: none of these may name a token
    for bad in [None, "", "red", True, 1.9, -0.5, -1, float("inf"), float("nan"), "-1"]:
        with pytest.raises(ValueError):
            token_index(bad)


def test_drawing_becomes_an_rgb_png():
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[5:10, 5:10] = (255, 0, 0, 255)  # red stroke on a transparent canvas
    path = drawing_to_image({"composite": Image.fromarray(rgba, "RGBA"), "layers": [], "background": None})
    img = Image.open(path)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((7, 7)) == (255, 0, 0)
    with pytest.raises(gr.Error):
        drawing_to_image(None)


def test_outputs_are_written_atomically_as_files():
    path = save_png(Image.new("RGB", (4, 4)), "t")
    assert path.endswith(".png") and Image.open(path).size == (4, 4)
    assert open(save_json({"a": 1}, "t")).read().strip().startswith("{")


def test_out_of_memory_is_a_message_and_frees_the_cache(tiny_clip_dir, fresh_cache):
    import torch

    from mmie_core import models

    models.load_model(tiny_clip_dir)
    assert fresh_cache.keys()

    @user_errors
    def greedy():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(gr.Error, match="ran out of memory"):
        greedy()
    assert fresh_cache.keys() == []
    assert models.load_model(tiny_clip_dir).family == "clip"  # the next request works


def test_chat_messages_carry_no_paths_or_urls():
    from mmie_core.chat import Turn, build_messages

    messages = build_messages([Turn("q", "a")], "q2")
    flat = str(messages)
    assert "url" not in flat and "path" not in flat and "http" not in flat


def test_no_trust_remote_code_anywhere():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for folder in ("mmie_core", "studio"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            assert "trust_remote_code=True" not in text, path


@pytest.fixture()
def no_loading(monkeypatch):
    """The chat tab's model loader replaced by one that fails, naming the model it was asked for."""
    def no_load(name):
        raise AssertionError(f"{name} would be loaded")

    monkeypatch.setattr("studio.chat_tab.load_model", no_load)


def test_chat_families_are_checked_before_any_download(no_loading):
    from mmie_core import models
    from studio.chat_tab import chat_model

    with pytest.raises(AssertionError, match="would be loaded"):  # every chat preset's family is supported
        chat_model("qwen2-vl-2b-instruct")
    with pytest.raises(ValueError, match="zero-shot"):
        chat_model("shapes-clip")
    assert models.PRESETS["smolvlm-256m-instruct"].family == "idefics3"
    with pytest.raises(AssertionError, match="would be loaded"):  # a supported family gets to loading
        chat_model("smolvlm-256m-instruct")


def test_captioners_serve_alt_text_but_not_chat(no_loading):
    from studio.chat_tab import chat_model

    with pytest.raises(ValueError, match="captioning model: it writes captions but cannot chat"):
        chat_model("blip-image-captioning-base")
    with pytest.raises(AssertionError, match="would be loaded"):  # accepted for alt text: it gets to loading
        chat_model("blip-image-captioning-base", task="alt_text")
    with pytest.raises(ValueError, match="cannot write alt text"):
        chat_model("shapes-clip", task="alt_text")


def test_every_tab_offers_the_example_photos_with_a_note():
    """The photographs sit next to the ShapesWorld examples in every tab, under a line that says the
    embedded models know only ShapesWorld."""
    import app
    from studio.common import PHOTOS_NOTE, example_photos

    photos = set(example_photos())
    assert len(photos) >= 4
    config = app.demo.get_config_file()
    datasets = [c for c in config["components"] if c["type"] == "dataset"]
    with_photos = [d for d in datasets if any(str(Path(p).name) in json.dumps(d["props"]) for p in photos)]
    assert len(with_photos) >= 5  # patches, zero-shot, chat, alt text, inside
    notes = [c for c in config["components"] if c["type"] == "markdown" and PHOTOS_NOTE in str(c["props"].get("value"))]
    assert len(notes) == len(with_photos)
