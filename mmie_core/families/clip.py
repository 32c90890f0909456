"""CLIP: a dual encoder whose vision tower prepends a CLS token and is read through it alone."""

from __future__ import annotations

from .base import Family


class CLIPFamily(Family):
    name = "clip"
    model_types = ("clip",)
    zero_shot = True
    label_activation = "softmax"  # one label wins: softmax over the labels
    patch_states_normed = False  # the tower's final norm is applied to the pooled CLS token only

    def model_class(self):
        import transformers

        return transformers.CLIPModel

    def vision_tower(self, model):
        return model.vision_model

    def feature_block(self, loaded, n_blocks: int) -> int:
        # the pooled output reads only the CLS token of the last block, so the last block's patch
        # tokens never reach the score: the block before it is the last whose patches matter
        return n_blocks - 2

    def text_kwargs(self) -> dict:
        return dict(padding=True, truncation=True)


FAMILY = CLIPFamily()
