"""Zero-shot with a fixed label set: the studio's cached path vs the same computation done the usual way.

    python -m bench.zero_shot [--images 20] [--quick]

50 labels, 20 images. Like for like, on the same model and images:
- **single template (the headline)**: studio `classify` vs one call of transformers'
  `pipeline("zero-shot-image-classification")` with the same `hypothesis_template`, whose
  probabilities must agree to 1e-4 (checked for every template). The studio encodes the labels once
  (text-embedding cache) and then only the image; the pipeline encodes every label on every call.
- **ensemble of 8 templates**: studio `classify` vs the ensemble as transformers' docs and the CLIP
  paper's notebook write it, uncached: per image, the text features of every label under every
  template, normalised and averaged, then the image (same probabilities to 1e-4).
Target: >= 5x for the single template on the ViT-B/32-shaped CLIP. A time breakdown per image
(preprocessing, image encoder, text encoder, softmax) shows where the time goes.
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


def _text_features(loaded, texts: list[str]) -> torch.Tensor:
    tok = loaded.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(loaded.device)
    feats = loaded.model.get_text_features(**tok)
    return torch.nn.functional.normalize(getattr(feats, "pooler_output", feats).float(), dim=-1)


def _image_features(loaded, pixels: torch.Tensor) -> torch.Tensor:
    feats = loaded.model.get_image_features(pixel_values=pixels.to(loaded.device, loaded.dtype))
    return torch.nn.functional.normalize(getattr(feats, "pooler_output", feats).float(), dim=-1)


def docs_ensemble(loaded, image, labels, templates) -> torch.Tensor:
    """The prompt ensemble as transformers' docs write it, with nothing cached: (labels,) probabilities."""
    per_template = torch.stack([_text_features(loaded, [t.format(l) for l in labels]) for t in templates])
    text = torch.nn.functional.normalize(per_template.mean(0), dim=-1)
    pixels = loaded.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    return (_image_features(loaded, pixels) @ text.t() * loaded.model.logit_scale.exp().float()).softmax(-1)[0]


def breakdown(loaded, image, labels, template: str, repeat: int = 5) -> dict:
    """Seconds per image of each stage of one single-template classification."""
    ip = loaded.processor.image_processor
    pre, pixels = timed(lambda: ip(images=[image], return_tensors="pt")["pixel_values"], repeat)
    img, feats = timed(lambda: _image_features(loaded, pixels), repeat)
    txt, text = timed(lambda: _text_features(loaded, [template.format(l) for l in labels]), repeat)
    soft, _ = timed(lambda: (feats @ text.t() * loaded.model.logit_scale.exp()).softmax(-1), repeat)
    return {"preprocessing_s": pre, "image_encoder_s": img, "text_encoder_s": txt, "softmax_s": soft}


def run_model(loaded, imgs, labels, templates=TEMPLATES) -> dict:
    from transformers import pipeline

    from mmie_core.zero_shot import TextEmbeddingCache, classify

    pipe = pipeline("zero-shot-image-classification", model=loaded.model, tokenizer=loaded.processor.tokenizer,
                    image_processor=loaded.processor.image_processor, device=loaded.device)
    per_image = len(imgs) - 1
    with torch.inference_mode():
        # --- single template: studio (labels cached after the first call) vs the pipeline's one call
        single_cache = TextEmbeddingCache()
        classify(loaded, imgs[:1], labels, templates[:1], cache=single_cache)
        for im in imgs[:2]:  # warm both paths up (first calls allocate and spin up threads)
            classify(loaded, [im], labels, templates[:1], cache=single_cache)
            pipe(im, candidate_labels=labels, hypothesis_template=templates[0])
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
        # --- ensemble: studio (cached) vs the docs' uncached ensemble
        cache = TextEmbeddingCache()
        first, _ = timed(lambda: classify(loaded, imgs[:1], labels, templates, cache=cache))
        ours, _ = timed(lambda: [classify(loaded, [im], labels, templates, cache=cache) for im in imgs[1:]])
        theirs, _ = timed(lambda: [docs_ensemble(loaded, im, labels, templates) for im in imgs[1:]])
        ens_diff = max(float((classify(loaded, [im], labels, templates, cache=cache).probs[0]
                              - docs_ensemble(loaded, im, labels, templates)).abs().max()) for im in imgs[:3])
        stages = breakdown(loaded, imgs[0], labels, templates[0])
    return {
        "model": loaded.name,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "labels": len(labels),
        "images": len(imgs),
        "studio_single_per_image_s": round(ours_1 / per_image, 4),
        "pipeline_single_per_image_s": round(theirs_1 / per_image, 4),
        "speedup_single": round(ratio(theirs_1, ours_1), 1),
        "max_abs_prob_diff_single": float(f"{max_diff:.2e}"),
        "templates": len(templates),
        "studio_first_call_s": round(first, 3),
        "studio_ensemble_per_image_s": round(ours / per_image, 4),
        "docs_ensemble_per_image_s": round(theirs / per_image, 4),
        "speedup_ensemble": round(ratio(theirs, ours), 1),
        "max_abs_prob_diff_ensemble": float(f"{ens_diff:.2e}"),
        **{k: round(v, 4) for k, v in stages.items()},
    }


def run(n_images: int = 20, quick: bool = False) -> dict:
    from mmie_core.models import load_model

    imgs = images(n_images)
    labels = label_set(50)
    rows = [run_model(load_model("shapes-clip"), imgs, labels)]
    if not quick:  # ViT-B/32 compute: fewer images keep the pipeline's 8 calls per image affordable
        rows.append(run_model(random_clip_b32(), imgs[:6], labels))
    headline = rows[-1]  # the ViT-B/32-shaped CLIP (the embedded model alone with --quick)
    met = headline["speedup_single"] >= 5 and all(r["max_abs_prob_diff_single"] <= 1e-4 for r in rows)
    notes = []
    if not met:
        s = headline
        floor = s["preprocessing_s"] + s["image_encoder_s"] + s["softmax_s"]
        notes = ["", f"Why the single-template target is not met on {s['model']}: per image the studio still pays "
                 f"preprocessing ({s['preprocessing_s']:.4f} s) and the image encoder ({s['image_encoder_s']:.4f} s); "
                 f"the pipeline adds the text encoder over {s['labels']} labels ({s['text_encoder_s']:.4f} s). "
                 f"Removing the text encoder alone gives (preprocessing + image + text + softmax) / (preprocessing + "
                 f"image + softmax) = {(floor + s['text_encoder_s']) / floor:.1f}x; measured {s['speedup_single']}x "
                 "(the rest is the pipeline's own tokenising and bookkeeping). The image encoder bounds the speed-up "
                 "of any cache of label texts."]
    return {"benchmark": "zero_shot", "target": "single template: >= 5x vs the pipeline on the ViT-B/32-shaped CLIP "
            "with 50 labels, probabilities to 1e-4; ensemble vs the docs' uncached ensemble, same to 1e-4",
            "met": met, "rows": rows, "notes": notes}


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
