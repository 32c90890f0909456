"""What an explanation will cost, estimated before it runs, and refused with advice when too much.

At a real checkpoint's geometry a request can be far heavier than on the embedded models: occlusion on
SmolVLM with 17 tiles is about 1,100 forward passes of 18,000 tokens; rollout and relevancy keep an
attention map of (sequence x sequence) per head and layer. `estimate` counts forward passes (a
backward pass counts as two) and the tokens of each pass (every vision token of every image or tile,
plus the language model's sequence), and the bytes of attention kept at once; `check` refuses a
request over the limits with a message that says what to change.

Limits (environment): MMIE_MAX_WORK, token-passes (default 5,000,000: about a minute of CPU for a
base-size model); MMIE_MAX_ATTENTION_MB, attention kept at once (default 4096).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

DEFAULT_MAX_WORK = 5_000_000
DEFAULT_MAX_ATTENTION_MB = 4096


class CostLimitError(ValueError):
    """The request would cost more than the limits allow; the message says what to change."""


@dataclass(frozen=True)
class Cost:
    """The estimated cost of one explanation."""

    method: str
    passes: int  # forward-pass equivalents (a backward pass counts as two)
    tokens: int  # tokens per pass: vision tokens of every image or tile + the language model's sequence
    attention_bytes: int  # attention probabilities (and their gradients) kept at once

    @property
    def work(self) -> int:
        """Token-passes: what the time grows with."""
        return self.passes * self.tokens

    def to_json(self) -> dict:
        return {"method": self.method, "passes": self.passes, "tokens": self.tokens, "work": self.work,
                "attention_mb": round(self.attention_bytes / 2**20, 1)}


def _limit(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise CostLimitError(f"{name}={raw!r} is not a number.") from None
    return value if value > 0 else math.inf  # 0 or less: no limit


def _heads(config) -> int:
    return int(getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None) or 1)


def _shape(subject) -> tuple[int, int, int, int, int]:
    """(vision tokens per pass, language tokens, views, vision layers x heads, LM layers x heads)."""
    from .families import vision_config

    grid, loaded = subject.grid, subject.loaded
    views = subject.pixel_values.shape[1] if subject.pixel_values.dim() == 5 else 1  # Idefics3 tiles
    vision_tokens = views * grid.n_tokens
    vcfg = vision_config(loaded.model.config)
    n_vision_blocks = len(loaded.adapter.vision_blocks(subject.vision))
    vision_lh = n_vision_blocks * _heads(vcfg)
    input_ids = getattr(subject, "input_ids", None)
    if input_ids is None:  # a dual encoder: the label embeddings are computed once and cached
        return vision_tokens, 0, views, vision_lh, 0
    text = loaded.model.config.get_text_config()
    lm_lh = len(loaded.adapter.answer_layers(loaded.model)) * _heads(text)
    return vision_tokens, int(input_ids.shape[-1]), views, vision_lh, lm_lh


def _windows(subject, window: int, stride: int) -> int:
    """Occlusion windows over one view: its map cells (tokens) in rows and columns."""
    rows, cols = subject.grid.rows // subject.layout.unit, subject.grid.cols // subject.layout.unit
    return (max(rows - window, 0) // stride + 1) * (max(cols - window, 0) // stride + 1)


def estimate(subject, method: str, params: dict) -> Cost:
    """Passes, tokens and attention memory of `method` on `subject` with `params`."""
    vision_tokens, lm_tokens, views, vision_lh, lm_lh = _shape(subject)
    tokens = vision_tokens + lm_tokens
    width = 4  # attention kept in float32
    if lm_tokens:
        maps = lm_lh * lm_tokens * lm_tokens * width  # every LM layer and head, sequence x sequence
    else:
        maps = vision_lh * vision_tokens * vision_tokens * width // views
    if method == "attention":
        passes, attention = 1, (lm_lh * lm_tokens * width if lm_tokens else maps)  # rows only for an answer token
    elif method == "rollout":
        passes, attention = 1, maps
    elif method == "relevancy":
        passes, attention = 3, 2 * maps  # maps and their gradients
        if params.get("through_vision"):
            attention += 2 * vision_lh * (vision_tokens // views) ** 2 * width
    elif method == "integrated_gradients":
        passes, attention = 3 * int(params.get("steps", 32)) + 2, 0  # + score(image), score(baseline)
    elif method == "saliency":
        passes, attention = 3 * (int(params.get("samples", 16)) if params.get("smooth") else 1), 0
    elif method == "occlusion":
        window = int(params.get("window", 1))
        stride = int(params.get("stride", 1))
        passes, attention = views * _windows(subject, window, stride) + 1, 0
    else:  # gradcam, and anything with one forward and one backward pass
        passes, attention = 3, 0
    return Cost(method, passes, tokens, attention)


def _advice(subject, cost: Cost, params: dict) -> str:
    views = subject.pixel_values.shape[1] if subject.pixel_values.dim() == 5 else 1
    tips = []
    if cost.method == "occlusion":
        cells = min(subject.grid.rows, subject.grid.cols) // subject.layout.unit
        for window in range(int(params.get("window", 1)) + 1, cells + 1):
            fewer = Cost("occlusion", views * _windows(subject, window, window) + 1, cost.tokens, 0)
            if fewer.work <= _limit("MMIE_MAX_WORK", DEFAULT_MAX_WORK):
                tips.append(f"a larger occlusion window (window={window}, stride={window} needs {fewer.passes} passes)")
                break
    if cost.method == "integrated_gradients":
        tips.append("fewer integrated-gradient steps")
    if cost.method == "saliency" and params.get("smooth"):
        tips.append("fewer SmoothGrad samples")
    if views > 1:
        tips.append(f"a smaller image (it was cut into {views - 1} tiles plus a global view; fewer tiles, fewer tokens)")
    elif cost.method in ("rollout", "relevancy") or cost.attention_bytes:
        tips.append("a smaller image where the processor follows the image's size (smaller max_pixels)")
    tips.append("a cheaper method (attention reads one row per layer; gradcam is one backward pass)")
    return "Try " + ", or ".join(tips) + "."


def check(subject, method: str, params: dict) -> Cost:
    """The cost of the request, or CostLimitError with what to change."""
    cost = estimate(subject, method, params)
    max_work = _limit("MMIE_MAX_WORK", DEFAULT_MAX_WORK)
    max_bytes = _limit("MMIE_MAX_ATTENTION_MB", DEFAULT_MAX_ATTENTION_MB) * 2**20
    if cost.work > max_work:
        raise CostLimitError(
            f"{method} here needs about {cost.passes:,} forward passes of {cost.tokens:,} tokens "
            f"({cost.work / 1e6:.1f} M token-passes; the limit is {max_work / 1e6:.1f} M, MMIE_MAX_WORK). "
            + _advice(subject, cost, params))
    if cost.attention_bytes > max_bytes:
        raise CostLimitError(
            f"{method} here keeps about {cost.attention_bytes / 2**30:.1f} GB of attention maps (every layer and "
            f"head, {cost.tokens:,} tokens squared; the limit is {max_bytes / 2**30:.1f} GB, MMIE_MAX_ATTENTION_MB). "
            + _advice(subject, cost, params))
    return cost


def check_passes(subject, what: str, passes: int) -> Cost:
    """The cost of `passes` plain forward passes over the subject's inputs (interventions), or
    CostLimitError with what to change."""
    vision_tokens, lm_tokens, _, _, _ = _shape(subject)
    cost = Cost(what, passes, vision_tokens + lm_tokens, 0)
    max_work = _limit("MMIE_MAX_WORK", DEFAULT_MAX_WORK)
    if cost.work > max_work:
        raise CostLimitError(
            f"{what} here needs about {passes:,} forward passes of {cost.tokens:,} tokens ({cost.work / 1e6:.1f} M "
            f"token-passes; the limit is {max_work / 1e6:.1f} M, MMIE_MAX_WORK). Try fewer layers (a wider window "
            "or chosen layers), a selection of patches instead of every one, a coarser knockout map (a window of "
            "cells), or a smaller image.")
    return cost
