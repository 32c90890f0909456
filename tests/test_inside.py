"""The deeper views (sequence, patch to words, patch similarity, logit lens, robustness), checked
against the models' own computations on tiny random LLaVA / PaliGemma models and the embedded
ShapesWorld models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmie_core import models
from mmie_core.chat import answer_token_maps, chat_inputs, patch_to_words
from mmie_core.explain import make_subject
from mmie_core.inspect_vision import patch_similarity
from mmie_core.lens import image_hidden_states, logit_lens
from mmie_core.patches import patch_at, patches_in_box, processor_view, vision_grid, vision_tower
from mmie_core.robustness import PERTURBATIONS, perturb, robustness
from mmie_core.sequence import sequence_view
from mmie_core.shapes.world import make_scene

QUESTION = "what color is the circle?"


@pytest.fixture(params=["llava", "paligemma"])
def tiny_vlm(request, tiny_llava_dir, tiny_paligemma_dir, fresh_cache):
    return models.load_model(tiny_llava_dir if request.param == "llava" else tiny_paligemma_dir)


@pytest.fixture(scope="module")
def scene_image():
    return make_scene(10003).render(96)


def _hooks(model) -> dict:
    """Every forward (pre-)hook on the model; transformers installs its own output-capturing
    hooks on the first forward pass, so tests compare snapshots instead of expecting none."""
    return {name: (list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in model.named_modules()}


def _lm_inputs_embeds(loaded, inputs) -> torch.Tensor:
    """What the language model really receives (image features already scattered in)."""
    seen = {}
    lm = loaded.model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            loaded.model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"][0]


def _patch_feature(loaded, pixel_values, row, col) -> torch.Tensor:
    """Projector output for vision-tower token (row, col), computed from the vision tower alone."""
    grid = vision_grid(loaded)
    with torch.no_grad():
        out = vision_tower(loaded)(pixel_values=pixel_values, output_hidden_states=True)
        layer = getattr(loaded.model.config, "vision_feature_layer", None)
        hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]
        token = hidden[:, grid.patch_to_token(row, col)][:, None]  # (1, 1, D)
        return loaded.model.model.multi_modal_projector(token)[0, 0]


def _check_sequence_against_model(loaded, image, question=QUESTION):
    view = sequence_view(loaded, image, question)
    inputs = chat_inputs(loaded, image, question)
    assert [t.id for t in view.tokens] == inputs["input_ids"][0].tolist()
    embeds = _lm_inputs_embeds(loaded, inputs)
    grid = vision_grid(loaded)
    image_tokens = [t for t in view.tokens if t.kind == "image"]
    assert len(image_tokens) == grid.n_patches == view.counts["image"]
    assert {(t.patch[0], t.patch[1]) for t in image_tokens} == {(r, c) for r in range(grid.rows) for c in range(grid.cols)}
    for t in image_tokens:  # each image token holds exactly its patch's projected features
        expected = _patch_feature(loaded, inputs["pixel_values"], t.patch[0], t.patch[1])
        torch.testing.assert_close(embeds[t.index], expected.to(embeds.dtype), atol=1e-5, rtol=1e-4)
    return view


def test_sequence_view_tiny_models(tiny_vlm):
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    image.paste((20, 40, 220), (0, 0, 20, 20))  # patches differ, so a wrong mapping shows
    view = _check_sequence_against_model(tiny_vlm, image)
    data = view.to_json()
    assert data["counts"]["image"] + data["counts"]["text"] + data["counts"]["special"] == data["length"]
    assert data["image_share"] == pytest.approx(data["counts"]["image"] / data["length"], abs=1e-4)
    [group] = data["image_groups"]
    assert group["tokens"] == data["counts"]["image"] and group["end"] - group["start"] + 1 == group["tokens"]
    if tiny_vlm.family == "paligemma":
        assert group["start"] == 0 and "both directions" in " ".join(view.notes)
    else:
        assert "causal" in " ".join(view.notes)


def test_sequence_view_shapes_vlm(scene_image):
    loaded = models.load_model("shapes-vlm")
    view = _check_sequence_against_model(loaded, scene_image)
    kinds = {t.text: t.kind for t in view.tokens if t.kind != "image"}
    assert kinds["<|user|>"] == kinds["<|assistant|>"] == kinds["<|end|>"] == "special"
    assert kinds["▁circle"] == "text"
    assert view.to_json()["image_groups"][0]["grid"] == [8, 8]


def test_sequence_view_refuses_dual_encoders(scene_image):
    with pytest.raises(ValueError, match="one grid of tokens in a language model's input; shapes-clip is a clip"):
        sequence_view(models.load_model("shapes-clip"), scene_image, QUESTION)


def test_patch_at_and_patches_in_box_agree_with_the_heatmap_geometry(tiny_clip_dir, fresh_cache):
    loaded = models.load_model(tiny_clip_dir)
    image = Image.new("RGB", (120, 60), "white")  # wide: the processor crops the centre
    view, grid = processor_view(loaded, image), vision_grid(loaded)
    x0, y0, x1, y1 = view.box
    assert x0 > 0  # cropped
    w, h = (x1 - x0) / grid.cols, (y1 - y0) / grid.rows
    for r in range(grid.rows):
        for c in range(grid.cols):
            assert patch_at(view, grid, x0 + (c + 0.5) * w, y0 + (r + 0.5) * h) == (r, c)
    with pytest.raises(ValueError, match="outside the region"):
        patch_at(view, grid, 1, 30)
    cells = patches_in_box(view.box, grid, (x0, y0, x0 + 2 * w, y0 + h))
    assert cells == [(0, 0), (0, 1)]


def test_patch_to_words_matches_eager_attention(tiny_vlm):
    """One layer, mean over heads: the attention of each answer position to the patch's image token,
    as eager attention computes it (LLaVA: causal; PaliGemma: bidirectional prefix, grouped-query)."""
    loaded = tiny_vlm
    image = Image.new("RGB", (40, 40), (30, 160, 60))
    answer = [5, 9, 11]
    maps = answer_token_maps(loaded, image, "what is it?", answer, layers=[1], head_fusion="mean")
    from mmie_core.chat import answer_sequence

    seq = answer_sequence(loaded, image, "what is it?", answer)
    with models.attention_implementation(loaded.model, "eager"), torch.no_grad():
        out = loaded.model(**seq.model_inputs(), output_attentions=True)
    attn = out.attentions[1][0].mean(0)  # (q, k), heads averaged
    grid = vision_grid(loaded)
    for r, c in [(0, 0), (1, 2), (grid.rows - 1, grid.cols - 1)]:
        col = int(seq.image_positions[r * grid.cols + c])
        expected = [float(attn[seq.prompt_length - 1 + k, col]) for k in range(len(answer))]
        got = [v for _, v in patch_to_words(maps, r, c)]
        np.testing.assert_allclose(got, expected, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        patch_to_words(maps, grid.rows, 0)


def test_patch_similarity_lights_up_the_object():
    loaded = models.load_model("shapes-clip")
    scene = make_scene(10011, n_objects=1)
    obj = scene.objects[0]
    image = scene.render(256)
    view, grid = processor_view(loaded, image), vision_grid(loaded)
    inside = patches_in_box(view.box, grid, tuple(obj.box(256)))
    assert len(inside) >= 2
    r, c = inside[len(inside) // 2]
    heatmap = patch_similarity(loaded, image, r, c, depth=-1)
    values = heatmap.values
    assert values[r, c] == pytest.approx(1.0, abs=1e-5)
    assert values.max() <= 1.0 + 1e-5 and values.min() >= -1.0 - 1e-5
    mask = np.zeros(values.shape, dtype=bool)
    for rr, cc in inside:
        mask[rr, cc] = True
    mask[r, c] = False
    assert values[mask].mean() > values[~mask].mean() + 0.2  # the object is one thing; the background another
    with pytest.raises(ValueError, match="depths 0"):
        patch_similarity(loaded, image, r, c, depth=99)
    with pytest.raises(ValueError, match="outside"):
        patch_similarity(loaded, image, 99, 0)


def test_logit_lens_last_depth_is_the_models_own_prediction(tiny_vlm):
    image = Image.new("RGB", (40, 40), (30, 160, 60))
    with torch.no_grad():
        tiny_vlm.model(**chat_inputs(tiny_vlm, image, "what is it?"))
    before = _hooks(tiny_vlm.model)
    lens = logit_lens(tiny_vlm, image, "what is it?", top_k=3)
    assert _hooks(tiny_vlm.model) == before
    n_blocks = len(tiny_vlm.model.model.language_model.layers)
    assert lens.layers == list(range(n_blocks + 1))
    grid = vision_grid(tiny_vlm)
    assert lens.token_ids.shape == (n_blocks + 1, grid.rows, grid.cols, 3)
    inputs = chat_inputs(tiny_vlm, image, "what is it?")
    positions = (inputs["input_ids"][0] == tiny_vlm.model.config.image_token_id).nonzero().flatten()
    with torch.no_grad():
        logits = tiny_vlm.model(**inputs).logits[0, positions].float()  # (patches, vocab), row-major patches
    probs = logits.softmax(-1)
    top = probs.topk(3, dim=-1)
    np.testing.assert_array_equal(lens.token_ids[-1].reshape(-1, 3), top.indices.numpy())
    np.testing.assert_allclose(lens.probs[-1].reshape(-1, 3), top.values.numpy(), atol=1e-5)
    assert lens.patch_top_k(n_blocks, 0, 0)[0][1] == pytest.approx(float(top.values[0, 0]), abs=1e-5)
    assert len(lens.to_json()["top_k"]) == n_blocks + 1
    # depth 0 is the language model's input at the image positions
    depths, states = image_hidden_states(tiny_vlm, dict(inputs), positions, layers=[0])
    embeds = _lm_inputs_embeds(tiny_vlm, inputs)
    torch.testing.assert_close(states[0, 0], embeds[positions])


def test_logit_lens_hooks_removed_on_error(tiny_llava_dir, fresh_cache):
    loaded = models.load_model(tiny_llava_dir)
    image = Image.new("RGB", (40, 40), "red")
    inputs = chat_inputs(loaded, image, "what is it?")
    with torch.no_grad():
        loaded.model(**inputs)
    before = _hooks(loaded.model)
    with pytest.raises(ValueError, match="depths 0"):
        logit_lens(loaded, image, "what is it?", layers=[0, 99])
    positions = torch.tensor([1, 2])
    blocks = loaded.model.model.language_model.layers
    boom = blocks[1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            image_hidden_states(loaded, dict(inputs), positions)
    finally:
        boom.remove()
    assert _hooks(loaded.model) == before


def test_logit_lens_agreement_on_shapesworld():
    from mmie_core.shapes.lens_agreement import logit_lens_agreement

    result = logit_lens_agreement("shapes-vlm", seed=10000, n=4)
    depths = len(result["layers"])
    assert depths == len(models.load_model("shapes-vlm").model.model.language_model.layers) + 1
    for key in ("color", "shape", "either", "other_object_word", "background_object_word"):
        assert len(result[key]) == depths and all(0.0 <= v <= 1.0 for v in result[key])
    for d in range(depths):  # either = colour or shape, and those two never both hold for one word
        assert result["either"][d] == pytest.approx(result["color"][d] + result["shape"][d], abs=1e-3)
    assert result["object_patches"] > 0 and result["background_patches"] > 0


def test_perturbations_identity_and_effect(scene_image):
    assert np.array_equal(np.asarray(perturb(scene_image, "noise", 0.0)), np.asarray(scene_image))
    assert np.array_equal(np.asarray(perturb(scene_image, "jpeg", 100)), np.asarray(scene_image))
    assert np.array_equal(np.asarray(perturb(scene_image, "blur", 0.0, 12.0)), np.asarray(scene_image))
    for kind, strength in [("noise", 0.3), ("blur", 1.0), ("jpeg", 5)]:
        out = perturb(scene_image, kind, strength, 12.0)
        assert out.size == scene_image.size
        assert np.abs(np.asarray(out, dtype=float) - np.asarray(scene_image, dtype=float)).mean() > 1.0
    with pytest.raises(ValueError, match="Unknown perturbation"):
        perturb(scene_image, "fog", 1.0)


@pytest.mark.parametrize("name", ["shapes-clip", "shapes-siglip"])
def test_robustness_dual_encoder(scene_image, name):
    loaded = models.load_model(name)
    labels = ["a blue circle", "a red square", "a blue diamond", "a green triangle"]
    target = {"label": "a blue circle", "labels": labels}
    clean = float(make_subject(loaded, scene_image, target).probability(
        make_subject(loaded, scene_image, target).pixel_values))
    result = robustness(loaded, scene_image, target, "noise")
    assert result.strengths == list(PERTURBATIONS["noise"])
    assert result.scores[0] == pytest.approx(clean, abs=1e-5)  # strength 0 is the clean image
    assert all(o in labels for o in result.outputs) and result.changed[0] is False
    occl = robustness(loaded, scene_image, target, "occlusion", strengths=[0.0, 0.25, 1.0])
    assert occl.random_scores is not None and occl.heatmap["method"] == "relevancy"
    assert occl.scores[0] == pytest.approx(occl.random_scores[0], abs=1e-6)  # nothing occluded
    assert occl.scores[-1] == pytest.approx(occl.random_scores[-1], abs=1e-6)  # everything occluded
    data = occl.to_json()
    assert data["perturbation"] == "occlusion" and len(data["random_scores"]) == 3 and "images" not in data
    with pytest.raises(ValueError, match="strengths must lie"):
        robustness(loaded, scene_image, target, "jpeg", strengths=[0])


def test_patch_similarity_every_family(tiny_clip_dir, tiny_siglip_dir, tiny_llava_dir, tiny_paligemma_dir,
                                       fresh_cache):
    image = Image.new("RGB", (50, 40), (30, 160, 60))
    image.paste((200, 20, 20), (0, 0, 25, 20))
    for folder in (tiny_clip_dir, tiny_siglip_dir, tiny_llava_dir, tiny_paligemma_dir):
        loaded = models.load_model(folder)
        grid = vision_grid(loaded)
        depths = len(vision_tower(loaded).encoder.layers) + 1
        for depth in (0, depths - 1):
            heatmap = patch_similarity(loaded, image, grid.rows - 1, 0, depth=depth)
            assert heatmap.grid == (grid.rows, grid.cols), loaded.family
            assert heatmap.values[grid.rows - 1, 0] == pytest.approx(1.0, abs=1e-5), loaded.family
            assert heatmap.params["depth"] == depth


def test_robustness_vlm(tiny_vlm):
    loaded = tiny_vlm
    image = Image.new("RGB", (40, 40), (30, 160, 60))
    target = {"question": "what is it?", "answer_ids": [5, 9], "token_index": 0}
    result = robustness(loaded, image, target, "blur", strengths=[0.0, 2.0])
    assert len(result.scores) == len(result.outputs) == len(result.images) == 2
    assert all(0.0 <= s <= 1.0 for s in result.scores)
    subject = make_subject(loaded, image, target)
    assert result.scores[0] == pytest.approx(float(subject.probability(subject.pixel_values)), abs=1e-5)


# --------------------------------------------------------------------------- through the running studio


def _example(i: int = 0) -> str:
    from studio.common import example_images

    return example_images()[i]


def test_sequence_endpoint(client):
    from gradio_client import handle_file

    chips, summary, patch_png, about, data = client.predict(
        handle_file(_example()), "how many shapes are there?", "shapes-vlm", 30, api_name="/sequence")
    assert data["counts"]["image"] == 64 and "64 image" in summary
    token = data["tokens"][30]
    assert token["kind"] == "image" and f"row {token['row']}, column {token['col']}" in about
    assert Image.open(patch_png).size == (640, 640)
    assert isinstance(chips, list) and len(chips) == data["length"]  # one chip per token, in order
    assert [c["class_or_confidence"] for c in chips] == [t["kind"] for t in data["tokens"]]
    assert chips[30]["token"] == f"▣{token['row']},{token['col']}"


def test_patch_to_words_endpoint(client):
    from gradio_client import handle_file

    pick, chart, data = client.predict(handle_file(_example()), "what color is the circle?", "shapes-vlm", 2, 5,
                                       0, 3, "max", api_name="/patch_to_words")
    assert data["patch"] == [2, 5] and data["layers"] == [0, 1, 2, 3] and data["head_fusion"] == "max"
    assert data["tokens"] and all(0.0 <= t["attention"] <= 1.0 for t in data["tokens"])
    assert Image.open(chart).size[0] > 100 and Image.open(pick).size == (640, 640)


def test_patch_similarity_and_logit_lens_endpoints(client):
    from gradio_client import handle_file

    pick, overlay, heatmap = client.predict(handle_file(_example(1)), "shapes-siglip", 4, 4, 2, "viridis", 0.6,
                                            api_name="/patch_similarity")
    assert heatmap["grid"] == [8, 8] and heatmap["values"][4][4] == pytest.approx(1.0, abs=1e-4)
    assert heatmap["params"]["depth"] == 2
    png, table, lens = client.predict(handle_file(_example(1)), "describe the image.", "shapes-vlm", 3, 1, 6, 4,
                                      api_name="/logit_lens")
    assert lens["shown_depth"] == 3 and lens["patch"] == [1, 6] and lens["grid"] == [8, 8]
    assert len(lens["top_k"]) == 5 and len(lens["top_k"][3]["words"][1][6]) == 4
    assert "Patch (1, 6)" in table and Image.open(png).size == (640, 640)


def test_robustness_endpoint(client):
    from gradio_client import handle_file

    plot, gallery, table, data = client.predict(
        handle_file(_example(2)), "shapes-clip", "occlusion", "a red square, a yellow circle, a green square",
        "relevancy", api_name="/robustness")
    assert data["perturbation"] == "occlusion" and len(data["scores"]) == len(data["random_scores"]) == 6
    assert len(gallery) == 6 and "| strength |" in table
    plot2, gallery2, table2, data2 = client.predict(
        handle_file(_example(2)), "shapes-vlm", "noise", "how many shapes are there?", "attention",
        api_name="/robustness")
    assert data2["target"]["question"] == "how many shapes are there?" and len(data2["outputs"]) == 6


def test_inside_bad_input_is_a_message_and_the_app_keeps_serving(client):
    from gradio_client import handle_file

    with pytest.raises(Exception, match="outside shapes-vlm's 8 x 8 grid"):
        client.predict(handle_file(_example()), "q?", "shapes-vlm", 9, 0, 0, 3, "mean", api_name="/patch_to_words")
    with pytest.raises(Exception, match="not in the list of choices"):  # the picker lists chat models only
        client.predict(handle_file(_example()), "", "shapes-clip", 3, 0, 0, 5, api_name="/logit_lens")
    with pytest.raises(Exception, match="No image was given"):
        client.predict(None, "", "shapes-vlm", 3, 0, 0, 5, api_name="/logit_lens")
    with pytest.raises(Exception, match="not in the list of choices"):
        client.predict(handle_file(_example()), "shapes-clip", "fog", "a, b", "relevancy", api_name="/robustness")
    with pytest.raises(Exception, match="Type at least one label"):
        client.predict(handle_file(_example()), "shapes-clip", "noise", "", "relevancy", api_name="/robustness")
    *_, data = client.predict(handle_file(_example()), "q?", "shapes-vlm", -1, api_name="/sequence")
    assert data["counts"]["image"] == 64


def test_click_picks_the_patch_under_the_pointer():
    import gradio as gr

    from studio.inside_tab import PICK_SIZE, pick_patch

    path = _example()  # 256 px scene: shown at PICK_SIZE px, 8 x 8 grid
    cell = PICK_SIZE / 8
    evt = gr.SelectData(None, {"index": [int(5.5 * cell), int(2.5 * cell)], "value": None})
    assert pick_patch(path, "shapes-clip", evt) == (2, 5)
