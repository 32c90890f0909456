"""On a CUDA device (skipped without one; `bash bench/gpu.sh` runs them): the embedded models in bf16 on the
GPU give the CPU's answers and heatmaps, and interventions stay exact there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def on_cuda(monkeypatch):
    from mmie_core import models

    monkeypatch.setenv("MMIE_DEVICE", "cuda")
    monkeypatch.setenv("MMIE_DTYPE", "bfloat16")
    models.MODEL_CACHE.clear()
    yield
    models.MODEL_CACHE.clear()


def _question(seed: int = 50_003):
    from mmie_core.shapes.world import make_scene

    scene = make_scene(seed)
    qa = next(q for q in scene.qa() if q["type"] == "color")
    return scene, qa


@pytest.mark.parametrize("method", ["attention", "relevancy", "integrated_gradients", "saliency", "gradcam"])
def test_answer_heatmaps_on_cuda_match_the_cpu(on_cuda, method, monkeypatch):
    from mmie_core.explain import explain
    from mmie_core.models import load_model

    scene, qa = _question()
    gpu = load_model("shapes-vlm")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    ids = gpu.processor.tokenizer(" " + qa["answer"], add_special_tokens=False)["input_ids"]
    target = {"question": qa["question"], "answer_ids": ids, "token_index": 0}
    on_gpu = explain(gpu, scene.render(64), target, method, **({"steps": 16} if method == "integrated_gradients" else {}))
    from mmie_core import models

    models.MODEL_CACHE.clear()
    monkeypatch.setenv("MMIE_DEVICE", "cpu")
    monkeypatch.setenv("MMIE_DTYPE", "float32")
    cpu = load_model("shapes-vlm")
    on_cpu = explain(cpu, scene.render(64), target, method, **({"steps": 16} if method == "integrated_gradients" else {}))
    corr = np.corrcoef(on_gpu.values.ravel(), on_cpu.values.ravel())[0, 1]
    assert corr > 0.9, (method, corr)


def test_knockout_of_nothing_is_exact_on_cuda(on_cuda):
    from mmie_core import interventions as iv
    from mmie_core.explain import make_subject
    from mmie_core.models import load_model

    scene, qa = _question()
    vlm = load_model("shapes-vlm")
    ids = vlm.processor.tokenizer(" " + qa["answer"], add_special_tokens=False)["input_ids"]
    s = make_subject(vlm, scene.render(64), {"question": qa["question"], "answer_ids": ids, "token_index": 0})
    with torch.inference_mode():
        clean = vlm.adapter.answer_logits(vlm, s.sequence.model_inputs(1, s.pixel_values), s.position)
    nothing = iv.run_blocks(s, [iv.Block((), (), (0, 1, 2, 3))])
    torch.testing.assert_close(nothing, clean, atol=1e-2, rtol=1e-2)  # bf16: the kernels may differ in rounding
    blocked = iv.knockout(s, "text", {"box": scene.sorted_objects()[qa["object"]].box(64)})
    assert blocked["blocked"]["probability"] < blocked["clean"]["probability"]


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_weights_answer_and_explain_on_cuda(on_cuda, monkeypatch, bits):
    """bitsandbytes weights (MMIE_QUANTIZE) placed by device_map: the answer and every method run, gradients
    reach the pixels through the quantized layers, and the maps stay close to the bf16 model's."""
    pytest.importorskip("bitsandbytes")
    from mmie_core import models
    from mmie_core.chat import answer_token_maps, greedy_answer_ids
    from mmie_core.explain import METHODS, explain

    scene, qa = _question()
    image = scene.render(256)
    full = models.load_model("shapes-vlm")
    ids = greedy_answer_ids(full, image, qa["question"])
    reference = explain(full, image, {"question": qa["question"], "answer_ids": ids, "token_index": 0}, "relevancy")
    monkeypatch.setenv("MMIE_QUANTIZE", bits)
    models.MODEL_CACHE.clear()
    small = models.load_model("shapes-vlm")
    assert small.device.type == "cuda" and hasattr(small.model, "hf_device_map")
    answer = greedy_answer_ids(small, image, qa["question"])
    target = {"question": qa["question"], "answer_ids": answer, "token_index": 0}
    for method in METHODS:
        heat = explain(small, image, target, method, **({"steps": 8} if method == "integrated_gradients" else {}))
        assert np.isfinite(heat.values).all() and np.abs(heat.values).sum() > 0, method
    assert len(answer_token_maps(small, image, qa["question"], answer).heatmaps) == len(answer)
    if answer == ids:
        quantized = explain(small, image, target, "relevancy")
        corr = np.corrcoef(reference.values.ravel(), quantized.values.ravel())[0, 1]
        assert corr > 0.8, corr
