"""Faithfulness metrics of heatmaps: pointing game, deletion curves and the randomisation check."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .heatmap import PatchHeatmap


def pointing_hit(heatmap: PatchHeatmap, box: tuple[float, float, float, float], tolerance: int = 1) -> bool:
    """Does the heatmap's maximum fall on `box` (original-image pixels), give or take
    `tolerance` patches?"""
    r, c = heatmap.argmax()
    x0, y0, x1, y1 = heatmap.patch_box(r, c)
    pw, ph = x1 - x0, y1 - y0
    bx0, by0, bx1, by1 = box
    return (x1 + tolerance * pw > bx0 and x0 - tolerance * pw < bx1 and
            y1 + tolerance * ph > by0 and y0 - tolerance * ph < by1)


def box_overlap(heatmap: PatchHeatmap, box: tuple[float, float, float, float]) -> np.ndarray:
    """(rows, cols): the fraction of each map cell's area inside `box` (original-image pixels)."""
    rows, cols = heatmap.grid
    bx0, by0, bx1, by1 = box
    out = np.zeros((rows, cols))
    for r in range(rows):
        for c in range(cols):
            x0, y0, x1, y1 = heatmap.patch_box(r, c)
            inter = max(0.0, min(x1, bx1) - max(x0, bx0)) * max(0.0, min(y1, by1) - max(y0, by0))
            out[r, c] = inter / max((x1 - x0) * (y1 - y0), 1e-12)
    return out


def energy_on_box(heatmap: PatchHeatmap, box: tuple[float, float, float, float]) -> float:
    """Share of the map's positive mass inside `box` (cells split by the area they have inside it)."""
    positive = np.clip(heatmap.values, 0, None)
    total = positive.sum()
    return float((positive * box_overlap(heatmap, box)).sum() / total) if total > 0 else 0.0


def discriminates(heatmap: PatchHeatmap, boxes: list[tuple[float, float, float, float]], named: int) -> bool:
    """Does the named object's box get more positive mass than every other object's box?"""
    positive = np.clip(heatmap.values, 0, None)
    mass = [float((positive * box_overlap(heatmap, b)).sum()) for b in boxes]
    return all(mass[named] > m for k, m in enumerate(mass) if k != named)


