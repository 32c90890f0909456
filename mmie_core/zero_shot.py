"""Zero-shot classification with CLIP (softmax over labels) and SigLIP (sigmoid per label).

Text embeddings of a (model, labels, templates) set are cached, so classifying a new image
with the same labels costs one image encoding.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from PIL import Image

from .models import LoadedModel
from .templates import IMAGENET_TEMPLATES

MAX_LABELS = 200
MAX_LABEL_CHARS = 200

_CONTROL = dict.fromkeys(c for c in range(32) if chr(c) not in "\n\t")


def parse_labels(text: str, max_labels: int = MAX_LABELS) -> list[str]:
    """Labels typed one per line, or comma-separated on one line. Blank and repeated labels are
    dropped, control characters removed; too many or too long labels are a clear error."""
    if text is None or not str(text).strip():
        raise ValueError("Type at least one label (one per line, or separated by commas).")
    text = str(text).translate(_CONTROL)
    lines = [line for line in text.splitlines() if line.strip()]
    parts = lines[0].split(",") if len(lines) == 1 else lines
    labels: list[str] = []
    for part in parts:
        label = " ".join(part.split())
        if label and label not in labels:
            labels.append(label)
    if not labels:
        raise ValueError("Type at least one label (one per line, or separated by commas).")
    if len(labels) > max_labels:
        raise ValueError(f"{len(labels)} labels is too many; the limit is {max_labels}.")
    long = [lab for lab in labels if len(lab) > MAX_LABEL_CHARS]
    if long:
        raise ValueError(f"Labels are limited to {MAX_LABEL_CHARS} characters; one has {len(long[0])}.")
    return labels


def resolve_templates(mode: str, custom: str = "", default: tuple[str, ...] = ("{}",)) -> tuple[str, ...]:
    """Prompt templates for a mode: "preset" (the model's default), "none" ("{}"), "single"
    (`custom`, which must contain {}), or "ensemble" (the 80 ImageNet templates)."""
    if mode == "preset":
        return tuple(default)
    if mode == "none":
        return ("{}",)
    if mode == "ensemble":
        return IMAGENET_TEMPLATES
    if mode == "single":
        template = (custom or "").strip()
        if template.count("{}") != 1 or "{" in template.replace("{}", "") or "}" in template.replace("{}", ""):
            raise ValueError('A template must contain {} exactly once, e.g. "a photo of a {}."')
        return (template,)
    raise ValueError(f"Unknown template mode {mode!r}; use preset, none, single or ensemble.")


@dataclass
class ZeroShotResult:
    labels: list[str]
    probs: torch.Tensor  # (images, labels): softmax rows (CLIP) or independent sigmoids (SigLIP)
    logits: torch.Tensor  # (images, labels)
    activation: str  # "softmax" or "sigmoid"


def _check_zero_shot(loaded: LoadedModel) -> None:
    if not loaded.adapter.zero_shot:
        raise ValueError(f"{loaded.name} is a {loaded.family} model; zero-shot needs a CLIP or SigLIP model.")


def _text_kwargs(loaded: LoadedModel) -> dict:
    return loaded.adapter.text_kwargs()


class TextEmbeddingCache:
    """Bounded LRU of normalised label embeddings keyed by (model, labels, templates)."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, loaded: LoadedModel, labels: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        key = (loaded.source, id(loaded.model), labels, templates)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        value = encode_labels(loaded, labels, templates)
        with self._lock:
            self.misses += 1
            self._items[key] = value
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return value


TEXT_CACHE = TextEmbeddingCache()


@torch.no_grad()
def encode_texts(loaded: LoadedModel, texts: list[str]) -> torch.Tensor:
    """(len(texts), dim) L2-normalised text embeddings."""
    _check_zero_shot(loaded)
    enc = loaded.processor.tokenizer(texts, return_tensors="pt", **_text_kwargs(loaded)).to(loaded.device)
    feats = loaded.model.get_text_features(**enc)
    feats = getattr(feats, "pooler_output", feats)
    return torch.nn.functional.normalize(feats.float(), dim=-1)


def encode_labels(loaded: LoadedModel, labels: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
    """(labels, dim) embeddings; several templates are averaged in embedding space (CLIP paper)."""
    texts = [t.format(label) for label in labels for t in templates]
    feats = encode_texts(loaded, texts).view(len(labels), len(templates), -1)  # (L, T, D)
    if len(templates) == 1:
        return feats[:, 0]
    return torch.nn.functional.normalize(feats.mean(1), dim=-1)


@torch.no_grad()
def encode_images(loaded: LoadedModel, images: list[Image.Image]) -> torch.Tensor:
    """(len(images), dim) L2-normalised image embeddings."""
    _check_zero_shot(loaded)
    pixels = loaded.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    feats = loaded.model.get_image_features(pixel_values=pixels.to(loaded.device, loaded.dtype))
    feats = getattr(feats, "pooler_output", feats)
    return torch.nn.functional.normalize(feats.float(), dim=-1)


@torch.no_grad()
def scores_from_embeddings(loaded: LoadedModel, image_emb: torch.Tensor, text_emb: torch.Tensor):
    """(logits, probs) as the model's own forward computes them."""
    model = loaded.model
    logits = image_emb @ text_emb.t() * model.logit_scale.exp().float()  # (N images, L labels)
    if loaded.adapter.label_activation == "sigmoid":  # SigLIP: independent labels, with the learned bias
        logits = logits + model.logit_bias.float()
        return logits, torch.sigmoid(logits)
    return logits, logits.softmax(dim=-1)


def classify(
    loaded: LoadedModel,
    images: list[Image.Image],
    labels: list[str],
    templates: tuple[str, ...] = ("{}",),
    cache: TextEmbeddingCache | None = TEXT_CACHE,
) -> ZeroShotResult:
    """Scores of every label for every image."""
    _check_zero_shot(loaded)
    if not labels:
        raise ValueError("Give at least one label.")
    labels_t, templates_t = tuple(labels), tuple(templates)
    text = cache.get(loaded, labels_t, templates_t) if cache else encode_labels(loaded, labels_t, templates_t)
    logits, probs = scores_from_embeddings(loaded, encode_images(loaded, images), text)
    return ZeroShotResult(list(labels), probs, logits, loaded.adapter.label_activation)
