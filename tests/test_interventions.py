"""Interventions: attention knockout, activation patching and Captum segment ablation.

Exactness checks (knockout of nothing, knockout of every edge to the image against a run with no image
tokens at all, patching everything), family coverage on the preset fixtures at their real geometry, and
the ShapesWorld ground truth (counterfactuals, masks, the causal command)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from preset_fixtures import build_preset

from mmie_core import interventions as iv
from mmie_core.explain import make_subject
from mmie_core.models import load_model
from mmie_core.shapes.world import COLORS, counterfactual, make_scene

SEED = 50_000


@pytest.fixture(scope="module")
def vlm():
    return load_model("shapes-vlm")


def _subject(loaded, scene, kind="color", size=64):
    qa = next(q for q in scene.qa() if q["type"] == kind)
    ids = loaded.processor.tokenizer(" " + qa["answer"], add_special_tokens=False)["input_ids"]
    return make_subject(loaded, scene.render(size), {"question": qa["question"], "answer_ids": ids, "token_index": 0}), qa


def _clean_logits(subject):
    with torch.inference_mode():
        return subject.loaded.adapter.answer_logits(subject.loaded, subject.sequence.model_inputs(1, subject.pixel_values),
                                                    subject.position)


def test_knockout_of_nothing_equals_the_clean_run(vlm):
    subject, _ = _subject(vlm, make_scene(SEED))
    layers = tuple(range(4))
    nothing = iv.run_blocks(subject, [iv.Block((), (), layers)])  # hooks on every layer, no edge removed
    assert torch.equal(nothing, _clean_logits(subject))


def test_knockout_of_every_edge_to_the_image_equals_a_run_without_image_tokens(vlm):
    """The reference drops the image tokens from the sequence and keeps the text's own positions: the text
    then attends to exactly what the knockout leaves it."""
    subject, _ = _subject(vlm, make_scene(SEED + 1))
    blocked = iv.run_blocks(subject, [iv.Block(tuple(iv.query_positions(subject, "text")),
                                               tuple(iv.image_positions(subject)), tuple(range(4)))])
    keep = [p for p in range(subject.input_ids.shape[-1]) if p not in set(iv.image_positions(subject))]
    lm = vlm.adapter.language_model(vlm.model)
    with torch.inference_mode():
        embeds = vlm.model.get_input_embeddings()(subject.input_ids[:, keep])
        hidden = lm(inputs_embeds=embeds, position_ids=torch.tensor([keep])).last_hidden_state
        reference = vlm.adapter.read_head(vlm.model, hidden[:, keep.index(subject.position)])
    torch.testing.assert_close(blocked, reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(blocked, _clean_logits(subject), atol=1e-2)  # the image mattered


def test_knockout_with_every_image_edge_blocked_ignores_the_pixels(vlm):
    a, _ = _subject(vlm, make_scene(SEED + 2))
    b = a.on_image(make_scene(SEED + 3).render(64))
    block = lambda s: iv.Block(tuple(iv.query_positions(s, "text")), tuple(iv.image_positions(s)), (0, 1, 2, 3))
    torch.testing.assert_close(iv.run_blocks(a, [block(a)]), iv.run_blocks(b, [block(b)]), atol=1e-5, rtol=1e-5)


def test_batched_blocks_equal_one_at_a_time(vlm):
    subject, _ = _subject(vlm, make_scene(SEED + 4))
    text, images = tuple(iv.query_positions(subject, "text")), iv.image_positions(subject)
    blocks = [iv.Block(text, (p,), (l,)) for l, p in [(0, images[3]), (2, images[20]), (3, images[40])]]
    together = iv.run_blocks(subject, blocks)
    alone = torch.cat([iv.run_blocks(subject, [b]) for b in blocks])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_patching_every_position_restores_the_clean_output(vlm):
    scene = make_scene(SEED + 5)
    subject, qa = _subject(vlm, scene)
    other = subject.on_image(counterfactual(scene, qa["object"], "color").render(64))
    clean_streams, clean = iv.residual_streams(subject)
    everything = tuple(range(subject.input_ids.shape[-1]))
    for layers in ([0], [0, 1, 2, 3]):
        plan = [(l, everything) for l in layers]
        # one batch row patched at each layer in `layers`: run them together, each must be the clean output
        with torch.inference_mode(), iv.residual_patch(subject, clean_streams, plan):
            inputs = subject.sequence.model_inputs(len(plan), other.pixel_values.expand(len(plan), -1, -1, -1))
            patched = vlm.adapter.answer_logits(vlm, inputs, subject.position)
        torch.testing.assert_close(patched, clean.expand(len(plan), -1), atol=1e-5, rtol=1e-5)


def test_patching_on_a_counterfactual_finds_the_changed_object(vlm):
    scene = make_scene(SEED + 3)
    subject, qa = _subject(vlm, scene)
    result = iv.patching(subject, counterfactual(scene, qa["object"], "color").render(64))
    assert result.clean.probability > result.corrupted.probability
    assert result.restored.shape == (4, len(iv.image_positions(subject)))
    np.testing.assert_allclose(result.per_layer[0], 1.0, atol=1e-4)  # every image position at the input
    box = scene.sorted_objects()[qa["object"]].box(64)
    assert result.best[1] in iv.tokens_in_cells(subject, iv.cells_in_box(subject, box))
    layer, token = result.best
    r, c = np.unravel_index(int(np.argmax(result.maps[layer].values)), result.maps[layer].grid)
    assert (r, c) in iv.cells_in_box(subject, box)
    data = json.loads(json.dumps(result.to_json()))
    assert data["best"] == {"layer": layer, "group": token, "cells": [[int(r), int(c)]]}


def test_patching_refuses_an_image_that_changes_nothing(vlm):
    scene = make_scene(SEED + 6)
    subject, _ = _subject(vlm, scene)
    with pytest.raises(ValueError, match="nothing to restore"):
        iv.patching(subject, scene.render(64))


def test_knockout_map_peaks_on_the_named_object_where_one_token_matters(vlm):
    """Blocking one token of an object that spans several often changes nothing (the others still show it:
    3 of these 6 maps stay under 0.05 nats everywhere); where a single token moves the answer, it is one of
    the named object's."""
    strong = 0
    for i in range(6):
        scene = make_scene(SEED + 10 + i)
        subject, qa = _subject(vlm, scene)
        heatmap = iv.knockout_map(subject)
        assert heatmap.grid == (8, 8) and heatmap.method == "knockout"
        if heatmap.values.max() > 0.05:
            strong += 1
            box = scene.sorted_objects()[qa["object"]].box(64)
            assert heatmap.argmax() in iv.cells_in_box(subject, box)
        # blocking all of the object's tokens together moves it more than as many tokens elsewhere
        box = scene.sorted_objects()[qa["object"]].box(64)
        on = iv.tokens_in_cells(subject, iv.cells_in_box(subject, box))
        off = [k for k in range(64) if k not in on][:: max(1, (64 - len(on)) // len(on))][: len(on)]
        assert iv.knockout(subject, "text", {"tokens": on})["drop"] > iv.knockout(subject, "text", {"tokens": off})["drop"]
    assert strong >= 3


def test_queries_and_keys(vlm):
    subject, _ = _subject(vlm, make_scene(SEED))
    tokens = vlm.processor.tokenizer.convert_ids_to_tokens(subject.input_ids[0].tolist())
    question = iv.query_positions(subject, "question")
    assert "".join(tokens[p] for p in question).replace("▁", " ").strip().startswith("what color is the")
    assert iv.query_positions(subject, "answer") == [subject.position]
    assert not set(iv.query_positions(subject, "text")) & set(iv.image_positions(subject))
    assert len(iv.key_positions(subject, "image")) == 64
    assert iv.key_positions(subject, {"cells": [(0, 0)]}) == [iv.image_positions(subject)[0]]
    assert len(iv.key_positions(subject, {"box": (0, 0, 16, 16)})) == 4
    with pytest.raises(ValueError, match="queries must be"):
        iv.query_positions(subject, "everything")
    with pytest.raises(ValueError, match="outside"):
        iv.tokens_in_cells(subject, [(9, 0)])


def test_window_sweep_and_information_flow(vlm):
    subject, _ = _subject(vlm, make_scene(SEED + 7))
    sweep = iv.window_sweep(subject, window=2)
    assert sweep["windows"] == [[0, 1], [1, 2], [2, 3]] and len(sweep["probability"]) == 3
    flow = iv.information_flow(subject)
    assert list(flow["flows"]) == list(iv.FLOW_EDGES) and all(len(v) == 4 for v in flow["flows"].values())
    assert len(flow["summary"]) == 3 and all(s.endswith(".") for s in flow["summary"])
    # cutting the image from every text position in every layer is at least as bad as any single flow window
    everything = iv.knockout(subject, "text", "image")
    assert everything["relative_drop"] > 0.2
    with pytest.raises(ValueError, match="window"):
        iv.window_sweep(subject, window=9)


def test_flow_summary_words():
    spans = [(0,), (1,), (2,), (3,)]
    text = iv.flow_summary({"image → answer": [0.0, 0.1, 0.6, 0.2], "question → answer": [0.01] * 4}, spans, 4)
    assert text[0].startswith("The image reaches the answer mostly at layer 2 (middle of 4 layers)")
    assert "no single window" in text[1]


def test_counterfactual_changes_one_object_only():
    scene = make_scene(SEED + 8, n_objects=3)
    base = np.asarray(scene.render(64)).astype(int)
    masks = scene.masks(64)
    for change in ("color", "shape", "position"):
        for k in range(3):
            other = counterfactual(scene, k, change)
            before, after = scene.sorted_objects()[k], next(o for o in other.objects if o not in scene.objects)
            assert [o for o in other.objects if o in scene.objects] == [o for o in scene.objects if o != before]
            assert getattr(after, change) != getattr(before, change)
            diff = np.abs(np.asarray(other.render(64)).astype(int) - base).sum(-1) > 0
            touched = np.zeros_like(diff)
            for box in (before.box(64), after.box(64)):
                x0, y0, x1, y1 = box
                touched[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3] = True  # Lanczos reaches 3 px
            assert diff.any() and not (diff & ~touched).any()  # nothing outside the object's old and new place
            assert len({(o.color, o.shape) for o in other.objects}) == 3
    assert set(np.unique(masks)) == {0, 1, 2, 3}
    for k, obj in enumerate(scene.sorted_objects()):
        ys, xs = np.nonzero(masks == k + 1)
        x0, y0, x1, y1 = obj.box(64)
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
    recoloured = counterfactual(scene, 0, "color").sorted_objects()[0]
    assert recoloured.color in COLORS and recoloured.color != scene.sorted_objects()[0].color
    with pytest.raises(ValueError, match="change must be"):
        counterfactual(scene, 0, "size")


def test_segment_ablation_is_captums_feature_ablation(vlm):
    """Each segment's value equals the log-probability drop measured by hand: the segment painted with the
    baseline colour, the same teacher-forced pass."""
    from mmie_core.segments import segment_ablation

    scene = make_scene(SEED + 9)
    subject, qa = _subject(vlm, scene)
    image, masks = scene.render(64), scene.masks(64)
    result = segment_ablation(vlm, image, qa["question"], subject.answer_ids, masks, baseline=scene.background)
    base = subject.log_probability(subject.pixel_values).item()
    for sid, value in zip(result.ids, result.values):
        painted = np.asarray(image).copy()
        painted[masks == sid] = scene.background
        other = subject.on_image(Image.fromarray(painted))
        assert value == pytest.approx(base - other.log_probability(other.pixel_values).item(), abs=1e-3)
    heatmap = result.heatmap(image, subject.target, vlm.name, cells=8)
    assert heatmap.grid == (8, 8)
    # here all three objects are yellow: removing one leaves the answer, no segment stands out
    assert np.abs(result.values).max() < 0.01
    for seed in (SEED + 3, SEED + 5):  # the answer's colour is the named object's alone: its segment leads
        scene = make_scene(seed)
        subject, qa = _subject(vlm, scene)
        assert sum(o.color == qa["answer"] for o in scene.objects) == 1
        result = segment_ablation(vlm, scene.render(64), qa["question"], subject.answer_ids, scene.masks(64),
                                  baseline=scene.background)
        assert result.ids[int(np.argmax(result.values))] == qa["object"] + 1


def test_segment_helpers():
    from mmie_core.segments import grid_segments, mask_segments

    seg = grid_segments((10, 6), 2, 5)
    assert seg.shape == (6, 10) and set(np.unique(seg)) == set(range(10)) and seg[0, 0] == 0 and seg[-1, -1] == 9
    drawn = np.zeros((6, 10, 4), dtype=np.uint8)
    drawn[1:3, 2:5, 3] = 255
    assert mask_segments(drawn).sum() == 6
    with pytest.raises(ValueError, match="empty"):
        mask_segments(np.zeros((4, 4)))


def test_causal_command_prints_the_named_json(capsys):
    from mmie_core.shapes.__main__ import main

    assert main(["causal", "--model", "shapes-vlm", "--seed", str(SEED), "--n", "3", "--compare", "attention",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(data) >= {"model", "seed", "n", "metrics"} and data["n"] == 3 and data["cases"] == 6
    assert set(data["metrics"]) == {"knockout_pointing", "knockout_drop_object", "knockout_drop_other",
                                    "patching_pointing", "segment_pointing", "ci95"}
    assert set(data["metrics"]["ci95"]) == set(data["metrics"]) - {"ci95"}
    assert data["metrics"]["knockout_drop_object"] > data["metrics"]["knockout_drop_other"]
    assert set(data["correlational"]) == {"attention"}


def test_interventions_refuse_a_captioner_and_a_dual_encoder():
    loaded = load_model("shapes-clip")
    with pytest.raises(ValueError):
        iv.check_subject(make_subject(loaded, make_scene(SEED).render(64), {"label": "a red circle"}))


# --------------------------------------------------------------------------- families at their real geometry

CHAT_PRESETS = ["llava-interleave-qwen-0.5b", "paligemma-3b-mix-224", "smolvlm-256m-instruct", "qwen2-vl-2b-instruct"]


@pytest.mark.parametrize("name", CHAT_PRESETS)
def test_interventions_on_every_chat_family(name, tmp_path):
    """On each chat family's fixture (real processor, real geometry, random weights): knockout of nothing is
    the clean run; with every text -> image edge blocked the answer no longer depends on the pixels; a knockout
    map and patching cover the family's map; Captum's segment ablation runs."""
    from mmie_core.segments import grid_segments, segment_ablation

    loaded = load_model(build_preset(name, tmp_path))
    photo = Image.open(__import__("matplotlib").get_data_path() + "/sample_data/grace_hopper.jpg").convert("RGB")
    photo = photo.resize((256, 300))
    answer = loaded.processor.tokenizer(" yes", add_special_tokens=False)["input_ids"][:1]
    subject = make_subject(loaded, photo, {"question": "what is this?", "answer_ids": answer, "token_index": 0})
    n_layers = len(loaded.adapter.answer_layers(loaded.model))
    nothing = iv.run_blocks(subject, [iv.Block((), (), tuple(range(n_layers)))])
    torch.testing.assert_close(nothing, _clean_logits(subject), atol=1e-5, rtol=1e-5)
    blurred = iv.blurred_copy(photo, (0, 0, 256, 300), radius=20)
    other = subject.on_image(blurred)
    block = lambda s: iv.Block(tuple(iv.query_positions(s, "text")), tuple(iv.all_image_positions(s)),
                               tuple(range(n_layers)))
    torch.testing.assert_close(iv.run_blocks(subject, [block(subject)]), iv.run_blocks(other, [block(other)]),
                               atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_clean_logits(subject), _clean_logits(other), atol=1e-6)
    window = max(1, subject.layout.shape[0] // 4)
    heatmap = iv.knockout_map(subject, layers=[n_layers - 1], window=window)
    assert heatmap.grid == subject.layout.shape and np.abs(heatmap.values).sum() > 0
    result = iv.patching(subject, blurred, layers=[0], window=window)
    np.testing.assert_allclose(result.per_layer[0], 1.0, atol=1e-3)
    seg = segment_ablation(loaded, photo, "what is this?", answer, grid_segments(photo.size, 2, 2))
    assert len(seg.values) == 4 and np.isfinite(seg.values).all() and np.abs(seg.values).sum() > 0


def test_no_hook_survives_an_exception(vlm, monkeypatch):
    subject, qa = _subject(vlm, make_scene(SEED))
    modules = vlm.adapter.answer_layers(vlm.model) + list(vlm.adapter.language_model(vlm.model).layers)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(vlm.adapter, "answer_logits", boom)
    with pytest.raises(RuntimeError, match="boom"):
        iv.run_blocks(subject, [iv.Block((subject.position,), (iv.image_positions(subject)[0],), (0, 1))])
    with pytest.raises(RuntimeError, match="boom"):
        iv.residual_streams(subject)
    assert all(not m._forward_pre_hooks for m in modules)


def test_overlapping_queries_and_keys_keep_each_position_itself(vlm):
    """Blocking text -> text (keys overlap the queries) never leaves a row with nothing to attend to."""
    subject, _ = _subject(vlm, make_scene(SEED))
    result = iv.knockout(subject, "text", "text")
    assert np.isfinite(result["blocked"]["log_probability"])


def test_question_stops_before_the_answer(vlm):
    scene = make_scene(SEED)
    qa = next(q for q in scene.qa() if q["type"] == "color")
    ids = vlm.processor.tokenizer(" " + qa["answer"] + " .", add_special_tokens=False)["input_ids"]
    first = make_subject(vlm, scene.render(64), {"question": qa["question"], "answer_ids": ids, "token_index": 0})
    second = make_subject(vlm, scene.render(64), {"question": qa["question"], "answer_ids": ids, "token_index": 1})
    # the prompt's last token writes answer token 0; for token 1 it is part of the prompt, the answer is not
    assert iv.query_positions(second, "question") == iv.query_positions(first, "question") + [first.position]
    assert max(iv.query_positions(second, "question")) < second.sequence.prompt_length <= second.position
    with pytest.raises(ValueError, match="layers must lie"):
        iv.patching(first, counterfactual(scene, qa["object"], "color").render(64), layers=[9])
