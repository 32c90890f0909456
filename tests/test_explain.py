"""The explanation engine: capture hooks, every method on tiny CLIP / SigLIP / LLaVA, rendering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmie_core import models
from mmie_core.attention import AttentionRecorder, relevancy, remove_sinks, rollout
from mmie_core.explain import METHODS, _constant_image, explain, explain_subject, make_subject
from mmie_core.heatmap import PatchHeatmap
from mmie_core.models import attention_implementation
from mmie_core.render import figure_to_image, heatmap_figure, overlay_heatmap
from mmie_core.shapes.world import make_scene


@pytest.fixture(scope="module")
def scene_image():
    return make_scene(21, n_objects=3).render(96)


def _target(loaded, family):
    if family in ("llava", "paligemma"):
        tok = loaded.processor.tokenizer
        return {"question": "what color is the circle?", "answer_ids": tok(" red circle", add_special_tokens=False)["input_ids"],
                "token_index": 1}
    return {"label": "a red circle", "labels": ["a red circle", "a blue square"]}


@pytest.mark.parametrize("family", ["clip", "siglip", "llava", "paligemma"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_every_family(family, method, scene_image, tiny_clip_dir, tiny_siglip_dir, tiny_llava_dir,
                                      tiny_paligemma_dir, fresh_cache):
    folder = {"clip": tiny_clip_dir, "siglip": tiny_siglip_dir, "llava": tiny_llava_dir,
              "paligemma": tiny_paligemma_dir}[family]
    loaded = models.load_model(folder)
    params = {"steps": 4} if method == "integrated_gradients" else {}
    target = _target(loaded, family)
    heatmap = explain(loaded, scene_image, target, method, **params)
    assert isinstance(heatmap, PatchHeatmap)
    assert heatmap.grid == (4, 4) and np.isfinite(heatmap.values).all()
    assert np.ptp(heatmap.values) > 0  # the map varies over the image
    if "label" in target and method not in ("attention", "rollout"):  # (the vision tower alone: label-blind)
        other = explain(loaded, scene_image, {**target, "label": "a blue square"}, method, **params)
        assert not np.allclose(other.values, heatmap.values), "the map must depend on the label"
    assert heatmap.method == method and heatmap.seconds > 0
    assert heatmap.box == (0.0, 0.0, 96.0, 96.0)
    if method in ("attention", "rollout"):
        assert heatmap.values.sum() == pytest.approx(1.0, abs=1e-6)  # renormalised over the image
    assert loaded.model.config._attn_implementation == "sdpa"  # eager only while needed
    if family in ("llava", "paligemma"):
        assert heatmap.target["token"] == "circle"


def test_hooks_are_removed_even_when_forward_raises(tiny_clip_dir, fresh_cache):
    loaded = models.load_model(tiny_clip_dir)
    layers = loaded.model.vision_model.encoder.layers
    modules = {i: layer.self_attn for i, layer in enumerate(layers)}
    before = [len(m._forward_hooks) for m in modules.values()]

    def explode(module, args, output):
        raise RuntimeError("boom inside the model")

    bomb = layers[0].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with attention_implementation(loaded.model, "eager"), AttentionRecorder(modules):
                loaded.model.vision_model(pixel_values=torch.zeros(1, 3, 32, 32))
    finally:
        bomb.remove()
    assert [len(m._forward_hooks) for m in modules.values()] == before
    assert loaded.model.config._attn_implementation == "sdpa"


def test_sdpa_gives_no_weights_and_says_so(tiny_clip_dir, fresh_cache):
    loaded = models.load_model(tiny_clip_dir)
    layer = loaded.model.vision_model.encoder.layers[0].self_attn
    with pytest.raises(RuntimeError, match="eager"):
        with AttentionRecorder({0: layer}):
            loaded.model.vision_model(pixel_values=torch.zeros(1, 3, 32, 32))


def test_recorder_keeps_only_rows_of_interest(tiny_llava_dir, fresh_cache):
    loaded = models.load_model(tiny_llava_dir)
    tok = loaded.processor.tokenizer
    subject = make_subject(loaded, Image.new("RGB", (32, 32)), {"question": "what?", "answer_ids":
                           tok(" red", add_special_tokens=False)["input_ids"], "token_index": 0})
    modules = subject.attention_modules()
    seq = subject.input_ids.shape[1]
    with attention_implementation(loaded.model, "eager"), torch.no_grad(), \
            AttentionRecorder(modules, rows=[subject.position]) as rec:
        subject.run_forward()
    for maps in rec.maps.values():
        assert maps.shape[2:] == (1, seq)  # (B, heads, 1 row, seq), not (seq, seq)
        assert torch.allclose(maps.sum(-1), torch.ones_like(maps.sum(-1)), atol=1e-5)


@pytest.mark.parametrize("family,padded", [("llava", False), ("llava", True), ("paligemma", False)])
def test_row_recorder_equals_eager_rows(tiny_llava_dir, tiny_paligemma_dir, fresh_cache, family, padded):
    """The sdpa pass with row taps gives exactly the rows eager attention computes, without ever
    building a (seq x seq) matrix; also with a padding mask, and for PaliGemma (grouped-query
    attention, a bidirectional prefix from token_type_ids)."""
    from mmie_core.attention import RowRecorder, register_rows_implementation

    loaded = models.load_model(tiny_llava_dir if family == "llava" else tiny_paligemma_dir)
    tok = loaded.processor.tokenizer
    subject = make_subject(loaded, Image.new("RGB", (32, 32), (200, 20, 20)), {
        "question": "what color is it?", "answer_ids": tok(" a red circle.", add_special_tokens=False)["input_ids"],
        "token_index": 1})
    ids = subject.input_ids
    mask = torch.ones_like(ids)
    if padded:  # a left-padded batch row, as batched generation makes
        ids = torch.cat([torch.full((1, 3), tok.pad_token_id), ids], 1)
        mask = torch.cat([torch.zeros((1, 3), dtype=mask.dtype), mask], 1)
    rows = list(range(ids.shape[1] - 5, ids.shape[1]))
    modules = subject.attention_modules()
    kwargs = dict(subject.sequence.model_inputs(), input_ids=ids, attention_mask=mask)
    rows = rows if family == "llava" else list(range(5, ids.shape[1]))  # prefix rows see later prefix keys too
    with attention_implementation(loaded.model, "eager"), torch.no_grad(), AttentionRecorder(modules, rows=rows) as eager:
        loaded.model(**kwargs)
    with attention_implementation(loaded.model, register_rows_implementation()), torch.no_grad(), \
            RowRecorder(modules, rows) as tapped:
        loaded.model(**kwargs)
    assert loaded.model.config._attn_implementation == "sdpa"
    for layer in modules:
        assert tapped.maps[layer].shape == eager.maps[layer].shape == (1, 2, len(rows), ids.shape[1])
        if family == "paligemma":  # the first prefix row attends past itself, as the prefix is bidirectional
            assert tapped.maps[layer][0, :, 0, rows[0] + 1:].sum() > 0
        assert torch.allclose(tapped.maps[layer], eager.maps[layer], atol=1e-6)


def test_row_taps_are_removed_when_the_forward_raises(tiny_llava_dir, fresh_cache):
    from mmie_core import attention

    loaded = models.load_model(tiny_llava_dir)
    modules = {i: layer.self_attn for i, layer in enumerate(loaded.model.model.language_model.layers)}
    with pytest.raises(RuntimeError, match="boom"):
        with attention_implementation(loaded.model, attention.register_rows_implementation()), \
                attention.RowRecorder(modules, rows=[0]):
            assert len(attention._ROW_TAPS) == len(modules)
            raise RuntimeError("boom")
    assert attention._ROW_TAPS == {} and loaded.model.config._attn_implementation == "sdpa"


def test_gradcam_works_again_on_the_same_vlm(tiny_llava_dir, fresh_cache, scene_image):
    """transformers installs output-capturing hooks on the first forward: a second gradcam on the same
    loaded model must still see its reshape hook's output (it once failed with no grad_fn)."""
    loaded = models.load_model(tiny_llava_dir)
    first = explain(loaded, scene_image, _target(loaded, "llava"), "gradcam")
    second = explain(loaded, scene_image, _target(loaded, "llava"), "gradcam")
    assert np.allclose(first.values, second.values)


