"""Shared fixtures: tiny random-weight models built from configs in code, saved to temp folders."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from mmie_core.shapes.recipes import ContrastiveRecipe, build_contrastive

    recipe = ContrastiveRecipe(family="clip", image_size=32, patch_size=8, hidden_size=32,
                               vision_layers=2, text_layers=2, heads=2, projection_dim=16)
    model, processor = build_contrastive(recipe)
    out = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
    from mmie_core.shapes.recipes import ContrastiveRecipe, build_contrastive

    recipe = ContrastiveRecipe(family="siglip", image_size=32, patch_size=8, hidden_size=32,
                               vision_layers=2, text_layers=2, heads=2, projection_dim=16)
    model, processor = build_contrastive(recipe)
    out = tmp_path_factory.mktemp("tiny-siglip")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, tiny_clip_dir):
    from mmie_core.shapes.recipes import VLMRecipe, build_vlm

    recipe = VLMRecipe(clip_dir=tiny_clip_dir, text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64)
    model, processor = build_vlm(recipe)
    out = tmp_path_factory.mktemp("tiny-llava")
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
