"""Patch geometry: what the processor does to an image, and which token sees which patch.

Everything is read from the model's config and processor, never from a constant:
- `processor_view` runs the image processor and reports the model input (de-normalised back to
  pixels) and the box of the original image it covers (resize + centre crop, or plain resize);
- `vision_grid` gives the ViT patch grid and the tokens before the patches (CLS or none);
- `image_token_layout` maps positions of image tokens in a language-model sequence to
  (row, col) patches, for LLaVA's "default" (CLS dropped) and "full" (CLS kept) strategies and
  for PaliGemma (one token per SigLIP patch, before the prompt);
- `QueryLayout` maps a Q-Former model's query tokens (BLIP-2, InstructBLIP) onto the patches they read;
- `tiled_layout` reads an Idefics3 / SmolVLM sequence, where an image becomes a grid of tiles plus a
  global view, each tile a few pixel-shuffled tokens; `TiledLayout.mosaic` joins the tiles back into one
  map over the whole image.

A `PatchGrid` and a `TiledLayout` share `token_map` (values over the image tokens -> map) and
`patch_map` (values per ViT patch of each image or tile -> map), so explanation methods need not know
which one they hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .heatmap import cell_box

if TYPE_CHECKING:
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

    # One map per image: the patches are the tokens.
    unit = 1  # ViT patches per map cell side
    marker_positions = ()  # no marker tokens around the image (TiledLayout has some)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def token_map(self, values: torch.Tensor) -> np.ndarray:
        """(patches,) values over the image tokens, in patch order -> (rows, cols)."""
        return values.detach().double().reshape(self.rows, self.cols).cpu().numpy()

    def patch_map(self, values: torch.Tensor) -> np.ndarray:
        """(1, rows, cols) values per ViT patch -> (rows, cols)."""
        return values.detach().double()[0].cpu().numpy()


def vision_tower(loaded: LoadedModel):
    """The ViT module of a loaded model (its family adapter knows where it is)."""
    return loaded.adapter.vision_tower(loaded.model)


def vision_grid(loaded: LoadedModel) -> PatchGrid:
    """The ViT patch grid of a model with one fixed input size, from its config (for Idefics3, the
    grid of one tile: the number of tiles depends on the image, `tiled_layout`)."""
    return loaded.adapter.vision_grid(loaded)


@dataclass(frozen=True)
class ProcessorView:
    """What the image processor made of an image."""

    model_input: Image.Image  # the pixel tensor de-normalised back to an RGB image
    box: tuple[float, float, float, float]  # region of the original image it covers (x0, y0, x1, y1)
    original_size: tuple[int, int]  # (width, height)
    steps: list[str]  # plain-language steps, e.g. "resize shortest side to 64 px"
    tiles: tuple[int, int] | None = None  # Idefics3: (rows, cols) of tiles cut from it ((0, 0): global view only)
    grid: PatchGrid | None = None  # Qwen2-VL: the ViT grid of this image (its size follows the image's)


def _size_dict(value) -> dict:
    if isinstance(value, dict):
        return value
    if hasattr(value, "items"):
        return dict(value.items())
    if value is None:
        return {}
    return {k: getattr(value, k) for k in ("height", "width", "shortest_edge", "longest_edge") if getattr(value, k, None)}


def _resize_shape(w: int, h: int, size: dict) -> tuple[int, int]:
    """(width, height) after the processor's resize step (the shorter side by transformers' own helper,
    which reads only the array's shape)."""
    if size.get("shortest_edge"):
        from transformers.image_transforms import get_resize_output_image_size
        from transformers.image_utils import ChannelDimension

        shape = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), (h, w, 3), (0, 0, 0))  # no memory
        new_h, new_w = get_resize_output_image_size(shape, size["shortest_edge"], default_to_square=False,
                                                    input_data_format=ChannelDimension.LAST)
        return new_w, new_h
    if size.get("height") and size.get("width"):
        return size["width"], size["height"]
    raise ValueError(f"unsupported resize rule {size}")


def _to_image(ip, pixels: torch.Tensor) -> Image.Image:
    """A (3, H, W) processor tensor de-normalised back to an RGB image."""
    mean = torch.tensor(ip.image_mean).view(3, 1, 1) if ip.do_normalize else torch.zeros(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1) if ip.do_normalize else torch.ones(3, 1, 1)
    scale = ip.rescale_factor if ip.do_rescale else 1.0
    restored = ((pixels.float() * std + mean) / scale).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(restored.permute(1, 2, 0).numpy())


