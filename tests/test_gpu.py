"""ZeroGPU readiness, checked off ZeroGPU: import order, no-op decorator, duration estimates,
picklable handler results, and the Spaces requirements variant."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_spaces_is_imported_before_torch():
    code = "import app, sys; m = list(sys.modules); print(m.index('spaces') < m.index('torch'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]


def test_gpu_decorator_is_a_no_op_off_zero_gpu(fresh_cache):
    from studio import gpu

    assert not gpu.ZERO_GPU

    def handler(x):
        return x

    assert gpu.gpu(10)(handler) is handler
    assert gpu.preload_for_zero_gpu() == [] and fresh_cache.keys() == []  # lazy loading elsewhere


def test_durations_follow_the_request():
    from studio.gpu import MAX_DURATION, duration_batch, duration_chat, duration_classify, duration_explain

    assert duration_chat(None, "q", [], "shapes-vlm", 256) > duration_chat(None, "q", [], "shapes-vlm", 8)
    assert duration_chat(None, "q", [], "shapes-vlm", "not a number") > 0
    assert duration_explain(None, "a, b", "a", "shapes-clip", "occlusion") > \
        duration_explain(None, "a, b", "a", "shapes-clip", "attention")
    assert duration_batch(["a.png"] * 10) > duration_batch(["a.png"])
    assert duration_batch(["a.png"] * 1000) == MAX_DURATION
    assert 5 <= duration_classify(None, "a\nb\nc") <= MAX_DURATION


def test_handler_results_cross_a_process_boundary():
    """ZeroGPU runs handlers in a worker process: every result must pickle (paths, not images)."""
    from studio.alt_text_tab import alt_text
    from studio.chat_tab import chat, explain_token
    from studio.common import example_images
    from studio.patches_tab import inspect
    from studio.zero_shot_tab import classify, explain_label

    image = example_images()[0]
    labels = "a red square, a yellow circle"
    results = [
        classify(image, labels, "shapes-clip"),
        explain_label(image, labels, "a red square", "shapes-clip", "relevancy"),
        inspect(image, "shapes-clip", 1),
        alt_text(image, "concise"),
    ]
    *_, last = chat(image, "how many shapes are there?", [], "shapes-vlm", 8)
    results += [last, explain_token(image, last[4], 0, "shapes-vlm", "attention")]
    for result in results:
        pickle.loads(pickle.dumps(result))


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.split(r"[<>=!~ ]", line, maxsplit=1)[0].lower()
            pins[name] = line
    return pins


def test_zero_gpu_requirements_differ_only_in_torch():
    cpu, zero = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements-zerogpu.txt")
    torch_like = {"torch", "torchvision"}
    assert {k: v for k, v in cpu.items() if k not in torch_like} == {k: v for k, v in zero.items() if k not in torch_like}
    major, minor = (int(x) for x in zero["torch"].split("==")[1].split(".")[:2])
    assert (2, 8) <= (major, minor) <= (2, 11)  # the torch releases ZeroGPU supports
    assert cpu["torch"] == "torch==2.14.1"


def test_zero_gpu_preload_survives_a_model_that_fails(monkeypatch, fresh_cache):
    from studio import gpu

    monkeypatch.setattr(gpu, "ZERO_GPU", True)
    monkeypatch.setenv("MMIE_DEVICE", "cpu")  # stands in for ZeroGPU's cuda here
    assert gpu.preload_for_zero_gpu(("shapes-clip", "no-such-preset")) == ["shapes-clip"]
    assert fresh_cache.keys() == ["shapes-clip"]
