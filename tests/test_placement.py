"""Big models: device_map placement (accelerate, with offload) and bitsandbytes 4-bit / 8-bit weights.

On this CPU: a model whose language model and head are offloaded to disk gives the same answer and the
same maps as the model loaded whole (accelerate's hooks move weights and activations; the studio's own
hooks and its float32 head readout follow them), and the quantization arguments are built and checked.
Quantized weights themselves need CUDA + bitsandbytes: tests/test_cuda.py."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from mmie_core import models
from mmie_core.chat import answer_token_maps, greedy_answer_ids
from mmie_core.explain import explain
from mmie_core.shapes.world import make_scene

QUESTION = "what color is the circle?"


def _outputs(image):
    loaded = models.load_model("shapes-vlm")
    ids = greedy_answer_ids(loaded, image, QUESTION)
    target = {"question": QUESTION, "answer_ids": ids, "token_index": 0}
    maps = {m: explain(loaded, image, target, m, **({"steps": 4} if m == "integrated_gradients" else {})).values
            for m in ("attention", "relevancy", "integrated_gradients", "gradcam")}
    maps["token_maps"] = answer_token_maps(loaded, image, QUESTION, ids).attention
    return loaded, ids, maps


def test_disk_offloaded_language_model_gives_the_same_answer_and_maps(fresh_cache, monkeypatch, tmp_path):
    pytest.importorskip("accelerate")
    image = make_scene(70_200, n_objects=3).render(256)
    whole, ids, expected = _outputs(image)
    assert not models.placement(None, torch.float32)
    monkeypatch.setattr(models, "MODEL_CACHE", models.ModelCache())
    monkeypatch.setenv("MMIE_DEVICE_MAP", json.dumps({"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                                                      "model.language_model": "disk", "lm_head": "disk"}))
    monkeypatch.setenv("MMIE_OFFLOAD_DIR", str(tmp_path))
    offloaded, ids2, got = _outputs(image)
    assert offloaded.model.hf_device_map["model.language_model"] == "disk"
    assert offloaded.model.lm_head.weight.device.type == "meta"  # really offloaded: loaded only for each forward
    assert offloaded.device == torch.device("cpu") and ids2 == ids
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-6, err_msg=name)


def test_quantization_settings_are_checked_and_built(monkeypatch):
    monkeypatch.setenv("MMIE_QUANTIZE", "3bit")
    with pytest.raises(models.ModelLoadError, match="not one of 4bit, 8bit"):
        models.placement(None, torch.bfloat16)
    monkeypatch.setenv("MMIE_QUANTIZE", "4bit")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(models.ModelLoadError, match="need a CUDA GPU"):
        models.placement(None, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(models.ModelLoadError, match="pip install bitsandbytes"):
        models.placement(None, torch.bfloat16)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setitem(sys.modules, "accelerate", types.ModuleType("accelerate"))
    four = models.placement(None, torch.bfloat16)
    assert four["device_map"] == "auto"
    assert four["quantization_config"].load_in_4bit and four["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    monkeypatch.setenv("MMIE_QUANTIZE", "8bit")
    monkeypatch.setenv("MMIE_DEVICE_MAP", "balanced")
    eight = models.placement(None, torch.float16)
    assert eight["quantization_config"].load_in_8bit and eight["device_map"] == "balanced"
    # a preset may ask for quantized weights; the variable overrides it ("none" turns it off)
    monkeypatch.delenv("MMIE_QUANTIZE")
    monkeypatch.delenv("MMIE_DEVICE_MAP")
    preset = models.Preset("big", "org/big", "llava", ("chat",), quantize="4bit")
    assert models.placement(preset, torch.bfloat16)["quantization_config"].load_in_4bit
    monkeypatch.setenv("MMIE_QUANTIZE", "none")
    assert models.placement(preset, torch.bfloat16) == {}


def test_device_map_without_accelerate_says_how_to_install(monkeypatch):
    monkeypatch.setenv("MMIE_DEVICE_MAP", "auto")
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(models.ModelLoadError, match="pip install accelerate"):
        models.placement(None, torch.float32)
    monkeypatch.setenv("MMIE_DEVICE_MAP", "{not json")
    monkeypatch.setitem(sys.modules, "accelerate", types.ModuleType("accelerate"))
    with pytest.raises(models.ModelLoadError, match="not valid JSON"):
        models.placement(None, torch.float32)
