"""Label-free views of a vision tower: per-layer, per-head attention maps, rollout, head focus,
and a PCA of patch features (as in DINO demos)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .attention import AttentionRecorder
from .explain import VisionSubject, explain_subject
from .heatmap import PatchHeatmap
from .models import LoadedModel, attention_implementation


@dataclass
class VisionInspection:
    heads: list[list[PatchHeatmap]]  # [layer][head]: the CLS row (or mean row) over the patches
    focus: np.ndarray  # (layers, heads): 1 - normalised entropy of each map (1 = one patch, 0 = uniform)
    features: np.ndarray  # (patches, dim): last layer's patch features
    subject: VisionSubject


def inspect_vision(loaded: LoadedModel, image: Image.Image) -> VisionInspection:
    """One forward pass of the vision tower recording every layer's attention."""
    subject = VisionSubject(loaded, image)
    modules = subject.attention_modules()
    with attention_implementation(loaded.model, "eager"), torch.inference_mode(), AttentionRecorder(modules) as rec:
        out = subject.run_forward()
    grid, p = subject.grid, subject.grid.prefix_tokens
    heads, focus = [], []
    for layer in sorted(rec.maps):
        maps = rec.maps[layer][0]  # (heads, q, k)
        row_maps, row_focus = [], []
        for h in range(maps.shape[0]):
            values = subject.attention_readout(maps[h])  # (patches,)
            values = values / values.sum().clamp_min(1e-12)
            entropy = -(values * values.clamp_min(1e-12).log()).sum() / np.log(len(values))
            row_focus.append(float(1 - entropy))
            row_maps.append(PatchHeatmap(
                values.double().reshape(grid.rows, grid.cols).cpu().numpy(), "attention",
                {"view": "vision tower"}, subject.view.box, subject.view.original_size,
                {"layers": [layer], "heads": [h], "caption": f"layer {layer} · head {h}"}, loaded.name,
            ))
        heads.append(row_maps)
        focus.append(row_focus)
    last = out.hidden_states[-1][0, p:]  # (patches, D)
    return VisionInspection(heads, np.array(focus), last.float().cpu().numpy(), subject)


def vision_rollout(inspection: VisionInspection, discard_ratio: float = 0.0, head_fusion: str = "mean") -> PatchHeatmap:
    """Attention rollout through the whole vision tower."""
    return explain_subject(inspection.subject, "rollout", discard_ratio=discard_ratio, head_fusion=head_fusion)


def patch_similarity(loaded: LoadedModel, image: Image.Image, row: int, col: int, depth: int = -1) -> PatchHeatmap:
    """Cosine similarity of patch (row, col)'s features to every patch at one depth of the vision
    tower (0 = patch embeddings with positions, l = after block l; negative counts from the end),
    as in DINO demos: patches of the same object should light up together."""
    subject = VisionSubject(loaded, image)
    grid = subject.grid
    if not (0 <= row < grid.rows and 0 <= col < grid.cols):
        raise ValueError(f"Patch ({row}, {col}) is outside the {grid.rows} x {grid.cols} grid.")
    with torch.inference_mode():
        hidden = subject.run_forward().hidden_states  # depths + 1 entries of (1, tokens, D)
    n = len(hidden)
    if not -n <= int(depth) < n:
        raise ValueError(f"{loaded.name}'s vision tower has depths 0 (patch embeddings) to {n - 1}; got {depth}.")
    depth = int(depth) % n
    feats = hidden[depth][0, grid.prefix_tokens:].float()  # (patches, D)
    feats = torch.nn.functional.normalize(feats, dim=-1)
    sims = feats @ feats[row * grid.cols + col]  # (patches,)
    return PatchHeatmap(
        sims.double().reshape(grid.rows, grid.cols).cpu().numpy(), "patch_similarity",
        {"patch": [row, col]}, subject.view.box, subject.view.original_size,
        {"depth": depth, "measure": "cosine"}, loaded.name,
    )
