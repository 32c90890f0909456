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

SIGLIP_TEXT_LENGTH = 64  # SigLIP text towers are trained on max_length-padded text


@dataclass
class ZeroShotResult:
    labels: list[str]
    probs: torch.Tensor  # (images, labels): softmax rows (CLIP) or independent sigmoids (SigLIP)
    logits: torch.Tensor  # (images, labels)
    activation: str  # "softmax" or "sigmoid"


def _check_zero_shot(loaded: LoadedModel) -> None:
    if loaded.family not in ("clip", "siglip"):
        raise ValueError(f"{loaded.name} is a {loaded.family} model; zero-shot needs a CLIP or SigLIP model.")


def _text_kwargs(loaded: LoadedModel) -> dict:
    if loaded.family == "siglip":
        return dict(padding="max_length", max_length=SIGLIP_TEXT_LENGTH, truncation=True)
    return dict(padding=True, truncation=True)


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
    if loaded.family == "siglip":
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
    return ZeroShotResult(list(labels), probs, logits, "sigmoid" if loaded.family == "siglip" else "softmax")
