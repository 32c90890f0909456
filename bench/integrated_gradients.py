"""Integrated gradients: all interpolation steps in batches vs one step at a time.

    python -m bench.integrated_gradients [--steps 32] [--quick]

Captum's LayerIntegratedGradients evaluates the model at `steps` points between the baseline and
the image. The studio sends them through the model `internal_batch_size` at a time; the baseline
sends one per forward/backward pass. Both must give the same attributions (to 1e-4, relative to the
largest value), on shapes-clip (a label) and shapes-vlm (an answer token).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from .common import machine, ratio, timed


def run_case(loaded, image, target: dict, steps: int) -> dict:
    from mmie_core.explain import explain_subject, make_subject

    subject = make_subject(loaded, image, target)
    one, single = timed(lambda: explain_subject(subject, "integrated_gradients", steps=steps, internal_batch_size=1))
    batched_s, batched = timed(lambda: explain_subject(subject, "integrated_gradients", steps=steps,
                                                       internal_batch_size=steps))
    scale = float(np.abs(single.values).max()) or 1.0
    diff = float(np.abs(single.values - batched.values).max()) / scale
    return {"model": loaded.name, "target": target.get("label") or f"answer token {target['token_index']}",
            "steps": steps, "one_at_a_time_s": round(one, 3), "batched_s": round(batched_s, 3),
            "speedup": round(ratio(one, batched_s), 2), "max_rel_diff": float(f"{diff:.2e}")}


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
    return {"benchmark": "integrated_gradients", "target": "same attributions to 1e-4; batched faster", "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="shapes-clip only")
    args = parser.parse_args(argv)
    print(json.dumps({"machine": machine(), **run(args.steps, args.quick)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
