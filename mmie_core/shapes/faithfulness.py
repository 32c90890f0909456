"""Do heatmaps point at the right place? Measured on ShapesWorld ground truth.

Cases:
- dual encoders: every object of 2- and 3-object scenes, explained by its plain label
  ("a red circle") among all colour x shape labels;
- VLM: per scene one colour and one shape question about an object ("what color is the
  circle?"), explained at the answer token that names the object's colour or shape (the true
  answer, teacher-forced).

Metrics: `pointing_game` (heatmap maximum on the object's box, one patch of tolerance),
`deletion_auc` and `deletion_auc_random` (target probability as patches are removed in heatmap
order vs a random order; lower is better), `sanity_rank_corr` (Spearman correlation with the
map of a randomised copy of the model; a faithful method changes, so lower is better), averaged
over the first `sanity_cases` cases (it needs a second explanation per case).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..explain import METHODS, explain_subject, make_subject
from ..metrics import curve_auc, deletion_curve, pointing_hit, randomized_copy, spearman
from ..models import LoadedModel, load_model
from .evaluate import EVAL_RENDER_SIZE, _check_seeds
from .world import all_labels, make_scene

log = logging.getLogger(__name__)

SANITY_FLAG = 0.5  # a rank correlation above this with the randomised model is flagged


@dataclass
class Case:
    image: object
    target: dict
    box: tuple[float, float, float, float]


def _cases(loaded: LoadedModel, seed: int, n: int, size: int) -> list[Case]:
    cases = []
    if loaded.adapter.zero_shot:
        labels = [f"a {p}" for p in all_labels()]
        for i in range(n):
            scene = make_scene(seed + i, n_objects=2 + i % 2)
            image = scene.render(size)
            for obj in scene.objects:
                cases.append(Case(image, {"label": f"a {obj.phrase}", "labels": labels}, tuple(obj.box(size))))
        return cases
    tok = loaded.processor.tokenizer
    rng = random.Random(seed)
    for i in range(n):
        scene = make_scene(seed + i)
        image = scene.render(size)
        by_answer = {o.color: o for o in scene.objects} | {o.shape: o for o in scene.objects}
        for kind in ("color", "shape"):  # one colour and one shape question per scene
            qa = rng.choice([q for q in scene.qa() if q["type"] == kind])
            obj = by_answer[qa["answer"]]
            answer_ids = tok(" " + qa["answer"], add_special_tokens=False)["input_ids"]
            target = {"question": qa["question"], "answer_ids": answer_ids, "token_index": 0}
            cases.append(Case(image, target, tuple(obj.box(size))))
    return cases


def evaluate_faithfulness(model: str, method: str, seed: int, n: int, size: int = EVAL_RENDER_SIZE,
                          deletion_steps: int = 16, sanity_cases: int = 100, **params) -> dict:
    """`{"model", "method", "seed", "n", "metrics"}` (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    _check_seeds(seed, n)
    loaded = load_model(model)
    random_loaded = LoadedModel(randomized_copy(loaded.model), loaded.processor, loaded.family, loaded.source,
                                loaded.preset, loaded.device, loaded.dtype)
    rng = np.random.default_rng(seed)
    hits, auc, auc_random, corr = [], [], [], []
    for k, case in enumerate(tqdm(_cases(loaded, seed, n, size), desc=f"faithfulness {method}", leave=False)):
        subject = make_subject(loaded, case.image, case.target)
        heatmap = explain_subject(subject, method, **params)
        hits.append(pointing_hit(heatmap, case.box))
        order = np.argsort(-heatmap.values.ravel(), kind="stable")
        g = subject.grid
        auc.append(curve_auc(deletion_curve(subject.probability, subject.pixel_values, order, g.patch_size,
                                            g.cols, deletion_steps)))
        auc_random.append(curve_auc(deletion_curve(subject.probability, subject.pixel_values,
                                                   rng.permutation(g.n_patches), g.patch_size, g.cols,
                                                   deletion_steps)))
        if k < sanity_cases:
            random_map = explain_subject(make_subject(random_loaded, case.image, case.target), method, **params)
            corr.append(spearman(heatmap.values, random_map.values))
    metrics = {
        "pointing_game": float(np.mean(hits)),
        "deletion_auc": float(np.mean(auc)),
        "deletion_auc_random": float(np.mean(auc_random)),
        "sanity_rank_corr": float(np.mean(corr)) if corr else None,
    }
    if corr and metrics["sanity_rank_corr"] > SANITY_FLAG:
        log.warning("%s barely changes when the model's weights are randomised (rank correlation %.2f): "
                    "it may not explain the model", method, metrics["sanity_rank_corr"])
    result = {"model": model, "method": method, "seed": seed, "n": n}
    if params:  # a variant of the method (its defaults otherwise)
        result["params"] = params
    return result | {"metrics": {k: None if v is None else round(v, 4) for k, v in metrics.items()}}