def test_relevancy_through_the_vision_tower(tiny_llava_dir, tiny_paligemma_dir, tiny_clip_dir, fresh_cache,
                                           scene_image):
    for folder, family in ((tiny_llava_dir, "llava"), (tiny_paligemma_dir, "paligemma")):
        loaded = models.load_model(folder)
        vision = loaded.model.model.vision_tower.encoder.layers
        plain = explain(loaded, scene_image, _target(loaded, family), "relevancy")
        hooks = [dict(layer.self_attn._forward_hooks) for layer in vision]  # after transformers' own first ones
        chained = explain(loaded, scene_image, _target(loaded, family), "relevancy", through_vision=True)
        assert chained.grid == (4, 4) and np.isfinite(chained.values).all() and chained.values.max() > 0
        assert chained.params == {"through_vision": True} and not np.array_equal(plain.values, chained.values)
        assert [dict(layer.self_attn._forward_hooks) for layer in vision] == hooks
    clip = models.load_model(tiny_clip_dir)
    with pytest.raises(ValueError, match="chat VLMs"):
        explain(clip, scene_image, _target(clip, "clip"), "relevancy", through_vision=True)


def test_rollout_and_relevancy_math():
    n = 3
    uniform = torch.full((2, n, n), 1.0 / n)  # (heads, q, k)
    r = rollout([uniform, uniform])
    assert torch.allclose(r.sum(-1), torch.ones(n, dtype=torch.float64))
    ident = torch.eye(n).expand(2, n, n)
    assert torch.allclose(rollout([ident]), torch.eye(n, dtype=torch.float64))
    # relevancy: with zero gradients nothing moves from the identity
    assert torch.allclose(relevancy([uniform], [torch.zeros_like(uniform)]), torch.eye(n, dtype=torch.float64))
    grad = torch.ones_like(uniform)
    expected = torch.eye(n, dtype=torch.float64) + uniform[0].double() @ torch.eye(n, dtype=torch.float64)
    assert torch.allclose(relevancy([uniform], [grad]), expected)