def _normalise_step(ip) -> str:
    mean = [round(float(v), 3) for v in ip.image_mean]
    std = [round(float(v), 3) for v in ip.image_std]
    return f"scale to 0..1 and normalise with mean {mean} and std {std}"


def tiled_view(loaded: LoadedModel, image: Image.Image) -> ProcessorView:
    """Idefics3: the longest edge resized to `size`, both sides rounded up to whole tiles (which
    stretches the image a little), cut into tiles, plus the whole image squeezed into one global tile.
    The model input shown is the tiles put back together (or the global tile alone when the image
    fits one tile); it covers the whole original image."""
    ip = loaded.processor.image_processor
    out = ip(images=[image], return_tensors="pt", return_row_col_info=True)
    pixels, rows, cols = out["pixel_values"][0], out["rows"][0][0], out["cols"][0][0]  # (tiles, 3, M, M)
    tile = pixels.shape[-1]
    w, h = image.size
    longest = _size_dict(ip.size).get("longest_edge")
    if rows * cols:
        canvas = pixels[:-1].reshape(rows, cols, 3, tile, tile).permute(2, 0, 3, 1, 4).reshape(3, rows * tile, cols * tile)
        steps = [f"resize the longer side to {longest} px, keeping the aspect ratio, then stretch both sides up to "
                 f"whole {tile}-px tiles ({w}x{h} -> {cols * tile}x{rows * tile})",
                 f"cut {rows}x{cols} tiles of {tile}x{tile} px, and add the whole image squeezed to {tile}x{tile} px "
                 "as a global view (the last tile)"]
    else:
        canvas = pixels[-1]
        steps = [f"the image fits one tile: resize it to {tile}x{tile} px (one global view, no tiles)"]
    if getattr(ip, "do_normalize", False):
        steps.append(_normalise_step(ip))
    return ProcessorView(_to_image(ip, canvas), (0.0, 0.0, float(w), float(h)), (w, h), steps, (rows, cols))


