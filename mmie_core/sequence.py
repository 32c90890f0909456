"""The prompt exactly as the language model receives it: every token after the processor, with
its kind (text, special, image) and, for image tokens, the patch it carries.

The sequence comes from the same `chat_inputs` the chat uses, and the patch of every image token
from `image_token_layout`, the one token-to-patch mapping of the project.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from .chat import Turn, chat_inputs, special_token_ids
from .models import LoadedModel
from .patches import image_token_layout, processor_view, vision_grid

KINDS = ("text", "special", "image")


@dataclass
class SequenceToken:
    index: int  # position in the language model's sequence
    id: int
    text: str  # the token as the tokenizer writes it (image tokens: their placeholder)
    kind: str  # "text", "special" or "image"
    patch: tuple[int, int, int] | None = None  # (row, col, tile) of an image token; None otherwise

    def to_json(self) -> dict:
        out = {"index": self.index, "id": self.id, "text": self.text, "kind": self.kind}
        if self.patch is not None:
            out["row"], out["col"], out["tile"] = self.patch
        return out


@dataclass
class SequenceView:
    model: str
    family: str
    tokens: list[SequenceToken]
    grid: tuple[int, int]  # (rows, cols) of one image's patches
    box: tuple[float, float, float, float]  # region of the original image the grid covers
    image_size: tuple[int, int]  # original (width, height)
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {k: sum(t.kind == k for t in self.tokens) for k in KINDS}

    @property
    def image_share(self) -> float:
        """Share of the context taken by image tokens (0..1)."""
        return self.counts["image"] / max(1, len(self.tokens))

    def image_groups(self) -> list[dict]:
        """Runs of consecutive image tokens: where each image (tile) starts and ends, and its grid."""
        groups: list[dict] = []
        for t in self.tokens:
            if t.kind != "image":
                continue
            tile = t.patch[2] if t.patch else 0
            if groups and groups[-1]["tile"] == tile and groups[-1]["end"] == t.index - 1:
                groups[-1]["end"] = t.index
                groups[-1]["tokens"] += 1
            else:
                groups.append({"tile": tile, "start": t.index, "end": t.index, "tokens": 1,
                               "grid": list(self.grid)})
        return groups

    def token_at(self, index: int) -> SequenceToken:
        if not 0 <= index < len(self.tokens):
            raise ValueError(f"Token {index} is outside the sequence of {len(self.tokens)} tokens.")
        return self.tokens[index]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "family": self.family,
            "length": len(self.tokens),
            "counts": self.counts,
            "image_share": round(self.image_share, 4),
            "grid": list(self.grid),
            "image_groups": self.image_groups(),
            "box": [round(float(v), 2) for v in self.box],
            "image_size": list(self.image_size),
            "notes": self.notes,
            "tokens": [t.to_json() for t in self.tokens],
        }


def sequence_view(loaded: LoadedModel, image: Image.Image, question: str,
                  history: list[Turn] | None = None) -> SequenceView:
    """Every token of the prompt the language model receives for `question` about `image`."""
    if not loaded.adapter.token_grid:
        raise ValueError(f"The sequence view covers models whose image becomes one grid of tokens in a language "
                         f"model's input; {loaded.name} is a {loaded.family} model.")
    inputs = chat_inputs(loaded, image, question, history)
    ids = inputs["input_ids"][0]
    layout = image_token_layout(loaded, ids)
    grid = vision_grid(loaded)
    patch_of = {pos: (*patch, layout.image_of(k))
                for k, (pos, patch) in enumerate(zip(layout.positions, layout.patches)) if patch is not None}
    tokenizer = loaded.processor.tokenizer
    special = special_token_ids(tokenizer)
    image_id = loaded.model.config.image_token_id
    pieces = tokenizer.convert_ids_to_tokens(ids.tolist())
    tokens = []
    for i, (tid, piece) in enumerate(zip(ids.tolist(), pieces)):
        kind = "image" if tid == image_id else ("special" if tid in special else "text")
        tokens.append(SequenceToken(i, tid, piece, kind, patch_of.get(i)))
    view = processor_view(loaded, image)
    notes = []
    if "token_type_ids" in inputs:
        notes.append("The image tokens and the prompt form a prefix that attends in both directions; "
                     "only the answer is causal.")
    else:
        notes.append("Attention is causal: image tokens come before the question, so they never see it.")
    if any(p is None for p in layout.patches):
        notes.append("The first image token of each image is the vision tower's CLS summary, not a patch.")
    if (0, 0) not in layout.patches:
        notes.append("The top-left patch has no image token: the feature selection strategy 'default' drops the "
                     "first vision token, and this vision tower has no CLS token, so it drops a patch.")
    return SequenceView(loaded.name, loaded.family, tokens, (grid.rows, grid.cols), view.box, view.original_size, notes)
