"""The adapter contract: what the rest of the library may ask about a model family.

A `Family` is the one place that knows an architecture: where its vision tower and blocks are, how
many tokens come before the patches (read from the vision config), what the processor does to an
image, where the image tokens of a sequence sit and which patch each carries, how a vision block's
output is viewed as a grid, the decoder blocks, final norm and head, the input that stands for "no
image", how prompts are built, and what the studio can do with it (capabilities).

Defaults here serve a ViT-style tower with one fixed grid (CLIP, SigLIP, LLaVA, PaliGemma, BLIP);
each family module overrides what differs. Nothing outside `mmie_core.families` compares family
names: it asks the adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from PIL import Image

from ..patches import PatchGrid, ProcessorView, resize_crop_view

if TYPE_CHECKING:
    from ..models import LoadedModel

# Tokens a vision tower puts before its patches, by the vision config's model_type: CLIP-style and
# BLIP embeddings prepend a class embedding; SigLIP-style towers (SigLIP, Idefics3's, SmolVLM's) do not.
VISION_PREFIX_TOKENS = {
    "clip_vision_model": 1,
    "blip_vision_model": 1,
    "siglip_vision_model": 0,
    "idefics3_vision": 0,
    "smolvlm_vision": 0,
    "qwen2_vl_vision": 0,
    "blip_2_vision_model": 1,
    "instructblip_vision_model": 1,
}


def _weights_of(module: torch.nn.Module):
    """A context in which an offloaded module's weights (device_map to CPU or disk: meta tensors outside its
    forward) are real tensors; a no-op for a module whose weights are in memory."""
    import contextlib

    if getattr(module, "weight", None) is None or module.weight.device.type != "meta":
        return contextlib.nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module)


class UnsupportedModel(ValueError):
    """A checkpoint of a known family with a feature the studio would map wrongly."""


def vision_config(config):
    """The vision part of a model config (the config itself for a bare vision model)."""
    return getattr(config, "vision_config", None) or config


def prefix_tokens_of(vcfg) -> int:
    """Tokens before the patches in the vision tower's sequence, from the vision config's type."""
    kind = getattr(vcfg, "model_type", "")
    if kind not in VISION_PREFIX_TOKENS:
        raise UnsupportedModel(f"vision tower type {kind!r} is not supported (known: {', '.join(VISION_PREFIX_TOKENS)})")
    return VISION_PREFIX_TOKENS[kind]


class Family:
    """Defaults for a family with a ViT tower of one fixed grid."""

    name = ""  # short name shown in the UI and the JSON ("clip", "llava", ...)
    model_types: tuple[str, ...] = ()  # config.model_type values this adapter serves

    # capabilities
    zero_shot = False  # a dual encoder: labels are scored against the image
    chat = False  # answers questions (a chat template or task prompts)
    captions = False  # writes captions only, optionally continuing a prefix; reads the image by cross-attention
    fixed_grid = True  # every image gives the same ViT grid (vision-tower views: inspect, patch similarity)
    token_grid = False  # a language model reads one fixed grid of image tokens (sequence view, lens, Inside)
    label_activation = ""  # zero-shot: "softmax" (one label wins) or "sigmoid" (independent labels)
    query_tokens = False  # the language model reads learned queries (a Q-Former), not patches

    patch_states_normed = True  # the vision tower's last hidden state has been through its final norm
    attn_implementation: str | None = "sdpa"  # at load time; None where the model refuses the argument
    zero_input = 0.0  # the pixel input that stands for "no image" (the processor's mean colour)

    # ------------------------------------------------------------------ checks and loading

    def check_config(self, config) -> None:
        """Raise UnsupportedModel for a checkpoint of this family that the studio would map wrongly."""

    def check_loaded(self, model, processor) -> None:
        """Raise UnsupportedModel when the processor and the model disagree in a way that would fail or
        mislead later (checked once, at load time)."""

    def model_class(self):
        import transformers

        return transformers.AutoModelForImageTextToText

    @property
    def describes(self) -> bool:
        """Alt text, answer-token maps and every explanation method of answers."""
        return self.chat or self.captions

    # ------------------------------------------------------------------ vision tower

    def vision_tower(self, model) -> torch.nn.Module:
        return model.model.vision_tower

    def vision_blocks(self, vision) -> torch.nn.ModuleList:
        return vision.encoder.layers

    def patch_embedding(self, vision) -> torch.nn.Module | None:
        """The linear patch embedding (integrated gradients' layer), or None to work on pixels."""
        return vision.embeddings.patch_embedding

    def prefix_tokens(self, config) -> int:
        return prefix_tokens_of(vision_config(config))

    def vision_grid(self, loaded: "LoadedModel") -> PatchGrid:
        """The ViT patch grid of the model input, from the vision config (floor division: a partial
        patch at the edge is dropped by the patch embedding's stride)."""
        vcfg = vision_config(loaded.model.config)
        size = vcfg.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        patch = vcfg.patch_size
        return PatchGrid(height // patch, width // patch, patch, height, width, self.prefix_tokens(loaded.model.config))

    def processor_view(self, loaded: "LoadedModel", image: Image.Image) -> ProcessorView:
        return resize_crop_view(loaded.processor.image_processor, image, self.vision_grid(loaded))

    def feature_block(self, loaded: "LoadedModel", n_blocks: int) -> int:
        """The last vision block whose patch tokens reach the score (GradCAM's default layer, and
        how far relevancy through the vision tower goes). A tower with a CLS token read alone (CLIP)
        overrides it."""
        return n_blocks - 1

    def grid_view(self, grid: PatchGrid, layout) -> tuple[Callable, Callable]:
        """(to_grid, from_grid): a vision block's output tokens <-> (B, D, rows, cols)."""
        p = grid.prefix_tokens

        def to_grid(tokens):  # (B, prefix + rows * cols, D) -> (B, D, rows, cols); Idefics3: B = tiles
            return tokens[:, p:].transpose(1, 2).reshape(tokens.shape[0], -1, grid.rows, grid.cols)

        def from_grid(x, tokens):
            return torch.cat([tokens[:, :p], x.flatten(2).transpose(1, 2)], dim=1)

        return to_grid, from_grid

    def vision_attention_modules(self, vision) -> dict[int, torch.nn.Module]:
        return {i: layer.self_attn for i, layer in enumerate(self.vision_blocks(vision))}

    # ------------------------------------------------------------------ language side

    def language_model(self, model):
        """The decoder stack (has .layers and .norm)."""
        return model.model.language_model

    def answer_layers(self, model) -> list:
        """The attention modules whose rows the answer-token maps read."""
        return [layer.self_attn for layer in self.language_model(model).layers]

    def encoder_decoder(self, model) -> bool:
        """Whether the language model is an encoder-decoder (T5): the prompt with its image tokens is the encoder's
        input, the answer the decoder's, which reads the encoder through cross-attention (`answer_layers`)."""
        return False

    def output_head(self, model) -> torch.nn.Module:
        return model.get_output_embeddings()

    def answer_logits(self, loaded: "LoadedModel", inputs: dict, position: int) -> torch.Tensor:
        """(B, vocab) float32 logits at `position`: the decoder's last hidden state there (after its
        final norm), read through the output head in float32, so that a half-precision model's scores
        keep their resolution (a bf16 head quantises the logits into a few distinct values)."""
        hidden = loaded.model.model(**inputs).last_hidden_state[:, position].float()  # (B, D)
        return self.read_head(loaded.model, hidden)

    def read_head(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 hidden states (..., D) -> float32 logits through the output head (and soft-capping)."""
        head = self.output_head(model)
        with _weights_of(head):  # an offloaded head (device_map) has its weights only inside this block
            bias = None if getattr(head, "bias", None) is None else head.bias.float().to(hidden.device)
            logits = torch.nn.functional.linear(hidden.float(), head.weight.float().to(hidden.device), bias)
        softcap = self.final_logit_softcap(model)
        return logits if not softcap else torch.tanh(logits / softcap) * softcap

    def final_logit_softcap(self, model) -> float | None:
        text = getattr(model.config, "text_config", model.config)
        return getattr(text, "final_logit_softcapping", None)

    def prompt(self, loaded: "LoadedModel", question: str, history: list) -> str:
        """The generation prompt, as the model's chat template renders it (the image goes with the
        first user turn)."""
        from ..chat import build_messages

        return loaded.processor.apply_chat_template(build_messages(history, question), add_generation_prompt=True,
                                                    tokenize=False)

    def first_vision_token(self, loaded: "LoadedModel") -> int:
        """The first vision-tower token that reaches the language model (LLaVA's 'default' strategy
        drops one)."""
        return 0

    def answer_layout(self, loaded: "LoadedModel", inputs, prompt_ids: torch.Tensor):
        """(layout, ViT grid of the pixel input, positions of the image tokens that carry patches, in
        layout order) of a prompt whose image is one fixed grid of image tokens."""
        from ..patches import GridLayout, image_token_layout

        tokens = image_token_layout(loaded, prompt_ids)  # checks the count against the vision tower
        if tokens.tokens_per_image != len(tokens.positions):
            raise ValueError(f"{loaded.name}'s prompt holds {len(tokens.positions) // tokens.tokens_per_image} images; "
                             "the studio analyses one image per conversation.")
        grid = self.vision_grid(loaded)
        cls = [pos for pos, patch in zip(tokens.positions, tokens.patches) if patch is None]
        patch_positions = [pos for pos, patch in zip(tokens.positions, tokens.patches) if patch is not None]
        first_row, first_col = next(patch for patch in tokens.patches if patch is not None)
        layout = GridLayout(grid, first_row * grid.cols + first_col, tuple(cls))
        return layout, grid, torch.tensor(patch_positions, dtype=torch.long, device=prompt_ids.device)

    def answer_sequence(self, loaded: "LoadedModel", inputs, answer_ids: list[int]):
        """Prompt + answer as one sequence for analysis passes (chat.AnswerSequence)."""
        from ..chat import image_token_sequence

        return image_token_sequence(loaded, inputs, answer_ids)

    per_image_inputs: tuple[str, ...] = ("pixel_attention_mask",)  # processor inputs that go with the image
    answer_token_inputs: dict[str, int] = {}  # per-token processor inputs and the value answer tokens take

    def extend_inputs(self, inputs: dict, length: int) -> dict:
        """Processor inputs of a prompt with their per-token entries (`answer_token_inputs`) lengthened to
        `length` tokens (prompt + answer), for a forward pass over both."""
        out = dict(inputs)
        for key, value in self.answer_token_inputs.items():
            if key in out and out[key].shape[-1] < length:
                t = out[key]
                out[key] = torch.cat([t, t.new_full((*t.shape[:-1], length - t.shape[-1]), value)], -1)
        return out

    def language_tokens_note(self, loaded: "LoadedModel", grid: PatchGrid, n_image_tokens: int) -> str:
        """One sentence for the Patches tab: how the language model receives the image."""
        return ""
