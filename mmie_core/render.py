"""Rendering: patch grids over images. Pure functions returning PIL images or Figures.

Matplotlib is used through its object-oriented API only (`Figure()`), never pyplot's global
state, so rendering is safe from several threads.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from .patches import PatchGrid, ProcessorView

GRID_COLOR = (255, 255, 255)
GRID_SHADOW = (0, 0, 0)
BOX_COLOR = (255, 200, 0)


def draw_grid_on_original(
    image: Image.Image, view: ProcessorView, grid: PatchGrid, target: int = 512, label_every: int = 0
) -> Image.Image:
    """The original image with the region the model sees outlined and its patch grid drawn in.

    label_every: write the patch index in every n-th cell (0: no labels).
    """
    scale = target / max(image.size)
    out = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(out)
    x0, y0, x1, y1 = (v * scale for v in view.box)
    cell_w, cell_h = (x1 - x0) / grid.cols, (y1 - y0) / grid.rows
    for c in range(1, grid.cols):
        x = x0 + c * cell_w
        draw.line([(x + 1, y0), (x + 1, y1)], fill=GRID_SHADOW, width=1)
        draw.line([(x, y0), (x, y1)], fill=GRID_COLOR, width=1)
    for r in range(1, grid.rows):
        y = y0 + r * cell_h
        draw.line([(x0, y + 1), (x1, y + 1)], fill=GRID_SHADOW, width=1)
        draw.line([(x0, y), (x1, y)], fill=GRID_COLOR, width=1)
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=BOX_COLOR, width=3)
    if label_every:
        font = ImageFont.load_default(size=max(8, int(min(cell_w, cell_h) / 3)))
        for r in range(grid.rows):
            for c in range(grid.cols):
                k = r * grid.cols + c
                if k % label_every == 0:
                    draw.text((x0 + c * cell_w + 2, y0 + r * cell_h + 1), str(k), fill=GRID_COLOR,
                              stroke_width=2, stroke_fill=GRID_SHADOW, font=font)
    return out


def draw_grid_on_input(view: ProcessorView, grid: PatchGrid, target: int = 512) -> Image.Image:
    """The model input (what the ViT really sees) enlarged with sharp pixels and the patch grid."""
    factor = max(1, target // max(view.model_input.size))
    img = view.model_input.resize(
        (view.model_input.width * factor, view.model_input.height * factor), Image.Resampling.NEAREST
    )
    draw = ImageDraw.Draw(img)
    step = grid.patch_size * factor
    for c in range(1, grid.cols):
        draw.line([(c * step, 0), (c * step, img.height)], fill=GRID_COLOR, width=1)
    for r in range(1, grid.rows):
        draw.line([(0, r * step), (img.width, r * step)], fill=GRID_COLOR, width=1)
    return img
