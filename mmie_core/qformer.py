"""The Q-Former explained: which patches each of BLIP-2's learned queries reads.

A BLIP-2 / InstructBLIP language model never sees a patch. It reads `num_query_tokens` query outputs of
the Q-Former, and each query gathers the image through cross-attention over the vision tokens (CLS +
patches) in every `cross_attention_frequency`-th Q-Former layer. This module records those
cross-attention probabilities:

- `query_reads` taps the cross-attention modules during one Q-Former pass and computes
  softmax(q k^T * scaling) from their own projections (exact under any attention implementation; a test
  checks it against the model's eager `cross_attentions`);
- `query_maps` turns them into one map per query (per layer and fused over layers), with how spread
  or focused each query is and how much the queries overlap, for the Inside view and the API.

The composition rule used by every answer-token map of these models (`patches.QueryLayout`): the
language model's value on query k is spread over the patches in proportion to query k's fused
cross-attention (heads and cross-attention layers averaged, CLS share dropped, row renormalised).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .heatmap import PatchHeatmap
from .models import LoadedModel


@dataclass
class QueryReads:
    """Cross-attention probabilities of the Q-Former's queries over the vision tokens."""

    layers: list[int]  # Q-Former layers that have cross-attention, in order
    probs: torch.Tensor  # (layers, heads, queries, vision tokens) float32, rows sum to 1
    prefix: int  # vision tokens before the patches (1: CLS)

    def per_layer(self) -> torch.Tensor:
        """(layers, queries, vision tokens): heads averaged."""
        return self.probs.mean(1)

    def fused(self) -> torch.Tensor:
        """(queries, vision tokens): heads and layers averaged."""
        return self.per_layer().mean(0)

    def fused_patches(self) -> torch.Tensor:
        """(queries, patches): the fused reading without the CLS share, renormalised over the patches."""
        patches = self.fused()[:, self.prefix:]
        return patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)


def _cross_probabilities(module, hidden: torch.Tensor, encoder: torch.Tensor, mask) -> torch.Tensor:
    """softmax(q k^T * scaling) of one Q-Former cross-attention module: (B, heads, queries, vision tokens)."""
    d = module.attention_head_size
    b, n, _ = hidden.shape
    q = module.query(hidden).view(b, n, -1, d).transpose(1, 2).float()  # (B, H, queries, d)
    k = module.key(encoder).view(b, encoder.shape[1], -1, d).transpose(1, 2).float()  # (B, H, tokens, d)
    scores = (q @ k.transpose(-1, -2)) * module.scaling  # (B, H, queries, tokens)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return scores.softmax(-1)


def query_reads(loaded: LoadedModel, pixel_values: torch.Tensor, inputs: dict | None = None) -> QueryReads:
    """One Q-Former pass over `pixel_values` (one image), recording every cross-attention layer's
    probabilities. `inputs` may hold InstructBLIP's `qformer_input_ids` / `qformer_attention_mask`."""
    adapter = loaded.adapter
    if not adapter.query_tokens:
        raise ValueError(f"{loaded.name} has no Q-Former: its language model reads {loaded.family} image tokens.")
    modules = adapter.cross_attention_modules(loaded.model)
    probs: dict[int, torch.Tensor] = {}

    def tap(layer: int):
        def hook(module, args, kwargs, output):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            probs[layer] = _cross_probabilities(module, hidden.detach(), kwargs["encoder_hidden_states"].detach(),
                                                kwargs.get("encoder_attention_mask"))[0].cpu()

        return hook

    handles = []
    try:
        for layer, module in modules.items():
            handles.append(module.register_forward_hook(tap(layer), with_kwargs=True))
        with torch.inference_mode():
            adapter.image_features(loaded.model, pixel_values[:1], inputs or {})
    finally:
        for handle in handles:
            handle.remove()
    order = sorted(probs)
    if order != sorted(modules):
        raise RuntimeError(f"cross-attention layers {sorted(set(modules) - set(order))} did not run")
    prefix = adapter.prefix_tokens(loaded.model.config)
    return QueryReads(order, torch.stack([probs[i] for i in order]), prefix)


