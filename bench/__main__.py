"""Run every benchmark and write bench/RESULTS.md (and bench/results.json).

    python -m bench [--quick] [--only zero_shot token_maps integrated_gradients cold_start interventions search batch]
    python -m bench --gpu [--only ...]     (on a CUDA machine; bench/gpu.sh runs it)

Each benchmark measures the studio's way and its baseline in the same run and reports ratios;
the seconds beside them are this machine's. `--gpu` runs on the GPU (the per-token maps on a random
LLaVA of llava-1.5-7b's full size in bfloat16) and keeps its figures apart, in bench/results_gpu.json,
shown as the last part of bench/RESULTS.md with the card's name. The results are written after every
benchmark, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

from . import batch, cold_start, integrated_gradients, interventions, search, token_maps, zero_shot
from .common import machine

HERE = Path(__file__).resolve().parent
GPU_BENCHMARKS = ("token_maps", "zero_shot", "integrated_gradients", "cold_start")
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


def _made_by(results: dict) -> str:
    info = results["machine"]
    where = f"{info['gpu']} (GPU), {info['cpu']}" if info.get("gpu") else info["cpu"]
    return (f"Made by `{results['command']}` in {results['seconds']:.0f} s on {where} "
            f"({info['cores']} cores, {info['torch_threads']} torch threads), torch {info['torch']}, "
            f"transformers {info.get('transformers', '?')}, Python {info['python']}.")


def _sections(results: dict, level: str = "##") -> list[str]:
    parts = []
    for name, result in results["benchmarks"].items():
        verdict = {True: " **Met.**", False: " **NOT MET.**"}.get(result.get("met"), "")
        parts += ["", f"{level} {TITLES[name]}", "", f"Target: {result['target']}.{verdict}", "",
                  markdown_table(result["rows"])]
        parts += result.get("notes", [])
    return parts


def render() -> str:
    """bench/RESULTS.md from bench/results.json and, when there is one, bench/results_gpu.json."""
    parts = ["# Benchmark results"]
    if (HERE / "results.json").exists():
        results = json.loads((HERE / "results.json").read_text())
        parts += ["", _made_by(results),
                  "Every ratio compares two ways measured in the same run; the seconds are this machine's."]
        parts += _sections(results)
    if (HERE / "results_gpu.json").exists():
        gpu = json.loads((HERE / "results_gpu.json").read_text())
        parts += ["", f"## GPU: {gpu['machine'].get('gpu', '?')}", "", _made_by(gpu),
                  "The same benchmarks on the GPU (the per-token maps on a random LLaVA of llava-1.5-7b's full "
                  "size in bfloat16); ratios as above, seconds this card's."]
        parts += _sections(gpu, "###")
    if (HERE / "cuda_checks.json").exists():
        c = json.loads((HERE / "cuda_checks.json").read_text())
        f = lambda x: f"{x:.1e}"  # noqa: E731
        parts += ["", f"### Numerics on {c['gpu']} (`python -m bench.cuda_checks`, embedded models in {c['dtype']})", "",
                  "| setting | generation maps vs the analysis pass (max abs) | classify vs the pipeline (max abs prob) |",
                  "|---|---|---|"]
        for key, label in (("as_found", "as found"), ("tf32_off", "TF32 off, float32 matmul precision highest"),
                           ("tf32_off_sdpa_math", "TF32 off and sdpa's math kernel alone")):
            parts.append(f"| {label} | {f(c[key]['generation_maps_vs_pass'])} | {f(c[key]['classify_vs_pipeline'])} |")
        sw = c["switches_found"]
        big = c["llava_7b_bf16"]
        where = ("TF32 plays no part in bf16: the differences are the kernels' rounding (sdpa's fused kernels, "
                 "different batch shapes); the float32 equalities are the zero-shot rows above"
                 if c["dtype"] != "float32" else "in float32, so the TF32 rows say whether TF32 matters")
        parts += ["", f"Made by `{c.get('command', 'python -m bench.cuda_checks')}`. Switches as found: "
                  f"matmul.allow_tf32={sw['matmul.allow_tf32']}, cudnn.allow_tf32={sw['cudnn.allow_tf32']}, float32 "
                  f"matmul precision {sw['float32_matmul_precision']}. This run was in {c['dtype']}: {where}. "
                  f"Generation with maps on the 7B-sized LLaVA in this run: {big['ratio']:.2f}x plain generation "
                  f"({big['generate_with_maps_s']:.3f} s vs {big['generate_s']:.3f} s)."]
    return "\n".join(parts) + "\n"


def write_results(results: dict, gpu: bool = False) -> str:
    name = "results_gpu.json" if gpu else "results.json"
    (HERE / name).write_text(json.dumps(results, indent=1) + "\n")
    text = render()
    (HERE / "RESULTS.md").write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the MMIE Studio benchmarks and write bench/RESULTS.md.")
    parser.add_argument("--quick", action="store_true", help="embedded models only, fewer repeats")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    parser.add_argument("--gpu", action="store_true", help=f"on the GPU ({', '.join(GPU_BENCHMARKS)} unless --only "
                        "says otherwise), figures kept in bench/results_gpu.json")
    args = parser.parse_args(argv)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA device (torch.cuda.is_available() is False)")
        os.environ["MMIE_DEVICE"] = "cuda"
    t0 = time.perf_counter()
    names = args.only or (list(GPU_BENCHMARKS) if args.gpu else list(BENCHMARKS))
    dtype = os.environ.get("MMIE_DTYPE")
    command = ((f"MMIE_DTYPE={dtype} " if dtype else "") + "python -m bench" + (" --gpu" if args.gpu else "")
               + (" --quick" if args.quick else "") + (f" --only {' '.join(names)}" if args.only else ""))
    target = HERE / ("results_gpu.json" if args.gpu else "results.json")
    earlier = json.loads(target.read_text()).get("benchmarks", {}) if args.only and target.exists() else {}
    results = {"machine": machine(), "command": command, "seconds": 0.0, "benchmarks": {}}
    done, text = {}, ""
    for name in names:
        t = time.perf_counter()
        if name == "cold_start" and importlib.util.find_spec("gradio") is None:
            print("cold_start: skipped, gradio is not installed here (the studio cannot start)", flush=True)
            continue
        if args.gpu and name == "token_maps":
            done[name] = token_maps.run(quick=args.quick, models=("llava-1.5-7b-bf16",))
        else:
            done[name] = BENCHMARKS[name](args.quick)
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
        # written after every benchmark; with --only, the others keep their last figures
        results["benchmarks"] = {k: done.get(k, earlier.get(k)) for k in BENCHMARKS if k in done or k in earlier}
        results["seconds"] = time.perf_counter() - t0
        if earlier and set(earlier) - set(done):
            results["command"] = command + " (the other sections from the last full run)"
        text = write_results(results, gpu=args.gpu)
    if text:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
