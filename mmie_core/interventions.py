"""Interventions: what an answer causally depends on, measured by changing the model's computation.

Every heatmap of `explain` is correlational (where attention or gradients go). These functions change
the computation and watch the answer token's probability:

- attention knockout (Geva et al. 2023; Zhang et al., "Cross-modal Information Flow in Multimodal
  Large Language Models", CVPR 2025): attention edges from chosen query positions to chosen key
  positions are removed in a window of language-model layers, through the attention mask each
  layer receives (a forward pre-hook on the layer's attention module; no attention matrix is
  copied). Several blocks run as one batch: each batch row carries its own blocked edges.
- activation patching (causal tracing, Meng et al. 2022): the residual stream entering a decoder
  layer at chosen image positions is copied from a clean run into a run on a corrupted image (a
  ShapesWorld counterfactual, a blurred region, a user's edited copy), and the share of the clean
  answer's log-probability that comes back is reported per (layer, image token).

Positions are indices into the subject's sequence (prompt + answer). Query sets:
- "answer": the position whose output predicts the explained answer token;
- "question": the prompt's text after the last image token (the question and the chat template's
  words around it; answer tokens before the explained one are not part of it);
- "text": every position that is not an image token (tile markers and line breaks between tiles are
  text: they attend to the tiles before them, so leaving them out would leak the image around a block).
Key sets are image tokens: all of them, those of a box or of map cells (a token belongs to every
map cell its footprint covers, read from the subject's layout), or any explicit list.

Each function takes a `VLMSubject` (explain.make_subject) of a chat model whose image tokens sit in
its language model's sequence (LLaVA, PaliGemma, Idefics3 / SmolVLM, Qwen2-VL).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from .chat import language_model
from .cost import check_passes
from .heatmap import PatchHeatmap
from .limits import check_deadline

QUERY_SETS = ("answer", "question", "text")
FLOW_EDGES = {  # (queries, keys) of the information-flow view, in the order it draws them
    "image → question": ("question", "image"),
    "image → answer": ("answer", "image"),
    "question → answer": ("answer", "question"),
}
BATCH = 16  # intervened forward passes run together, at most
TOKENS_PER_BATCH = 32_768  # vision + language tokens of one batch, at most


@contextmanager
def pre_hooks(pairs: Iterable[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    """Forward pre-hooks (with keyword arguments) on modules while open; always removed."""
    handles = []
    try:
        for module, fn in pairs:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- positions


def check_subject(subject) -> None:
    """Interventions need a language model whose sequence holds the image tokens."""
    loaded = subject.loaded
    covered = ("attention knockout and activation patching cover chat models whose answer follows the image tokens "
               "in one sequence (LLaVA, PaliGemma, Idefics3, Qwen2-VL, BLIP-2 OPT, InstructBLIP Vicuna).")
    if not hasattr(subject, "sequence") or loaded.adapter.captions:
        raise ValueError(f"{loaded.name} reads the image through cross-attention, not as tokens of its "
                         f"language model's sequence: {covered}")
    if loaded.adapter.encoder_decoder(loaded.model):
        raise ValueError(f"{loaded.name}'s language model is an encoder-decoder: the image tokens are in its "
                         f"encoder's sequence and the answer in its decoder's, which reads them through "
                         f"cross-attention: {covered}")


def image_positions(subject) -> list[int]:
    """Sequence positions of the image tokens that carry patches, in the layout's order (a CLS image token
    excluded)."""
    return [int(p) for p in subject.image_positions]


def all_image_positions(subject) -> list[int]:
    """Every image-token position of the sequence (CLS image tokens included)."""
    ids = subject.input_ids.reshape(-1)
    return (ids == subject.loaded.model.config.image_token_id).nonzero().flatten().tolist()


def query_positions(subject, which: str) -> list[int]:
    """Positions of a query set (see the module docstring)."""
    if which not in QUERY_SETS:
        raise ValueError(f"queries must be one of {', '.join(QUERY_SETS)}, not {which!r}")
    answer = int(subject.position)
    if which == "answer":
        return [answer]
    images = all_image_positions(subject)
    text = sorted(set(range(int(subject.input_ids.shape[-1]))) - set(images))  # tile markers count as text
    if which == "text":
        return text
    end = min(answer, int(subject.sequence.prompt_length))  # earlier answer tokens are not the question
    return [p for p in text if max(images) < p < end]


def footprints(subject) -> np.ndarray:
    """(image tokens, rows, cols): the map cells each image token covers (its one-hot through the layout)."""
    n = len(subject.image_positions)
    out = []
    for k in range(n):
        one = torch.zeros(n, dtype=torch.float64)
        one[k] = 1.0
        out.append(subject.layout.token_map(one))
    return np.stack(out)


def require_patch_tokens(subject, what: str) -> None:
    """Refuse a selection by image region where the image tokens carry no region: a Q-Former model's queries
    each read the whole image (their footprint through the layout is a reading, non-zero on every cell)."""
    from .patches import QueryLayout

    if isinstance(subject.layout, QueryLayout):
        raise ValueError(f"{subject.loaded.name}'s image tokens are Q-Former queries, each reading the whole "
                         f"image, so {what} selects no particular tokens. Use the whole image (keys 'image') or "
                         "one query at a time (window 0, each query's effect spread over the patches it read).")


def tokens_in_cells(subject, cells: Sequence[tuple[int, int]]) -> list[int]:
    """Indices (into `image_positions`) of the image tokens that cover any of `cells` of the map."""
    require_patch_tokens(subject, "a box or map cells")
    feet = footprints(subject)
    rows, cols = feet.shape[1:]
    chosen = np.zeros((rows, cols), dtype=bool)
    for r, c in cells:
        if not (0 <= r < rows and 0 <= c < cols):
            raise ValueError(f"cell ({r}, {c}) is outside the {rows}x{cols} map")
        chosen[r, c] = True
    return [k for k in range(len(feet)) if (feet[k][chosen] > 0).any()]


def cells_in_box(subject, box: tuple[float, float, float, float]) -> list[tuple[int, int]]:
    """Map cells that overlap `box` (x0, y0, x1, y1 in original-image pixels)."""
    from .metrics import box_overlap

    overlap = box_overlap(empty_map(subject), box)
    return [(int(r), int(c)) for r, c in zip(*np.nonzero(overlap > 0))]


def empty_map(subject, method: str = "", values: np.ndarray | None = None, **params) -> PatchHeatmap:
    rows, cols = subject.layout.shape
    return PatchHeatmap(np.zeros((rows, cols)) if values is None else values, method, subject.target,
                        subject.view.box, subject.view.original_size, params, subject.loaded.name)


# --------------------------------------------------------------------------- knockout


@dataclass(frozen=True)
class Block:
    """Attention edges removed in one forward pass: every query in `queries` stops attending to every key
    in `keys` (sequence positions) in the language-model layers `layers`."""

    queries: tuple[int, ...]
    keys: tuple[int, ...]
    layers: tuple[int, ...]


NO_BLOCK = Block((), (), ())


def _allowed(mask: torch.Tensor | None, length: int, device) -> torch.Tensor:
    """The attention mask a layer received as booleans (True = may attend), (b, 1, q, k)."""
    if mask is None:  # sdpa's causal fast path: no mask was built
        return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # eager: 0 where allowed, the dtype's minimum where not


@contextmanager
def knocked_out(subject, blocks: Sequence[Block]) -> Iterator[None]:
    """While open, a forward pass of batch len(blocks) removes blocks[b]'s edges from batch row b."""
    check_subject(subject)
    modules = subject.loaded.adapter.answer_layers(subject.loaded.model)
    length = int(subject.input_ids.shape[-1])
    device = subject.input_ids.device
    edges = torch.zeros(len(blocks), 1, length, length, dtype=torch.bool, device=device)  # (B, 1, q, k) blocked
    active: dict[int, torch.Tensor] = {}  # layer -> (B,) rows whose block covers it
    for b, block in enumerate(blocks):
        q = torch.tensor(block.queries, dtype=torch.long, device=device)
        k = torch.tensor(block.keys, dtype=torch.long, device=device)
        edges[b, 0, q[:, None], k[None, :]] = True
        for layer in block.layers:
            if not -len(modules) <= layer < len(modules):
                raise ValueError(f"layer {layer} is outside the language model's {len(modules)} layers")
            layer %= len(modules)
            active.setdefault(layer, torch.zeros(len(blocks), dtype=torch.bool, device=device))[b] = True
    edges &= ~torch.eye(length, dtype=torch.bool, device=device)  # a position always keeps itself (no empty row)

    def hook(layer):
        def pre_hook(module, args, kwargs):
            if "attention_mask" not in kwargs:
                raise RuntimeError(f"{type(module).__name__} takes its attention mask positionally; knockout "
                                   "needs it as a keyword argument")
            mask = kwargs["attention_mask"]
            if isinstance(mask, dict):
                raise RuntimeError("this model passes one attention mask per layer type; knockout needs a tensor")
            blocked = edges & active[layer][:, None, None, None]  # (B, 1, q, k)
            allowed = _allowed(mask, length, device) & ~blocked
            if mask is None or mask.dtype == torch.bool:
                kwargs["attention_mask"] = allowed
            else:
                kwargs["attention_mask"] = torch.zeros(allowed.shape, dtype=mask.dtype, device=device).masked_fill_(
                    ~allowed, torch.finfo(mask.dtype).min)
            return args, kwargs
        return pre_hook

    with pre_hooks((modules[layer], hook(layer)) for layer in active):
        yield


