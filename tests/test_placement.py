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
from mmie_core.explain import METHODS, explain, make_subject
from mmie_core.interventions import knockout
from mmie_core.lens import logit_lens
from mmie_core.shapes.world import make_scene

QUESTION = "what color is the circle?"


CHEAP = {"integrated_gradients": {"steps": 4}, "occlusion": {"window": 4, "stride": 4}}


def _outputs(image):
    """Every method's map, the per-token maps, the logit lens and an attention knockout of one answer."""
    loaded = models.load_model("shapes-vlm")
    ids = greedy_answer_ids(loaded, image, QUESTION)
    target = {"question": QUESTION, "answer_ids": ids, "token_index": 0}
    maps = {m: explain(loaded, image, target, m, **CHEAP.get(m, {})).values for m in METHODS}
    maps["token_maps"] = answer_token_maps(loaded, image, QUESTION, ids).attention
    maps["logit_lens"] = logit_lens(loaded, image, QUESTION, top_k=3).probs
    maps["knockout"] = np.array(knockout(make_subject(loaded, image, target), "text", "image")["drop"])
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


def test_a_dual_encoder_spread_by_a_device_map_scores_and_explains_as_when_whole(fresh_cache, monkeypatch, tmp_path):
    """CLIPModel names no input embeddings: its inputs go to its first module's device, each tower's hooks
    moving their own. With the vision tower on disk, every method gives the whole model's map."""
    pytest.importorskip("accelerate")
    from mmie_core.zero_shot import classify

    image = make_scene(70_300, n_objects=3).render(128)
    labels = ["a red circle", "a blue square", "a green triangle"]
    target = {"label": labels[0], "labels": labels}

    def run():
        loaded = models.load_model("shapes-clip")
        out = {m: explain(loaded, image, target, m, **CHEAP.get(m, {})).values for m in METHODS}
        out["probs"] = classify(loaded, [image], labels, cache=None).probs.numpy()
        return loaded, out

    _, expected = run()
    for device_map in ("auto", json.dumps({"text_model": "cpu", "vision_model": "disk", "visual_projection": "cpu",
                                           "text_projection": "cpu", "logit_scale": "cpu"})):
        monkeypatch.setattr(models, "MODEL_CACHE", models.ModelCache())
        monkeypatch.setenv("MMIE_DEVICE_MAP", device_map)
        monkeypatch.setenv("MMIE_OFFLOAD_DIR", str(tmp_path))
        placed, got = run()
        assert placed.device == torch.device("cpu")
        if device_map != "auto":  # "auto" on a machine without a GPU places the whole model on the CPU
            assert placed.model.hf_device_map["vision_model"] == "disk"
            assert placed.model.vision_model.embeddings.patch_embedding.weight.device.type == "meta"  # on disk
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], atol=1e-6, err_msg=f"{name} with {device_map}")


def test_quantization_settings_are_checked_and_built(monkeypatch):
    import transformers  # noqa: F401 - imported before a stand-in accelerate (without a module spec) is installed
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


def test_a_captioner_with_its_prediction_head_on_disk_scores_as_when_whole(tiny_blip_dir, fresh_cache, monkeypatch,
                                                                           tmp_path):
    """BLIP reads its text decoder's prediction head in float32 from the weights themselves: offloaded, they are
    loaded for the readout."""
    pytest.importorskip("accelerate")
    image = make_scene(70_400, n_objects=2).render(64)

    def scores():
        loaded = models.load_model(tiny_blip_dir)
        ids = greedy_answer_ids(loaded, image, "", max_new_tokens=3)
        subject = make_subject(loaded, image, {"question": "", "answer_ids": ids, "token_index": 1})
        with torch.no_grad():
            return loaded, ids, subject.score(subject.pixel_values).item()

    _, ids, expected = scores()
    monkeypatch.setattr(models, "MODEL_CACHE", models.ModelCache())
    monkeypatch.setenv("MMIE_DEVICE_MAP", json.dumps({"vision_model": "cpu", "text_decoder": "disk"}))
    monkeypatch.setenv("MMIE_OFFLOAD_DIR", str(tmp_path))
    placed, ids2, got = scores()
    assert placed.model.text_decoder.cls.predictions.transform.dense.weight.device.type == "meta"  # on disk
    assert ids2 == ids and got == pytest.approx(expected, abs=1e-5)
