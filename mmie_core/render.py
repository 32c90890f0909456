"""Rendering: patch grids, heatmap overlays, galleries and plots. Pure functions returning PIL
images or matplotlib Figures.

Matplotlib is used through its object-oriented API only (`Figure()`), never pyplot's global
state, so rendering is safe from several threads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .heatmap import PatchHeatmap, cell_box
from .patches import PatchGrid, ProcessorView

if TYPE_CHECKING:
    from matplotlib.figure import Figure

def _figure(**kwargs) -> "Figure":
    """A new matplotlib Figure (matplotlib is imported on first use: it costs half a second at start-up)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


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


# --------------------------------------------------------------------------- heatmaps

def _colormap(name: str):
    from matplotlib import colormaps

    if name not in colormaps:
        raise ValueError(f"Unknown colormap {name!r}; try inferno, viridis, magma, jet or turbo.")
    return colormaps[name]


def heatmap_layer(heatmap: PatchHeatmap, size: tuple[int, int], upsample: str = "blocks") -> np.ndarray:
    """The heatmap's 0..1 values resampled to `size` (width, height) of the image region it covers."""
    if upsample not in ("blocks", "smooth"):
        raise ValueError("upsample must be 'blocks' or 'smooth'")
    values = heatmap.normalized().astype(np.float32)  # (rows, cols)
    img = Image.fromarray(values, mode="F")
    resample = Image.Resampling.NEAREST if upsample == "blocks" else Image.Resampling.BILINEAR
    return np.asarray(img.resize(size, resample), dtype=np.float32)


