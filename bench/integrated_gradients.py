"""Integrated gradients: the studio's explain call vs Captum's own default call.

    python -m bench.integrated_gradients [--steps 32] [--quick]

The baseline is what a Captum user writes: `LayerIntegratedGradients(score, patch_embedding)
.attribute(pixels, baselines=mean, n_steps=steps)` with Captum's defaults (every step in one batch).
The studio's `explain_subject(..., "integrated_gradients")` adds the subject's map placement and
Captum's convergence delta (completeness), which costs two more forward passes. Both must give the
same attributions (to 1e-4, relative to the largest value), on shapes-clip (a label) and shapes-vlm
(an answer token); the ratio says what the studio's extras cost (target: within 10% of Captum's call).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from .common import machine, ratio, timed


def run_case(loaded, image, target: dict, steps: int) -> dict:
    from mmie_core.explain import explain_subject, make_subject

    import torch
    from captum.attr import LayerIntegratedGradients

    subject = make_subject(loaded, image, target)
    embedding = loaded.adapter.patch_embedding(subject.vision)

    def captum_default():
        with torch.enable_grad():
            attr = LayerIntegratedGradients(subject.score, embedding).attribute(
                subject.pixel_values, baselines=torch.zeros_like(subject.pixel_values), n_steps=steps)
        return subject.layout.patch_map(attr.detach().float().sum(1))

    theirs_s, theirs = timed(captum_default, repeat=3)
    ours_s, ours = timed(lambda: explain_subject(subject, "integrated_gradients", steps=steps), repeat=3)
    scale = float(np.abs(theirs).max()) or 1.0
    diff = float(np.abs(theirs - ours.values).max()) / scale
    return {"model": loaded.name, "dtype": str(loaded.dtype).removeprefix("torch."), "target": target.get("label") or f"answer token {target['token_index']}",
            "steps": steps, "captum_default_s": round(theirs_s, 3), "studio_s": round(ours_s, 3),
            "captum_over_studio": round(ratio(theirs_s, ours_s), 2), "max_rel_diff": float(f"{diff:.2e}"),
            "completeness_error": round(ours.params["completeness_error"], 4)}


def run(steps: int = 32, quick: bool = False) -> dict:
    from mmie_core.chat import answer_batch
    from mmie_core.models import load_model
    from mmie_core.shapes.world import make_scene

    image = make_scene(70_100, n_objects=3).render(256)
    clip = load_model("shapes-clip")
    labels = [f"a {o.color} {o.shape}" for o in make_scene(70_100, n_objects=3).objects]
    rows = [run_case(clip, image, {"label": labels[0], "labels": labels}, steps)]
    if not quick:
        vlm = load_model("shapes-vlm")
        question = "what color is the circle?"
        answer = answer_batch(vlm, [image], [question])[0]
        ids = vlm.processor.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        rows.append(run_case(vlm, image, {"question": question, "answer_ids": ids, "token_index": 0}, steps))
    met = all(r["max_rel_diff"] <= 1e-4 and r["captum_over_studio"] >= 0.9 for r in rows)
    return {"benchmark": "integrated_gradients", "target": "same attributions as Captum's default call to 1e-4; "
            "the studio within 10% of its time (captum_over_studio >= 0.9)", "met": met, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="shapes-clip only")
    args = parser.parse_args(argv)
    print(json.dumps({"machine": machine(), **run(args.steps, args.quick)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