def batched_pixels(pixel_values: torch.Tensor, batch: int) -> torch.Tensor:
    """(1, ...) pixel input -> (batch, ...) copies (contiguous: Idefics3 views its tiles as one batch)."""
    return pixel_values.expand(batch, *pixel_values.shape[1:]).contiguous()


def batch_size(subject) -> int:
    """Intervened passes run together: BATCH, fewer when one pass is long (tiles, large images)."""
    from .cost import _shape

    vision_tokens, lm_tokens, _, _, _ = _shape(subject)
    return max(1, min(BATCH, TOKENS_PER_BATCH // max(vision_tokens + lm_tokens, 1)))


def _answer_logits(subject, batch: int) -> torch.Tensor:  # (batch, vocab) float32 at the answer position
    check_deadline()
    inputs = subject.sequence.model_inputs(batch, batched_pixels(subject.pixel_values, batch))
    return subject.loaded.adapter.answer_logits(subject.loaded, inputs, subject.position)


def run_blocks(subject, blocks: Sequence[Block], batch: int | None = None, progress=None) -> torch.Tensor:
    """(len(blocks), vocab) float32 answer-position logits, one forward pass per block, `batch` at a time
    (default: `batch_size`)."""
    batch = batch or batch_size(subject)
    out = []
    with torch.inference_mode():
        for start in range(0, len(blocks), batch):
            chunk = blocks[start:start + batch]
            with knocked_out(subject, chunk):
                out.append(_answer_logits(subject, len(chunk)))
            if progress is not None:
                progress(min(start + batch, len(blocks)), len(blocks))
    return torch.cat(out)


@dataclass
class Outcome:
    """The answer token's probability and the top answer of one forward pass."""

    probability: float
    log_probability: float
    top_token: str
    top_probability: float

    def to_json(self) -> dict:
        return {"probability": round(self.probability, 6), "log_probability": round(self.log_probability, 6),
                "top_token": self.top_token, "top_probability": round(self.top_probability, 6)}


def outcomes(subject, logits: torch.Tensor) -> list[Outcome]:
    log_probs = logits.float().log_softmax(-1)
    top = log_probs.argmax(-1)
    decode = subject.loaded.processor.tokenizer.decode
    return [Outcome(float(lp[subject.token_id].exp()), float(lp[subject.token_id]), decode([int(t)]).strip(),
                    float(lp[t].exp())) for lp, t in zip(log_probs, top)]


def _n_layers(subject) -> int:
    return len(subject.loaded.adapter.answer_layers(subject.loaded.model))


def key_positions(subject, keys) -> list[int]:
    """Sequence positions of a key selection: "image" (every image token), "question", "text", a box
    {"box": (x0, y0, x1, y1)} in original-image pixels, {"cells": [(row, col), ...]} of the map, or
    {"tokens": [k, ...]} indices into the image tokens."""
    images = image_positions(subject)
    if isinstance(keys, str):
        if keys == "image":
            return all_image_positions(subject)
        return query_positions(subject, keys)
    if "box" in keys:
        tokens = tokens_in_cells(subject, cells_in_box(subject, tuple(keys["box"])))
    elif "cells" in keys:
        tokens = tokens_in_cells(subject, [tuple(c) for c in keys["cells"]])
    elif "tokens" in keys:
        tokens = list(keys["tokens"])
    else:
        raise ValueError("keys: 'image', 'question', 'text', {'box': ...}, {'cells': [...]} or {'tokens': [...]}")
    if not tokens:
        raise ValueError("the selection covers no image token")
    return [images[k] for k in tokens]


def knockout(subject, queries: str = "text", keys="image", layers: Sequence[int] | None = None) -> dict:
    """The answer with and without the edges queries -> keys in `layers` (default: every layer).

    `{"clean", "blocked"}` (Outcome JSON), `"drop"` (clean - blocked probability), `"relative_drop"`
    (drop / clean), `"edges"` (queries x keys x layers)."""
    layers = tuple(range(_n_layers(subject))) if layers is None else tuple(layers)
    q, k = query_positions(subject, queries), key_positions(subject, keys)
    check_passes(subject, "knockout", 2)
    clean, blocked = outcomes(subject, run_blocks(subject, [NO_BLOCK, Block(tuple(q), tuple(k), layers)]))
    return {"clean": clean.to_json(), "blocked": blocked.to_json(),
            "drop": round(clean.probability - blocked.probability, 6),
            "relative_drop": round((clean.probability - blocked.probability) / max(clean.probability, 1e-12), 6),
            "edges": len(q) * len(k) * len(layers), "queries": queries, "layers": list(layers)}


def windows(n_layers: int, window: int) -> list[tuple[int, ...]]:
    """Every run of `window` consecutive layers, sliding by one."""
    if not 1 <= window <= n_layers:
        raise ValueError(f"window must be between 1 and {n_layers} layers")
    return [tuple(range(s, s + window)) for s in range(n_layers - window + 1)]


def window_sweep(subject, queries: str = "text", keys="image", window: int = 1, progress=None) -> dict:
    """The answer token's probability with queries -> keys blocked in each window of `window` layers.

    `{"clean": p, "windows": [[first, last], ...], "probability": [...], "relative_drop": [...]}`."""
    spans = windows(_n_layers(subject), window)
    q, k = tuple(query_positions(subject, queries)), tuple(key_positions(subject, keys))
    check_passes(subject, "a knockout sweep", len(spans) + 1)
    results = outcomes(subject, run_blocks(subject, [NO_BLOCK] + [Block(q, k, s) for s in spans], progress=progress))
    clean = results[0].probability
    return {"clean": clean, "windows": [[s[0], s[-1]] for s in spans],
            "probability": [r.probability for r in results[1:]],
            "relative_drop": [(clean - r.probability) / max(clean, 1e-12) for r in results[1:]]}


def token_groups(subject, window: int = 0) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(image-token indices, map cells) per unit of a map: each image token and the cells it covers
    (window 0), or each square of `window` x `window` cells and every token that covers one of them."""
    rows, cols = subject.layout.shape
    if window < 0:
        raise ValueError("window must be 0 (each image token) or a number of map cells")
    if window:
        require_patch_tokens(subject, "a square of map cells")
    if not window:
        feet = footprints(subject)
        return [([k], [(int(r), int(c)) for r, c in zip(*np.nonzero(f))]) for k, f in enumerate(feet)]
    squares = [[(r, c) for r in range(r0, min(r0 + window, rows)) for c in range(c0, min(c0 + window, cols))]
               for r0 in range(0, rows, window) for c0 in range(0, cols, window)]
    return [(tokens_in_cells(subject, cells), cells) for cells in squares]


def group_map(subject, groups, values, window: int) -> np.ndarray:
    """Per-group values -> (rows, cols): through the layout per token (window 0), or filled per square."""
    if not window:
        return subject.layout.token_map(torch.as_tensor(np.asarray(values, dtype=np.float64)))
    out = np.zeros(subject.layout.shape)
    for (_, cells), v in zip(groups, values):
        for r, c in cells:
            out[r, c] = v
    return out


def knockout_map(subject, queries: str = "text", layers: Sequence[int] | None = None, window: int = 0,
                 progress=None) -> PatchHeatmap:
    """The drop of the answer token's log-probability when `queries` stop attending to image tokens (in
    `layers`, default all), on the map: per image token (window 0, each token's drop placed through the
    layout), or per square of `window` x `window` map cells (every token that covers a cell of the square
    blocked at once; each cell shows its square's drop: fewer passes on a large map).

    Log-probability, not probability: a confident answer (p = 0.999) hardly moves in probability when one
    of several tokens that show the object is blocked, but it does in log-probability."""
    layers = tuple(range(_n_layers(subject))) if layers is None else tuple(layers)
    q = tuple(query_positions(subject, queries))
    images = image_positions(subject)
    groups = token_groups(subject, window)
    check_passes(subject, "a knockout map", len(groups) + 1)
    blocks = [NO_BLOCK] + [Block(q, tuple(images[k] for k in tokens), layers) for tokens, _ in groups]
    results = outcomes(subject, run_blocks(subject, blocks, progress=progress))
    lp = np.array([r.log_probability for r in results])
    values = group_map(subject, groups, lp[0] - lp[1:], window)
    heatmap = empty_map(subject, "knockout", values, queries=queries, layers=list(layers), window=window)
    heatmap.params["clean_probability"] = results[0].probability
    return heatmap


def information_flow(subject, window: int = 1, progress=None) -> dict:
    """How the answer's probability falls when each flow of FLOW_EDGES is cut in each window of layers,
    and one plain-language sentence per flow about where it matters most.

    `{"clean", "windows", "flows": {name: relative drops}, "summary": [sentences]}`."""
    n = _n_layers(subject)
    spans = windows(n, window)
    edges = {name: (tuple(query_positions(subject, q)), tuple(key_positions(subject, k)))
             for name, (q, k) in FLOW_EDGES.items()}
    blocks = [NO_BLOCK] + [Block(q, k, s) for q, k in edges.values() for s in spans]
    check_passes(subject, "the information-flow sweep", len(blocks))
    probs = [r.probability for r in outcomes(subject, run_blocks(subject, blocks, progress=progress))]
    clean = probs[0]
    flows = {}
    for i, name in enumerate(edges):
        chunk = probs[1 + i * len(spans): 1 + (i + 1) * len(spans)]
        flows[name] = [(clean - p) / max(clean, 1e-12) for p in chunk]
    return {"clean": clean, "windows": [[s[0], s[-1]] for s in spans], "flows": flows,
            "summary": flow_summary(flows, spans, n)}


def flow_summary(flows: dict[str, list[float]], spans: list[tuple[int, ...]], n_layers: int,
                 threshold: float = 0.05) -> list[str]:
    """One sentence per flow: at which depth cutting it hurts the answer most, or that no window matters."""
    out = []
    for name, drops in flows.items():
        best = int(np.argmax(drops))
        span = spans[best]
        where = f"layer {span[0]}" if len(span) == 1 else f"layers {span[0]}-{span[-1]}"
        depth = ((span[0] + span[-1]) / 2 + 0.5) / n_layers  # the window's centre, 0..1
        part = "early" if depth < 1 / 3 else "middle" if depth < 2 / 3 else "late"
        source, _, target = name.partition(" → ")
        if drops[best] < threshold:
            out.append(f"Cutting {source} → {target} in any one window of {len(span)} layer(s) changes the answer's "
                       f"probability by less than {threshold:.0%}: no single window carries it.")
        else:
            out.append(f"The {source} reaches the {target} mostly at {where} ({part} of {n_layers} layers): cutting it "
                       f"there lowers the answer's probability by {drops[best]:.0%}.")
    return out


# --------------------------------------------------------------------------- activation patching


@contextmanager
def residual_patch(subject, clean: dict[int, torch.Tensor], plan: Sequence[tuple[int, tuple[int, ...]]]) -> Iterator[None]:
    """While open, batch row b of a forward pass gets the residual stream entering decoder layer
    plan[b][0] at positions plan[b][1] replaced by `clean[layer]` ((1, length, D): a clean run's)."""
    layers = language_model(subject.loaded).layers
    length = int(subject.input_ids.shape[-1])
    replace: dict[int, torch.Tensor] = {}
    for b, (layer, positions) in enumerate(plan):
        if not positions:
            continue
        if layer not in replace:
            replace[layer] = torch.zeros(len(plan), length, 1, dtype=torch.bool, device=subject.input_ids.device)
        replace[layer][b, list(positions)] = True  # (B, length, 1)

    def hook(layer):
        def pre_hook(module, args, kwargs):
            if args:
                hidden = args[0]
                return (torch.where(replace[layer], clean[layer].to(hidden.dtype), hidden), *args[1:]), kwargs
            hidden = kwargs["hidden_states"]
            kwargs["hidden_states"] = torch.where(replace[layer], clean[layer].to(hidden.dtype), hidden)
            return args, kwargs
        return pre_hook

    with pre_hooks((layers[layer], hook(layer)) for layer in replace):
        yield


def residual_streams(subject, pixel_values: torch.Tensor | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({layer: (1, length, D) residual stream entering the layer}, (1, vocab) answer logits) of one run."""
    layers = language_model(subject.loaded).layers
    streams: dict[int, torch.Tensor] = {}

    def hook(layer):
        def pre_hook(module, args, kwargs):
            streams[layer] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return pre_hook

    with pre_hooks((layer, hook(i)) for i, layer in enumerate(layers)), torch.inference_mode():
        check_deadline()
        inputs = subject.sequence.model_inputs(1, pixel_values)
        logits = subject.loaded.adapter.answer_logits(subject.loaded, inputs, subject.position)
    return streams, logits


@dataclass
class PatchingResult:
    """Activation patching of image positions from a clean run into a corrupted one."""

    restored: np.ndarray  # (layers, groups): share of the clean answer's log-prob gap restored
    per_layer: np.ndarray  # (layers,): every image position patched at once
    clean: Outcome
    corrupted: Outcome
    layers: list[int]  # the decoder layers patched (rows of `restored`)
    cells: list[list[tuple[int, int]]]  # map cells of each group (an image token, or a square of cells)
    maps: list[PatchHeatmap] = field(default_factory=list)  # per layer, on the image

    @property
    def best(self) -> tuple[int, int]:
        """(layer, group) that restores the most (the group is an image token's index for window 0)."""
        row, group = np.unravel_index(int(np.argmax(self.restored)), self.restored.shape)
        return self.layers[int(row)], int(group)

    def to_json(self) -> dict:
        layer, group = self.best
        return {"clean": self.clean.to_json(), "corrupted": self.corrupted.to_json(), "layers": self.layers,
                "per_layer": np.round(self.per_layer, 6).tolist(), "restored": np.round(self.restored, 6).tolist(),
                "best": {"layer": layer, "group": group, "cells": [list(c) for c in self.cells[group]]},
                "maps": [m.to_json() for m in self.maps]}


def patching(subject, corrupted: Image.Image, layers: Sequence[int] | None = None, window: int = 0,
             progress=None) -> PatchingResult:
    """Patch each image token's residual stream (or each square of `window` x `window` map cells: every
    token covering it), and then every image position at once, at each decoder layer from the subject's
    clean image into a run on `corrupted`, and measure the clean answer token's log-probability:
    restored = (patched - corrupted) / (clean - corrupted), 1 = the clean answer fully back.

    The corrupted image must give the same sequence (same size for models whose token count follows the
    image) and must change the answer's log-probability."""
    check_subject(subject)
    other = subject.on_image(corrupted)
    if not torch.equal(other.input_ids, subject.input_ids):
        raise ValueError("the corrupted image gives a different token sequence (another number of image tokens "
                         "or tiles); use a copy of the same size")
    n = _n_layers(subject)
    if layers is not None and any(not -n <= l < n for l in layers):
        raise ValueError(f"layers must lie between {-n} and {n - 1}: the language model has {n} layers")
    layers = list(range(n)) if layers is None else sorted({l % n for l in layers})
    images = image_positions(subject)
    groups = token_groups(subject, window)
    check_passes(subject, "activation patching", len(layers) * (len(groups) + 1) + 2)
    clean_streams, clean_logits = residual_streams(subject)
    _, corrupt_logits = residual_streams(subject, other.pixel_values)
    clean, corrupt = outcomes(subject, torch.cat([clean_logits, corrupt_logits]))
    gap = clean.log_probability - corrupt.log_probability
    if abs(gap) < 1e-3:
        raise ValueError(f"the corrupted image leaves the answer's log-probability where it was ({clean.log_probability:.3f} "
                         f"vs {corrupt.log_probability:.3f}): there is nothing to restore. Change what the answer "
                         "is about (the object's colour or shape, or blur it).")
    plan = [(layer, tuple(images[k] for k in tokens)) for layer in layers for tokens, _ in groups]
    plan += [(layer, tuple(images)) for layer in layers]
    scores = []
    batch = batch_size(subject)
    with torch.inference_mode():
        for start in range(0, len(plan), batch):
            chunk = plan[start:start + batch]
            check_deadline()
            with residual_patch(subject, clean_streams, chunk):
                inputs = subject.sequence.model_inputs(len(chunk), batched_pixels(other.pixel_values, len(chunk)))
                logits = subject.loaded.adapter.answer_logits(subject.loaded, inputs, subject.position)
            scores.append(logits.float().log_softmax(-1)[:, subject.token_id])
            if progress is not None:
                progress(min(start + batch, len(plan)), len(plan))
    lp = torch.cat(scores).double().numpy()
    restored = (lp - corrupt.log_probability) / gap
    per_group = restored[: len(layers) * len(groups)].reshape(len(layers), len(groups))
    per_layer = restored[len(layers) * len(groups):]
    maps = [empty_map(subject, "patching", group_map(subject, groups, row, window), layer=layer, window=window)
            for layer, row in zip(layers, per_group)]
    return PatchingResult(per_group, per_layer, clean, corrupt, layers, [cells for _, cells in groups], maps)


def blurred_copy(image: Image.Image, box: tuple[float, float, float, float], radius: float = 8.0) -> Image.Image:
    """The image with `box` (x0, y0, x1, y1, pixels) Gaussian-blurred: a corrupted input for any photo."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0 = max(0, min(x0, image.width)), max(0, min(y0, image.height))
    x1, y1 = max(x0, min(x1, image.width)), max(y0, min(y1, image.height))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError("the region to blur is empty")
    out = image.convert("RGB").copy()
    out.paste(out.crop((x0, y0, x1, y1)).filter(ImageFilter.GaussianBlur(radius)), (x0, y0))
    return out
