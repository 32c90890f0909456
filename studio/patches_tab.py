"""Patches tab: what the processor does to an image and how it becomes patch tokens."""

from __future__ import annotations

import gradio as gr

from mmie_core.images import load_image
from mmie_core.models import get_preset, load_model, presets_for
from mmie_core.patches import processor_view, vision_grid
from mmie_core.render import draw_grid_on_input, draw_grid_on_original

from .common import example_images, save_png, user_errors

INTRO = """
### How an image becomes tokens
A vision transformer never sees your image as it is. The **processor** first resizes it (and
may crop the centre), then the model cuts the result into square **patches**; each patch becomes
one token, like a word in a sentence. Left: your image with the region the model sees (yellow
box) and the patch grid. Right: the exact pixels the model receives. The grid and token counts
are read from the model's own configuration.
"""

DEFAULT_MODEL = "shapes-clip"


def model_note(model_name: str) -> str:
    """The picker's note for a preset: what the model is and what it can see."""
    try:
        return f"*{get_preset(model_name).about}*"
    except Exception as err:  # noqa: BLE001 - a note must never fail
        return f"*{err}*"


@user_errors
def patches(image, model_name: str, show_indices: bool = False):
    """Patch grid of `image` for `model_name`.

    Returns (original with grid PNG, model input with grid PNG, summary markdown, geometry JSON).
    """
    img = load_image(image)
    loaded = load_model(model_name or DEFAULT_MODEL)
    grid = vision_grid(loaded)
    view = processor_view(loaded, img)
    label_every = 1 if show_indices and grid.n_patches <= 256 else 0
    original = draw_grid_on_original(img, view, grid, label_every=label_every)
    model_input = draw_grid_on_input(view, grid)
    prefix = {0: "no extra token", 1: "1 CLS token"}.get(grid.prefix_tokens, f"{grid.prefix_tokens} extra tokens")
    summary = [
        f"**{loaded.name}** ({loaded.family}) sees a **{grid.input_width} x {grid.input_height} px** input, "
        f"cut into a **{grid.rows} x {grid.cols} grid** of {grid.patch_size} px patches: "
        f"**{grid.n_patches} patch tokens** + {prefix} = {grid.n_tokens} tokens in the vision transformer.",
        "",
        "Processor steps: " + "; ".join(view.steps) + ".",
    ]
    info = {
        "model": loaded.name,
        "family": loaded.family,
        "original_size": list(view.original_size),
        "input_size": [grid.input_width, grid.input_height],
        "box": [round(v, 2) for v in view.box],
        "patch_size": grid.patch_size,
        "grid": [grid.rows, grid.cols],
        "patch_tokens": grid.n_patches,
        "prefix_tokens": grid.prefix_tokens,
        "vision_tokens": grid.n_tokens,
        "steps": view.steps,
    }
    if loaded.family == "llava":
        image_tokens = loaded.model.config.image_seq_length
        summary.append(
            f"\nIn the language model, the image is **{image_tokens} tokens** (strategy "
            f"`{loaded.model.config.vision_feature_select_strategy}`), placed where the prompt says `<image>`."
        )
        info["language_model_image_tokens"] = image_tokens
    return save_png(original, "patches"), save_png(model_input, "model-input"), "\n".join(summary), info


def build_patches_tab() -> None:
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], height=320)
            choices = [p.name for p in presets_for("patches")]
            model = gr.Dropdown(choices, value=DEFAULT_MODEL, label="Model")
            note = gr.Markdown(model_note(DEFAULT_MODEL))
            show_indices = gr.Checkbox(label="Number the patches", value=False)
            run = gr.Button("Show patches", variant="primary")
            gr.Examples(examples=[[p] for p in example_images()], inputs=[image], label="ShapesWorld examples")
        with gr.Column(scale=2):
            with gr.Row():
                original = gr.Image(label="Your image, the region the model sees and its patches", format="png", interactive=False)
                model_input = gr.Image(label="The model's input, pixel for pixel", format="png", interactive=False)
            summary = gr.Markdown()
            info = gr.JSON(label="Geometry (JSON)")
    model.change(model_note, inputs=model, outputs=note, api_name=False)
    outputs = [original, model_input, summary, info]
    run.click(patches, inputs=[image, model, show_indices], outputs=outputs, api_name="patches", concurrency_id="model")
