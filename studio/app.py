"""The MMIE Studio Blocks app: every tab, one queue."""

from __future__ import annotations

import os

import gradio as gr

from .alt_text_tab import build_alt_text_tab
from .chat_tab import build_chat_tab
from .inside_tab import build_inside_tab
from .interventions_tab import build_interventions_tab
from .patches_tab import build_patches_tab
from .search_tab import build_search_tab
from .zero_shot_tab import build_zero_shot_tab

TITLE = "MMIE Studio"
HEADER = """
# MMIE Studio: look inside vision-language models
Every tab works offline on small models trained by this project on **ShapesWorld** (coloured
shapes with known positions), so each explanation can be checked against the truth. Hub models
(CLIP, SigLIP, LLaVA, ...) load by name when the network is there.
"""


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


def configure_queue(demo: gr.Blocks) -> gr.Blocks:
    """The queue: model work runs one request at a time per process by default (MMIE_CONCURRENCY)
    and at most MMIE_QUEUE_SIZE requests wait; beyond that callers get a clean "queue is full"."""
    return demo.queue(
        default_concurrency_limit=_env_int("MMIE_CONCURRENCY", 1),
        max_size=_env_int("MMIE_QUEUE_SIZE", 64),
    )


MAX_FILE_SIZE = "20mb"  # uploads above this are refused by the server before any handler runs


def build_demo() -> gr.Blocks:
    """Lay out the whole studio. Loads no model: models load on first use."""
    # Uploaded and generated files older than an hour are deleted every hour.
    with gr.Blocks(title=TITLE, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(HEADER)
        with gr.Tabs():
            with gr.Tab("Patches", id="patches"):
                build_patches_tab()
            with gr.Tab("Zero-shot", id="zero_shot"):
                build_zero_shot_tab()
            with gr.Tab("Chat", id="chat"):
                build_chat_tab()
            with gr.Tab("Alt text", id="alt_text"):
                build_alt_text_tab()
            with gr.Tab("Inside", id="inside"):
                build_inside_tab()
            with gr.Tab("Interventions", id="interventions"):
                build_interventions_tab()
            with gr.Tab("Search", id="search"):
                build_search_tab()
    return demo
