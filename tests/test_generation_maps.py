"""Per-token maps recorded during generation equal the teacher-forced analysis pass's, with no second pass."""

from __future__ import annotations

import threading

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from preset_fixtures import build_preset

from mmie_core.chat import GenerationSettings, answer_token_maps, generation_token_maps, stream_answer
from mmie_core.models import load_model
from mmie_core.shapes.world import make_scene

PHOTO = Image.open(f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg").convert("RGB")


def _both(loaded, image, question, tokens=10):
    *_, state = stream_answer(loaded, image, question, settings=GenerationSettings(tokens), record_maps=True)
    return state, generation_token_maps(loaded, image, question, state), answer_token_maps(loaded, image, question,
                                                                                           state.token_ids)


def _assert_same(during, after):
    assert during.tokens == after.tokens and during.layers == after.layers
    assert np.abs(during.attention - after.attention).max() < 1e-5
    assert np.abs(during.image_share - after.image_share).max() < 1e-5
    assert max(abs(a - b) for a, b in zip(during.image_reliance, after.image_reliance)) < 1e-5
    assert during.heatmaps[0].params["pass"] == "generation" and after.heatmaps[0].params["pass"] == "answer"


def test_shapes_vlm_rows_during_generation_equal_the_analysis_pass():
    loaded = load_model("shapes-vlm")
    state, during, after = _both(loaded, make_scene(70_200, n_objects=3).render(256), "describe the image.", 24)
    assert during is not None and len(state.token_ids) > 5
    _assert_same(during, after)
    # each recorded row covers the keys seen at its step: the prompt, then one more per token
    rows = state.rows.steps[0]
    assert len(rows) >= len(state.token_ids)
    assert [r.shape[-1] for r in rows[1:4]] == [rows[0].shape[-1] + k for k in (1, 2, 3)]


@pytest.mark.parametrize("name", ["llava-interleave-qwen-0.5b", "qwen2-vl-2b-instruct", "paligemma-3b-mix-224",
                                  "blip2-opt-2.7b"])
def test_every_image_token_family_records_the_same_rows(name, tmp_path):
    loaded = load_model(build_preset(name, tmp_path / name))
    state, during, after = _both(loaded, PHOTO, "What is in the image?", 6)
    assert during is not None, state.generated_ids
    _assert_same(during, after)


def test_a_special_token_inside_the_answer_falls_back_to_the_analysis_pass():
    loaded = load_model("shapes-vlm")
    image = make_scene(70_200, n_objects=3).render(256)
    *_, state = stream_answer(loaded, image, "describe the image.", settings=GenerationSettings(8), record_maps=True)
    special = loaded.processor.tokenizer.pad_token_id
    state.generated_ids = [state.generated_ids[0], special, *state.generated_ids[1:]]
    assert generation_token_maps(loaded, image, "describe the image.", state) is None
    plain = list(stream_answer(loaded, image, "describe the image.", settings=GenerationSettings(4)))[-1]
    assert plain.rows is None and generation_token_maps(loaded, image, "describe the image.", plain) is None


def test_another_threads_passes_are_not_recorded():
    """Row taps are keyed by module: a second request running on the same model while an answer is recorded
    must not add rows to it (they would shift every later row onto the wrong token)."""
    from mmie_core.chat import greedy_answer_ids

    loaded = load_model("shapes-vlm")
    image = make_scene(70_200, n_objects=3).render(256)
    other = make_scene(70_201, n_objects=2).render(256)
    busy = threading.Event()

    def noise():
        while not busy.is_set():
            greedy_answer_ids(loaded, other, "how many shapes are there?", max_new_tokens=4)

    thread = threading.Thread(target=noise)
    thread.start()
    try:
        state, during, after = _both(loaded, image, "describe the image.", 24)
    finally:
        busy.set()
        thread.join()
    assert all(len(steps) == len(state.generated_ids) for steps in state.rows.steps.values())
    _assert_same(during, after)


def test_a_recorder_that_cannot_start_leaves_the_attention_implementation_as_it_was():
    from mmie_core.attention import RowRecorder
    from mmie_core.chat import answer_layers

    loaded = load_model("shapes-vlm")
    before = loaded.model.config._attn_implementation
    image = make_scene(70_200, n_objects=3).render(256)
    with RowRecorder({0: answer_layers(loaded)[0]}, rows=[0]):  # the layer is already being recorded
        with pytest.raises(RuntimeError, match="already being recorded"):
            list(stream_answer(loaded, image, "describe the image.", settings=GenerationSettings(3),
                               record_maps=True))
    assert loaded.model.config._attn_implementation == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_the_decoding_steps_row_by_slicing_equals_the_indexed_row(dtype, mask):
    """last_row_probabilities (the tap of every decoding step) == row_probabilities with rows=[q - 1], with
    grouped-query keys, a model's own mask and half precision; float32 out either way."""
    from mmie_core.attention import last_row_probabilities, row_probabilities

    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, 8, 5, 16, generator=gen).to(dtype)
    key = torch.randn(1, 2, 9, 16, generator=gen).to(dtype)  # 4 cached keys, then the 5 queries'; 2 kv heads
    attention_mask = None
    if mask == "bool":
        attention_mask = torch.rand(1, 1, 5, 9, generator=gen) > 0.3
        attention_mask[..., 0] = True
    elif mask == "float":
        attention_mask = torch.where(torch.rand(1, 1, 5, 9, generator=gen) > 0.3, 0.0, -1e9).to(dtype)
    module = torch.nn.Module()
    module.is_causal = True
    last = last_row_probabilities(query, key, attention_mask, 0.25)
    indexed = row_probabilities(module, query, key, attention_mask, 0.25, torch.tensor([4]))[:, :, 0]
    assert last.dtype == torch.float32 and last.shape == (1, 8, 9)
    assert torch.equal(last, indexed)
    assert torch.allclose(last.sum(-1), torch.ones(1, 8))


def test_recorded_rows_are_held_once_and_half_precision_rows_in_float16():
    from mmie_core.chat import GenerationRows

    rows = GenerationRows({0: None, 1: None})
    for layer in (0, 1):
        rows.steps[layer] = [torch.rand(4, 6 + t) for t in range(3)]
    out = rows.per_head([0, 1], [0, 1, 2], 8)
    assert out.shape == (2, 4, 3, 8) and float(out[1, :, 2, 8:].abs().sum()) == 0.0
    # every recorded row is now a view of the returned tensor: the rows are not held twice
    assert all(r.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
               for steps in rows.steps.values() for r in steps)
    assert torch.equal(rows.per_head([0, 1], [0, 1, 2], 8), out)  # and can be read again

    tap = GenerationRows({0: None})
    tap.owner = threading.get_ident()
    q, k = torch.randn(1, 2, 1, 8).to(torch.bfloat16), torch.randn(1, 2, 5, 8).to(torch.bfloat16)
    tap._tap(0)(None, q, k, None, None)
    tap._tap(0)(None, q.float(), k.float(), None, None)
    assert [r.dtype for r in tap.steps[0]] == [torch.float16, torch.float32]
    assert torch.allclose(tap.steps[0][0].float(), tap.steps[0][1], atol=2e-2)
