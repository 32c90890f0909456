"""Patch geometry: what the processor does to an image, and which token sees which patch.

Everything is read from the model's config and processor, never from a constant:
- `processor_view` runs the image processor and reports the model input (de-normalised back to
  pixels) and the box of the original image it covers (resize + centre crop, or plain resize);
- `vision_grid` gives the ViT patch grid and the tokens before the patches (CLS or none);
- `image_token_layout` maps positions of image tokens in a language-model sequence to
  (row, col) patches, for LLaVA's "default" (CLS dropped) and "full" (CLS kept) strategies and
  for PaliGemma (one token per SigLIP patch, before the prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .heatmap import cell_box
from .models import LoadedModel


@dataclass(frozen=True)
class PatchGrid:
    """The patch grid of a ViT input."""

    rows: int
    cols: int
    patch_size: int  # patch side in model-input pixels
    input_height: int  # model input in pixels
    input_width: int
    prefix_tokens: int  # vision tokens before the patches (1 for CLIP's CLS, 0 for SigLIP)

    @property
    def n_patches(self) -> int:
        return self.rows * self.cols

    @property
    def n_tokens(self) -> int:
        """Length of the vision tower's sequence."""
        return self.prefix_tokens + self.n_patches

    def token_to_patch(self, token: int) -> tuple[int, int]:
        """(row, col) of a vision-tower token; patches are in row-major order after the prefix."""
        k = token - self.prefix_tokens
        if not 0 <= k < self.n_patches:
            raise IndexError(f"vision token {token} is not a patch token (prefix {self.prefix_tokens})")
        return divmod(k, self.cols)

    def patch_to_token(self, row: int, col: int) -> int:
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"patch ({row}, {col}) outside the {self.rows}x{self.cols} grid")
        return self.prefix_tokens + row * self.cols + col


def vision_tower(loaded: LoadedModel):
    """The ViT module of a loaded model (has .embeddings.patch_embedding and .encoder.layers)."""
    if loaded.family in ("llava", "paligemma"):
        return loaded.model.model.vision_tower
    if loaded.family in ("clip", "siglip", "blip"):
        return loaded.model.vision_model
    raise ValueError(f"vision_tower does not know the {loaded.family} family yet")


def _vision_config(config):
    return getattr(config, "vision_config", config)