def noisy_linear_impute(image: torch.Tensor, removed: np.ndarray, noise: float = 0.01,
                        rng: np.random.Generator | None = None) -> torch.Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022): each removed pixel becomes the weighted mean of
    its 8 neighbours (1/6 for the 4 direct ones, 1/12 for the diagonals), solved jointly as one sparse
    linear system per image, plus Gaussian noise. The imputed value carries no information about the
    removed pixel and no constant colour that a method could share as its baseline.

    image: (C, H, W); removed: (H, W) bool. A tiny pull towards 0 (the processor mean) keeps regions
    with no known neighbour (everything removed) well defined."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import spsolve

    rng = rng or np.random.default_rng(0)
    img = image.detach().double().cpu().numpy()
    c, h, w = img.shape
    rows, cols = np.nonzero(removed)
    m = len(rows)
    if m == 0:
        return image.clone()
    if m == h * w:  # nothing left to impute from: the mean (0) plus the noise
        return torch.from_numpy(rng.normal(0.0, noise, img.shape)).to(image)
    index = -np.ones((h, w), dtype=np.int64)
    index[rows, cols] = np.arange(m)
    diag = np.full(m, 1e-6)
    a_i, a_j, a_v = [], [], []
    b = np.zeros((m, c))
    for dy, dx, weight in [(-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
                           (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12)]:
        r2, c2 = rows + dy, cols + dx
        inside = (r2 >= 0) & (r2 < h) & (c2 >= 0) & (c2 < w)
        src, r2, c2 = np.nonzero(inside)[0], r2[inside], c2[inside]
        diag[src] += weight
        gone = removed[r2, c2]
        a_i.append(src[gone])
        a_j.append(index[r2[gone], c2[gone]])
        a_v.append(np.full(int(gone.sum()), -weight))
        np.add.at(b, src[~gone], weight * img[:, r2[~gone], c2[~gone]].T)
    a = sp.csr_matrix((np.concatenate(a_v), (np.concatenate(a_i), np.concatenate(a_j))), shape=(m, m))
    values = spsolve((a + sp.diags(diag)).tocsc(), b).reshape(m, c) + rng.normal(0.0, noise, (m, c))
    out = img.copy()
    out[:, rows, cols] = values.T
    return torch.from_numpy(out).to(image)


REMOVAL_RULES = ("mean", "road")


def _removed_mask(order: np.ndarray, k: int, grid: tuple[int, int], patch_size: int, shape: tuple[int, int],
                  keep_first: bool) -> np.ndarray:
    """(H, W) pixels removed: the first k patches of `order` (deletion), or all but them (insertion)."""
    rows, cols = grid
    cells = np.zeros(rows * cols, dtype=bool)
    cells[order[:k]] = True
    if keep_first:
        cells = ~cells
    mask = np.zeros(shape, dtype=bool)
    for patch in np.nonzero(cells)[0]:
        r, c = divmod(int(patch), cols)
        mask[r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size] = True
    return mask


def removal_curve(probability, pixel_values: torch.Tensor, order: np.ndarray, patch_size: int,
                  grid: tuple[int, int], steps: int = 16, mode: str = "deletion", rule: str = "mean",
                  fill: float = 0.0, seed: int = 0) -> np.ndarray:
    """Target probability over `steps + 1` evenly spaced fractions of the patches in `order`:
    - deletion: the image with the first patches of `order` removed (nothing removed ... all removed);
    - insertion: an empty canvas with the first patches of `order` put back (nothing ... everything).
    rule "mean": removed pixels get `fill` (the processor's mean colour in model space); "road": ROAD's
    noisy linear imputation from the pixels that are left.

    probability: callable (B, 3, H, W) -> (B,)."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be deletion or insertion, not {mode!r}")
    if rule not in REMOVAL_RULES:
        raise ValueError(f"rule must be one of {', '.join(REMOVAL_RULES)}, not {rule!r}")
    n = len(order)
    counts = np.linspace(0, n, steps + 1).round().astype(int)
    rng = np.random.default_rng(seed)
    image = pixel_values[0]
    batch = []
    for k in counts:
        mask = _removed_mask(order, int(k), grid, patch_size, tuple(image.shape[-2:]), keep_first=mode == "insertion")
        if rule == "road":
            batch.append(noisy_linear_impute(image, mask, rng=rng))
        else:
            filled = image.clone()
            filled[:, torch.from_numpy(mask)] = fill
            batch.append(filled)
    with torch.no_grad():
        return probability(torch.stack(batch)).float().cpu().numpy()


def deletion_curve(probability, pixel_values: torch.Tensor, order: np.ndarray, patch_size: int, cols: int,
                   steps: int = 16) -> np.ndarray:
    """Target probability as patches are replaced by the processor mean (0 in model space) in `order`."""
    rows = pixel_values.shape[-2] // patch_size
    return removal_curve(probability, pixel_values, order, patch_size, (rows, cols), steps)


def curve_auc(curve: np.ndarray) -> float:
    """Area under a curve sampled evenly on [0, 1] (trapezoid rule)."""
    y = np.asarray(curve, dtype=np.float64)
    return float(np.trapezoid(y, dx=1.0 / (len(y) - 1)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (ties get their average rank; 0 for a constant map)."""
    from scipy.stats import spearmanr

    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def bootstrap_ci(values, n_resamples: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the mean of per-case values."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(x) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n_resamples, len(x)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy with every weight re-initialised (Adebayo et al. 2018, full randomisation)."""
    clone = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in clone.named_parameters():
            if name.endswith("logit_scale") or name.endswith("logit_bias"):
                continue  # keep the score's scale so probabilities stay comparable
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return clone
