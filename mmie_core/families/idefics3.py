"""Idefics3 / SmolVLM: the image stretched onto whole tiles plus a global view, each tile a SigLIP-style
grid (no CLS) whose patches are pixel-shuffled into a few language-model tokens, each run of tokens
announced by a marker (`<row_r_col_c>`, `<global-img>`)."""

from __future__ import annotations

from ..patches import tiled_layout, tiled_view
from .base import Family


class Idefics3Family(Family):
    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    chat = True
    fixed_grid = False  # the number of tiles follows the image
    # a tile that is exactly 0 everywhere is padding to Idefics3 and is dropped: "no image" is a hair above it
    zero_input = 1e-4

    def vision_tower(self, model):
        return model.model.vision_model

    def processor_view(self, loaded, image):
        return tiled_view(loaded, image)

    def language_model(self, model):
        return model.model.text_model

    def answer_layout(self, loaded, inputs, prompt_ids):
        layout = tiled_layout(loaded, prompt_ids)
        return layout, self.vision_grid(loaded), _positions(layout, prompt_ids)

    def language_tokens_note(self, loaded, grid, n_image_tokens: int) -> str:
        return (f"In the language model the image is **{n_image_tokens} tokens** (every view's pixel-shuffled "
                "tokens), each view announced by a marker token.")


def _positions(layout, prompt_ids):
    import torch

    return torch.tensor(layout.positions, dtype=torch.long, device=prompt_ids.device)


FAMILY = Idefics3Family()
