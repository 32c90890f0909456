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


def deletion_curve(
    probability, pixel_values: torch.Tensor, order: np.ndarray, patch_size: int, cols: int, steps: int = 16
) -> np.ndarray:
    """Target probability as patches are replaced by the baseline (0 = processor mean) in `order`.

    probability: callable (B, 3, H, W) -> (B,). Returns steps + 1 values, from nothing removed
    to everything removed.
    """
    n = len(order)
    counts = np.linspace(0, n, steps + 1).round().astype(int)
    batch = pixel_values.repeat(len(counts), 1, 1, 1).clone()  # (steps+1, 3, H, W)
    for i, k in enumerate(counts):
        for patch in order[:k]:
            r, c = divmod(int(patch), cols)
            batch[i, :, r * patch_size : (r + 1) * patch_size, c * patch_size : (c + 1) * patch_size] = 0.0
    with torch.no_grad():
        return probability(batch).float().cpu().numpy()


def curve_auc(curve: np.ndarray) -> float:
    """Area under a curve sampled evenly on [0, 1] (trapezoid rule)."""
    y = np.asarray(curve, dtype=np.float64)
    return float(((y[:-1] + y[1:]) / 2).mean())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (ties get their average rank)."""
    ra, rb = _ranks(np.ravel(a)), _ranks(np.ravel(b))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):  # average ranks of ties
        tie = x == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


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
