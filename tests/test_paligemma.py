"""PaliGemma, the second VLM family: images first, SigLIP patches (no CLS), a Gemma decoder with a
bidirectional prefix (token_type_ids) and no chat template. Checked on a tiny random model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmie_core import models
from mmie_core.chat import (GenerationSettings, Turn, answer_sequence, answer_token_maps, chat_inputs, prompt_for,
                            stream_answer)
from mmie_core.patches import image_token_layout, vision_grid


@pytest.fixture()
def paligemma(tiny_paligemma_dir, fresh_cache):
    return models.load_model(tiny_paligemma_dir)


IMAGE = Image.new("RGB", (48, 32), (200, 30, 30))


def test_family_grid_and_prompt(paligemma):
    assert paligemma.family == "paligemma"
    grid = vision_grid(paligemma)
    assert (grid.rows, grid.cols, grid.prefix_tokens) == (4, 4, 0)
    assert prompt_for(paligemma, "what color is it?").endswith("answer en what color is it?")
    assert prompt_for(paligemma, "caption en").endswith("caption en")  # a task prefix is kept as typed
    with pytest.raises(ValueError, match="one question at a time"):
        prompt_for(paligemma, "and now?", [Turn("what color is it?", "red")])


def test_image_tokens_come_first_and_match_the_models_placeholder_mask(paligemma):
    inputs = chat_inputs(paligemma, IMAGE, "what color is it?")
    assert "labels" not in inputs
    layout = image_token_layout(paligemma, inputs["input_ids"][0])
    assert layout.positions == list(range(16))  # images first
    assert layout.patches[0] == (0, 0) and layout.patches[-1] == (3, 3) and None not in layout.patches
    embeds = paligemma.model.get_input_embeddings()(inputs["input_ids"])
    features = paligemma.model.get_image_features(pixel_values=inputs["pixel_values"])
    features = getattr(features, "pooler_output", features)
    mask = paligemma.model.model.get_placeholder_mask(inputs["input_ids"], inputs_embeds=embeds,
                                                      image_features=features)
    assert mask[0, :, 0].nonzero().flatten().tolist() == layout.positions


def test_stream_and_per_token_maps(paligemma):
    final = list(stream_answer(paligemma, IMAGE, "what color is it?", settings=GenerationSettings(max_new_tokens=4)))[-1]
    assert final.finished and 1 <= len(final.token_ids) <= 4
    seq = answer_sequence(paligemma, IMAGE, "what color is it?", final.token_ids)
    types = seq.extra["token_type_ids"][0]
    assert types[: seq.prompt_length].eq(0).all() and types[seq.prompt_length:].eq(1).all()
    maps = answer_token_maps(paligemma, IMAGE, "what color is it?", final.token_ids)
    assert len(maps.heatmaps) == len(final.token_ids)
    for heatmap, reliance in zip(maps.heatmaps, maps.image_reliance):
        assert heatmap.grid == (4, 4) and heatmap.values.sum() == pytest.approx(1.0, abs=1e-6)
        assert 0.0 < reliance <= 1.0
    assert paligemma.model.config._attn_implementation == "sdpa"


def test_teacher_forced_logits_match_generation(paligemma):
    """The analysis sequence (prompt + answer, with token types) reproduces generation's choices."""
    final = list(stream_answer(paligemma, IMAGE, "what color is it?", settings=GenerationSettings(max_new_tokens=3)))[-1]
    seq = answer_sequence(paligemma, IMAGE, "what color is it?", final.token_ids)
    with torch.no_grad():
        logits = paligemma.model(**seq.model_inputs()).logits[0]
    predicted = logits[seq.prompt_length - 1: seq.prompt_length - 1 + len(final.token_ids)].argmax(-1).tolist()
    assert predicted == final.token_ids
