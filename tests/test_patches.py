"""Patch geometry from configs and processors, and image-token layouts in LLaVA sequences."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmie_core import models
from mmie_core.chat import prompt_for
from mmie_core.patches import PatchGrid, image_token_layout, processor_view, vision_grid


def test_grid_from_config(tiny_clip_dir, tiny_siglip_dir, fresh_cache):
    clip = vision_grid(models.load_model(tiny_clip_dir))
    assert (clip.rows, clip.cols, clip.patch_size, clip.prefix_tokens) == (4, 4, 8, 1)
    assert clip.n_tokens == 17
    siglip = vision_grid(models.load_model(tiny_siglip_dir))
    assert siglip.prefix_tokens == 0 and siglip.n_tokens == 16


def test_grid_matches_the_vision_tower_sequence(tiny_clip_dir, tiny_siglip_dir, fresh_cache):
    for folder in (tiny_clip_dir, tiny_siglip_dir):
        loaded = models.load_model(folder)
        grid = vision_grid(loaded)
        pixels = torch.zeros(1, 3, grid.input_height, grid.input_width)
        hidden = loaded.model.vision_model(pixel_values=pixels).last_hidden_state
        assert hidden.shape[1] == grid.n_tokens


def test_token_patch_round_trip():
    grid = PatchGrid(rows=3, cols=5, patch_size=8, input_height=24, input_width=40, prefix_tokens=1)
    for r in range(3):
        for c in range(5):
            assert grid.token_to_patch(grid.patch_to_token(r, c)) == (r, c)
    with pytest.raises(IndexError):
        grid.token_to_patch(0)  # the CLS token
    with pytest.raises(IndexError):
        grid.patch_to_token(3, 0)


def test_processor_view_centre_crop_box(tiny_clip_dir, fresh_cache):
    loaded = models.load_model(tiny_clip_dir)
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 50, 100))  # red left quarter: cropped away
    view = processor_view(loaded, img)
    # shortest side 100 -> 32 px, so 200 -> 64; the centre 32 px cover x 50..150 of the original
    assert view.box == pytest.approx((50.0, 0.0, 150.0, 100.0), abs=1.0)
    assert view.model_input.size == (32, 32)
    r, g, b = view.model_input.getpixel((1, 16))
    assert r > 240 and g > 200  # the red part is outside the crop
    assert any("crop" in s for s in view.steps)


def test_processor_view_plain_resize(tiny_siglip_dir, fresh_cache):
    loaded = models.load_model(tiny_siglip_dir)
    img = Image.new("RGB", (120, 60), (10, 200, 30))
    view = processor_view(loaded, img)
    assert view.box == (0.0, 0.0, 120.0, 60.0)
    r, g, b = view.model_input.getpixel((5, 5))
    assert abs(r - 10) <= 2 and abs(g - 200) <= 2 and abs(b - 30) <= 2  # de-normalisation is exact


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava_image_tokens_match_placeholder_mask(tiny_llava_dir, fresh_cache, strategy):
    loaded = models.load_model(tiny_llava_dir)
    config = loaded.model.config
    old = config.vision_feature_select_strategy, loaded.processor.vision_feature_select_strategy
    config.vision_feature_select_strategy = strategy
    loaded.processor.vision_feature_select_strategy = strategy
    try:
        img = Image.new("RGB", (48, 40), (0, 0, 255))
        inputs = loaded.processor(images=[img], text=[prompt_for(loaded, "what color is it?")], return_tensors="pt")
        layout = image_token_layout(loaded, inputs["input_ids"][0])
        embeds = loaded.model.get_input_embeddings()(inputs["input_ids"])
        features = loaded.model.get_image_features(pixel_values=inputs["pixel_values"])
        features = getattr(features, "pooler_output", features)
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
        mask = loaded.model.model.get_placeholder_mask(inputs["input_ids"], inputs_embeds=embeds, image_features=features)
        assert mask[0, :, 0].nonzero().flatten().tolist() == layout.positions
        grid = vision_grid(loaded)
        expected = grid.n_patches + (1 if strategy == "full" else 0)
        assert len(layout.positions) == expected
        assert layout.patches[-1] == (grid.rows - 1, grid.cols - 1)
        assert (layout.patches[0] is None) == (strategy == "full")
    finally:
        config.vision_feature_select_strategy, loaded.processor.vision_feature_select_strategy = old
