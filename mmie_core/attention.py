"""Attention capture with forward hooks, reduced on the fly, and the maps built from it.

`AttentionRecorder` hooks the attention modules of chosen layers. Each hook receives the
attention probabilities (B, heads, q, k) that eager attention returns and keeps only what is
asked for (some query rows, all key columns), so memory grows with rows x sequence, not with
sequence^2 x layers. Hooks are always removed, even when the forward pass raises.

Also here: head/layer fusion, attention rollout (Abnar & Zuidema 2020), the gradient-weighted
relevancy update of Chefer et al. (2021), and its encoder-decoder form for captioners (Chefer et
al. 2021b).
"""

from __future__ import annotations

import threading
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
            weights = attention_weights(module, output)
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


def attention_weights(module: nn.Module, output) -> torch.Tensor | None:
    """The attention probabilities in an attention module's output: (output, weights), or T5-style attention's
    (output, position bias, weights) (a module with relative position buckets)."""
    if not isinstance(output, tuple):
        return None
    at = 2 if hasattr(module, "relative_attention_num_buckets") else 1
    return output[at] if len(output) > at else None


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
    result = torch.eye(n, dtype=torch.float64, device=layer_maps[0].device)
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
        a = 0.5 * a + 0.5 * torch.eye(n, dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    return result


def relevancy(layer_maps: Sequence[torch.Tensor], layer_grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chefer et al. 2021: R <- R + mean_heads(clamp(grad * attn, min=0)) @ R, from R = I.

    layer_maps / layer_grads: per layer (heads, q, k), in forward order. Returns (q, k).
    """
    n = layer_maps[0].shape[-1]
    r = torch.eye(n, dtype=torch.float64, device=layer_maps[0].device)
    for attn, grad in zip(layer_maps, layer_grads):
        cam = (grad.double() * attn.double()).clamp(min=0).mean(0)  # (q, k)
        r = r + cam @ r
    return r


def _normalised_gain(r: torch.Tensor) -> torch.Tensor:
    """Chefer et al. 2021b's R-bar: rows of (R - I) scaled to sum 1 (rows still 0 stay 0), plus I."""
    eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
    gain = r - eye
    return gain / gain.sum(-1, keepdim=True).clamp_min(1e-12) + eye


def cross_modal_relevancy(vision: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
                          decoder: Sequence[tuple[tuple[torch.Tensor, torch.Tensor | None],
                                                  tuple[torch.Tensor, torch.Tensor | None]]]) -> torch.Tensor:
    """Relevancy of image tokens for every text position of an encoder-decoder captioner (BLIP),
    by the rules of Chefer et al. 2021b ("Generic attention-model explainability for interpreting
    bi-modal and encoder-decoder transformers"):

    - vision self-attention:  R_ii <- R_ii + A_ii @ R_ii
    - decoder self-attention: R_tt <- R_tt + A_tt @ R_tt;  R_ti <- R_ti + A_tt @ R_ti
    - cross-attention:        R_ti <- R_ti + bar(R_tt)^T @ A_ti @ bar(R_ii)

    where A = mean_heads(clamp(grad * attn, min=0)). Without gradients (grad None) A is the
    attention rollout's matrix instead: mean_heads(attn), with half the identity added and rows
    renormalised for self-attention, plain for cross-attention.

    vision: per vision layer (attn (heads, i, i), grad or None); decoder: per decoder layer
    ((self attn (heads, t, t), grad), (cross attn (heads, t' <= t, i), grad) or None), in forward order.
    A Q-Former fits the same rules: its queries are the text side; a layer without cross-attention passes
    None, and cross-attention of only the first t' rows (the queries, not InstructBLIP's instruction tokens)
    leaves the other rows zero.
    Returns R_ti (t, i): text positions x vision tokens.
    """
    def weighted(attn: torch.Tensor, grad: torch.Tensor | None, square: bool) -> torch.Tensor:
        if grad is not None:
            return (grad.double() * attn.double()).clamp(min=0).mean(0)
        a = attn.double().mean(0)
        if square:
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
            a = a / a.sum(-1, keepdim=True)
        return a

    n_image = vision[0][0].shape[-1]
    n_text = decoder[0][0][0].shape[-1]
    device = vision[0][0].device
    r_ii = torch.eye(n_image, dtype=torch.float64, device=device)
    for attn, grad in vision:
        r_ii = r_ii + weighted(attn, grad, True) @ r_ii
    r_tt = torch.eye(n_text, dtype=torch.float64, device=device)
    r_ti = torch.zeros(n_text, n_image, dtype=torch.float64, device=device)
    bar_ii = _normalised_gain(r_ii)
    for (self_attn, self_grad), cross in decoder:
        a_tt = weighted(self_attn, self_grad, True)
        r_tt = r_tt + a_tt @ r_tt
        r_ti = r_ti + a_tt @ r_ti
        if cross is None:  # a layer without cross-attention (the Q-Former's odd layers)
            continue
        a_ti = weighted(*cross, False)  # (rows that cross-attend, i): the first rows (a Q-Former's queries)
        if a_ti.shape[0] < n_text:
            a_ti = torch.cat([a_ti, a_ti.new_zeros(n_text - a_ti.shape[0], n_image)])
        r_ti = r_ti + _normalised_gain(r_tt).T @ a_ti @ bar_ii
    return r_ti


# --------------------------------------------------------------------------- rows without eager

ROWS_IMPLEMENTATION = "mmie_rows"  # sdpa for the forward, plus exact softmax rows for taps
_ROW_TAPS: dict[int, tuple[int, Callable]] = {}  # id(attention module) -> (recording thread, tap)
_TAPS_LOCK = threading.Lock()
_registered = False


def row_probabilities(module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask, scaling,
                      rows: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of the query `rows` over every key, exactly as eager attention computes it.

    query (B, H, q, d) and key (B, H_kv, k, d), after rotary embeddings; attention_mask as the
    sdpa path receives it (None for plain causal, or boolean "may attend", or additive float); bias: T5's
    position bias (…, q, k), added to the scores before the mask.
    Returns (B, H, rows, k) float32 (the product in the model's dtype, the softmax in float32, as eager
    attention does): memory grows with rows x k, never q x k.
    """
    scores = _scores(query.index_select(2, rows.to(query.device)), key, scaling)  # (B, H, r, k)
    if bias is not None:
        bias = bias[..., : key.shape[2]]
        scores = scores + (bias.index_select(-2, rows.to(bias.device)) if bias.shape[-2] > 1 else bias).to(scores.dtype)
    offset = key.shape[2] - query.shape[2]  # keys already cached before this query block
    if attention_mask is None:
        if getattr(module, "is_causal", True) and query.shape[2] > 1:
            allowed = torch.arange(key.shape[2], device=scores.device)[None, :] <= (rows.to(scores.device) + offset)[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
    else:
        mask = attention_mask[..., : key.shape[2]]
        if mask.shape[-2] > 1:  # a mask of one row (an encoder's padding) serves every query
            mask = mask.index_select(-2, rows.to(mask.device))
        scores = _masked(scores, mask)
    return scores.softmax(-1, dtype=torch.float32)


def _scores(q: torch.Tensor, key: torch.Tensor, scaling) -> torch.Tensor:
    """(B, H, r, k) scaled q k^T in the model's dtype, as eager attention computes it; q (B, H, r, d), key
    (B, H_kv, k, d) (grouped-query attention: each key head serves several query heads)."""
    if key.shape[1] != q.shape[1]:
        key = key.repeat_interleave(q.shape[1] // key.shape[1], dim=1)  # (B, H, k, d)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    return (q @ key.transpose(-1, -2)) * scale


def _masked(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`scores` under a model's mask: boolean "may attend", or additive."""
    return scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(scores.dtype)


def rows_from_cache(queries: list[torch.Tensor], key: torch.Tensor, lengths: list[int], masks: list, scaling
                    ) -> list[torch.Tensor]:
    """The softmax rows of several decoding steps at once, from their queries and the key cache as it stands
    later: step i's query (B, H, 1, d) over its first `lengths[i]` keys of `key` (B, H_kv, k, d), with its own
    row of the model's mask (None, or (B, 1, 1, lengths[i]) boolean "may attend" or additive). A cache that only
    grows never changes a key once written, so each row equals the one its step's attention computed
    (`row_probabilities` of its last query position). Returns (B, H, lengths[i]) float32 per step."""
    scores = _scores(torch.cat(queries, dim=2), key[:, :, : max(lengths)], scaling)  # (B, H, n, k)
    limit = torch.tensor(lengths, device=scores.device)[:, None]  # one copy per batch of rows, not per step
    scores = scores.masked_fill(torch.arange(scores.shape[-1], device=scores.device)[None, :] >= limit, float("-inf"))
    for i, mask in enumerate(masks):
        if mask is not None:
            scores[:, :, i, : lengths[i]] = _masked(scores[:, :, i, : lengths[i]], mask[:, :, 0, : lengths[i]])
    probs = scores.softmax(-1, dtype=torch.float32)
    return [probs[:, :, i, : lengths[i]] for i in range(len(lengths))]


def biased_mask(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """One additive mask from a position bias (…, q, k) and the model's mask (None, boolean "may attend", or
    additive). A causal mask that the model leaves implicit (None) is not in it: for a query's last row only."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, float("-inf"))
    return bias + mask


def _rows_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    owner, tap = _ROW_TAPS.get(id(module), (None, None))
    if tap is not None and owner == threading.get_ident():  # another thread's pass on the same model: not ours
        # T5 passes a relative position bias (zeros in cross-attention), added to the scores before the mask
        tap(module, query, key, attention_mask, scaling, kwargs.get("position_bias"))
    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                       **kwargs)
    return output, None


def register_rows_implementation() -> str:
    """Register the "mmie_rows" attention (sdpa + taps) and its mask with transformers, once."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ROWS_IMPLEMENTATION, _rows_attention)
        AttentionMaskInterface.register(ROWS_IMPLEMENTATION, sdpa_mask)
        _registered = True
    return ROWS_IMPLEMENTATION


class RowRecorder:
    """Attention probabilities of chosen query rows, without eager attention.

    While the model runs with the "mmie_rows" implementation (see `register_rows_implementation`
    and `models.attention_implementation`), the forward pass itself uses sdpa and each tapped
    module computes only softmax(q_rows k^T) for `rows`: no (q x k) matrix is ever built, so
    memory grows with rows x sequence and time stays close to an sdpa forward. Same `maps`
    ((B, heads, rows, k) per layer) as `AttentionRecorder(modules, rows=rows)` with eager.
    Taps are always removed, even when the forward pass raises, and record only the passes of the thread
    that entered the recorder: another request running on the same model at the time is not recorded.
    """

    def __init__(self, modules: dict[int, nn.Module], rows: Sequence[int]):
        self.modules = modules
        self.rows = torch.as_tensor(list(rows), dtype=torch.long)
        self.maps: dict[int, torch.Tensor] = {}
        self._ids: list[int] = []
        self.owner: int | None = None  # the thread whose passes are recorded

    def _tap(self, layer: int) -> Callable:
        def tap(module, query, key, attention_mask, scaling, bias=None):
            self.maps[layer] = row_probabilities(module, query.detach(), key.detach(), attention_mask, scaling,
                                                 self.rows, bias)

        return tap

    def __enter__(self) -> "RowRecorder":
        register_rows_implementation()
        self.owner = threading.get_ident()
        with _TAPS_LOCK:
            busy = [layer for layer, m in self.modules.items() if id(m) in _ROW_TAPS]
            if busy:
                raise RuntimeError(f"attention layers {busy} are already being recorded")
            for layer, module in self.modules.items():
                _ROW_TAPS[id(module)] = (self.owner, self._tap(layer))
                self._ids.append(id(module))
        return self

    def remove(self) -> None:
        with _TAPS_LOCK:
            for key in self._ids:
                _ROW_TAPS.pop(key, None)
            self._ids.clear()

    def __exit__(self, *exc) -> None:
        self.remove()