def test_remove_sinks_zeroes_outliers():
    cols = torch.tensor([0.05, 0.06, 0.05, 0.7, 0.04, 0.05, 0.05])
    out = remove_sinks(cols)
    assert out[3] == 0 and out[0] == cols[0]


def test_attention_options(tiny_clip_dir, fresh_cache, scene_image):
    loaded = models.load_model(tiny_clip_dir)
    subject = make_subject(loaded, scene_image, {"label": "a red circle"})
    mean = explain_subject(subject, "attention", layers="all", head_fusion="mean")
    mx = explain_subject(subject, "attention", layers="all", head_fusion="max")
    one = explain_subject(subject, "attention", layers=[0], heads=[1])
    assert mean.params["layers"] == [0, 1] and one.params["heads"] == [1]
    assert not np.allclose(mean.values, mx.values)
    with pytest.raises(ValueError, match="fusion"):
        explain_subject(subject, "attention", head_fusion="median")
    with pytest.raises(ValueError, match="Unknown method"):
        explain_subject(subject, "magic")
    with pytest.raises(ValueError, match="discard_ratio"):
        explain_subject(subject, "rollout", discard_ratio=1.5)


def test_integrated_gradients_batched_equals_unbatched(tiny_clip_dir, fresh_cache, scene_image):
    loaded = models.load_model(tiny_clip_dir)
    subject = make_subject(loaded, scene_image, {"label": "a red circle"})
    batched = explain_subject(subject, "integrated_gradients", steps=8, internal_batch_size=8)
    single = explain_subject(subject, "integrated_gradients", steps=8, internal_batch_size=1)
    assert np.allclose(batched.values, single.values, atol=1e-4)


def test_occlusion_window_and_smoothgrad(tiny_clip_dir, fresh_cache, scene_image):
    loaded = models.load_model(tiny_clip_dir)
    subject = make_subject(loaded, scene_image, {"label": "a red circle"})
    assert explain_subject(subject, "occlusion", window=2, stride=1).grid == (4, 4)
    smooth = explain_subject(subject, "saliency", smooth=True, samples=4)
    assert smooth.params["samples"] == 4
    with pytest.raises(ValueError):
        explain_subject(subject, "occlusion", window=9)


def test_heatmap_json_round_trip_and_geometry():
    hm = PatchHeatmap(np.arange(12.0).reshape(3, 4), "attention", {"label": "x"}, (10, 20, 50, 50), (60, 60),
                      {"layers": [1]})
    again = PatchHeatmap.from_json(hm.to_json())
    assert np.allclose(again.values, hm.values) and again.box == hm.box and again.target == hm.target
    assert hm.argmax() == (2, 3)
    assert hm.patch_box(0, 0) == (10, 20, 20, 30)
    assert hm.normalized().max() == 1.0
    with pytest.raises(ValueError):
        PatchHeatmap(np.zeros(5), "x", {}, (0, 0, 1, 1), (1, 1))


