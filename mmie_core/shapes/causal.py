"""Interventions scored on ShapesWorld ground truth: does the answer causally depend on the object the
question names?

Cases: the VLM cases of `faithfulness` (per scene one colour and one shape question about an
object, explained at the answer token, teacher-forced). Per case:

- knockout: every text position stops attending to the named object's image tokens (the tokens whose
  cells overlap its box) in every language-model layer; the same for `other_draws` random sets of as
  many other image tokens (none on the object). `knockout_pointing`: the object's block lowers the
  answer's probability more than the mean of the other blocks. `knockout_drop_object` /
  `knockout_drop_other`: the mean drops of the answer's probability.
- patching: the counterfactual of the scene with the named object's asked property changed (its colour
  for a colour question, its shape for a shape question; everything else identical) is the corrupted
  image; each image token's residual stream is patched from the clean run at each layer.
  `patching_pointing`: the (layer, token) that restores most of the clean answer's log-probability is a
  token on the object (its cells overlap the object's box in either image).
- segment ablation: Captum's LLMAttribution + ImageMaskInput with FeatureAblation over the scene's
  segments (background and each object's mask; removed pixels take the scene's background colour, so
  removing an object's segment removes the object).
  `segment_pointing`: the named object's segment has the largest value.

`compare` adds the correlational methods' pointing game (strict and ±1 patch) on the same cases: method
names, or (label, method, params) for a variant.
Every metric comes with a 95% bootstrap interval over the cases (`ci95`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from ..explain import explain_subject, make_subject
from ..interventions import NO_BLOCK, Block, cells_in_box, empty_map, image_positions, outcomes, patching, \
    query_positions, run_blocks, tokens_in_cells
from ..metrics import bootstrap_ci, pointing_hit
from ..models import load_model
from ..segments import segment_ablation
from .evaluate import EVAL_RENDER_SIZE, _check_seeds
from .faithfulness import cases as faithfulness_cases
from .world import counterfactual

log = logging.getLogger(__name__)
METRICS = ("knockout_pointing", "knockout_drop_object", "knockout_drop_other", "patching_pointing",
           "segment_pointing")


def _union(a, b):
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _hit_at(heatmap, cell: tuple[int, int], box, tolerance: int) -> bool:
    """pointing_hit of a map whose maximum is `cell`."""
    values = np.zeros(heatmap.grid)
    values[cell] = 1.0
    heatmap.values = values
    return pointing_hit(heatmap, box, tolerance)


def evaluate_causal(model: str, seed: int, n: int, size: int = EVAL_RENDER_SIZE, other_draws: int = 4,
                    compare: tuple = ()) -> dict:
    """`{"model", "seed", "n", "cases", "metrics": {...METRICS, "ci95"}, "chance": {metric: level}}` (+
    `"correlational"` when `compare` names explanation methods: `{method: {"pointing_game",
    "pointing_game_strict", "ci95"}}`, with the chance of a uniformly random maximum in `"chance"`)."""
    _check_seeds(seed, n)
    loaded = load_model(model)
    if not loaded.adapter.token_grid:
        raise ValueError(f"{model} does not read the image as tokens of its language model: the causal "
                         "evaluation needs a chat model (shapes-vlm)")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    per: dict[str, list] = {k: [] for k in METRICS}
    chance: dict[str, list] = {k: [] for k in ("knockout_pointing", "patching_pointing", "segment_pointing",
                                                "pointing_game", "pointing_game_strict")}
    compare = [(c, c, {}) if isinstance(c, str) else tuple(c) for c in compare]  # (label, method, params)
    corr: dict[str, dict[str, list]] = {label: {"pointing_game": [], "pointing_game_strict": []}
                                        for label, _, _ in compare}
    found = faithfulness_cases(loaded, seed, n, size)
    skipped = 0  # cases whose counterfactual does not move the answer (patching has nothing to restore)
    layers = tuple(range(len(loaded.adapter.answer_layers(loaded.model))))
    for case in tqdm(found, desc="causal", leave=False):
        subject = make_subject(loaded, case.image, case.target)
        # knockout: the object's tokens vs as many other tokens
        n_tokens = len(image_positions(subject))
        on_object = tokens_in_cells(subject, cells_in_box(subject, case.box))
        elsewhere = [k for k in range(n_tokens) if k not in set(on_object)]
        text = tuple(query_positions(subject, "text"))
        positions = image_positions(subject)
        blocks = [NO_BLOCK, Block(text, tuple(positions[k] for k in on_object), layers)]
        for _ in range(other_draws):
            pick = rng.choice(elsewhere, size=min(len(on_object), len(elsewhere)), replace=False)
            blocks.append(Block(text, tuple(positions[int(k)] for k in pick), layers))
        probs = [o.probability for o in outcomes(subject, run_blocks(subject, blocks))]
        drop_object = probs[0] - probs[1]
        drop_other = probs[0] - float(np.mean(probs[2:]))
        per["knockout_drop_object"].append(drop_object)
        per["knockout_drop_other"].append(drop_other)
        per["knockout_pointing"].append(drop_object > drop_other)
        chance["knockout_pointing"].append(0.5)  # a block that does nothing wins either way half the time
        # patching on the counterfactual
        changed = counterfactual(case.scene, case.named, case.kind, seed=seed)
        box = _union(case.box, tuple(changed.sorted_objects()[case.named].box(size)))
        try:
            result = patching(subject, changed.render(size))
        except ValueError as err:  # the counterfactual left the answer where it was: nothing to restore
            log.warning("case %d: patching skipped (%s)", len(per["knockout_pointing"]) - 1, err)
            skipped += 1
        else:
            _, token = result.best
            hits = set(tokens_in_cells(subject, cells_in_box(subject, box)))
            per["patching_pointing"].append(token in hits)
            chance["patching_pointing"].append(len(hits) / n_tokens)  # a random token
        # segment ablation (Captum)
        seg = segment_ablation(loaded, case.image, case.target["question"], case.target["answer_ids"],
                               case.scene.masks(size), token_index=case.target["token_index"],
                               baseline=case.scene.background)
        per["segment_pointing"].append(seg.ids[int(np.argmax(seg.values))] == case.named + 1)
        chance["segment_pointing"].append(1 / len(seg.ids))  # a random segment
        if compare:  # a map whose maximum falls on a uniformly random cell
            blank = empty_map(subject)
            cells = [(r, c) for r in range(blank.grid[0]) for c in range(blank.grid[1])]
            for key, tolerance in (("pointing_game", 1), ("pointing_game_strict", 0)):
                chance[key].append(np.mean([_hit_at(blank, rc, case.box, tolerance) for rc in cells]))
        for label, method, params in compare:
            heatmap = explain_subject(subject, method, **params)
            corr[label]["pointing_game"].append(pointing_hit(heatmap, case.box))
            corr[label]["pointing_game_strict"].append(pointing_hit(heatmap, case.box, tolerance=0))
    metrics = {k: round(float(np.mean(v)), 4) for k, v in per.items()}
    metrics["ci95"] = {k: [round(x, 4) for x in bootstrap_ci(v, seed=seed)] for k, v in per.items()}
    result = {"model": model, "seed": seed, "n": n, "cases": len(found), "metrics": metrics}
    if skipped:
        result["patching_skipped"] = skipped
    result["chance"] = {k: round(float(np.mean(v)), 4) for k, v in chance.items() if v}
    if compare:
        result["correlational"] = {
            m: {k: round(float(np.mean(v)), 4) for k, v in d.items()}
            | {"ci95": {k: [round(x, 4) for x in bootstrap_ci(v, seed=seed)] for k, v in d.items()}}
            for m, d in corr.items()}
    return result
