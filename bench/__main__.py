"""Run every benchmark and write bench/RESULTS.md (and bench/results.json).

    python -m bench [--quick] [--only zero_shot token_maps integrated_gradients cold_start interventions search batch]

Each benchmark measures the studio's way and its baseline in the same run and reports ratios;
the seconds beside them are this machine's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import batch, cold_start, integrated_gradients, interventions, search, token_maps, zero_shot
from .common import machine

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "zero_shot": lambda quick: zero_shot.run(quick=quick),
    "token_maps": lambda quick: token_maps.run(quick=quick),
    "integrated_gradients": lambda quick: integrated_gradients.run(quick=quick),
    "cold_start": lambda quick: cold_start.run(repeat=1 if quick else 2),
    "interventions": lambda quick: interventions.run(quick=quick),
    "search": lambda quick: search.run(quick=quick),
    "batch": lambda quick: batch.run(images=16 if quick else 48),
}
TITLES = {
    "zero_shot": "1. Zero-shot, 50 labels: single template vs transformers' pipeline, 8-template ensemble vs the docs' uncached ensemble",
    "token_maps": "2. Per-token heatmaps of a generated answer vs plain generation and output_attentions",
    "integrated_gradients": "3. Integrated gradients: the studio's call vs Captum's default call",
    "cold_start": "4. Cold start: `python app.py` to the first /classify answer vs a bare import",
    "interventions": "5. Intervention views: forward passes and seconds, against one clean pass",
    "search": "6. Semantic search: retrieval on ShapesWorld, index build throughput, query latency",
    "batch": "7. Batch jobs: the local engine vs Ray Data on this machine",
}


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_results(results: dict, command: str, seconds: float) -> str:
    info = results["machine"]
    parts = [
        "# Benchmark results",
        "",
        f"Made by `{command}` in {seconds:.0f} s on {info.get('gpu') or info['cpu']} "
        f"({info['cores']} cores, {info['torch_threads']} torch threads), torch {info['torch']}, "
        f"transformers {info.get('transformers', '?')}, Python {info['python']}.",
        "Every ratio compares two ways measured in the same run; the seconds are this machine's.",
    ]
    for name, result in results["benchmarks"].items():
        verdict = {True: " **Met.**", False: " **NOT MET.**"}.get(result.get("met"), "")
        parts += ["", f"## {TITLES[name]}", "", f"Target: {result['target']}.{verdict}", "",
                  markdown_table(result["rows"])]
        parts += result.get("notes", [])
    text = "\n".join(parts) + "\n"
    (HERE / "RESULTS.md").write_text(text)
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the MMIE Studio benchmarks and write bench/RESULTS.md.")
    parser.add_argument("--quick", action="store_true", help="embedded models only, fewer repeats")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    names = args.only or list(BENCHMARKS)
    results = {"machine": machine(), "benchmarks": {}}
    for name in names:
        t = time.perf_counter()
        results["benchmarks"][name] = BENCHMARKS[name](args.quick)
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    command = "python -m bench" + (" --quick" if args.quick else "") + (f" --only {' '.join(names)}" if args.only else "")
    if args.only and (HERE / "results.json").exists():  # keep the other benchmarks' last figures
        earlier = json.loads((HERE / "results.json").read_text())
        merged = {k: v for k, v in earlier.get("benchmarks", {}).items() if k in BENCHMARKS}
        results["benchmarks"] = {k: results["benchmarks"].get(k, merged.get(k)) for k in BENCHMARKS
                                 if k in results["benchmarks"] or k in merged}
        command += " (the other sections from the last full run)"
    print(write_results(results, command, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
