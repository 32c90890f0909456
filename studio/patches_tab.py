"""Patches tab: what the processor does to an image and how it becomes patch tokens."""

from __future__ import annotations

import gradio as gr

from mmie_core.chat import image_token_count
from mmie_core.images import load_image
from mmie_core.inspect_vision import inspect_vision, vision_rollout
from mmie_core.models import load_model
from mmie_core.patches import PatchGrid, processor_view, vision_grid, vision_tower
from mmie_core.render import (
    draw_grid_on_input,
    draw_grid_on_original,
    figure_to_image,
    head_gallery,
    heatmap_figure,
    matrix_figure,
    pca_image,
)

from .gpu import gpu
from .common import example_images, photo_examples, image_input, model_picker, save_json, save_png, user_errors

COLORMAPS = ["inferno", "viridis", "magma", "turbo", "jet"]

INTRO = """
### How an image becomes tokens
A vision transformer never sees your image as it is. The **processor** first resizes it (and
may crop the centre), then the model cuts the result into square **patches**; each patch becomes
one token, like a word in a sentence. Left: your image with the region the model sees (yellow
box) and the patch grid. Right: the exact pixels the model receives. The grid and token counts
are read from the model's own configuration.
"""

DEFAULT_MODEL = "shapes-clip"


@user_errors
def patches(image: str, model_name: str, show_indices: bool = False):
    """Show how a vision model cuts an image into patches: the patch grid on the original image and on the
    model's input, the number of image tokens and the processor's resize / crop / tiles.

    Args:
        image: the image (a file or URL).
        model_name: a model preset, e.g. shapes-clip, shapes-vlm, clip-vit-base-patch32.
        show_indices: write each patch's index on the grid.
    Returns:
        the original image with the grid (PNG), the model input with the grid (PNG), a Markdown summary, and
        the geometry as JSON (grid, patch size, box of the original image the model sees, token counts).
    """
    img = load_image(image)
    loaded = load_model(model_name or DEFAULT_MODEL)
    view = processor_view(loaded, img)
    if view.tiles is not None:
        return _tiles(loaded, vision_grid(loaded), view, img, show_indices)
    grid = view.grid or vision_grid(loaded)  # Qwen2-VL: a grid that follows the image's size
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
    info = _geometry(loaded, view, grid)
    if loaded.adapter.describes:  # counted in the processor's own output for a prompt with the image
        image_tokens = image_token_count(loaded, img)
        summary.append("\n" + loaded.adapter.language_tokens_note(loaded, grid, image_tokens))
        info["language_model_image_tokens"] = image_tokens
    if view.grid is not None:  # merged patches
        info["merge"] = loaded.model.config.vision_config.spatial_merge_size
    return save_png(original, "patches"), save_png(model_input, "model-input"), "\n".join(summary), info


