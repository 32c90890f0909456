"""Faults through the running studio: each gives a clear message, frees what it held, and the
next request works. Also the per-event time limit and model-cache eviction while switching
models. The server runs in this process, so the faults are injected with monkeypatch."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace

import pytest
from PIL import Image

from mmie_core import models

LABELS = "a red square, a yellow circle, a green square, a blue diamond"


def example(i: int = 0) -> str:
    from studio.common import example_images

    return example_images()[i]


def classify(client, model: str = "shapes-clip"):
    from gradio_client import handle_file

    return client.predict(handle_file(example(0)), LABELS, model, "preset", "", False, api_name="/classify")


def explain_label(client, method: str, model: str = "shapes-clip"):
    from gradio_client import handle_file

    return client.predict(handle_file(example(0)), LABELS, "a red square", model, method, "preset", "", "inferno",
                          0.6, "blocks", api_name="/explain_label")


def fails_cleanly(call, *expected: str) -> str:
    """Run `call`, which must fail with a user-facing message containing every `expected` part."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        call()
    message = str(info.value)
    assert "Traceback" not in message and 'File "' not in message, message
    for part in expected:
        assert part in message, message
    return message


def works_normally(client) -> None:
    _, scores, _, _ = classify(client)
    assert abs(scores["results"][0]["sum"] - 1) < 1e-3


def no_hooks_left(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hub_model_that_cannot_load_names_the_embedded_alternative(client, fresh_cache):
    fails_cleanly(lambda: classify(client, "clip-vit-base-patch32"), "openai/clip-vit-base-patch32", "shapes-clip")
    assert fresh_cache.keys() == []
    works_normally(client)


def test_corrupt_weights_file_is_a_message(client, fresh_cache, monkeypatch, tmp_path):
    broken = tmp_path / "broken-siglip"
    shutil.copytree(models.EMBEDDED_DIR / "shapes-siglip", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 5000])  # cut mid-file, as an interrupted copy leaves it
    preset = replace(models.PRESETS["shapes-siglip"], source=str(broken), embedded=False)
    monkeypatch.setitem(models.PRESETS, "shapes-siglip", preset)
    fails_cleanly(lambda: classify(client, "shapes-siglip"), "Could not load the model folder", str(broken))
    monkeypatch.undo()
    works_normally(client)
    _, scores, _, _ = classify(client, "shapes-siglip")  # the real one loads once the folder is whole again
    assert scores["results"][0]["activation"] == "sigmoid"


def test_exception_inside_a_hook_removes_every_hook(client, fresh_cache, monkeypatch):
    from mmie_core.attention import AttentionRecorder

    def exploding_hook(self, layer):
        def hook(module, args, output):
            raise RuntimeError("fault injected inside an attention hook")

        return hook

    monkeypatch.setattr(AttentionRecorder, "_hook", exploding_hook)
    fails_cleanly(lambda: explain_label(client, "attention"), "Something went wrong (RuntimeError)",
                  "still running")
    loaded = models.load_model("shapes-clip")
    assert no_hooks_left(loaded.model)
    assert loaded.model.config._attn_implementation == "sdpa"  # eager only while it was needed
    monkeypatch.undo()
    _, heat, _ = explain_label(client, "attention")
    assert heat["method"] == "attention" and heat["grid"] == [8, 8]
    assert no_hooks_left(loaded.model)


def test_out_of_memory_in_a_request_frees_the_cache(client, fresh_cache, monkeypatch):
    import torch

    import studio.zero_shot_tab as tab

    works_normally(client)
    assert fresh_cache.keys() == ["shapes-clip"]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(tab, "zs_classify", out_of_memory)
    fails_cleanly(lambda: classify(client), "ran out of memory", "keeps serving")
    assert fresh_cache.keys() == []
    monkeypatch.undo()
    works_normally(client)


