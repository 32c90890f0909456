"""Cost of the intervention views: forward passes and seconds per view, against one clean pass.

    python -m bench.interventions [--quick]

On shapes-vlm (ShapesWorld scenes, a colour question each) and on a random-weight LLaVA of realistic
shape (576 image tokens, a Llama of 8 x 512): each view's forward passes, median seconds, and seconds
over one clean forward pass measured in the same run. Also the knockout map with its blocks batched
(the studio's way) against the same blocks run one at a time. Target: the full information-flow sweep
(every window of one layer, three routes) and the per-patch knockout map answer in seconds on shapes-vlm
(<= 10 s each on this CPU).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from mmie_core import interventions as iv
from mmie_core.explain import make_subject
from mmie_core.models import load_model
from mmie_core.segments import segment_ablation
from mmie_core.shapes.world import counterfactual, make_scene

from .common import machine, random_llava_576, ratio, timed

TARGET_SECONDS = 10.0


def _subject(loaded, scene, size: int):
    qa = next(q for q in scene.qa() if q["type"] == "color")
    ids = loaded.processor.tokenizer(" " + qa["answer"], add_special_tokens=False)["input_ids"]
    return make_subject(loaded, scene.render(size), {"question": qa["question"], "answer_ids": ids[:1],
                                                     "token_index": 0}), qa


def _clean(subject):
    with torch.inference_mode():
        inputs = subject.sequence.model_inputs(1, subject.pixel_values)
        return subject.loaded.adapter.answer_logits(subject.loaded, inputs, subject.position)


def views(loaded, scene, size: int, full: bool = True) -> list[dict]:
    """Each view on one scene: (name, passes, seconds)."""
    subject, qa = _subject(loaded, scene, size)
    n_layers = len(loaded.adapter.answer_layers(loaded.model))
    n_image = len(iv.image_positions(subject))
    _clean(subject)  # warm up
    clean, _ = timed(lambda: _clean(subject), repeat=3)
    rows = [("one clean forward pass", 1, clean)]
    seconds, _ = timed(lambda: iv.knockout(subject, "text", "image"))
    rows.append(("knockout, every layer", 2, seconds))
    seconds, _ = timed(lambda: iv.information_flow(subject, 1))
    rows.append(("information flow (1-layer windows, 3 routes)", 1 + 3 * n_layers, seconds))
    if full:
        seconds, _ = timed(lambda: iv.knockout_map(subject))
        rows.append(("per-patch knockout map", 1 + n_image, seconds))
        text, images = tuple(iv.query_positions(subject, "text")), iv.image_positions(subject)
        blocks = [iv.NO_BLOCK] + [iv.Block(text, (p,), tuple(range(n_layers))) for p in images]
        seconds, _ = timed(lambda: iv.run_blocks(subject, blocks, batch=1))
        rows.append(("per-patch knockout map, blocks one at a time (baseline)", 1 + n_image, seconds))
        changed = counterfactual(scene, qa["object"], "color").render(size)
        seconds, _ = timed(lambda: iv.patching(subject, changed))
        rows.append(("activation patching (every layer x image token)", n_layers * (n_image + 1) + 2, seconds))
        masks = scene.masks(size)
        seconds, _ = timed(lambda: segment_ablation(loaded, scene.render(size), qa["question"], subject.answer_ids,
                                                    masks, baseline=scene.background))
        rows.append(("segment ablation (FeatureAblation, objects)", 1 + len(np.unique(masks)), seconds))
    return [{"view": name, "passes": passes, "seconds": s, "x_clean_pass": s / clean} for name, passes, s in rows]


def run(quick: bool = False) -> dict:
    scenes = [make_scene(50_000 + i) for i in range(2 if quick else 5)]
    loaded = load_model("shapes-vlm")
    per_scene = [views(loaded, scene, 64) for scene in scenes]
    rows = []
    for k, first in enumerate(per_scene[0]):
        seconds = float(np.median([s[k]["seconds"] for s in per_scene]))
        times = float(np.median([s[k]["x_clean_pass"] for s in per_scene]))
        passes = float(np.median([s[k]["passes"] for s in per_scene]))
        rows.append({"model": "shapes-vlm", "view": first["view"], "forward passes": f"{passes:g}",
                     "seconds": round(seconds, 3), "x one clean pass": round(times, 1)})
    big = random_llava_576()
    for row in views(big, scenes[0], 384, full=False):
        rows.append({"model": big.name, "view": row["view"], "forward passes": row["passes"],
                     "seconds": round(row["seconds"], 3), "x one clean pass": round(row["x_clean_pass"], 1)})
    by_view = {r["view"]: r for r in rows if r["model"] == "shapes-vlm"}
    flow = by_view["information flow (1-layer windows, 3 routes)"]["seconds"]
    kmap = by_view["per-patch knockout map"]["seconds"]
    one_at_a_time = by_view["per-patch knockout map, blocks one at a time (baseline)"]["seconds"]
    met = flow <= TARGET_SECONDS and kmap <= TARGET_SECONDS
    notes = ["", f"Batched blocks vs one at a time (per-patch knockout map, shapes-vlm): "
                 f"{ratio(one_at_a_time, kmap):.2f}x faster, same {by_view['per-patch knockout map']['forward passes']} "
                 "passes. Medians over the scenes."]
    return {"target": f"information flow and per-patch knockout map <= {TARGET_SECONDS:.0f} s each on shapes-vlm",
            "met": met, "rows": rows, "notes": notes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = run(quick=args.quick)
    print(json.dumps({"machine": machine()} | result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
