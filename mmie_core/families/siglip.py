"""SigLIP (and the fixed-resolution SigLIP 2 checkpoints, model_type "siglip"): a dual encoder with
no CLS token (an attention-pooling head reads every patch) and an independent sigmoid per label."""

from __future__ import annotations

from .base import Family

SIGLIP_TEXT_LENGTH = 64  # SigLIP was trained on text padded to 64 tokens: pad the same way


class SiglipFamily(Family):
    name = "siglip"
    model_types = ("siglip",)
    zero_shot = True
    label_activation = "sigmoid"  # each label on its own: a sigmoid with the learned bias

    def model_class(self):
        import transformers

        return transformers.AutoModel

    def vision_tower(self, model):
        return model.vision_model

    def text_kwargs(self) -> dict:
        return dict(padding="max_length", max_length=SIGLIP_TEXT_LENGTH, truncation=True)


FAMILY = SiglipFamily()
