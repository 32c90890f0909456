"""Zero-shot scores: CLIP softmax, SigLIP sigmoid, template ensembles, the text cache, and
agreement with transformers' zero-shot pipeline."""

from __future__ import annotations

import pytest
import torch

from mmie_core import models
from mmie_core.shapes.world import make_scene
from mmie_core.templates import IMAGENET_TEMPLATES
from mmie_core.zero_shot import TextEmbeddingCache, classify, encode_labels, parse_labels, resolve_templates

LABELS = ["a red circle", "a blue square", "a green triangle"]


def test_parse_labels():
    assert parse_labels("a, b ,c") == ["a", "b", "c"]
    assert parse_labels("red circle\nblue, square\n\n") == ["red circle", "blue, square"]
    assert parse_labels("x\nx\n  x  ") == ["x"]
    assert parse_labels("ta\u0000b\u0007") == ["tab"]
    assert parse_labels("  many   spaces ") == ["many spaces"]
    for bad in ["", "   ", "\n,\n", ",,,", None]:
        with pytest.raises(ValueError, match="at least one label"):
            parse_labels(bad)
    with pytest.raises(ValueError, match="too many"):
        parse_labels("\n".join(f"label {i}" for i in range(5000)))
    with pytest.raises(ValueError, match="characters"):
        parse_labels("x" * 300)


def test_templates():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert resolve_templates("none") == ("{}",)
    assert resolve_templates("single", "a photo of a {}.") == ("a photo of a {}.",)
    assert resolve_templates("ensemble") == IMAGENET_TEMPLATES
    assert resolve_templates("preset", default=("x {}",)) == ("x {}",)
    for bad in ["no placeholder", "{} and {}", "{0}"]:
        with pytest.raises(ValueError, match="exactly once"):
            resolve_templates("single", bad)
    with pytest.raises(ValueError):
        resolve_templates("weird")
    assert models.PRESETS["shapes-clip"].default_templates == ("{}",)
    assert models.PRESETS["clip-vit-base-patch32"].default_templates == IMAGENET_TEMPLATES


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_activation_per_family(family, tiny_clip_dir, tiny_siglip_dir, fresh_cache):
    loaded = models.load_model(tiny_clip_dir if family == "clip" else tiny_siglip_dir)
    result = classify(loaded, [make_scene(1).render(64), make_scene(2).render(64)], LABELS)
    assert result.probs.shape == (2, 3)
    if family == "clip":
        assert result.activation == "softmax"
        assert torch.allclose(result.probs.sum(-1), torch.ones(2), atol=1e-5)
    else:
        assert result.activation == "sigmoid"
        assert torch.allclose(result.probs, torch.sigmoid(result.logits))


@pytest.mark.parametrize("name", ["shapes-clip", "shapes-siglip"])
@pytest.mark.parametrize("template", ["{}", "a photo of a {}."])
def test_matches_transformers_pipeline(name, template):
    from transformers import pipeline

    loaded = models.load_model(name)
    pipe = pipeline("zero-shot-image-classification", model=loaded.model, tokenizer=loaded.processor.tokenizer,
                    image_processor=loaded.processor.image_processor, device="cpu")
    image = make_scene(5, n_objects=2).render(256)
    expected = {r["label"]: r["score"] for r in pipe(image, candidate_labels=LABELS, hypothesis_template=template)}
    ours = classify(loaded, [image], LABELS, (template,)).probs[0]
    for label, p in zip(LABELS, ours.tolist()):
        assert p == pytest.approx(expected[label], abs=1e-4)


def test_ensemble_averages_in_embedding_space(tiny_clip_dir, fresh_cache):
    loaded = models.load_model(tiny_clip_dir)
    templates = ("a {}.", "the {}.")
    emb = encode_labels(loaded, ("circle",), templates)
    a = encode_labels(loaded, ("circle",), ("a {}.",))
    b = encode_labels(loaded, ("circle",), ("the {}.",))
    expected = torch.nn.functional.normalize(a + b, dim=-1)
    assert torch.allclose(emb, expected, atol=1e-5)
    assert emb.norm(dim=-1).item() == pytest.approx(1.0, abs=1e-5)


def test_text_cache_is_reused_and_bounded(tiny_clip_dir, fresh_cache, monkeypatch):
    from mmie_core import zero_shot

    loaded = models.load_model(tiny_clip_dir)
    cache = TextEmbeddingCache(max_entries=2)
    calls = []
    real = zero_shot.encode_labels
    monkeypatch.setattr(zero_shot, "encode_labels", lambda *a: calls.append(a) or real(*a))
    img = make_scene(3).render(64)
    for _ in range(3):
        classify(loaded, [img], LABELS, cache=cache)
    assert len(calls) == 1 and cache.hits == 2
    classify(loaded, [img], ["x"], cache=cache)
    classify(loaded, [img], ["y"], cache=cache)
    assert len(cache._items) == 2


def test_the_ensemble_benchmarks_baseline_computes_the_same_probabilities():
    """bench.zero_shot compares the cached ensemble with the docs' uncached one: same numbers, so the
    speed-up is like for like."""
    from bench.zero_shot import TEMPLATES, docs_ensemble, label_set
    from mmie_core.models import load_model
    from mmie_core.shapes.world import make_scene
    from mmie_core.zero_shot import classify

    loaded = load_model("shapes-clip")
    image = make_scene(70_000).render(224)
    labels = label_set(12)
    ours = classify(loaded, [image], labels, TEMPLATES, cache=None).probs[0]
    theirs = docs_ensemble(loaded, image, labels, TEMPLATES)
    assert torch.allclose(ours, theirs, atol=1e-5)
