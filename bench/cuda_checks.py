"""Numerics of the embedded models on a CUDA device, and the cost of recording maps during generation there.

    MMIE_DTYPE=float32 python -m bench.cuda_checks     (on a CUDA machine; bench/gpu.sh runs it so)

The TF32 switches only matter in float32: run it with MMIE_DTYPE=float32 to see whether they do (in the
CUDA default, bf16, they change nothing).

Prints one JSON object: the TF32 switches as this process finds them; for each precision setting (as
found; TF32 off with float32 matmul precision "highest"; that plus sdpa's math kernel alone) the largest
difference between (a) shapes-vlm's per-token maps recorded during generation and those of the
teacher-forced pass and (b) shapes-clip's `classify` and transformers' zero-shot pipeline; then plain
generation vs generation with maps on a random LLaVA of llava-1.5-7b's size in bf16 (median of 5,
interleaved). Also written to bench/cuda_checks.json.
"""

from __future__ import annotations

import json
import os
import statistics
from contextlib import nullcontext
from pathlib import Path

import torch

from .common import random_llava_15, timed


def switches() -> dict:
    return {"matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "env": {k: v for k, v in os.environ.items() if "TF32" in k}}


def differences(vlm, clip) -> dict:
    from transformers import pipeline

    from mmie_core.chat import GenerationSettings, answer_token_maps, generation_token_maps, stream_answer
    from mmie_core.shapes.world import make_scene
    from mmie_core.zero_shot import classify

    image = make_scene(70_200, n_objects=3).render(256)
    question = "describe the image."
    *_, state = stream_answer(vlm, image, question, settings=GenerationSettings(24), record_maps=True)
    during = generation_token_maps(vlm, image, question, state)
    after = answer_token_maps(vlm, image, question, state.token_ids)
    labels = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")]
    pipe = pipeline("zero-shot-image-classification", model=clip.model, tokenizer=clip.processor.tokenizer,
                    image_processor=clip.processor.image_processor, device=clip.device)
    worst = 0.0
    for seed in range(3):
        im = make_scene(70_300 + seed, n_objects=3).render(256)
        expected = {r["label"]: r["score"] for r in pipe(im, candidate_labels=labels, hypothesis_template="{}")}
        probs = classify(clip, [im], labels, ("{}",), cache=None).probs[0].tolist()
        worst = max(worst, max(abs(p - expected[l]) for l, p in zip(labels, probs)))
    return {"generation_maps_vs_pass": float(abs(during.attention - after.attention).max()),
            "classify_vs_pipeline": worst}


def main() -> int:
    from mmie_core.models import load_model

    from .token_maps import _generate, _image, generate_with_maps

    if not torch.cuda.is_available():
        raise SystemExit("bench.cuda_checks needs a CUDA device")
    os.environ["MMIE_DEVICE"] = "cuda"
    dtype = os.environ.get("MMIE_DTYPE")
    out = {"command": (f"MMIE_DTYPE={dtype} " if dtype else "") + "python -m bench.cuda_checks",
           "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "switches_found": switches()}
    vlm, clip = load_model("shapes-vlm"), load_model("shapes-clip")
    out["dtype"] = str(vlm.dtype).removeprefix("torch.")  # MMIE_DTYPE, else the CUDA default (bf16)
    out["as_found"] = differences(vlm, clip)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    out["tf32_off"] = differences(vlm, clip)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH) if sdpa_kernel else nullcontext():
        out["tf32_off_sdpa_math"] = differences(vlm, clip)
    print(json.dumps(out), flush=True)
    del vlm, clip
    big = random_llava_15(torch.bfloat16)
    image = _image()
    _generate(big, image, 32)
    generate_with_maps(big, image, 32)
    plain, maps = [], []
    for _ in range(5):
        plain.append(timed(lambda: _generate(big, image, 32))[0])
        maps.append(timed(lambda: generate_with_maps(big, image, 32))[0])
    out["llava_7b_bf16"] = {"generate_s": statistics.median(plain), "generate_with_maps_s": statistics.median(maps),
                            "ratio": statistics.median(maps) / statistics.median(plain)}
    print(json.dumps(out, indent=1))
    (Path(__file__).resolve().parent / "cuda_checks.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
