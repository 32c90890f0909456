"""A half-precision model's scores are read in float32 from the last hidden state.

A bf16 head rounds the logits to bf16 (8 bits of mantissa): occlusion on shapes-vlm then collapsed to
26 distinct values over 64 patches, because most score drops rounded to the same few steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmie_core import models
from mmie_core.chat import greedy_answer_ids
from mmie_core.explain import explain, make_subject
from mmie_core.shapes.world import make_scene


@pytest.fixture()
def bf16_vlm(monkeypatch, fresh_cache):
    monkeypatch.setenv("MMIE_DTYPE", "bfloat16")
    return models.load_model("shapes-vlm")


def test_answer_scores_keep_float32_resolution_in_bf16(bf16_vlm):
    loaded = bf16_vlm
    assert loaded.dtype == torch.bfloat16
    image = make_scene(50000).render(64)
    question = "what color is the circle?"
    ids = greedy_answer_ids(loaded, image, question, max_new_tokens=3)
    target = {"question": question, "answer_ids": ids, "token_index": 0}
    subject = make_subject(loaded, image, target)
    with torch.inference_mode():
        logits = subject._logits(subject.pixel_values)
    assert logits.dtype == torch.float32
    # the same number as the model's own head, up to bf16 rounding of that head's output
    with torch.inference_mode():
        own = loaded.model(**subject.sequence.model_inputs()).logits[:, subject.position]
    assert torch.allclose(logits, own.float(), atol=0.1, rtol=0.02)
    assert not torch.equal(logits, own.float())  # but not rounded to bf16
    heat = explain(loaded, image, target, "occlusion")
    assert len(np.unique(heat.values)) >= 60  # of 64 patches
