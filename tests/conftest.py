"""Shared fixtures: tiny random-weight models built from configs in code, saved to temp folders."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _save_tiny_dual_encoder(family: str, tmp_path_factory) -> str:
    """A tiny CLIP or SigLIP (image 32, patch 8, width 32, 2 layers) with the ShapesWorld tokenizer."""
    from mmie_core.shapes.recipes import ContrastiveRecipe, build_contrastive

    recipe = ContrastiveRecipe(family=family, image_size=32, patch_size=8, hidden_size=32,
                               vision_layers=2, text_layers=2, heads=2, projection_dim=16)
    model, processor = build_contrastive(recipe)
    out = tmp_path_factory.mktemp(f"tiny-{family}")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    return _save_tiny_dual_encoder("clip", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
    return _save_tiny_dual_encoder("siglip", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, tiny_clip_dir):
    from mmie_core.shapes.recipes import VLMRecipe, build_vlm

    recipe = VLMRecipe(clip_dir=tiny_clip_dir, text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64)
    model, processor = build_vlm(recipe)
    out = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_paligemma_dir(tmp_path_factory):
    """A tiny PaliGemma (SigLIP 32 px / patch 8 -> 16 image tokens first, Gemma with grouped-query
    attention and a bidirectional prefix), with the ShapesWorld tokenizer and no chat template."""
    import torch
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessor, SiglipVisionConfig)

    from mmie_core.shapes.vocab import END, IMAGE, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(add_bos_eos=False, model_max_length=256)
    vision = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)
    text = GemmaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids(END))
    config = PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                             image_token_id=tok.convert_tokens_to_ids(IMAGE), projection_dim=32)
    model = PaliGemmaForConditionalGeneration(config)
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    out = tmp_path_factory.mktemp("tiny-paligemma")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


@pytest.fixture()
def fresh_cache(monkeypatch):
    """An empty model cache for the test, restored afterwards."""
    from mmie_core import models

    cache = models.ModelCache()
    monkeypatch.setattr(models, "MODEL_CACHE", cache)
    return cache


@pytest.fixture(scope="session")
def studio_url():
    """The studio (app.demo, as `python app.py` configures it) served on a free local port."""
    import app
    from studio.app import MAX_FILE_SIZE, configure_queue

    configure_queue(app.demo).launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                                     max_file_size=MAX_FILE_SIZE)
    try:
        yield app.demo.local_url
    finally:
        app.demo.close()


@pytest.fixture(scope="session")
def client(studio_url):
    from gradio_client import Client

    return Client(studio_url, verbose=False)
