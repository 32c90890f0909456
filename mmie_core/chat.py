"""Visual question answering with chat VLMs: prompts through the model's chat template."""

from __future__ import annotations

import torch
from PIL import Image

from .models import LoadedModel


def user_message(question: str, with_image: bool = True) -> dict:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return {"role": "user", "content": content}


def prompt_for(loaded: LoadedModel, question: str) -> str:
    """The generation prompt for one image + one question, as the chat template renders it."""
    return loaded.processor.apply_chat_template(
        [user_message(question)], add_generation_prompt=True, tokenize=False
    )


@torch.inference_mode()
def answer_batch(
    loaded: LoadedModel, images: list[Image.Image], questions: list[str], max_new_tokens: int = 48
) -> list[str]:
    """Greedy answers to one question per image, batched with left padding."""
    if len(images) != len(questions):
        raise ValueError("answer_batch needs one question per image")
    prompts = [prompt_for(loaded, q) for q in questions]
    inputs = loaded.processor(
        images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt"
    ).to(loaded.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in loaded.processor.batch_decode(new_tokens, skip_special_tokens=True)]
