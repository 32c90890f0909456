"""Logit lens over image patches: read each image token's hidden state as if it were the last
layer's, through the language model's final norm and LM head.

The residual stream of an image token starts as the projector's output and is rewritten by
every decoder block. Decoding it at each depth shows when (and whether) the language model's
view of a patch turns into words: on shapes-vlm a patch on the red circle may read "red" or
"circle" at some layer. Hidden states are captured with forward hooks on the decoder blocks
(removed in `finally`), only at the image positions, in one sdpa forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .chat import Turn, chat_inputs
from .limits import check_deadline
from .models import LoadedModel
from .patches import image_token_layout, processor_view, vision_grid

DEFAULT_QUESTION = "describe the image."


@dataclass
class LogitLens:
    """Top-k words of every image patch at every captured depth of the language model."""

    model: str
    question: str
    layers: list[int]  # depths: 0 = image features as the language model receives them, l = after block l
    token_ids: np.ndarray  # (depths, rows, cols, k) top-k token ids
    probs: np.ndarray  # (depths, rows, cols, k) their probabilities
    words: list[list[list[list[str]]]]  # [depth][row][col][k] decoded tokens
    box: tuple[float, float, float, float]  # region of the original image the grid covers
    image_size: tuple[int, int]

    @property
    def grid(self) -> tuple[int, int]:
        return self.token_ids.shape[1], self.token_ids.shape[2]

    def depth_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"Depth {layer} was not captured; captured: {self.layers}.")
        return self.layers.index(layer)

    def top_words(self, layer: int) -> list[list[str]]:
        """(rows, cols) of the top-1 word at one depth."""
        d = self.depth_index(layer)
        return [[cell[0] for cell in row] for row in self.words[d]]

    def patch_top_k(self, layer: int, row: int, col: int) -> list[tuple[str, float]]:
        d = self.depth_index(layer)
        rows, cols = self.grid
        if not (0 <= row < rows and 0 <= col < cols):
            raise ValueError(f"Patch ({row}, {col}) is outside the {rows} x {cols} grid.")
        return [(w, float(p)) for w, p in zip(self.words[d][row][col], self.probs[d, row, col])]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "question": self.question,
            "layers": self.layers,
            "grid": list(self.grid),
            "box": [round(float(v), 2) for v in self.box],
            "image_size": list(self.image_size),
            "top_k": [
                {"layer": layer,
                 "words": self.words[d],
                 "probs": np.round(self.probs[d], 4).tolist(),
                 "token_ids": self.token_ids[d].tolist()}
                for d, layer in enumerate(self.layers)
            ],
        }


def _decoder(loaded: LoadedModel):
    """The language model's blocks and final norm (the head is read through the adapter's read_head)."""
    lm = loaded.adapter.language_model(loaded.model)
    return lm.layers, lm.norm


def _first_tensor(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def image_hidden_states(loaded: LoadedModel, inputs: dict, positions: torch.Tensor,
                        layers: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """Residual stream at the image positions, before the final norm.

    Returns (depths, states) with states (depths, batch, image tokens, hidden); depth 0 is the
    input of the first block, depth l the output of block l.
    """
    blocks, _ = _decoder(loaded)
    n = len(blocks)
    depths = list(range(n + 1)) if layers is None else sorted({int(l) for l in layers})
    bad = [d for d in depths if not 0 <= d <= n]
    if bad:
        raise ValueError(f"{loaded.name}'s language model has depths 0 (its input) to {n}; got {bad}.")
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def keep(depth: int, hidden: torch.Tensor) -> None:
        captured[depth] = hidden[:, positions].detach()  # (B, image tokens, D)

    try:
        if 0 in depths:
            handles.append(blocks[0].register_forward_pre_hook(
                lambda m, args, kwargs: keep(0, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        for d in depths:
            if d > 0:
                handles.append(blocks[d - 1].register_forward_hook(
                    lambda m, args, out, d=d: keep(d, _first_tensor(out))))
        with torch.inference_mode():
            loaded.model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return depths, torch.stack([captured[d] for d in depths])


def logit_lens(loaded: LoadedModel, image: Image.Image, question: str = DEFAULT_QUESTION,
               layers: list[int] | None = None, top_k: int = 5, history: list[Turn] | None = None) -> LogitLens:
    """Decode every image token's hidden state at each depth through the final norm and LM head."""
    if not loaded.adapter.token_grid:
        raise ValueError(f"The logit lens reads the hidden states of a language model's image tokens laid out as one "
                         f"grid; {loaded.name} ({loaded.family}) has no such grid.")
    if not 1 <= int(top_k) <= 20:
        raise ValueError("top-k must be between 1 and 20.")
    inputs = dict(chat_inputs(loaded, image, question, history))
    layout = image_token_layout(loaded, inputs["input_ids"])
    grid = vision_grid(loaded)
    first_image = zip(layout.positions[: layout.tokens_per_image], layout.patches[: layout.tokens_per_image])
    kept = [(pos, patch) for pos, patch in first_image if patch is not None]  # the first image's patch tokens
    positions = torch.tensor([pos for pos, _ in kept], device=loaded.device)
    cells = [r * grid.cols + c for _, (r, c) in kept]  # a patch with no image token keeps id -1, probability 0
    depths, states = image_hidden_states(loaded, inputs, positions, layers)  # (depths, 1, patches, D)
    _, norm = _decoder(loaded)
    tokenizer = loaded.processor.tokenizer
    k = int(top_k)
    token_ids = np.full((len(depths), grid.n_patches, k), -1, dtype=np.int64)
    prob_arr = np.zeros((len(depths), grid.n_patches, k), dtype=np.float32)
    with torch.inference_mode():
        for d in range(len(depths)):
            check_deadline()
            hidden = norm(states[d, 0]).float()  # (patch tokens, D), read in float32
            logits = loaded.adapter.read_head(loaded.model, hidden)  # an offloaded head's weights too
            p, i = logits.softmax(-1).topk(k, dim=-1)  # (patch tokens, k)
            token_ids[d, cells] = i.cpu().numpy()
            prob_arr[d, cells] = p.cpu().numpy()
    token_ids = token_ids.reshape(len(depths), grid.rows, grid.cols, k)
    prob_arr = prob_arr.reshape(len(depths), grid.rows, grid.cols, k)
    vocab = {int(t): tokenizer.decode([int(t)]).strip() or tokenizer.convert_ids_to_tokens(int(t))
             for t in np.unique(token_ids) if t >= 0} | {-1: ""}
    words = [[[[vocab[int(t)] for t in cell] for cell in row] for row in depth] for depth in token_ids]
    view = processor_view(loaded, image)
    return LogitLens(loaded.name, question, depths, token_ids, prob_arr, words, view.box, view.original_size)