@dataclass
class QueryMaps:
    """Each query's reading of the image, for the Inside view."""

    layers: list[int]  # Q-Former layers with cross-attention
    per_layer: np.ndarray  # (layers, queries, rows, cols): share of each query's cross-attention on each patch
    fused: np.ndarray  # (queries, rows, cols): layers averaged
    cls_share: np.ndarray  # (queries,): share on the CLS token, layers averaged
    spread: np.ndarray  # (queries,): effective number of patches read, exp(entropy) of the fused map
    focus: np.ndarray  # (queries,): 1 - normalised entropy (1 = one patch, 0 = all patches alike)
    peak: list[tuple[int, int]]  # (row, col) each query reads most
    overlap: float  # mean cosine similarity between the queries' fused maps (1 = all read the same patches)
    box: tuple[float, float, float, float]
    original_size: tuple[int, int]
    model: str

    @property
    def n_queries(self) -> int:
        return self.fused.shape[0]

    def heatmap(self, query: int, layer: int | None = None) -> PatchHeatmap:
        """One query's map (fused, or of one cross-attention layer), normalised to sum 1."""
        if not 0 <= query < self.n_queries:
            raise ValueError(f"query must be between 0 and {self.n_queries - 1}")
        if layer is None:
            values, caption = self.fused[query], f"query {query} · fused"
        else:
            if layer not in self.layers:
                raise ValueError(f"Q-Former layer {layer} has no cross-attention; those that do: {self.layers}")
            values, caption = self.per_layer[self.layers.index(layer), query], f"query {query} · layer {layer}"
        values = values / max(values.sum(), 1e-12)
        return PatchHeatmap(values, "query_attention", {"query": query}, self.box, self.original_size,
                            {"layers": [layer] if layer is not None else self.layers, "caption": caption}, self.model)

    def summary(self) -> str:
        n_patches = self.fused.shape[1] * self.fused.shape[2]
        order = np.argsort(-self.focus)
        most, least = int(order[0]), int(order[-1])
        distinct = len(set(self.peak))
        return (f"{self.n_queries} queries over {n_patches} patches (cross-attention in Q-Former layers "
                f"{self.layers}). A query reads the equivalent of {np.median(self.spread):.0f} patches (median; "
                f"{self.spread.min():.0f} to {self.spread.max():.0f}). Most focused: query {most} "
                f"(focus {self.focus[most]:.2f}, peak at row {self.peak[most][0]}, col {self.peak[most][1]}); "
                f"least: query {least} (focus {self.focus[least]:.2f}). The queries peak on {distinct} distinct "
                f"patches; their maps overlap with mean cosine {self.overlap:.2f} (1 = all read the same patches). "
                f"Share on the CLS token: {self.cls_share.mean():.0%} on average.")

    def to_json(self) -> dict:
        return {"model": self.model, "layers": self.layers, "grid": list(self.fused.shape[1:]),
                "queries": [{"query": k, "spread": round(float(self.spread[k]), 3),
                             "focus": round(float(self.focus[k]), 4), "cls_share": round(float(self.cls_share[k]), 4),
                             "peak": list(self.peak[k]), "fused": np.round(self.fused[k], 6).tolist()}
                            for k in range(self.n_queries)],
                "overlap": round(self.overlap, 4), "summary": self.summary()}


def query_maps(loaded: LoadedModel, image: Image.Image, instruction: str = "") -> QueryMaps:
    """Every query's cross-attention over the patches of `image`. InstructBLIP's queries also read the
    instruction, so their maps depend on it ("Describe the image." when empty); BLIP-2's do not."""
    from .chat import chat_inputs
    from .patches import processor_view, vision_grid

    inputs = chat_inputs(loaded, image, instruction.strip() or "Describe the image.")
    reads = query_reads(loaded, inputs["pixel_values"], inputs)
    grid = vision_grid(loaded)
    per_layer = reads.per_layer()[:, :, reads.prefix:]  # (layers, queries, patches)
    fused = reads.fused_patches()  # (queries, patches), rows sum to 1
    p = fused.double().clamp_min(1e-12)
    entropy = -(p * p.log()).sum(-1)  # (queries,)
    unit = torch.nn.functional.normalize(fused.double(), dim=-1)
    cos = unit @ unit.T
    n = fused.shape[0]
    overlap = float((cos.sum() - cos.diagonal().sum()) / max(n * (n - 1), 1))
    peaks = [divmod(int(i), grid.cols) for i in fused.argmax(-1)]
    view = processor_view(loaded, image)
    return QueryMaps(reads.layers, per_layer.reshape(len(reads.layers), n, grid.rows, grid.cols).double().numpy(),
                     fused.reshape(n, grid.rows, grid.cols).double().numpy(),
                     reads.fused()[:, :reads.prefix].sum(-1).double().numpy(),
                     entropy.exp().clamp(1, grid.n_patches).numpy(),
                     (1 - entropy / np.log(grid.n_patches)).clamp(0, 1).numpy(), peaks, overlap,
                     view.box, view.original_size, loaded.name)
