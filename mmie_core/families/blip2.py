"""BLIP-2 and InstructBLIP: a ViT (CLS + patches), a Q-Former whose learned queries read the vision
tokens through cross-attention (in every `cross_attention_frequency`-th layer), and a language model that
receives the query outputs, projected, as image tokens placed where the processor writes `num_query_tokens`
image placeholders before the prompt (or, for a processor without `num_query_tokens`, where the chat template
writes them, as shapes-blip2's does).

The language model is decoder-only (OPT, Vicuna: the answer follows the prompt in one sequence) or an
encoder-decoder (Flan-T5: the query tokens and the prompt are the encoder's input, the answer is the decoder's,
and the decoder reads the encoder through cross-attention, which is then what the answer-token maps read).

The language model never sees a patch: its image tokens are queries. Maps over the image therefore
compose the language model's values over the queries with each query's cross-attention over the patches
(`patches.QueryLayout`). InstructBLIP's Q-Former also reads the instruction (`qformer_input_ids`), so its
queries, and their maps, depend on the question.
"""

from __future__ import annotations

import torch

from .base import Family, UnsupportedModel

# The prompt each checkpoint was trained with: BLIP-2 OPT answers "Question: ... Answer:" (an empty prompt
# asks for a caption); InstructBLIP takes the instruction as it is.
_PROMPTS = {"blip-2": "Question: {} Answer:", "instructblip": "{}"}


