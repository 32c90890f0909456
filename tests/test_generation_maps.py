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
    # the rows are held once: each is its own copy or a view of the one tensor the maps were built from, also
    # when the last step (the end-of-turn token) is not part of the answer's maps
    short, during_short, _ = _both(loaded, make_scene(70_200, n_objects=3).render(256), "describe the image.", 64)
    assert len(short.generated_ids) > len(short.token_ids) and during_short is not None
    shared = {r.untyped_storage().data_ptr() for steps in short.rows.steps.values() for r in steps
              if r.untyped_storage().nbytes() != r.numel() * r.element_size()}
    assert len(shared) == 1
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
    failures = []

    def noise():  # the other request must itself run undisturbed by this one's taps
        while not busy.is_set():
            try:
                greedy_answer_ids(loaded, other, "how many shapes are there?", max_new_tokens=4)
            except Exception as err:  # noqa: BLE001 - reported below
                failures.append(err)
                return

    thread = threading.Thread(target=noise)
    thread.start()
    try:
        state, during, after = _both(loaded, image, "describe the image.", 24)
    finally:
        busy.set()
        thread.join()
    assert failures == []
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
def test_rows_from_the_final_cache_equal_each_steps_own_row(dtype, mask):
    """rows_from_cache (every decoding step's row at once, from the keys as they stand after generation) ==
    row_probabilities of each step's last query over the keys it saw, with grouped-query keys, a model's own
    mask and half precision; float32 out."""
    from mmie_core.attention import row_probabilities, rows_from_cache

    gen = torch.Generator().manual_seed(0)
    key = torch.randn(1, 2, 9, 16, generator=gen).to(dtype)  # the final cache; 2 kv heads for 8 query heads
    lengths = [6, 7, 8, 9]  # the prefill's last position saw 6 keys, then one more per fed token
    queries = [torch.randn(1, 8, 1, 16, generator=gen).to(dtype) for _ in lengths]
    masks = [None] * len(lengths)
    if mask == "bool":
        masks = [torch.rand(1, 1, 1, n, generator=gen) > 0.3 for n in lengths]
        for m in masks:
            m[..., 0] = True
    elif mask == "float":
        masks = [torch.where(torch.rand(1, 1, 1, n, generator=gen) > 0.3, 0.0, -1e9).to(dtype) for n in lengths]
    module = torch.nn.Module()
    rows = rows_from_cache(queries, key, lengths, masks, 0.25)
    for q, n, m, row in zip(queries, lengths, masks, rows):
        own = row_probabilities(module, q, key[:, :, :n], m, 0.25, torch.tensor([0]))[:, :, 0]
        assert row.dtype == torch.float32 and row.shape == (1, 8, n)
        assert torch.allclose(row, own, atol=1e-6 if dtype == torch.float32 else 1e-3)
        assert torch.allclose(row.sum(-1), torch.ones(1, 8))


def test_recorded_rows_are_held_once_and_half_precision_rows_in_float16():
    from mmie_core.chat import GenerationRows

    rows = GenerationRows({0: None, 1: None})
    for layer in (0, 1):
        rows._rows[layer] = [torch.rand(4, 6 + t) for t in range(3)]
    out = rows.per_head([0, 1], [0, 1, 2], 8)
    assert out.shape == (2, 4, 3, 8) and float(out[1, :, 2, 8:].abs().sum()) == 0.0
    # every recorded row is now a view of the returned tensor: the rows are not held twice
    assert all(r.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
               for steps in rows.steps.values() for r in steps)
    assert torch.equal(rows.per_head([0, 1], [0, 1, 2], 8), out)  # and can be read again

    for dtype, kept in ((torch.bfloat16, torch.float16), (torch.float32, torch.float32)):
        tap = GenerationRows({0: None})
        tap.owner = threading.get_ident()
        q, k = torch.randn(1, 2, 3, 8).to(dtype), torch.randn(1, 2, 3, 8).to(dtype)  # a prefill of 3 positions
        tap._tap(0)(None, q, k, None, None)
        q2, k2 = torch.randn(1, 2, 1, 8).to(dtype), torch.cat([k, torch.randn(1, 2, 1, 8).to(dtype)], 2)
        tap._tap(0)(None, q2, k2, None, None)  # a decoding step: the cache grew by one
        assert len(tap._rows[0]) == 1 and len(tap._pending[0]) == 1  # the prefill's row now, the step's later
        assert [r.dtype for r in tap.steps[0]] == [kept, kept] and [r.shape[-1] for r in tap.steps[0]] == [3, 4]
        assert tap._keys[0] is None  # the cache is let go once the rows are read


def test_caches_that_do_not_just_grow_get_each_row_from_the_keys_it_saw():
    """A cache written in place (static, ring buffer) changes keys under earlier rows: each row is computed at its
    step. A sliding window hands a new, shorter tensor: the pending rows come from the keys before it."""
    from mmie_core.attention import row_probabilities
    from mmie_core.chat import GenerationRows

    def own(q, k):
        return row_probabilities(torch.nn.Module(), q, k.clone(), None, None, torch.tensor([0]))[0, :, 0]

    gen = torch.Generator().manual_seed(1)
    tap = GenerationRows({0: None})
    tap.owner = threading.get_ident()
    buffer = torch.randn(1, 2, 6, 8, generator=gen)  # a fixed-size cache written in place
    q1, q2 = torch.randn(1, 2, 1, 8, generator=gen), torch.randn(1, 2, 1, 8, generator=gen)
    tap._tap(0)(None, q1, buffer, None, None)
    first = own(q1, buffer)
    buffer[:, :, 2] = 100.0  # the next step overwrites a slot
    tap._tap(0)(None, q2, buffer, None, None)
    assert torch.allclose(tap.steps[0][0], first, atol=1e-6) and torch.allclose(tap.steps[0][1], own(q2, buffer))

    window = GenerationRows({0: None})
    window.owner = threading.get_ident()
    k0 = torch.randn(1, 2, 4, 8, generator=gen)
    k1 = torch.cat([k0, torch.randn(1, 2, 1, 8, generator=gen)], 2)  # grew by one: deferred
    k2 = torch.cat([k1[:, :, 1:], torch.randn(1, 2, 1, 8, generator=gen)], 2)  # a window of 5: a new, equal-length tensor
    qs = [torch.randn(1, 2, 1, 8, generator=gen) for _ in range(3)]
    for q, k in zip(qs, (k0, k1, k2)):
        window._tap(0)(None, q, k, None, None)
    rows = window.steps[0]
    for q, k, row in zip(qs, (k0, k1, k2), rows):
        assert torch.allclose(row, own(q, k), atol=1e-6)
