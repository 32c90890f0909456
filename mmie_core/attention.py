"""Attention capture with forward hooks, reduced on the fly, and the maps built from it.

`AttentionRecorder` hooks the attention modules of chosen layers. Each hook receives the
attention probabilities (B, heads, q, k) that eager attention returns and keeps only what is
asked for (some query rows, all key columns), so memory grows with rows x sequence, not with
sequence^2 x layers. Hooks are always removed, even when the forward pass raises.

Also here: head/layer fusion, attention rollout (Abnar & Zuidema 2020) and the gradient-weighted
relevancy update of Chefer et al. (2021).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


class AttentionRecorder:
    """Context manager recording (reduced) attention probabilities of chosen modules.

    modules: attention modules, keyed by layer index.
    rows: query rows to keep (None keeps all rows).
    keep_grad: keep the full maps attached to the graph and record their gradients too
      (for relevancy); rows are then not reduced.
    """

    def __init__(
        self,
        modules: dict[int, nn.Module],
        rows: Sequence[int] | None = None,
        keep_grad: bool = False,
    ):
        self.modules = modules
        self.rows = None if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        self.keep_grad = keep_grad
        self.maps: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, layer: int) -> Callable:
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(
                    "This attention layer returned no weights: it must run with attn_implementation='eager'."
                )
            if self.keep_grad:
                if weights.requires_grad:
                    weights.register_hook(lambda g: self.grads.__setitem__(layer, g.detach()))
                self.maps[layer] = weights
                return
            w = weights.detach()
            if self.rows is not None:
                w = w.index_select(2, self.rows.to(w.device))  # (B, heads, rows, k)
            self.maps[layer] = w.float()

        return hook

    def __enter__(self) -> "AttentionRecorder":
        try:
            for layer, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(layer)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc) -> None:
        self.remove()


def fuse(maps: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    """Fuse heads or layers: mean, max or min along `dim`."""
    if how == "mean":
        return maps.mean(dim)
    if how == "max":
        return maps.amax(dim)
    if how == "min":
        return maps.amin(dim)
    raise ValueError(f"fusion must be mean, max or min, not {how!r}")


def remove_sinks(columns: torch.Tensor, z: float = 3.0) -> torch.Tensor:
    """Zero the key columns that soak up attention (sinks): more than `z` robust deviations above
    the median. columns: (..., k) attention over image tokens. Returns a copy."""
    med = columns.median(dim=-1, keepdim=True).values
    mad = (columns - med).abs().median(dim=-1, keepdim=True).values + 1e-8
    out = columns.clone()
    out[(columns - med) / (1.4826 * mad) > z] = 0.0
    return out


def rollout(layer_maps: Sequence[torch.Tensor], discard_ratio: float = 0.0, head_fusion: str = "mean",
            keep: Sequence[int] = (0,)) -> torch.Tensor:
    """Attention rollout. layer_maps: per layer (heads, q, k) with q == k (full maps, in order).

    Each layer: fuse heads, zero the lowest `discard_ratio` of entries (never those in the
    columns `keep`, e.g. CLS), add the identity for the residual path, renormalise rows, and
    multiply. Returns the (q, k) rolled-out matrix.
    """
    n = layer_maps[0].shape[-1]
    result = torch.eye(n, dtype=torch.float64)
    for maps in layer_maps:
        a = fuse(maps.double(), head_fusion, dim=0)  # (q, k)
        if discard_ratio > 0:
            flat = a.flatten()
            k = int(flat.numel() * discard_ratio)
            if k:
                protected = torch.zeros_like(a, dtype=torch.bool)
                protected[:, list(keep)] = True
                candidates = flat.masked_fill(protected.flatten(), float("inf"))
                idx = candidates.topk(k, largest=False).indices
                flat = flat.clone()
                flat[idx] = 0.0
                a = flat.view_as(a)
        a = 0.5 * a + 0.5 * torch.eye(n, dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    return result


def relevancy(layer_maps: Sequence[torch.Tensor], layer_grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chefer et al. 2021: R <- R + mean_heads(clamp(grad * attn, min=0)) @ R, from R = I.

    layer_maps / layer_grads: per layer (heads, q, k), in forward order. Returns (q, k).
    """
    n = layer_maps[0].shape[-1]
    r = torch.eye(n, dtype=torch.float64)
    for attn, grad in zip(layer_maps, layer_grads):
        cam = (grad.double() * attn.double()).clamp(min=0).mean(0)  # (q, k)
        r = r + cam @ r
    return r
