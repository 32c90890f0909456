"""Do heatmaps point at the right place? Measured on ShapesWorld ground truth, next to chance.

Cases:
- dual encoders: every object of 2- and 3-object scenes, explained by its plain label
  ("a red circle") among all colour x shape labels;
- VLM: per scene one colour and one shape question about an object ("what color is the
  circle?"), explained at the answer token that names the object's colour or shape (the true
  answer, teacher-forced). The object is the one the question is about (`qa["object"]`), never
  guessed from the answer word (objects may share a colour or a shape).

Methods: every explanation method, and chance-level baselines computed on the same cases:
`random` (a uniform random map), `center` (a centred Gaussian), `random_object` (a label-blind map
on a random object of the scene) and, for VLMs, `object_prior` (the map, by the method given as
`of`, relevancy by default, of a question of the same kind about another object of the scene).

Metrics (per case, then averaged, each with a 95% bootstrap interval in `ci95`):
- `pointing_game` (the maximum within one patch of the object's box) and `pointing_game_strict`
  (on the box);
- `energy_on_object`: the share of the map's positive mass inside the object's box;
  `object_discrimination`: whether the object gets more of it than every other object (chance
  1 / objects);
- `deletion_auc` / `deletion_auc_random`: target probability as patches are removed most relevant
  first (vs a random order) and replaced by the processor's mean colour (lower is better);
  `deletion_auc_road` / `deletion_auc_road_random`: the same with ROAD's noisy linear imputation,
  a removal no method shares as its baseline; `insertion_auc` / `insertion_auc_random`: patches
  put back most relevant first into an empty (mean-colour) canvas (higher is better);
- `sanity_rank_corr`: Spearman correlation with the map of a randomised copy of the model over the
  first `sanity_cases` cases (a faithful method changes: lower is better).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..explain import METHODS, explain_subject, make_subject
from ..heatmap import PatchHeatmap
from ..metrics import (bootstrap_ci, curve_auc, discriminates, energy_on_box, pointing_hit, randomized_copy,
                       removal_curve, spearman)
from ..models import LoadedModel, load_model
from .evaluate import EVAL_RENDER_SIZE, _check_seeds
from .world import all_labels, make_scene

log = logging.getLogger(__name__)

SANITY_FLAG = 0.5  # a rank correlation above this with the randomised model is flagged
BASELINES = ("random", "center", "random_object", "object_prior")
FAITHFULNESS_METHODS = METHODS + BASELINES
OBJECT_PRIOR_DEFAULT = "relevancy"
# Random-order curve areas do not depend on the method (same cases, same permutations, same ROAD noise for
# a seed), so every method evaluated in one process shares them: {(model, seed, case, ...): area}.
_RANDOM_ORDER_AUC: dict[tuple, float] = {}


@dataclass
class Case:
    image: object
    target: dict
    box: tuple[float, float, float, float]  # the named object's box
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # every object's box
    named: int = 0  # the named object's index in `boxes`
    other: dict | None = None  # VLM: a question of the same kind about another object (object_prior)
    scene: object = None  # the ShapesWorld scene
    kind: str = ""  # VLM: the question's type ("color" or "shape")


def cases(loaded: LoadedModel, seed: int, n: int, size: int) -> list[Case]:
    """The evaluation cases of `n` scenes from `seed` (see the module docstring)."""
    cases = []
    if loaded.adapter.zero_shot:
        labels = [f"a {p}" for p in all_labels()]
        for i in range(n):
            scene = make_scene(seed + i, n_objects=2 + i % 2)
            image = scene.render(size)
            boxes = [tuple(o.box(size)) for o in scene.objects]
            for k, obj in enumerate(scene.objects):
                cases.append(Case(image, {"label": f"a {obj.phrase}", "labels": labels}, boxes[k], boxes, k))
        return cases
    tok = loaded.processor.tokenizer

    def target(qa: dict) -> dict:
        answer_ids = tok(" " + qa["answer"], add_special_tokens=False)["input_ids"]
        return {"question": qa["question"], "answer_ids": answer_ids, "token_index": 0}

    rng = random.Random(seed)
    for i in range(n):
        scene = make_scene(seed + i)
        image = scene.render(size)
        objects = scene.sorted_objects()  # qa["object"] indexes this list
        boxes = [tuple(o.box(size)) for o in objects]
        pairs = scene.qa()
        for kind in ("color", "shape"):  # one colour and one shape question per scene
            qa = rng.choice([q for q in pairs if q["type"] == kind])
            others = [q for q in pairs if q["type"] == kind and q["object"] != qa["object"]]
            other = target(others[i % len(others)]) if others else None
            cases.append(Case(image, target(qa), boxes[qa["object"]], boxes, qa["object"], other, scene, kind))
    return cases


def _baseline_map(kind: str, subject, case: Case, rng: np.random.Generator, loaded: LoadedModel,
                  params: dict) -> PatchHeatmap:
    """A chance-level map over the subject's grid, with the subject's box."""
    view = subject.view
    rows, cols = subject.layout.shape
    empty = PatchHeatmap(np.zeros((rows, cols)), kind, subject.target, view.box, view.original_size)
    if kind == "random":
        values = rng.random((rows, cols))
    elif kind == "center":
        r, c = np.mgrid[0:rows, 0:cols]
        sr, sc = rows / 4, cols / 4
        values = np.exp(-(((r - (rows - 1) / 2) / sr) ** 2 + ((c - (cols - 1) / 2) / sc) ** 2) / 2)
    elif kind == "random_object":
        from ..metrics import box_overlap

        values = box_overlap(empty, case.boxes[int(rng.integers(len(case.boxes)))])
    elif kind == "object_prior":
        if loaded.adapter.zero_shot:
            raise ValueError("object_prior is for VLMs (the map of a question about another object)")
        if case.other is None:  # one object only: no other object to ask about
            values = rng.random((rows, cols))
        else:
            method = params.get("of", OBJECT_PRIOR_DEFAULT)
            other = make_subject(loaded, case.image, case.other)
            return explain_subject(other, method, **{k: v for k, v in params.items() if k != "of"})
    else:
        raise ValueError(f"unknown baseline {kind!r}")
    return PatchHeatmap(values, kind, subject.target, view.box, view.original_size)


def evaluate_faithfulness(model: str, method: str, seed: int, n: int, size: int = EVAL_RENDER_SIZE,
                          deletion_steps: int = 16, sanity_cases: int = 100, curves: bool = True, **params) -> dict:
    """`{"model", "method", "seed", "n", "cases", "metrics"}` (see the module docstring); `curves=False`
    skips the deletion and insertion curves (their metrics are then None)."""
    if method not in FAITHFULNESS_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(FAITHFULNESS_METHODS)}")
    _check_seeds(seed, n)
    loaded = load_model(model)
    if method == "object_prior" and loaded.adapter.zero_shot:
        raise ValueError("object_prior is a VLM baseline (the map of a question about another object)")
    baseline = method in BASELINES
    random_loaded = None if baseline else LoadedModel(
        randomized_copy(loaded.model), loaded.processor, loaded.family, loaded.source, loaded.preset, loaded.device,
        loaded.dtype)
    torch.manual_seed(seed)  # methods that sample (SmoothGrad's noise) repeat exactly for the same seed
    rng = np.random.default_rng(seed)
    maps_rng = np.random.default_rng(seed + 1)  # the baselines' own draws, apart from the random orders
    per_case: dict[str, list] = {k: [] for k in (
        "pointing_game", "pointing_game_strict", "energy_on_object", "object_discrimination", "deletion_auc",
        "deletion_auc_random", "deletion_auc_road", "deletion_auc_road_random", "insertion_auc",
        "insertion_auc_random", "sanity_rank_corr")}
    for k, case in enumerate(tqdm(cases(loaded, seed, n, size), desc=f"faithfulness {method}", leave=False)):
        subject = make_subject(loaded, case.image, case.target)
        heatmap = (_baseline_map(method, subject, case, maps_rng, loaded, params) if baseline
                   else explain_subject(subject, method, **params))
        per_case["pointing_game"].append(pointing_hit(heatmap, case.box))
        per_case["pointing_game_strict"].append(pointing_hit(heatmap, case.box, tolerance=0))
        per_case["energy_on_object"].append(energy_on_box(heatmap, case.box))
        per_case["object_discrimination"].append(discriminates(heatmap, case.boxes, case.named))
        order = np.argsort(-heatmap.values.ravel(), kind="stable")
        g = subject.grid
        shuffled = rng.permutation(g.n_patches)

        def auc(order_, mode="deletion", rule="mean"):
            return curve_auc(removal_curve(subject.probability, subject.pixel_values, order_, g.patch_size,
                                           (g.rows, g.cols), deletion_steps, mode, rule, subject.zero_input, seed + k))

        def random_auc(mode="deletion", rule="mean"):
            key = (model, seed, k, size, deletion_steps, mode, rule)
            if key not in _RANDOM_ORDER_AUC:
                _RANDOM_ORDER_AUC[key] = auc(shuffled, mode, rule)
            return _RANDOM_ORDER_AUC[key]

        if curves:
            per_case["deletion_auc"].append(auc(order))
            per_case["deletion_auc_random"].append(random_auc())
            per_case["deletion_auc_road"].append(auc(order, rule="road"))
            per_case["deletion_auc_road_random"].append(random_auc(rule="road"))
            per_case["insertion_auc"].append(auc(order, mode="insertion"))
            per_case["insertion_auc_random"].append(random_auc(mode="insertion"))
        if not baseline and k < sanity_cases:
            random_map = explain_subject(make_subject(random_loaded, case.image, case.target), method, **params)
            per_case["sanity_rank_corr"].append(spearman(heatmap.values, random_map.values))
    metrics = {k: (float(np.mean(v)) if v else None) for k, v in per_case.items()}
    if metrics["sanity_rank_corr"] is not None and metrics["sanity_rank_corr"] > SANITY_FLAG:
        log.warning("%s barely changes when the model's weights are randomised (rank correlation %.2f): "
                    "it may not explain the model", method, metrics["sanity_rank_corr"])
    metrics = {k: None if v is None else round(v, 4) for k, v in metrics.items()}
    metrics["ci95"] = {k: [round(x, 4) for x in bootstrap_ci(v, seed=seed)] for k, v in per_case.items() if v}
    result = {"model": model, "method": method, "seed": seed, "n": n, "cases": len(per_case["pointing_game"])}
    if params:  # a variant of the method (its defaults otherwise)
        result["params"] = params
    return result | {"metrics": metrics}
