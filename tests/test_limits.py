"""Time limits inside the library: explanations and generation stop at the deadline, hooks are
released, and a batch keeps the rows it finished."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from mmie_core import models
from mmie_core.limits import DeadlineCriteria, TimeLimitError, check_deadline, deadline, seconds_left, time_limit
from mmie_core.shapes.world import make_scene


def expired():
    return deadline(time.monotonic() - 1)


def test_deadlines_nest_and_keep_the_earlier():
    assert seconds_left() is None
    check_deadline()  # no limit: nothing happens
    with time_limit(10):
        with time_limit(100):
            assert seconds_left() <= 10
        with time_limit(1):
            assert seconds_left() <= 1
    with time_limit(0):
        assert seconds_left() is None
    with expired(), pytest.raises(TimeLimitError, match="time limit"):
        check_deadline()


def test_explanation_stops_at_the_deadline_and_removes_hooks(tiny_clip_dir, fresh_cache):
    from mmie_core.explain import explain

    loaded = models.load_model(tiny_clip_dir)
    image = make_scene(1).render(32)
    for method in ("integrated_gradients", "attention", "occlusion"):
        with expired(), pytest.raises(TimeLimitError):
            explain(loaded, image, {"label": "a red circle", "labels": ["a red circle", "a blue square"]}, method)
        assert all(not m._forward_hooks for m in loaded.model.modules())
        assert loaded.model.config._attn_implementation == "sdpa"
    heatmap = explain(loaded, image, {"label": "a red circle"}, "integrated_gradients", steps=4)
    assert heatmap.values.shape == (4, 4)


def test_generation_stops_at_the_deadline(tiny_llava_dir, fresh_cache, monkeypatch):
    import mmie_core.chat as chat

    loaded = models.load_model(tiny_llava_dir)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    with expired(), pytest.raises(TimeLimitError):  # checked before any work starts
        list(chat.stream_answer(loaded, image, "describe the image."))
    monkeypatch.setattr(chat, "check_deadline", lambda: None)  # start, then run out mid-generation
    settings = chat.GenerationSettings(max_new_tokens=40)
    with expired():
        final = list(chat.stream_answer(loaded, image, "describe the image.", settings=settings))[-1]
    assert final.timed_out and final.stopped and len(final.token_ids) <= 1
    full = list(chat.stream_answer(loaded, image, "describe the image.", settings=settings))[-1]
    assert not full.timed_out and not full.stopped


def test_deadline_criteria():
    import torch

    ids = torch.zeros((2, 3), dtype=torch.long)
    never, past = DeadlineCriteria(None), DeadlineCriteria(time.monotonic() - 1)
    assert not never(ids, None).any() and not never.fired
    assert past(ids, None).all() and past.fired


def test_alt_text_batch_keeps_finished_rows_and_names_the_rest(tiny_llava_dir, fresh_cache, monkeypatch):
    import mmie_core.alt_text as alt_text

    loaded = models.load_model(tiny_llava_dir)
    items = [(f"img{k}.png", Image.new("RGB", (32, 32), (20 * k, 0, 0))) for k in range(4)]
    real = alt_text.generate_alt_text
    calls = []

    def first_then_out_of_time(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise TimeLimitError("This request reached its time limit and was stopped.")
        return real(*args, **kwargs)

    monkeypatch.setattr(alt_text, "generate_alt_text", first_then_out_of_time)
    rows = alt_text.alt_text_batch(loaded, items)
    assert [r.file for r in rows] == [n for n, _ in items]
    assert rows[0].error == "" and all(r.error.startswith("not processed") for r in rows[1:])
