"""The benchmark runner (`python -m bench`): what it runs where."""

from __future__ import annotations

import importlib.util


def test_cold_start_is_skipped_with_a_reason_where_gradio_is_missing(monkeypatch, capsys):
    import bench.__main__ as runner

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    monkeypatch.setattr(runner, "write_results", lambda *a, **k: (_ for _ in ()).throw(AssertionError("wrote")))
    ran = []
    monkeypatch.setitem(runner.BENCHMARKS, "cold_start", lambda quick: ran.append(quick))
    assert runner.main(["--only", "cold_start"]) == 0
    assert ran == [] and "cold_start: skipped, gradio is not installed" in capsys.readouterr().out
    assert "cold_start" in runner.GPU_BENCHMARKS  # bench/gpu.sh times the cold start on the card where it can
