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


def _baseline_map(kind: str, subject, case: Case, draw, loaded: LoadedModel, params: dict) -> PatchHeatmap:
    """A chance-level map over the subject's grid, with the subject's box; `draw` is this case's random draw
    (`_draws`): a (rows, cols) map for `random` (and `object_prior` without another object), an object index
    for `random_object`."""
    view = subject.view
    rows, cols = subject.layout.shape
    empty = PatchHeatmap(np.zeros((rows, cols)), kind, subject.target, view.box, view.original_size)
    if kind == "random":
        values = draw
    elif kind == "center":
        r, c = np.mgrid[0:rows, 0:cols]
        sr, sc = rows / 4, cols / 4
        values = np.exp(-(((r - (rows - 1) / 2) / sr) ** 2 + ((c - (cols - 1) / 2) / sc) ** 2) / 2)
    elif kind == "random_object":
        from ..metrics import box_overlap

        values = box_overlap(empty, case.boxes[int(draw)])
    elif kind == "object_prior":
        if loaded.adapter.zero_shot:
            raise ValueError("object_prior is for VLMs (the map of a question about another object)")
        if case.other is None:  # one object only: no other object to ask about
            values = draw
        else:
            method = params.get("of", OBJECT_PRIOR_DEFAULT)
            other = make_subject(loaded, case.image, case.other)
            return explain_subject(other, method, **{k: v for k, v in params.items() if k != "of"})
    else:
        raise ValueError(f"unknown baseline {kind!r}")
    return PatchHeatmap(values, kind, subject.target, view.box, view.original_size)


PER_CASE = ("pointing_game", "pointing_game_strict", "energy_on_object", "object_discrimination", "deletion_auc",
            "deletion_auc_random", "deletion_auc_road", "deletion_auc_road_random", "insertion_auc",
            "insertion_auc_random", "sanity_rank_corr")


@dataclass
class Plan:
    """Everything random about one evaluation, drawn once in order, so that cases can be scored in any order,
    in any process (`--engine ray`), with the same result."""

    model: str
    method: str
    seed: int
    n: int
    size: int
    deletion_steps: int
    sanity_cases: int
    curves: bool
    params: dict
    cases: list[Case]
    draws: list  # per case: the baseline's random draw (or None)
    orders: list[np.ndarray]  # per case: the random removal order of the patches


def plan(loaded: LoadedModel, model: str, method: str, seed: int, n: int, size: int = EVAL_RENDER_SIZE,
         deletion_steps: int = 16, sanity_cases: int = 100, curves: bool = True, **params) -> Plan:
    """The cases of `seed`..`seed + n` and their random draws: the baselines' from `seed + 1`, the random
    removal orders from `seed`, each generator in case order."""
    if method not in FAITHFULNESS_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(FAITHFULNESS_METHODS)}")
    _check_seeds(seed, n)
    if method == "object_prior" and loaded.adapter.zero_shot:
        raise ValueError("object_prior is a VLM baseline (the map of a question about another object)")
    all_cases = cases(loaded, seed, n, size)
    first = make_subject(loaded, all_cases[0].image, all_cases[0].target)  # ShapesWorld: one grid for all
    shape, n_patches = first.layout.shape, first.grid.n_patches
    rng = np.random.default_rng(seed)
    maps_rng = np.random.default_rng(seed + 1)  # the baselines' own draws, apart from the random orders
    draws, orders = [], []
    for case in all_cases:
        if method == "random" or (method == "object_prior" and case.other is None):
            draws.append(maps_rng.random(shape))
        elif method == "random_object":
            draws.append(int(maps_rng.integers(len(case.boxes))))
        else:
            draws.append(None)
        orders.append(rng.permutation(n_patches))
    return Plan(model, method, seed, n, size, deletion_steps, sanity_cases, curves, params, all_cases, draws, orders)