class QFormerFamily(Family):
    name = "blip2"
    model_types = ("blip-2", "instructblip")
    chat = True
    query_tokens = True  # the language model's image tokens are learned queries, not patches

    per_image_inputs = ("qformer_input_ids", "qformer_attention_mask")  # InstructBLIP: the instruction

    def check_config(self, config) -> None:
        if not config.use_decoder_only_language_model and config.text_config.model_type != "t5":
            raise UnsupportedModel(
                f"this checkpoint's language model is an encoder-decoder of type {config.text_config.model_type!r}; "
                "the studio follows a T5 decoder's cross-attention (InstructBLIP / BLIP-2 Flan-T5) and decoder-only "
                "language models (OPT, Vicuna).")
        self.prefix_tokens(config)

    def encoder_decoder(self, model) -> bool:
        return not model.config.use_decoder_only_language_model

    def check_loaded(self, model, processor) -> None:
        """Transformers 5 puts the query outputs where the prompt holds image tokens: the config must name
        the image token and the processor must write `num_query_tokens` of them."""
        config = model.config
        written = getattr(processor, "num_query_tokens", None)
        if written is None and self.template_writes_queries(processor):
            written = self._template_image_tokens(processor, config.image_token_id)
        if config.image_token_id is None or written != config.num_query_tokens:
            raise UnsupportedModel(
                f"this revision's processor writes {written} image tokens and its config names image token "
                f"{config.image_token_id}, while the model has {config.num_query_tokens} queries: it predates the "
                "image tokens that transformers 5 needs (config.image_token_index and the processor's "
                "num_query_tokens). Load a later revision of the checkpoint.")

    @staticmethod
    def template_writes_queries(processor) -> bool:
        """A processor that writes no query placeholders while its tokenizer has a chat template (shapes-blip2's):
        the template writes them, inside the first user turn. (Blip2Processor keeps no chat template of its own
        when loaded, so the tokenizer's is the one that renders.)"""
        return (getattr(processor, "num_query_tokens", None) is None
                and bool(getattr(getattr(processor, "tokenizer", None), "chat_template", None)))

    @staticmethod
    def _render(processor, messages: list) -> str:
        return processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _template_image_tokens(self, processor, image_token_id) -> int:
        from ..chat import user_message

        text = self._render(processor, [user_message("?")])
        return processor.tokenizer(text, add_special_tokens=False)["input_ids"].count(image_token_id)

    # ------------------------------------------------------------------ vision tower and Q-Former

    def vision_tower(self, model):
        return model.vision_model

    def qformer_layers(self, model) -> list:
        return list(model.qformer.encoder.layer)

    def cross_attention_modules(self, model) -> dict[int, torch.nn.Module]:
        """The Q-Former's cross-attention (queries -> vision tokens), keyed by Q-Former layer."""
        return {i: layer.crossattention.attention for i, layer in enumerate(self.qformer_layers(model))
                if getattr(layer, "has_cross_attention", False)}

    def qformer_self_attention_modules(self, model) -> dict[int, torch.nn.Module]:
        return {i: layer.attention.attention for i, layer in enumerate(self.qformer_layers(model))}

    def query_count(self, model) -> int:
        return model.config.num_query_tokens

    def image_features(self, model, pixel_values: torch.Tensor, inputs: dict) -> torch.Tensor:
        """(B, queries, language width): the projected query outputs the language model reads."""
        extra = {k: inputs[k] for k in self.per_image_inputs if k in inputs}
        return model.get_image_features(pixel_values=pixel_values, **extra).pooler_output

    # ------------------------------------------------------------------ language side

    def language_model(self, model):
        """The decoder stack (OPT's `model.decoder`, Llama's `model`, T5's `decoder`)."""
        if self.encoder_decoder(model):
            return model.language_model.decoder
        base = model.language_model.base_model
        return getattr(base, "decoder", base)

    def answer_layers(self, model) -> list:
        """The decoder's self-attention (decoder-only: the image tokens are in its sequence), or a T5 decoder's
        cross-attention over the encoder's tokens (queries and prompt)."""
        if self.encoder_decoder(model):
            return list(self.encoder_decoder_modules(model)[2].values())
        return super().answer_layers(model)

    def encoder_decoder_modules(self, model) -> tuple[dict, dict, dict]:
        """(encoder self-attention, decoder self-attention, decoder cross-attention) of a T5 language model, keyed
        by layer (the encoder-decoder relevancy rules chain them)."""
        lm = model.language_model
        return ({i: block.layer[0].SelfAttention for i, block in enumerate(lm.encoder.block)},
                {i: block.layer[0].SelfAttention for i, block in enumerate(lm.decoder.block)},
                {i: block.layer[1].EncDecAttention for i, block in enumerate(lm.decoder.block)})

    def decoder_start(self, model) -> int:
        """The id a T5 decoder starts from (what generate feeds first)."""
        lm = model.language_model
        start = getattr(lm.generation_config, "decoder_start_token_id", None)
        start = lm.config.decoder_start_token_id if start is None else start
        if start is None:
            raise UnsupportedModel("this encoder-decoder language model names no decoder start token")
        return int(start)

    def answer_logits(self, loaded, inputs: dict, position: int) -> torch.Tensor:
        """The decoder's last hidden state at `position` (after its final norm) through the head in
        float32: the query outputs are put into the image positions as the model's forward does. An
        encoder-decoder runs its encoder over the prompt, then its decoder over `decoder_input_ids` (start token +
        answer), and reads the decoder's position."""
        model = loaded.model
        ids = inputs["input_ids"]
        features = self.image_features(model, inputs["pixel_values"], inputs)  # (B, queries, D)
        embeds = model.get_input_embeddings()(ids)  # (B, L, D)
        mask = (ids == model.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(mask, features.to(embeds.device, embeds.dtype))
        if not self.encoder_decoder(model):
            hidden = model.language_model.base_model(inputs_embeds=embeds).last_hidden_state[:, position].float()
            return self.read_head(model, hidden)
        lm = model.language_model
        encoded = lm.encoder(inputs_embeds=embeds).last_hidden_state
        hidden = lm.decoder(input_ids=inputs["decoder_input_ids"], encoder_hidden_states=encoded,
                            use_cache=False).last_hidden_state[:, position].float()
        if lm.config.scale_decoder_outputs:  # T5 with a head tied to its embeddings
            hidden = hidden * lm.config.d_model ** -0.5
        return self.read_head(model, hidden)

    def answer_sequence(self, loaded, inputs, answer_ids: list[int]):
        """Decoder-only: prompt + answer as one sequence. Encoder-decoder: the prompt (query tokens and
        instruction) stays the encoder's input; the decoder's sequence is the start token + the answer, as
        generate feeds it."""
        if not self.encoder_decoder(loaded.model):
            return super().answer_sequence(loaded, inputs, answer_ids)
        from ..chat import AnswerSequence

        prompt_ids = inputs["input_ids"]
        layout, grid, positions = self.answer_layout(loaded, inputs, prompt_ids[0])
        decoder = torch.tensor([[self.decoder_start(loaded.model), *answer_ids]], device=prompt_ids.device,
                               dtype=prompt_ids.dtype)
        image_extra = {k: inputs[k] for k in self.per_image_inputs if k in inputs}
        return AnswerSequence(prompt_ids, inputs["pixel_values"], 1, positions, layout, grid, image_extra=image_extra,
                              decoder_input_ids=decoder)

    def prompt(self, loaded, question: str, history: list) -> str:
        """BLIP-2 OPT: "Question: q Answer:" (earlier turns as "Question: q Answer: a."); InstructBLIP: the
        instruction (one at a time). The processor puts the query placeholders before the prompt. A model whose
        chat template writes the placeholders (shapes-blip2) gets its chat template, with the history."""
        if self.template_writes_queries(loaded.processor):
            from ..chat import build_messages

            return self._render(loaded.processor, build_messages(history, question))
        form = _PROMPTS[loaded.model.config.model_type]
        if history and form == "{}":
            raise ValueError(f"{loaded.name} answers one instruction at a time (it has no chat history); "
                             "press Clear, then ask.")
        earlier = " ".join(f"{form.format(t.user)} {t.assistant.strip()}." for t in history)
        return (earlier + " " if earlier else "") + form.format(question)

    def answer_layout(self, loaded, inputs, prompt_ids: torch.Tensor):
        """(QueryLayout, ViT grid, positions of the query tokens): each query's cross-attention over the
        patches, read from this image's own Q-Former pass."""
        from ..patches import QueryLayout
        from ..qformer import query_reads

        ids = prompt_ids.reshape(-1)
        positions = (ids == loaded.model.config.image_token_id).nonzero().flatten()
        n = self.query_count(loaded.model)
        if len(positions) != n:
            raise ValueError(f"{loaded.name}'s prompt holds {len(positions)} image tokens; its Q-Former gives {n} "
                             "queries per image (the studio analyses one image per conversation).")
        grid = self.vision_grid(loaded)
        reads = query_reads(loaded, inputs["pixel_values"], inputs)
        return QueryLayout(grid, reads.fused_patches()), grid, positions

    def language_tokens_note(self, loaded, grid, n_image_tokens: int) -> str:
        cross = len(self.cross_attention_modules(loaded.model))
        layers = len(self.qformer_layers(loaded.model))
        reads = " and the instruction" if loaded.model.config.model_type == "instructblip" else ""
        encoder = (" The language model is an encoder-decoder: its encoder reads the query tokens and the prompt, "
                   "and every answer token reads them through the decoder's cross-attention, which the maps follow."
                   if self.encoder_decoder(loaded.model) else "")
        return (f"In the language model, the image is **{n_image_tokens} query tokens**, not patches: the "
                f"Q-Former's learned queries, each reading all {grid.n_tokens} vision tokens (CLS + patches){reads} "
                f"through cross-attention in {cross} of its {layers} layers, then projected. A map over the image "
                "spreads each query's value over the patches in proportion to that query's cross-attention."
                + encoder)


FAMILY = QFormerFamily()
