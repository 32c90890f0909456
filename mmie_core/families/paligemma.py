"""PaliGemma: SigLIP patches (no CLS) as image tokens before the prompt, a prefix attended in both
directions, task prompts instead of a chat template ("answer en ...", "caption en", ...)."""

from __future__ import annotations

from .base import Family, UnsupportedModel

# big_vision's task prefixes; a question without one is asked as "answer en ..."
PALIGEMMA_TASKS = ("answer ", "caption ", "describe ", "ocr", "detect ", "segment ", "question ")


class PaliGemmaFamily(Family):
    name = "paligemma"
    model_types = ("paligemma",)
    chat = True
    token_grid = True

    answer_token_inputs = {"token_type_ids": 1}  # the prefix (image + prompt) is 0, attended both ways

    def check_config(self, config) -> None:
        text = config.text_config
        if getattr(text, "attn_logit_softcapping", None) or getattr(text, "final_logit_softcapping", None):
            raise UnsupportedModel(
                "PaliGemma 2 (a Gemma 2 decoder) soft-caps its attention logits, which the studio's attention "
                "row taps do not reproduce; PaliGemma (1) checkpoints such as google/paligemma-3b-mix-224 are supported")

    def prompt(self, loaded, question: str, history: list) -> str:
        """No chat template: the processor puts the image tokens and <bos> before the prompt and a newline
        after it; one question at a time."""
        if history:
            raise ValueError(f"{loaded.name} answers one question at a time (it has no chat history); "
                             "press Clear, then ask.")
        task = question if question.lower().startswith(PALIGEMMA_TASKS) else f"answer en {question}"
        return loaded.processor.image_token + task

    def language_tokens_note(self, loaded, grid, n_image_tokens: int) -> str:
        return (f"In the language model, the image is **{n_image_tokens} tokens**, one per patch, placed before the "
                "prompt; image and prompt attend to each other in both directions.")


FAMILY = PaliGemmaFamily()
