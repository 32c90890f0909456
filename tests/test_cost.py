"""The cost estimate counts what the methods really run: images through the vision tower per method."""

from __future__ import annotations

import pytest
from PIL import Image

from mmie_core import models
from mmie_core.cost import CostLimitError, estimate
from mmie_core.explain import explain_subject, make_subject


def _images_seen(loaded, subject, method, params) -> int:
    """Images (rows of image_grid_thw) the vision tower encodes while `method` runs."""
    visual = loaded.adapter.vision_tower(loaded.model)
    seen = []

    def count(module, args, kwargs):
        seen.append(int((kwargs.get("grid_thw") if "grid_thw" in kwargs else args[1]).shape[0]))

    handle = visual.register_forward_pre_hook(count, with_kwargs=True)
    try:
        explain_subject(subject, method, **params)
    finally:
        handle.remove()
    return sum(seen)


@pytest.mark.parametrize("method,params", [("occlusion", {}), ("occlusion", {"window": 2, "stride": 1}),
                                           ("occlusion", {"window": 2, "stride": 2}),
                                           ("integrated_gradients", {"steps": 4, "internal_batch_size": 4}),
                                           ("saliency", {}), ("gradcam", {})])
def test_passes_match_the_images_encoded_on_a_non_square_grid(tiny_qwen2vl_dir, fresh_cache, method, params):
    loaded = models.load_model(tiny_qwen2vl_dir)
    image = Image.new("RGB", (50, 30), "white")  # 48x32 px -> 4x6 merged cells
    ids = loaded.processor.tokenizer(" red", add_special_tokens=False)["input_ids"]
    subject = make_subject(loaded, image, {"question": "what color is the circle?", "answer_ids": ids,
                                           "token_index": 0})
    cost = estimate(subject, method, params)
    seen = _images_seen(loaded, subject, method, params)
    # a backward pass counts as two forward passes in the estimate; the vision tower runs once per image
    if method == "occlusion":  # forward passes only
        assert cost.passes == seen
    elif method == "integrated_gradients":  # every step forward and backward, then score(image), score(baseline)
        assert seen == params["steps"] + 2 and cost.passes == 3 * params["steps"] + 2
    else:
        assert cost.passes == 3 * seen


def test_limits_from_the_environment(monkeypatch, tiny_clip_dir, fresh_cache):
    loaded = models.load_model(tiny_clip_dir)
    subject = make_subject(loaded, Image.new("RGB", (32, 32)), {"label": "a red circle", "labels": ["a red circle"]})
    monkeypatch.setenv("MMIE_MAX_WORK", "10")
    with pytest.raises(CostLimitError, match="limit is 0.0 M, MMIE_MAX_WORK"):
        explain_subject(subject, "integrated_gradients")
    monkeypatch.setenv("MMIE_MAX_WORK", "lots")
    with pytest.raises(CostLimitError, match="not a number"):
        explain_subject(subject, "attention")
    monkeypatch.setenv("MMIE_MAX_WORK", "0")
    explain_subject(subject, "integrated_gradients", steps=4)