def _geometry(loaded, view, grid: PatchGrid) -> dict:
    """The Geometry JSON of a model input cut into `grid`."""
    return {
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


def _tiles(loaded, tile_grid: PatchGrid, view, img, show_indices: bool):
    """Idefics3 / SmolVLM: the image stretched onto whole tiles, each tile's patches merged into
    language-model tokens (pixel shuffle), plus a global view of the whole image."""
    rows, cols = view.tiles
    image_tokens = image_token_count(loaded, img)  # counted in the processor's output
    merge = loaded.model.config.scale_factor
    cells = tile_grid.rows // merge  # tokens per tile side
    nr, nc = max(rows, 1), max(cols, 1)
    tile = tile_grid.input_width
    # the language-model tokens of the local tiles: one uniform grid over the whole image
    tokens = PatchGrid(nr * cells, nc * cells, tile_grid.patch_size * merge, nr * tile, nc * tile, 0)
    label_every = 1 if show_indices and tokens.n_patches <= 256 else 0
    original = draw_grid_on_original(img, view, tokens, label_every=label_every)
    model_input = draw_grid_on_input(view, tokens)
    n_views = rows * cols + 1
    split = (f"cut into **{rows} x {cols} tiles** of {tile} x {tile} px plus a **global view** (the whole image "
             f"squeezed into one tile)" if rows * cols else "small enough for **one view** of the whole image")
    summary = [
        f"**{loaded.name}** ({loaded.family}) does not see one fixed-size input: the processor stretches your "
        f"image onto whole tiles, {split}. Each tile is a {tile_grid.rows} x {tile_grid.cols} grid of "
        f"{tile_grid.patch_size} px patches; the connector merges {merge} x {merge} neighbouring patches into one "
        f"token (pixel shuffle), so a tile becomes **{cells * cells} tokens**.",
        "",
        f"In the language model the image is **{image_tokens} tokens** ({n_views} views x "
        f"{cells * cells}), each view announced by a marker token. The grid drawn here is the local tiles' tokens; "
        "heatmaps add the global view's share, spread evenly over the cells it covers.",
        "",
        "Processor steps: " + "; ".join(view.steps) + ".",
    ]
    info = _geometry(loaded, view, tokens) | {
        "patch_size": tile_grid.patch_size,  # the ViT's; the grid above is of merged tokens
        "tiles": [rows, cols],
        "tile_size": tile,
        "tile_grid": [tile_grid.rows, tile_grid.cols],
        "merge": merge,
        "patch_tokens": n_views * tile_grid.n_patches,
        "vision_tokens": n_views * tile_grid.n_patches,
        "language_model_image_tokens": image_tokens,
    }
    return save_png(original, "patches"), save_png(model_input, "model-input"), "\n".join(summary), info


INSPECT_INTRO = """
### Inside the vision tower
**Attention per head**: each small map shows where one attention head of the chosen layer
looks from the summary token (CLS; models without one use the average over all patches).
Heads specialise: some stare at one object, some spread out. **Head focus** sums that up
(1 = all attention on one patch, 0 = spread evenly). **Rollout** multiplies the attention of
all layers (plus the residual path) to estimate where the final summary draws from; the
discard ratio drops the weakest links first. **PCA** colours each patch by the three main
directions of its final features: patches of the same object get the same colour.
"""


@gpu(20)
@user_errors
def inspect(image, model_name: str, layer: int = -1, discard_ratio: float = 0.0, colormap: str = "inferno",
            opacity: float = 0.6, upsample: str = "blocks"):
    """Vision-tower inspection of `image`.

    Returns (per-head gallery PNG, head-focus PNG, rollout PNG, PCA PNG, JSON of every heatmap,
    downloadable files: rollout PNG + JSON and the per-head maps JSON).
    """
    img = load_image(image)
    loaded = load_model(model_name or DEFAULT_MODEL)
    result = inspect_vision(loaded, img)
    n_layers = len(result.heads)
    if not -n_layers <= int(layer) < n_layers:
        raise ValueError(f"{loaded.name} has layers 0 to {n_layers - 1}; got {layer}.")
    layer = int(layer) % n_layers
    gallery = figure_to_image(head_gallery(img, result.heads[layer], colormap=colormap, opacity=opacity))
    focus = figure_to_image(matrix_figure(result.focus, "head focus (1 = one patch)"))
    roll = vision_rollout(result, discard_ratio=float(discard_ratio))
    roll_png = figure_to_image(heatmap_figure(img, roll, colormap, opacity, upsample,
                                              title=f"rollout (discard {discard_ratio:.2f})"))
    grid = result.subject.grid
    pca = pca_image(result.features, grid.rows, grid.cols)
    data = {
        "model": loaded.name,
        "layer": layer,
        "rollout": roll.to_json(),
        "heads": [hm.to_json() for hm in result.heads[layer]],
        "focus": [[round(float(v), 4) for v in row] for row in result.focus],
    }
    roll_file = save_png(roll_png, "rollout")
    files = [roll_file, save_json(roll.to_json(), "rollout"), save_json(data, "vision-attention")]
    return save_png(gallery, "heads"), save_png(focus, "focus"), roll_file, save_png(pca, "pca"), data, files


def layer_slider(model_name: str, depths: bool = False):
    """Slider range for the chosen model's vision layers (0..n-1), or with `depths` its hidden
    states (0 = patch embeddings .. n)."""
    try:
        n = len(vision_tower(load_model(model_name)).encoder.layers)
    except Exception:  # noqa: BLE001 - an unavailable model keeps the current slider
        return gr.update()
    top = n if depths else n - 1
    return gr.update(minimum=0, maximum=top, value=top)


def build_patches_tab() -> None:
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input("patches-image")
            model = model_picker("patches", DEFAULT_MODEL)
            show_indices = gr.Checkbox(label="Number the patches", value=False)
            run = gr.Button("Show patches", variant="primary")
            gr.Examples(examples=[[p] for p in example_images()], inputs=[image], label="ShapesWorld examples")
            photo_examples([image])
        with gr.Column(scale=2):
            with gr.Row():
                original = gr.Image(label="Your image, the region the model sees and its patches", format="png",
                                    interactive=False, elem_id="patches-original")
                model_input = gr.Image(label="The model's input, pixel for pixel", format="png", interactive=False)
            summary = gr.Markdown()
            info = gr.JSON(label="Geometry (JSON)")
    gr.Markdown(INSPECT_INTRO)
    with gr.Row():
        layer = gr.Slider(0, 3, value=3, step=1, label="Layer (for the per-head maps)")
        discard = gr.Slider(0.0, 0.95, value=0.0, step=0.05, label="Rollout discard ratio")
        colormap = gr.Dropdown(COLORMAPS, value="inferno", label="Colormap")
        opacity = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Opacity")
        upsample = gr.Radio(["blocks", "smooth"], value="blocks", label="Upsampling")
    inspect_btn = gr.Button("Inspect the vision tower", variant="primary")
    with gr.Row():
        gallery = gr.Image(label="Attention per head", format="png", interactive=False)
        focus = gr.Image(label="Head focus", format="png", interactive=False)
    with gr.Row():
        rollout_img = gr.Image(label="Attention rollout", format="png", interactive=False, elem_id="patches-rollout")
        pca = gr.Image(label="PCA of the last layer's patch features", format="png", interactive=False)
    with gr.Row():
        maps_json = gr.JSON(label="Heatmaps (JSON)")
        downloads = gr.File(label="Download (PNG, JSON)", file_count="multiple", interactive=False)

    model.change(layer_slider, inputs=model, outputs=layer, api_name=False)
    outputs = [original, model_input, summary, info]
    run.click(patches, inputs=[image, model, show_indices], outputs=outputs, api_name="patches", concurrency_id="model")
    inspect_btn.click(
        inspect,
        inputs=[image, model, layer, discard, colormap, opacity, upsample],
        outputs=[gallery, focus, rollout_img, pca, maps_json, downloads],
        api_name="inspect",
        concurrency_id="model",
    )