def vision_grid(loaded: LoadedModel) -> PatchGrid:
    """The ViT patch grid of a CLIP, SigLIP, LLaVA, PaliGemma or BLIP model, from its config."""
    vcfg = _vision_config(loaded.model.config)
    size = vcfg.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    patch = vcfg.patch_size
    if loaded.family in ("clip", "llava", "blip"):
        prefix = 1  # class embedding prepended by CLIP-style (and BLIP) embeddings
    elif loaded.family in ("siglip", "paligemma"):
        prefix = 0
    else:
        raise ValueError(f"vision_grid does not know the {loaded.family} family yet")
    return PatchGrid(height // patch, width // patch, patch, height, width, prefix)


@dataclass(frozen=True)
class ProcessorView:
    """What the image processor made of an image."""

    model_input: Image.Image  # the pixel tensor de-normalised back to an RGB image
    box: tuple[float, float, float, float]  # region of the original image it covers (x0, y0, x1, y1)
    original_size: tuple[int, int]  # (width, height)
    steps: list[str]  # plain-language steps, e.g. "resize shortest side to 64 px"


def _size_dict(value) -> dict:
    if isinstance(value, dict):
        return value
    if hasattr(value, "items"):
        return dict(value.items())
    if value is None:
        return {}
    return {k: getattr(value, k) for k in ("height", "width", "shortest_edge", "longest_edge") if getattr(value, k, None)}


def _resize_shape(w: int, h: int, size: dict) -> tuple[int, int]:
    """(width, height) after the processor's resize step."""
    if size.get("shortest_edge"):
        short, long = (w, h) if w <= h else (h, w)
        s = size["shortest_edge"]
        new_long = int(s * long / short)
        return (s, new_long) if w <= h else (new_long, s)
    if size.get("height") and size.get("width"):
        return size["width"], size["height"]
    raise ValueError(f"unsupported resize rule {size}")


def processor_view(loaded: LoadedModel, image: Image.Image) -> ProcessorView:
    """Run the model's image processor on `image` and explain the result."""
    ip = loaded.processor.image_processor
    pixels = ip(images=[image], return_tensors="pt")["pixel_values"][0]  # (3, H, W)
    mean = torch.tensor(ip.image_mean).view(3, 1, 1) if ip.do_normalize else torch.zeros(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1) if ip.do_normalize else torch.ones(3, 1, 1)
    scale = ip.rescale_factor if ip.do_rescale else 1.0
    restored = ((pixels.float() * std + mean) / scale).clamp(0, 255).round().to(torch.uint8)
    model_input = Image.fromarray(restored.permute(1, 2, 0).numpy())

    w, h = image.size
    steps = []
    box = (0.0, 0.0, float(w), float(h))
    if getattr(ip, "do_resize", False):
        size = _size_dict(ip.size)
        rw, rh = _resize_shape(w, h, size)
        if size.get("shortest_edge"):
            steps.append(f"resize the shorter side to {size['shortest_edge']} px, keeping the aspect ratio ({w}x{h} -> {rw}x{rh})")
        else:
            steps.append(f"resize to {rw}x{rh} px, ignoring the aspect ratio")
    else:
        rw, rh = w, h
    if getattr(ip, "do_center_crop", False):
        crop = _size_dict(ip.crop_size)
        cw, ch = crop["width"], crop["height"]
        left, top = int(round((rw - cw) / 2.0)), int(round((rh - ch) / 2.0))
        sx, sy = w / rw, h / rh
        box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
        if (cw, ch) != (rw, rh):
            steps.append(f"crop the centre {cw}x{ch} px (the parts outside the box are never seen)")
    if getattr(ip, "do_normalize", False):
        mean = [round(float(v), 3) for v in ip.image_mean]
        std = [round(float(v), 3) for v in ip.image_std]
        steps.append(f"scale to 0..1 and normalise with mean {mean} and std {std}")
    return ProcessorView(model_input, box, (w, h), steps)


def patch_at(view: ProcessorView, grid: PatchGrid, x: float, y: float) -> tuple[int, int]:
    """The patch (row, col) under pixel (x, y) of the original image (a click on the image)."""
    x0, y0, x1, y1 = view.box
    if not (x0 <= x < x1 and y0 <= y < y1):
        raise ValueError(f"Pixel ({x:.0f}, {y:.0f}) is outside the region the model sees "
                         f"({x0:.0f}, {y0:.0f}) - ({x1:.0f}, {y1:.0f}); pick a point inside the grid.")
    col = int((x - x0) / (x1 - x0) * grid.cols)
    row = int((y - y0) / (y1 - y0) * grid.rows)
    return min(row, grid.rows - 1), min(col, grid.cols - 1)


def patches_in_box(grid_box: tuple[float, float, float, float], grid: PatchGrid,
                   box: tuple[float, float, float, float]) -> list[tuple[int, int]]:
    """Patches whose centre lies inside `box`; `grid_box` is the region of the original image the
    grid covers (`ProcessorView.box`, `PatchHeatmap.box`), both in original-image pixels."""
    bx0, by0, bx1, by1 = box
    out = []
    for r in range(grid.rows):
        for c in range(grid.cols):
            x0, y0, x1, y1 = cell_box(grid_box, grid.rows, grid.cols, r, c)
            if bx0 <= (x0 + x1) / 2 <= bx1 and by0 <= (y0 + y1) / 2 <= by1:
                out.append((r, c))
    return out


@dataclass(frozen=True)
class ImageTokenLayout:
    """Where the image tokens of a language-model sequence sit, and which patch each shows."""

    positions: list[int]  # indices in input_ids of the image tokens
    patches: list[tuple[int, int] | None]  # (row, col) per image token; None for a CLS token
    tokens_per_image: int  # image tokens of one image (patches, plus the CLS token when kept)

    def image_of(self, k: int) -> int:
        """Which image (or tile) the k-th image token belongs to, counting from 0."""
        return k // self.tokens_per_image


def image_token_layout(loaded: LoadedModel, input_ids: torch.Tensor) -> ImageTokenLayout:
    """Image-token positions of one sequence and their patches (LLaVA "default" / "full";
    PaliGemma: one token per SigLIP patch, images first)."""
    config = loaded.model.config
    if loaded.family not in ("llava", "paligemma"):
        raise ValueError(f"image_token_layout covers LLaVA and PaliGemma models, not {loaded.family} (yet)")
    ids = input_ids.reshape(-1)
    positions = (ids == config.image_token_id).nonzero().flatten().tolist()
    grid = vision_grid(loaded)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if loaded.family == "paligemma" or strategy == "default":  # CLS dropped: one token per patch
        patches = [grid.token_to_patch(k + grid.prefix_tokens) for k in range(grid.n_patches)]
    elif strategy == "full":  # CLS kept first
        patches = [None] * grid.prefix_tokens + [grid.token_to_patch(grid.prefix_tokens + k) for k in range(grid.n_patches)]
    else:
        raise ValueError(f"unknown vision_feature_select_strategy {strategy!r}")
    if len(positions) % len(patches):
        raise ValueError(f"{len(positions)} image tokens do not fit a layout of {len(patches)} tokens per image")
    return ImageTokenLayout(positions, patches * (len(positions) // len(patches)), len(patches))
