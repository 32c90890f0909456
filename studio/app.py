"""The MMIE Studio Blocks app: every tab, one queue."""

from __future__ import annotations

import gradio as gr

from .alt_text_tab import build_alt_text_tab
from .chat_tab import build_chat_tab
from .patches_tab import build_patches_tab
from .zero_shot_tab import build_zero_shot_tab

TITLE = "MMIE Studio"
HEADER = """
# MMIE Studio: look inside vision-language models
Every tab works offline on small models trained by this project on **ShapesWorld** (coloured
shapes with known positions), so each explanation can be checked against the truth. Hub models
(CLIP, SigLIP, LLaVA, ...) load by name when the network is there.
"""


def build_demo() -> gr.Blocks:
    """Lay out the whole studio. Loads no model: models load on first use."""
    with gr.Blocks(title=TITLE) as demo:
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
    return demo
