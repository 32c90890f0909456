"""LLaVA: a vision tower (CLIP with a CLS token, or SigLIP without) whose hidden states of
`vision_feature_layer` (one layer, or several concatenated) are projected into the language model
as image tokens. Strategy "default" drops the first vision token (the CLS token, or on a tower
without one the first patch, as transformers does), "full" keeps every token."""

from __future__ import annotations

from .base import Family, UnsupportedModel, vision_config


def _block_of(layer: int, n_blocks: int) -> int:
    """The block whose output is hidden_states[layer] (n_blocks + 1 of them: hidden_states[0] is the
    embeddings, read as block -1)."""
    return (layer if layer >= 0 else n_blocks + 1 + layer) - 1


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)
    chat = True
    token_grid = True

    def check_config(self, config) -> None:
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise UnsupportedModel(f"vision_feature_select_strategy {strategy!r} is not one of 'default', 'full'")
        self.prefix_tokens(config)  # a tower type the studio knows

    def check_loaded(self, model, processor) -> None:
        """The processor writes patches + num_additional_image_tokens placeholders per image (one fewer
        with strategy 'default'); the model gives prefix + patches features (one fewer with 'default').
        They agree only when num_additional_image_tokens is the tower's prefix count."""
        config = model.config
        extra = getattr(processor, "num_additional_image_tokens", None)
        prefix = self.prefix_tokens(config)
        if extra is not None and extra != prefix:
            grid = vision_config(config).image_size // vision_config(config).patch_size
            drop = 1 if config.vision_feature_select_strategy == "default" else 0
            raise UnsupportedModel(
                f"this checkpoint's processor adds {extra} extra image token(s) per image "
                f"(num_additional_image_tokens={extra}) but its vision tower has {prefix} token(s) before the "
                f"patches: with strategy {config.vision_feature_select_strategy!r} the prompt gets "
                f"{grid * grid + extra - drop} image placeholders while the model gives {grid * grid + prefix - drop} "
                f"image features, and the model cannot run. Set num_additional_image_tokens to {prefix} in the "
                "processor config (with vision_feature_select_strategy 'full' on a tower without a CLS token, as "
                "later revisions of such checkpoints do).")

    def first_vision_token(self, loaded) -> int:
        return 1 if loaded.model.config.vision_feature_select_strategy == "default" else 0

    def feature_layers(self, config) -> list[int]:
        layer = config.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    def feature_block(self, loaded, n_blocks: int) -> int:
        return max(0, max(_block_of(l, n_blocks) for l in self.feature_layers(loaded.model.config)))

    def language_tokens_note(self, loaded, grid, n_image_tokens: int) -> str:
        config = loaded.model.config
        first = self.first_vision_token(loaded)
        tower = f"{grid.n_tokens} vision tokens" + (" (CLS + patches)" if grid.prefix_tokens else " (patches only, no CLS)")
        dropped = ""
        if first:
            dropped = (", minus the first, which strategy `default` drops" +
                       (" (the CLS token)" if grid.prefix_tokens else ": on this tower that is the top-left patch, "
                        "which the language model never sees"))
        layers = self.feature_layers(config)
        where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers} concatenated"
        return (f"In the language model, the image is **{n_image_tokens} tokens**: the tower's {tower}{dropped}, "
                f"read at {where} (strategy `{config.vision_feature_select_strategy}`) and projected, placed where "
                "the prompt says `<image>`.")


FAMILY = LlavaFamily()