def test_overlay_puts_the_heat_where_the_values_are():
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    values = np.zeros((2, 2))
    values[1, 0] = 1.0  # bottom-left patch of the centre crop
    hm = PatchHeatmap(values, "test", {}, (50, 0, 150, 100), (200, 100))
    out = np.asarray(overlay_heatmap(img, hm, opacity=0.9, target=200)).astype(int)
    hot, cold = out[75, 75], out[25, 125]
    assert np.abs(hot - cold).sum() > 100
    assert out[50, 10].max() < 130  # outside the model's view: dimmed
    fig = heatmap_figure(img, hm)
    assert figure_to_image(fig).size[0] > 100


def test_gradient_objectives_and_integrated_gradients_baselines(tiny_clip_dir, tiny_siglip_dir, tiny_llava_dir,
                                                                 fresh_cache, scene_image):
    from PIL import Image

    from mmie_core.explain import _constant_image

    for folder, family in ((tiny_clip_dir, "clip"), (tiny_siglip_dir, "siglip"), (tiny_llava_dir, "llava")):
        loaded = models.load_model(folder)
        subject = make_subject(loaded, scene_image, _target(loaded, family))
        with torch.no_grad():
            px = subject.pixel_values
            assert torch.allclose(subject.log_probability(px), subject.probability(px).log(), atol=1e-5)
        white = _constant_image(subject, (255, 255, 255))
        size = scene_image.size
        processed = loaded.processor.image_processor(images=[Image.new("RGB", size, (255, 255, 255))],
                                                     return_tensors="pt")["pixel_values"]
        assert torch.allclose(white, processed.to(white), atol=1e-4)  # the processor's own white image
        for baseline in ("mean", "black", "white"):
            heatmap = explain_subject(subject, "integrated_gradients", steps=4, baseline=baseline, objective="log_prob")
            assert heatmap.grid == (4, 4) and np.isfinite(heatmap.values).all()
            assert heatmap.params["objective"] == "log_prob"
        sal = explain_subject(subject, "saliency", objective="log_prob")
        assert sal.params["objective"] == "log_prob" and np.isfinite(sal.values).all()
    with pytest.raises(ValueError, match="baseline"):
        explain_subject(subject, "integrated_gradients", baseline="grey")
    with pytest.raises(ValueError, match="objective"):
        explain_subject(subject, "saliency", objective="prob")


@pytest.mark.parametrize("family", ["clip", "siglip", "llava", "paligemma", "blip", "idefics3", "qwen2vl"])
def test_integrated_gradients_completeness_on_every_family(family, request, fresh_cache):
    """Captum's convergence delta is reported with every IG map (JSON params, figure title), and it is
    small: the map adds up to score(image) - score(black canvas) within 10% at 128 steps, closer than at 8."""
    from mmie_core.models import load_model
    from mmie_core.render import _title

    loaded = load_model(request.getfixturevalue(f"tiny_{family}_dir"))
    image = Image.new("RGB", (48, 32), "white")
    image.paste((220, 30, 30), (4, 4, 20, 20))
    if loaded.adapter.zero_shot:
        target = {"label": "a red circle", "labels": ["a red circle", "a blue square"]}
    else:
        ids = loaded.processor.tokenizer(" red", add_special_tokens=False)["input_ids"]
        target = {"question": "what color is the circle?", "answer_ids": ids, "token_index": 0}
    subject = make_subject(loaded, image, target)
    heat = explain_subject(subject, "integrated_gradients", steps=128, internal_batch_size=32, baseline="black")
    coarse = explain_subject(subject, "integrated_gradients", steps=8, internal_batch_size=8, baseline="black")
    p = heat.params
    black = _constant_image(subject, (0, 0, 0))
    with torch.inference_mode():
        gap = float(subject.score(subject.pixel_values) - subject.score(black))
    assert abs(heat.values.sum() - gap) == pytest.approx(p["completeness_delta"], rel=1e-3, abs=1e-5)
    assert p["completeness_error"] == pytest.approx(p["completeness_delta"] / abs(gap), rel=1e-6)
    # the error shrinks with more steps and is small at 128 (the tiny models' weights are random)
    assert p["completeness_error"] < max(coarse.params["completeness_error"], 0.01) and p["completeness_error"] < 0.1, p
    assert "completeness error" in _title(heat) and "completeness_error" in heat.to_json()["params"]
