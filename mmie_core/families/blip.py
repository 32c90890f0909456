"""BLIP captioning: a ViT with a CLS token, and a BERT-style text decoder that reads every vision
token through cross-attention (no image tokens in its sequence); captions only, optionally
continuing a prefix."""

from __future__ import annotations

from .base import Family, _weights_of


class BlipFamily(Family):
    name = "blip"
    model_types = ("blip",)
    captions = True
    attn_implementation = None  # BLIP writes its attention out by hand and refuses the argument

    def model_class(self):
        import transformers

        return transformers.BlipForConditionalGeneration

    def vision_tower(self, model):
        return model.vision_model

    def answer_layers(self, model) -> list:
        return [layer.crossattention for layer in model.text_decoder.bert.encoder.layer]

    def answer_logits(self, loaded, inputs: dict, position: int):
        """The text decoder's hidden state at `position`, read through its prediction head in float32."""
        import torch.nn.functional as F

        model = loaded.model
        image_embeds = model.vision_model(pixel_values=inputs["pixel_values"])[0]
        hidden = model.text_decoder.bert(input_ids=inputs["input_ids"], encoder_hidden_states=image_embeds,
                                         is_decoder=True)[0][:, position].float()  # (B, D)
        head = model.text_decoder.cls.predictions
        t = head.transform
        with _weights_of(t.dense), _weights_of(t.LayerNorm), _weights_of(head.decoder):  # offloaded weights too
            d = hidden.device  # the head's weights may sit on another device than the decoder's last block
            x = F.linear(hidden, t.dense.weight.float().to(d), t.dense.bias.float().to(d))
            x = F.layer_norm(t.transform_act_fn(x), t.LayerNorm.normalized_shape, t.LayerNorm.weight.float().to(d),
                             t.LayerNorm.bias.float().to(d), t.LayerNorm.eps)
            return F.linear(x, head.decoder.weight.float().to(d), head.decoder.bias.float().to(d))

    def prompt(self, loaded, question: str, history: list) -> str:
        if history:
            raise ValueError(f"{loaded.name} writes captions; it does not chat.")
        return question  # a caption prefix ("" for a plain caption)

    def answer_sequence(self, loaded, inputs, answer_ids):
        """The decoder sequence as BLIP's `generate` builds it: the processor's `[CLS] prefix [SEP]`
        becomes `[DEC] prefix` (first id replaced by bos, last dropped), then the answer. There are no
        image positions: the decoder reads the image by cross-attention."""
        import torch

        from ..chat import AnswerSequence

        bos = loaded.model.config.text_config.bos_token_id
        device = inputs["pixel_values"].device
        prefix = inputs["input_ids"][0, 1:-1] if "input_ids" in inputs else torch.empty(0, dtype=torch.long, device=device)
        prompt = torch.cat([torch.tensor([bos], device=device, dtype=prefix.dtype), prefix])
        ids = torch.cat([prompt, torch.tensor(answer_ids, device=device, dtype=prefix.dtype)])[None]
        grid = self.vision_grid(loaded)
        return AnswerSequence(ids, inputs["pixel_values"], len(prompt),
                              torch.empty(0, dtype=torch.long, device=device), grid, grid)

    def language_tokens_note(self, loaded, grid, n_image_tokens: int) -> str:
        return (f"The text decoder has **no image tokens**: every decoder layer reads all {grid.n_tokens} vision "
                "tokens (CLS and patches) through cross-attention.")


FAMILY = BlipFamily()
