"""Robustness panel: degrade the image step by step and watch the score and the answer.

Perturbations act on the original image, as a user's photo would degrade:
- `noise`: Gaussian pixel noise, std as a fraction of the 0..255 range;
- `blur`: Gaussian blur, radius in patches (1 = one patch side of the model's grid);
- `jpeg`: JPEG re-encoding at a quality (100 = the clean image, not re-encoded);
- `occlusion`: a fraction of the patches painted over with the image's median colour (on a plain
  background, the background itself, so no new grey shapes appear), in the order of a heatmap
  (most important first) and, for comparison, in random orders: if the heatmap is faithful the
  score falls faster when its top patches go.

The score is the target's probability as the explanations define it (`Subject.probability`):
the label's probability for CLIP/SigLIP, the probability of one answer token for a VLM
(teacher-forced, the clean answer kept fixed). For a VLM the answer is also regenerated on
every perturbed image; for a dual encoder the top label among the candidates is reported.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from .chat import answer_batch
from .explain import explain_subject, make_subject
from .images import load_image
from .limits import check_deadline
from .patches import vision_grid

PERTURBATIONS = {
    "noise": (0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
    "blur": (0.0, 0.25, 0.5, 1.0, 2.0, 3.0),
    "jpeg": (100, 75, 50, 25, 10, 3),
    "occlusion": (0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
}
STRENGTH_LABELS = {
    "noise": "noise std (fraction of 255)",
    "blur": "blur radius (patches)",
    "jpeg": "JPEG quality (100 = clean)",
    "occlusion": "fraction of patches occluded",
}
RANDOM_ORDERS = 3  # random occlusion orders averaged for the baseline curve


def _check_kind(kind: str) -> None:
    if kind not in PERTURBATIONS:
        raise ValueError(f"Unknown perturbation {kind!r}; choose one of {', '.join(PERTURBATIONS)}.")


def _check_strengths(kind: str, strengths) -> list[float]:
    values = [float(s) for s in (strengths if strengths is not None else PERTURBATIONS[kind])]
    if not values or len(values) > 12:
        raise ValueError("Give between 1 and 12 strengths.")
    lo, hi = {"noise": (0, 2), "blur": (0, 16), "jpeg": (1, 100), "occlusion": (0, 1)}[kind]
    if any(not lo <= v <= hi for v in values):
        raise ValueError(f"{kind} strengths must lie in [{lo}, {hi}]; got {values}.")
    return values


def perturb(image: Image.Image, kind: str, strength: float, patch_px: float = 1.0, seed: int = 0) -> Image.Image:
    """One perturbed copy of `image` (noise, blur or jpeg; occlusion goes through `occlude`)."""
    _check_kind(kind)
    if kind == "noise":
        if strength <= 0:
            return image.copy()
        rng = np.random.default_rng(seed)
        pixels = np.asarray(image, dtype=np.float32)
        noisy = pixels + rng.normal(0.0, strength * 255.0, pixels.shape)
        return Image.fromarray(noisy.clip(0, 255).round().astype(np.uint8))
    if kind == "blur":
        return image.copy() if strength <= 0 else image.filter(ImageFilter.GaussianBlur(strength * patch_px))
    if kind == "jpeg":
        if strength >= 100:
            return image.copy()
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=int(round(strength)))
        return load_image(buf.getvalue())  # decoded through the one door for images
    raise ValueError("occlusion needs an order of patches: use occlude()")


def occlude(image: Image.Image, boxes: list[tuple[float, float, float, float]]) -> Image.Image:
    """`image` with the given pixel boxes painted in its median colour."""
    fill = tuple(int(v) for v in np.median(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0))
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    return out


@dataclass
class RobustnessResult:
    kind: str
    strengths: list[float]
    scores: list[float]  # target probability per strength (occlusion: heatmap order, top patches first)
    outputs: list[str]  # answer (VLM) or top label (dual encoder) per strength
    target: dict
    model: str
    random_scores: list[float] | None = None  # occlusion only: mean over random orders
    heatmap: dict | None = None  # occlusion only: the heatmap that ordered the patches (JSON)
    notes: list[str] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list, repr=False)  # the perturbed images (not in the JSON)

    @property
    def changed(self) -> list[bool]:
        """Whether the answer / top label differs from the clean one (first strength = clean reference)."""
        return [o != self.outputs[0] for o in self.outputs]

    def to_json(self) -> dict:
        out = {
            "model": self.model,
            "perturbation": self.kind,
            "strength_unit": STRENGTH_LABELS[self.kind],
            "target": self.target,
            "strengths": self.strengths,
            "scores": [round(s, 6) for s in self.scores],
            "outputs": self.outputs,
            "changed": self.changed,
            "notes": self.notes,
        }
        if self.random_scores is not None:
            out["random_scores"] = [round(s, 6) for s in self.random_scores]
            out["heatmap"] = self.heatmap
        return out


def _pixels(loaded, images: list[Image.Image]) -> torch.Tensor:
    ip = loaded.processor.image_processor
    return ip(images=images, return_tensors="pt")["pixel_values"].to(loaded.device, loaded.dtype)


def _probabilities(subject, images: list[Image.Image]) -> list[float]:
    with torch.no_grad():
        return [float(p) for p in subject.probability(_pixels(subject.loaded, images))]


def _scores_and_outputs(loaded, subject, images: list[Image.Image]) -> tuple[list[float], list[str]]:
    """Target probability and output (top label, or the regenerated answer) per image."""
    check_deadline()
    if loaded.adapter.zero_shot:  # one forward pass gives both
        with torch.no_grad():
            logits = subject._logits(_pixels(loaded, images))
        labels = subject.target["labels"]
        return ([float(p) for p in subject.label_probability(logits)],
                [labels[i] for i in logits.argmax(-1).tolist()])
    with torch.inference_mode():
        answers = answer_batch(loaded, images, [subject.target["question"]] * len(images))
    return _probabilities(subject, images), answers


def robustness(loaded, image: Image.Image, target: dict, kind: str, strengths=None, method: str = "relevancy",
               seed: int = 0) -> RobustnessResult:
    """Score and answer of `target` (as `explain` takes it) under one perturbation at several strengths."""
    _check_kind(kind)
    values = _check_strengths(kind, strengths)
    subject = make_subject(loaded, image, target)
    grid = vision_grid(loaded)
    x0, y0, x1, y1 = subject.view.box
    patch_px = (x1 - x0) / grid.cols
    notes = []
    if kind != "occlusion":
        images = [perturb(image, kind, v, patch_px, seed) for v in values]
        scores, outputs = _scores_and_outputs(loaded, subject, images)
        return RobustnessResult(kind, values, scores, outputs, subject.target, loaded.name, notes=notes,
                                images=images)
    heatmap = explain_subject(subject, method)
    order = np.argsort(-heatmap.values.ravel(), kind="stable")
    rng = random.Random(seed)
    random_orders = [rng.sample(range(grid.n_patches), grid.n_patches) for _ in range(RANDOM_ORDERS)]

    def boxes(order_, fraction: float):
        k = int(round(fraction * grid.n_patches))
        return [heatmap.patch_box(*divmod(int(p), grid.cols)) for p in order_[:k]]

    top_images = [occlude(image, boxes(order, v)) for v in values]
    random_images = [occlude(image, boxes(o, v)) for o in random_orders for v in values]
    random_probs = np.array(_probabilities(subject, random_images)).reshape(RANDOM_ORDERS, len(values))
    notes.append(f"Patches ordered by the {method} heatmap; the baseline averages {RANDOM_ORDERS} random orders.")
    scores, outputs = _scores_and_outputs(loaded, subject, top_images)
    return RobustnessResult(kind, values, scores, outputs, subject.target, loaded.name, random_probs.mean(0).tolist(),
                            heatmap.to_json(), notes, top_images)