def score_case(p: Plan, k: int, loaded: LoadedModel, random_loaded: LoadedModel | None) -> dict:
    """Every per-case metric of case `k` (None where it is not computed)."""
    case, method, params, seed = p.cases[k], p.method, p.params, p.seed
    torch.manual_seed(seed + k)  # methods that sample (SmoothGrad's noise) repeat exactly, in any process
    subject = make_subject(loaded, case.image, case.target)
    baseline = method in BASELINES
    heatmap = (_baseline_map(method, subject, case, p.draws[k], loaded, params) if baseline
               else explain_subject(subject, method, **params))
    out = dict.fromkeys(PER_CASE)
    out["pointing_game"] = pointing_hit(heatmap, case.box)
    out["pointing_game_strict"] = pointing_hit(heatmap, case.box, tolerance=0)
    out["energy_on_object"] = energy_on_box(heatmap, case.box)
    out["object_discrimination"] = discriminates(heatmap, case.boxes, case.named)
    order = np.argsort(-heatmap.values.ravel(), kind="stable")
    g = subject.grid

    def auc(order_, mode="deletion", rule="mean"):
        return curve_auc(removal_curve(subject.probability, subject.pixel_values, order_, g.patch_size,
                                       (g.rows, g.cols), p.deletion_steps, mode, rule, subject.zero_input, seed + k))

    def random_auc(mode="deletion", rule="mean"):
        key = (p.model, seed, k, p.size, p.deletion_steps, mode, rule)
        if key not in _RANDOM_ORDER_AUC:
            _RANDOM_ORDER_AUC[key] = auc(p.orders[k], mode, rule)
        return _RANDOM_ORDER_AUC[key]

    if p.curves:
        out["deletion_auc"] = auc(order)
        out["deletion_auc_random"] = random_auc()
        out["deletion_auc_road"] = auc(order, rule="road")
        out["deletion_auc_road_random"] = random_auc(rule="road")
        out["insertion_auc"] = auc(order, mode="insertion")
        out["insertion_auc_random"] = random_auc(mode="insertion")
    if not baseline and k < p.sanity_cases:
        random_map = explain_subject(make_subject(random_loaded, case.image, case.target), method, **params)
        out["sanity_rank_corr"] = spearman(heatmap.values, random_map.values)
    return {key: None if v is None else float(v) for key, v in out.items()}


def random_copy(loaded: LoadedModel) -> LoadedModel:
    """The model with every weight re-initialised (the sanity check's model)."""
    return LoadedModel(randomized_copy(loaded.model), loaded.processor, loaded.family, loaded.source, loaded.preset,
                       loaded.device, loaded.dtype)


class FaithfulnessWorker:
    """Ray Data actor: loads the model (and its randomised copy) and the plan once, scores the cases it is given."""

    def __init__(self, model: str, method: str, seed: int, n: int, options: dict, params: dict):
        self.loaded = load_model(model)
        self.plan = plan(self.loaded, model, method, seed, n, **options, **params)
        self.random_loaded = None if method in BASELINES else random_copy(self.loaded)

    def __call__(self, batch: dict) -> dict:
        import json

        rows = [json.dumps(score_case(self.plan, int(k), self.loaded, self.random_loaded)) for k in batch["index"]]
        return {"index": np.asarray(batch["index"]), "result": np.array(rows)}


def evaluate_faithfulness(model: str, method: str, seed: int, n: int, size: int = EVAL_RENDER_SIZE,
                          deletion_steps: int = 16, sanity_cases: int = 100, curves: bool = True,
                          engine: str = "local", workers: int = 2, address: str | None = None, **params) -> dict:
    """`{"model", "method", "seed", "n", "cases", "metrics"}` (see the module docstring); `curves=False`
    skips the deletion and insertion curves (their metrics are then None). `engine="ray"` scores the cases
    on Ray Data (an actor per worker, each loading the model once): the same numbers, case for case."""
    loaded = load_model(model)
    options = {"size": size, "deletion_steps": deletion_steps, "sanity_cases": sanity_cases, "curves": curves}
    p = plan(loaded, model, method, seed, n, **options, **params)
    if engine == "ray":
        from ..batch import ray_map_indices

        rows = ray_map_indices(len(p.cases), FaithfulnessWorker,
                               {"model": model, "method": method, "seed": seed, "n": n, "options": options,
                                "params": params}, workers=workers, address=address)
    elif engine == "local":
        random_loaded = None if method in BASELINES else random_copy(loaded)
        rows = [score_case(p, k, loaded, random_loaded)
                for k in tqdm(range(len(p.cases)), desc=f"faithfulness {method}", leave=False)]
    else:
        raise ValueError(f"engine must be local or ray, not {engine!r}")
    per_case: dict[str, list] = {k: [r[k] for r in rows if r[k] is not None] for k in PER_CASE}
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