def qwen_patchify(canvas: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """Differentiable twin of Qwen2-VL's processor: normalised canvases (B, 3, H, W) -> (B * N, 3 * T * P * P)
    rows in merge-window order (block row, block col, i, j), each patch repeated over T frames."""
    b, c, h, w = canvas.shape
    gh, gw = h // patch, w // patch
    x = canvas.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    return x.reshape(b * gh * gw, c * temporal * patch * patch)


def qwen_canvas(pixel_values: torch.Tensor, grid_thw, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """The inverse for one image: (N, 3 * T * P * P) -> the normalised (1, 3, gh * P, gw * P) canvas."""
    _, gh, gw = (int(v) for v in grid_thw)
    x = pixel_values.reshape(gh // merge, gw // merge, merge, merge, 3, temporal, patch, patch)[:, :, :, :, :, 0]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(1, 3, gh * patch, gw * patch)


def qwen_grid(grid_thw, patch: int) -> PatchGrid:
    """The ViT patch grid of one Qwen2-VL image (`image_grid_thw` row: frames, rows, cols)."""
    _, gh, gw = (int(v) for v in grid_thw)
    return PatchGrid(gh, gw, patch, gh * patch, gw * patch, 0)


def native_view(loaded: LoadedModel, image: Image.Image) -> ProcessorView:
    """Qwen2-VL: a plain resize to whole merged cells (patch x merge px) with the area between the
    processor's minimum and maximum, keeping the aspect ratio as well as it can; no crop."""
    ip = loaded.processor.image_processor
    out = ip(images=[image], return_tensors="pt")
    grid_thw = out["image_grid_thw"][0]
    p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    canvas = qwen_canvas(out["pixel_values"], grid_thw, p, m, t)[0]
    gh, gw = int(grid_thw[1]), int(grid_thw[2])
    w, h = image.size
    size = _size_dict(ip.size)
    steps = [f"resize to {gw * p}x{gh * p} px ({w}x{h} -> {gw * p}x{gh * p}): both sides whole {p * m}-px cells "
             f"({p}-px patches, merged {m}x{m}), the area between {size.get('shortest_edge')} and "
             f"{size.get('longest_edge')} pixels, the aspect ratio kept as closely as that allows"]
    if getattr(ip, "do_normalize", False):
        steps.append(_normalise_step(ip))
    return ProcessorView(_to_image(ip, canvas), (0.0, 0.0, float(w), float(h)), (w, h), steps,
                         grid=qwen_grid(grid_thw, p))


def processor_view(loaded: LoadedModel, image: Image.Image) -> ProcessorView:
    """Run the model's image processor on `image` and explain the result (the family adapter knows
    whether it resizes and crops, stretches onto tiles or follows the image's size)."""
    return loaded.adapter.processor_view(loaded, image)


def resize_crop_view(ip, image: Image.Image, grid: PatchGrid) -> ProcessorView:
    """A processor that resizes (the shorter side, or both sides to a fixed size) and may crop the
    centre, as CLIP, SigLIP, LLaVA, PaliGemma and BLIP do. The box is the part of the original image
    that the patches cover: the crop, rounded as the processor rounds it (down), and only the whole
    patches of the input (27 patches of 14 px cover 378 of 384 px; the strided patch embedding
    drops the rest)."""
    model_input = _to_image(ip, ip(images=[image], return_tensors="pt")["pixel_values"][0])  # (3, H, W)
    w, h = image.size
    steps = []
    if getattr(ip, "do_resize", False):
        size = _size_dict(ip.size)
        rw, rh = _resize_shape(w, h, size)
        if size.get("shortest_edge"):
            steps.append(f"resize the shorter side to {size['shortest_edge']} px, keeping the aspect ratio ({w}x{h} -> {rw}x{rh})")
        else:
            steps.append(f"resize to {rw}x{rh} px, ignoring the aspect ratio")
    else:
        rw, rh = w, h
    left, top, cw, ch = 0, 0, rw, rh
    if getattr(ip, "do_center_crop", False):
        crop = _size_dict(ip.crop_size)
        cw, ch = crop["width"], crop["height"]
        left, top = (rw - cw) // 2, (rh - ch) // 2  # transformers rounds the offsets down
        if (cw, ch) != (rw, rh):
            steps.append(f"crop the centre {cw}x{ch} px (the parts outside the box are never seen)")
    covered_w, covered_h = grid.cols * grid.patch_size, grid.rows * grid.patch_size  # whole patches only
    if (covered_w, covered_h) != (cw, ch):
        steps.append(f"cut {grid.rows}x{grid.cols} patches of {grid.patch_size} px: they cover {covered_w}x{covered_h} "
                     f"of the {cw}x{ch} px input (the last {cw - covered_w} columns and {ch - covered_h} rows of "
                     "pixels fall in no patch)")
    sx, sy = w / rw, h / rh
    box = (left * sx, top * sy, (left + min(cw, covered_w)) * sx, (top + min(ch, covered_h)) * sy)
    if getattr(ip, "do_normalize", False):
        steps.append(_normalise_step(ip))
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
    """Image-token positions of one sequence and the patch (or None: a CLS token) each carries, for a
    model whose image tokens are one fixed grid (LLaVA, PaliGemma)."""
    ids = input_ids.reshape(-1)
    positions = (ids == loaded.model.config.image_token_id).nonzero().flatten().tolist()
    grid = vision_grid(loaded)
    first = loaded.adapter.first_vision_token(loaded)  # vision-tower tokens before it never reach the LM
    patches = [None if t < grid.prefix_tokens else grid.token_to_patch(t) for t in range(first, grid.n_tokens)]
    if not positions or len(positions) % len(patches):
        raise ValueError(
            f"{loaded.name}'s prompt holds {len(positions)} image tokens, but its vision tower gives "
            f"{len(patches)} per image ({grid.n_tokens} tokens, the first {first} dropped by the feature selection "
            "strategy): the processor config and the model config disagree (check vision_feature_select_strategy "
            "and num_additional_image_tokens).")
    return ImageTokenLayout(positions, patches * (len(positions) // len(patches)), len(patches))


@dataclass(frozen=True)
class GridLayout:
    """The image tokens of one fixed grid in an answer sequence (LLaVA, PaliGemma): the tokens that
    carry patches, in patch order from `first_patch` on (LLaVA's 'default' strategy on a tower without a
    CLS token drops the first patch), and the CLS tokens kept by the 'full' strategy as markers
    (image tokens that carry no patch)."""

    grid: PatchGrid
    first_patch: int  # flat index of the patch the first patch token carries
    marker_positions: tuple[int, ...] = ()  # CLS image tokens: neither a patch nor text

    unit = 1  # ViT patches per map cell side

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape

    @property
    def vision_tokens(self) -> range:
        """Vision-tower token index of each patch token, in order."""
        return range(self.grid.prefix_tokens + self.first_patch, self.grid.n_tokens)

    def token_map(self, values: torch.Tensor) -> np.ndarray:
        """(patch tokens,) -> (rows, cols); a patch that has no token gets 0."""
        values = values.detach().double().reshape(-1)
        if self.first_patch:
            values = torch.cat([values.new_zeros(self.first_patch), values])
        return self.grid.token_map(values)

    def patch_map(self, values: torch.Tensor) -> np.ndarray:
        return self.grid.patch_map(values)


@dataclass(frozen=True, eq=False)
class QueryLayout:
    """The image tokens of a Q-Former model (BLIP-2, InstructBLIP): learned queries, not patches.

    Query k carries no position; it read the vision tokens through the Q-Former's cross-attention.
    `reads[k]` is that reading over the patches (heads and cross-attention layers averaged, the CLS
    token's share dropped and the row renormalised over the patches), so `token_map` spreads each
    query's value over the patches in proportion to what the query read: map = values @ reads. The
    total is kept.
    """

    grid: PatchGrid
    reads: torch.Tensor  # (queries, patches): each row sums to 1 over the patches
    marker_positions: tuple[int, ...] = ()

    unit = 1  # ViT patches per map cell side

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape

    @property
    def n_queries(self) -> int:
        return self.reads.shape[0]

    def token_map(self, values: torch.Tensor) -> np.ndarray:
        """(queries,) values over the query tokens -> (rows, cols) through each query's reading."""
        values = values.detach().double().reshape(-1).cpu()
        return self.grid.token_map(values @ self.reads.double().cpu())

    def patch_map(self, values: torch.Tensor) -> np.ndarray:
        return self.grid.patch_map(values)


@dataclass(frozen=True)
class TiledLayout:
    """The image tokens of models whose token grid depends on the image.

    Idefics3 / SmolVLM: one image as `tile_rows x tile_cols` tiles plus a global view. Each tile (and
    the global view) is a ViT input whose patches are pixel-shuffled into `cell_rows x cell_cols`
    language-model tokens (`merge` patches per token side). The processor stretches the whole image
    onto the tiles, so the local tiles together form one uniform grid over the whole image, and the
    global view a coarser one over the same image. `mosaic` joins them into one map: the local grid,
    plus each global cell's value spread evenly over the local cells it covers (the sum is kept).

    Qwen2-VL: no tiles (`tile_rows = tile_cols = 0`), one view of `cell_rows x cell_cols` tokens,
    each merging `merge x merge` patches; its size follows the image's.
    """

    tile_rows: int  # 0 when the image was not split (one view only)
    tile_cols: int
    cell_rows: int  # language-model tokens per view
    cell_cols: int
    merge: int  # ViT patches per token side
    positions: tuple[int, ...]  # image tokens in input_ids: local tiles row-major, then the global view
    marker_positions: tuple[int, ...]  # the markers around them: neither image nor text content

    @property
    def n_tiles(self) -> int:  # views, counting the global one
        return self.tile_rows * self.tile_cols + 1

    @property
    def unit(self) -> int:  # ViT patches per map cell side
        return self.merge

    @property
    def shape(self) -> tuple[int, int]:
        return max(self.tile_rows, 1) * self.cell_rows, max(self.tile_cols, 1) * self.cell_cols

    def mosaic(self, per_tile: torch.Tensor) -> np.ndarray:
        """(views, cell_rows, cell_cols), local tiles row-major then global -> one (rows, cols) map."""
        per_tile = per_tile.detach().double().cpu()
        global_view = per_tile[-1]
        if not self.tile_rows * self.tile_cols:
            return global_view.numpy()
        nr, nc, kr, kc = self.tile_rows, self.tile_cols, self.cell_rows, self.cell_cols
        local = per_tile[:-1].reshape(nr, nc, kr, kc).permute(0, 2, 1, 3).reshape(nr * kr, nc * kc)
        spread = global_view.repeat_interleave(nr, 0).repeat_interleave(nc, 1) / (nr * nc)
        return (local + spread).numpy()

    def token_map(self, values: torch.Tensor) -> np.ndarray:
        """(image tokens,) values in sequence order -> the mosaic."""
        return self.mosaic(values.reshape(self.n_tiles, self.cell_rows, self.cell_cols))

    def patch_map(self, values: torch.Tensor) -> np.ndarray:
        """(views, patch rows, patch cols) values per ViT patch of each view -> summed per token -> the mosaic."""
        kr, kc, m = self.cell_rows, self.cell_cols, self.merge
        return self.mosaic(values.reshape(self.n_tiles, kr, m, kc, m).sum((2, 4)))


_TILE_MARKER = re.compile(r"<row_(\d+)_col_(\d+)>")


def tiled_layout(loaded: LoadedModel, input_ids: torch.Tensor) -> TiledLayout:
    """The tiles of the one image in an Idefics3 sequence, read from the marker token before each
    run of image tokens (`<row_r_col_c>` for a tile, `<global-img>` for the global view)."""
    config = loaded.model.config
    grid = vision_grid(loaded)
    merge = config.scale_factor
    cells = grid.rows // merge
    ids = input_ids.reshape(-1).tolist()
    tokens = loaded.processor.tokenizer.convert_ids_to_tokens(ids)
    global_marker = (getattr(loaded.processor, "global_image_tag", None)  # Idefics3Processor
                     or getattr(loaded.processor, "global_image_token", "<global-img>"))  # SmolVLMProcessor
    runs, k = [], 0
    while k < len(ids):
        if ids[k] == config.image_token_id:
            start = k
            while k < len(ids) and ids[k] == config.image_token_id:
                k += 1
            runs.append((tokens[start - 1] if start else "", start, k))
        else:
            k += 1
    tiles = [_TILE_MARKER.fullmatch(marker) for marker, _, _ in runs]
    if not runs or runs[-1][0] != global_marker \
            or any(t is None for t in tiles[:-1]):
        raise ValueError("this sequence does not hold one image as Idefics3 tiles plus a global view")
    if len(runs) > 1 + sum(t is not None for t in tiles):
        raise ValueError("the studio analyses one image per conversation")
    nr = max([int(t[1]) for t in tiles[:-1]], default=0)
    nc = max([int(t[2]) for t in tiles[:-1]], default=0)
    expected = [(r, c) for r in range(1, nr + 1) for c in range(1, nc + 1)]
    if [(int(t[1]), int(t[2])) for t in tiles[:-1]] != expected:
        raise ValueError(f"tiles out of order: {[m for m, _, _ in runs[:-1]]}")
    for marker, start, end in runs:
        if end - start != cells * cells:
            raise ValueError(f"{end - start} image tokens after {marker}, expected {cells}x{cells}")
    positions = tuple(p for _, start, end in runs for p in range(start, end))
    # <fake_token_around_image><row_1_col_1> ... tile rows ended by "\n" ... <global-img> ... <fake_token_around_image>
    block = range(max(runs[0][1] - 2, 0), min(runs[-1][2] + 1, len(ids)))
    markers = tuple(p for p in block if ids[p] != config.image_token_id)
    return TiledLayout(nr, nc, cells, cells, merge, positions, markers)


def qwen_layout(loaded: LoadedModel, input_ids: torch.Tensor, image_grid_thw: torch.Tensor) -> TiledLayout:
    """The one image of a Qwen2-VL sequence: its `<|image_pad|>` tokens are the merged cells of its
    grid in row-major order (token k is cell (k // cols, k % cols)), between <|vision_start|> and
    <|vision_end|>."""
    config = loaded.model.config
    m = config.vision_config.spatial_merge_size
    if image_grid_thw.shape[0] != 1:
        raise ValueError("the studio analyses one image per conversation")
    t, gh, gw = (int(v) for v in image_grid_thw[0])
    ids = input_ids.reshape(-1)
    positions = tuple((ids == config.image_token_id).nonzero().flatten().tolist())
    if len(positions) != t * (gh // m) * (gw // m):
        raise ValueError(f"{len(positions)} image tokens for a {gh // m}x{gw // m} grid")
    markers = tuple((ids == config.vision_start_token_id).nonzero().flatten().tolist()
                    + (ids == config.vision_end_token_id).nonzero().flatten().tolist())
    return TiledLayout(0, 0, gh // m, gw // m, m, positions, markers)