def test_time_limit_stops_long_work_and_the_next_request_runs(client, fresh_cache, monkeypatch):
    works_normally(client)  # model loaded outside the limit
    monkeypatch.setenv("MMIE_TIME_LIMIT", "0.001")
    fails_cleanly(lambda: explain_label(client, "integrated_gradients"), "time limit")
    assert no_hooks_left(models.load_model("shapes-clip").model)
    monkeypatch.setenv("MMIE_TIME_LIMIT", "600")
    _, heat, _ = explain_label(client, "integrated_gradients")
    assert heat["method"] == "integrated_gradients"


def test_chat_at_the_time_limit_says_so(client, fresh_cache, monkeypatch):
    from gradio_client import handle_file

    import mmie_core.chat as chat

    monkeypatch.setattr(chat, "check_deadline", lambda: None)  # let generation start, then run out
    monkeypatch.setenv("MMIE_TIME_LIMIT", "0.001")
    messages, _, _, _, answer, _ = client.predict(handle_file(example(0)), "describe the image.", [], "shapes-vlm",
                                                  48, 0.0, 1.0, api_name="/chat")
    assert answer["timed_out"] and answer["stopped"]
    assert len(answer["token_ids"]) <= 2
    assert "*(stopped at the time limit)*" in str(messages[-1]["content"])


def test_cache_eviction_with_one_model_while_switching(client, fresh_cache, monkeypatch):
    from gradio_client import handle_file

    monkeypatch.setenv("MMIE_MAX_MODELS", "1")
    for model, activation in [("shapes-clip", "softmax"), ("shapes-siglip", "sigmoid"), ("shapes-clip", "softmax")]:
        _, scores, _, _ = classify(client, model)
        assert scores["results"][0]["activation"] == activation
        assert fresh_cache.keys() == [model]
    _, _, _, _, answer, _ = client.predict(handle_file(example(0)), "how many shapes are there?", [], "shapes-vlm",
                                           8, 0.0, 1.0, api_name="/chat")
    assert answer["answer"] and fresh_cache.keys() == ["shapes-vlm"]
    # compare mode needs two models at once: with room for one, the second evicts the first mid-request,
    # and both results are still right
    _, both, _, _ = client.predict(handle_file(example(0)), LABELS, "shapes-clip", "preset", "", True,
                                   api_name="/classify")
    assert [r["activation"] for r in both["results"]] == ["softmax", "sigmoid"]
    assert len(fresh_cache.keys()) == 1


def test_user_errors_time_limit_unit(monkeypatch):
    """The wrapper's deadline reaches library code; streaming handlers keep theirs across steps."""
    import gradio as gr

    from mmie_core.limits import check_deadline, seconds_left
    from studio.common import user_errors

    monkeypatch.setenv("MMIE_TIME_LIMIT", "30")

    @user_errors
    def plain():
        return seconds_left()

    left = plain()
    assert 25 < left <= 30

    @user_errors
    def streaming():
        yield seconds_left()
        time.sleep(0.05)
        yield seconds_left()

    first, second = list(streaming())
    assert second < first  # one deadline for the whole event, not one per step

    monkeypatch.setenv("MMIE_TIME_LIMIT", "0.001")

    @user_errors
    def slow():
        time.sleep(0.01)
        check_deadline()

    with pytest.raises(gr.Error, match="time limit"):
        slow()
    monkeypatch.setenv("MMIE_TIME_LIMIT", "0")
    assert plain() is None  # 0 = no limit


def test_uploads_and_outputs_are_not_kept_and_no_path_is_allowed(studio_url, monkeypatch):
    import app
    import studio.common as common

    assert app.demo.delete_cache == (3600, 3600)  # uploads and outputs older than an hour go, hourly
    assert app.demo.allowed_paths == []  # nothing outside Gradio's own cache is served
    monkeypatch.setattr(common, "MAX_KEPT_OUTPUTS", 2)
    monkeypatch.setattr(common, "_kept", type(common._kept)())
    paths = [common.save_png(Image.new("RGB", (2, 2)), "kept") for _ in range(3)]
    assert [os.path.exists(p) for p in paths] == [False, True, True]
