"""Zero-shot with a fixed label set: the studio's cached path vs transformers' pipeline.

    python -m bench.zero_shot [--images 20] [--quick]

50 labels x 8 prompt templates, 20 images. The studio encodes the 400 label texts once (the
text-embedding cache) and then one image per call; the pipeline re-encodes every label with the
image on each call. Two comparisons, both measured here on the same model and images:
- ensemble: studio classify with the 8-template ensemble vs the pipeline called once per
  template (the 400 text encodings the ensemble needs);
- single template: studio classify vs one pipeline call with the same `hypothesis_template`,
  whose probabilities must agree to 1e-4 (checked for every template).
"""

from __future__ import annotations

import argparse
import json

import torch

from .common import machine, random_clip_b32, ratio, timed

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("", "small ", "large ")
TEMPLATES = ("{}", "a picture of {}.", "an image of {}.", "a photo of {}.", "there is {}.", "this is {}.",
             "{} in the image.", "a scene with {}.")


def label_set(n: int = 50) -> list[str]:
    labels = [f"a {size}{c} {s}" for size in SIZES for c in COLORS for s in SHAPES]
    return labels[:n]


def images(n: int):
    from mmie_core.shapes.world import make_scene

    return [make_scene(70_000 + i).render(224) for i in range(n)]


def run_model(loaded, imgs, labels, templates=TEMPLATES) -> dict:
    from transformers import pipeline

    from mmie_core.zero_shot import TextEmbeddingCache, classify

    pipe = pipeline("zero-shot-image-classification", model=loaded.model, tokenizer=loaded.processor.tokenizer,
                    image_processor=loaded.processor.image_processor, device=loaded.device)
    with torch.inference_mode():
        # --- ensemble: first call (text encodings) and then per image
        cache = TextEmbeddingCache()
        first, _ = timed(lambda: classify(loaded, imgs[:1], labels, templates, cache=cache))
        ours, _ = timed(lambda: [classify(loaded, [im], labels, templates, cache=cache) for im in imgs[1:]])
        theirs, _ = timed(lambda: [[pipe(im, candidate_labels=labels, hypothesis_template=t) for t in templates]
                                   for im in imgs[1:]])
        per_image = len(imgs) - 1
        # --- single template, and agreement with the pipeline for every template
        single_cache = TextEmbeddingCache()
        classify(loaded, imgs[:1], labels, templates[:1], cache=single_cache)
        ours_1, _ = timed(lambda: [classify(loaded, [im], labels, templates[:1], cache=single_cache)
                                   for im in imgs[1:]])
        theirs_1, _ = timed(lambda: [pipe(im, candidate_labels=labels, hypothesis_template=templates[0])
                                     for im in imgs[1:]])
        max_diff = 0.0
        for t in templates:
            for im in imgs[:3]:
                expected = {r["label"]: r["score"] for r in pipe(im, candidate_labels=labels, hypothesis_template=t)}
                probs = classify(loaded, [im], labels, (t,), cache=None).probs[0].tolist()
                max_diff = max(max_diff, max(abs(p - expected[l]) for l, p in zip(labels, probs)))
    return {
        "model": loaded.name,
        "labels": len(labels),
        "templates": len(templates),
        "images": len(imgs),
        "studio_first_call_s": round(first, 3),
        "studio_per_image_s": round(ours / per_image, 4),
        "pipeline_per_image_s": round(theirs / per_image, 4),
        "speedup_ensemble": round(ratio(theirs, ours), 1),
        "studio_single_per_image_s": round(ours_1 / per_image, 4),
        "pipeline_single_per_image_s": round(theirs_1 / per_image, 4),
        "speedup_single": round(ratio(theirs_1, ours_1), 1),
        "max_abs_prob_diff": float(f"{max_diff:.2e}"),
    }


def run(n_images: int = 20, quick: bool = False) -> dict:
    from mmie_core.models import load_model

    imgs = images(n_images)
    labels = label_set(50)
    rows = [run_model(load_model("shapes-clip"), imgs, labels)]
    if not quick:  # ViT-B/32 compute: fewer images keep the pipeline's 8 calls per image affordable
        rows.append(run_model(random_clip_b32(), imgs[:6], labels))
    return {"benchmark": "zero_shot", "target": "speedup >= 5x per image after the first call; probabilities to 1e-4",
            "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="embedded model only")
    args = parser.parse_args(argv)
    result = run(args.images, args.quick)
    print(json.dumps({"machine": machine(), **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