def overlay_heatmap(
    image: Image.Image,
    heatmap: PatchHeatmap,
    colormap: str = "inferno",
    opacity: float = 0.55,
    upsample: str = "blocks",
    grid_lines: bool = False,
    target: int = 512,
) -> Image.Image:
    """The original image with the heatmap blended over the region the model saw.

    Each pixel's blend weight grows with its value (opacity x value), so unimportant patches
    keep the image visible. Outside the region (cropped away by the processor) the image is dimmed.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError("opacity must be between 0 and 1")
    scale = target / max(image.size)
    base = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                       Image.Resampling.LANCZOS)
    out = np.asarray(base, dtype=np.float32) * 0.45  # dim everything outside the model's view
    x0, y0, x1, y1 = (int(round(v * scale)) for v in heatmap.box)
    x1, y1 = min(x1, base.width), min(y1, base.height)
    region = np.asarray(base, dtype=np.float32)[y0:y1, x0:x1]
    values = heatmap_layer(heatmap, (x1 - x0, y1 - y0), upsample)
    colors = _colormap(colormap)(values)[..., :3] * 255.0
    alpha = (opacity * (0.15 + 0.85 * values))[..., None]  # (h, w, 1)
    out[y0:y1, x0:x1] = (1 - alpha) * region + alpha * colors
    result = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if grid_lines:
        draw = ImageDraw.Draw(result)
        rows, cols = heatmap.grid
        for c in range(1, cols):
            x = x0 + c * (x1 - x0) / cols
            draw.line([(x, y0), (x, y1)], fill=(255, 255, 255), width=1)
        for r in range(1, rows):
            y = y0 + r * (y1 - y0) / rows
            draw.line([(x0, y), (x1, y)], fill=(255, 255, 255), width=1)
    return result


def heatmap_figure(image: Image.Image, heatmap: PatchHeatmap, colormap: str = "inferno", opacity: float = 0.55,
                   upsample: str = "blocks", grid_lines: bool = False, title: str | None = None) -> Figure:
    """A matplotlib Figure: the overlay with a colourbar of the raw values."""
    from matplotlib.colors import Normalize
    from matplotlib.cm import ScalarMappable

    fig = _figure(figsize=(5.2, 4.4), dpi=100)
    ax = fig.add_subplot(111)
    ax.imshow(overlay_heatmap(image, heatmap, colormap, opacity, upsample, grid_lines))
    ax.set_axis_off()
    ax.set_title(title or _title(heatmap), fontsize=10)
    lo, hi = float(heatmap.values.min()), float(heatmap.values.max())
    fig.colorbar(ScalarMappable(Normalize(lo, hi if hi > lo else lo + 1e-9), _colormap(colormap)), ax=ax,
                 fraction=0.046, pad=0.03)
    fig.tight_layout()
    return fig


def _title(heatmap: PatchHeatmap) -> str:
    target = heatmap.target.get("label") or repr(heatmap.target.get("token", ""))
    title = f"{heatmap.method} · {target}"
    error = heatmap.params.get("completeness_error")
    if error is not None:  # integrated gradients: how far the attributions are from adding up to the score gap
        title += f" · completeness error {completeness_text(error)}"
    return title


def completeness_text(error: float) -> str:
    """A relative completeness error as a short percentage ("2%", "0.3%", "<0.1%")."""
    percent = 100 * float(error)
    if percent < 0.1:
        return "<0.1%"
    return f"{percent:.1f}%" if percent < 10 else f"{percent:.0f}%"


def figure_to_image(fig: Figure) -> Image.Image:
    """Render a Figure to an RGB PIL image (Agg canvas, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def head_gallery(image: Image.Image, heatmaps: list[PatchHeatmap], columns: int = 4, colormap: str = "inferno",
                 opacity: float = 0.6) -> Figure:
    """Small overlays side by side, one per heatmap (e.g. one per head of a layer)."""
    if not heatmaps:
        raise ValueError("head_gallery needs at least one heatmap")
    rows = (len(heatmaps) + columns - 1) // columns
    fig = _figure(figsize=(2.2 * columns, 2.3 * rows), dpi=100)
    for i, hm in enumerate(heatmaps):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(overlay_heatmap(image, hm, colormap, opacity, target=256))
        ax.set_axis_off()
        ax.set_title(hm.params.get("caption", _title(hm)), fontsize=8)
    fig.tight_layout()
    return fig


def matrix_figure(matrix: np.ndarray, title: str, xlabel: str = "head", ylabel: str = "layer",
                  colormap: str = "viridis") -> Figure:
    """A labelled matrix plot (e.g. layer x head mean attention to the image)."""
    matrix = np.asarray(matrix, dtype=float)
    fig = _figure(figsize=(1.2 + 0.55 * matrix.shape[1], 1.0 + 0.45 * matrix.shape[0]), dpi=100)
    ax = fig.add_subplot(111)
    im = ax.imshow(matrix, cmap=_colormap(colormap), aspect="auto")
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_yticks(range(matrix.shape[0]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for (r, c), v in np.ndenumerate(matrix):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v < matrix.mean() else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    fig.tight_layout()
    return fig


def pca_image(features: np.ndarray, rows: int, cols: int, size: int = 256) -> Image.Image:
    """First three principal components of patch features as an RGB image (DINO-style).

    features: (rows * cols, dim). Each component is min-max scaled to 0..255.
    """
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = x @ vt[:3].T  # (patches, 3)
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = comps.min(0, keepdims=True), comps.max(0, keepdims=True)
    rgb = ((comps - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0) * 255).astype(np.uint8)
    img = Image.fromarray(rgb.reshape(rows, cols, 3))
    return img.resize((size * cols // max(rows, cols), size * rows // max(rows, cols)), Image.Resampling.NEAREST)


def bar_chart(panels: list[tuple[str, list[str], list[float]]], xlabel: str = "score", top: int = 15) -> Figure:
    """Horizontal bar charts side by side, one per (title, labels, scores) panel, best on top."""
    if not panels:
        raise ValueError("bar_chart needs at least one panel")
    n = min(top, max(len(p[1]) for p in panels))
    fig = _figure(figsize=(4.6 * len(panels), 0.9 + 0.38 * n), dpi=100)
    for i, (title, labels, scores) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")[:top]
        names = [_shorten(labels[k]) for k in order][::-1]
        values = [float(scores[k]) for k in order][::-1]
        bars = ax.barh(range(len(values)), values, color="#4f6bd8")
        if values:
            bars[-1].set_color("#e8590c")  # the winner
        ax.set_yticks(range(len(values)))
        ax.set_yticklabels(names, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
        for y, v in enumerate(values):
            ax.text(min(v + 0.01, 0.86), y, f"{v:.3f}", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def reliance_plot(tokens: list[str], reliance: list[float]) -> Figure:
    """Per answer token: the share of attention on image tokens (bars) versus text."""
    fig = _figure(figsize=(min(12.0, max(4.0, 0.4 * len(tokens) + 1.5)), 3.0), dpi=100)
    ax = fig.add_subplot(111)
    x = np.arange(len(tokens))
    ax.bar(x, reliance, color="#e8590c", label="image")
    ax.bar(x, [1 - r for r in reliance], bottom=reliance, color="#ced4da", label="text")
    ax.set_xticks(x)
    ax.set_xticklabels([_shorten(t, 12) for t in tokens], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of attention")
    ax.set_title("image reliance per answer token", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def _shorten(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


HIGHLIGHT_COLOR = (0, 220, 255)


def _cell(view: ProcessorView, grid: PatchGrid, scale: float, row: int, col: int) -> tuple[float, float, float, float]:
    """Patch (row, col) in pixels of the original image drawn at `scale`."""
    return tuple(v * scale for v in cell_box(view.box, grid.rows, grid.cols, row, col))


def highlight_patches(image: Image.Image, view: ProcessorView, grid: PatchGrid, patches: list[tuple[int, int]],
                      target: int = 512) -> Image.Image:
    """The original image with its patch grid and the given patches outlined."""
    out = draw_grid_on_original(image, view, grid, target=target)
    scale = out.width / image.width
    draw = ImageDraw.Draw(out)
    for row, col in patches:
        x0, y0, x1, y1 = _cell(view, grid, scale, row, col)
        draw.rectangle([x0, y0, x1, y1], outline=HIGHLIGHT_COLOR, width=max(2, int(min(x1 - x0, y1 - y0) / 10)))
    return out


def words_on_grid(image: Image.Image, view: ProcessorView, grid: PatchGrid, words: list[list[str]],
                  highlight: tuple[int, int] | None = None, target: int = 768) -> Image.Image:
    """The original image, dimmed, with its patch grid and one word written in each patch (the
    logit lens's top word). Words longer than the cell allows are cut with an ellipsis."""
    base = image.convert("RGB")
    dim = Image.blend(base, Image.new("RGB", base.size, (255, 255, 255)), 0.45)
    out = highlight_patches(dim, view, grid, [highlight] if highlight else [], target=target)
    scale = out.width / image.width
    draw = ImageDraw.Draw(out)
    x0, _, x1, _ = _cell(view, grid, scale, 0, 0)
    size = max(7, min(16, int((x1 - x0) / 4.5)))
    font = ImageFont.load_default(size=size)
    chars = max(2, int((x1 - x0) / (size * 0.55)))
    for r in range(grid.rows):
        for c in range(grid.cols):
            cx0, cy0, cx1, cy1 = _cell(view, grid, scale, r, c)
            word = _shorten(words[r][c], chars)
            draw.text(((cx0 + cx1) / 2, (cy0 + cy1) / 2), word, fill=(0, 0, 0), anchor="mm", font=font,
                      stroke_width=2, stroke_fill=(255, 255, 255))
    return out


def token_bar_chart(tokens: list[str], values: list[float], title: str, ylabel: str) -> Figure:
    """One bar per token (e.g. how much each answer token attended to one patch)."""
    fig = _figure(figsize=(min(12.0, max(4.0, 0.45 * len(tokens) + 1.5)), 3.0), dpi=100)
    ax = fig.add_subplot(111)
    x = np.arange(len(tokens))
    ax.bar(x, values, color="#4f6bd8")
    ax.set_xticks(x)
    ax.set_xticklabels([_shorten(t, 12) for t in tokens], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for xi, v in zip(x, values):
        ax.text(xi, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, max(values + [1e-6]) * 1.2)
    fig.tight_layout()
    return fig


def curves_figure(x: list[float], series: dict[str, list[float]], xlabel: str, ylabel: str, title: str,
                  ylim: tuple[float, float] | None = (0.0, 1.0), xticks: bool = False) -> Figure:
    """Line plot of named series over a shared x axis (robustness curves, per-layer rates);
    `xticks`: one tick per x value (e.g. layer numbers)."""
    fig = _figure(figsize=(5.6, 3.4), dpi=100)
    ax = fig.add_subplot(111)
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if ylim:
        ax.set_ylim(*ylim)
    if xticks:
        ax.set_xticks(list(x))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
