"""Heatmaps point at the right object on ShapesWorld ground truth (embedded models)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmie_core.heatmap import PatchHeatmap
from mmie_core.metrics import curve_auc, deletion_curve, pointing_hit, randomized_copy, spearman
from mmie_core.shapes.faithfulness import evaluate_faithfulness

SEED = 30_000


def test_pointing_hit_tolerance():
    values = np.zeros((4, 4))
    values[0, 0] = 1
    hm = PatchHeatmap(values, "t", {}, (0, 0, 40, 40), (40, 40))
    assert pointing_hit(hm, (0, 0, 5, 5))
    assert pointing_hit(hm, (12, 12, 18, 18), tolerance=1)  # one patch away
    assert not pointing_hit(hm, (12, 12, 18, 18), tolerance=0)
    assert not pointing_hit(hm, (30, 30, 40, 40))


def test_deletion_curve_and_auc():
    pixels = torch.ones(1, 3, 4, 4)
    curve = deletion_curve(lambda x: x[:, :, :2, :2].mean((1, 2, 3)), pixels, np.array([0, 1, 2, 3]), 2, 2, steps=4)
    assert curve.tolist() == [1, 0, 0, 0, 0]
    curve = deletion_curve(lambda x: x[:, :, :2, :2].mean((1, 2, 3)), pixels, np.array([3, 2, 1, 0]), 2, 2, steps=4)
    assert curve.tolist() == [1, 1, 1, 1, 0]
    assert curve_auc([1, 0, 0, 0, 0]) < curve_auc([1, 1, 1, 1, 0])


def test_spearman_and_randomized_copy(tiny_clip_dir, fresh_cache):
    a = np.arange(16.0)
    assert spearman(a, a) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    from mmie_core.models import load_model

    model = load_model(tiny_clip_dir).model
    clone = randomized_copy(model)
    w0 = model.vision_model.embeddings.patch_embedding.weight
    w1 = clone.vision_model.embeddings.patch_embedding.weight
    assert not torch.allclose(w0, w1) and w0.data_ptr() != w1.data_ptr()


def test_relevancy_points_at_the_labelled_object_on_shapes_clip():
    result = evaluate_faithfulness("shapes-clip", "relevancy", seed=SEED, n=20)
    m = result["metrics"]
    assert m["pointing_game"] >= 0.85, m
    assert m["deletion_auc"] <= 0.6 * m["deletion_auc_random"], m
    assert m["sanity_rank_corr"] < 0.5, m


def test_vlm_answer_token_maps_point_at_the_object():
    # relevancy measured 0.675 on these 40 cases with the shipped shapes-vlm (0.767 on the README's
    # 600); a regression guard
    m = evaluate_faithfulness("shapes-vlm", "relevancy", seed=SEED, n=20, sanity_cases=10)["metrics"]
    assert m["pointing_game"] >= 0.62, m
    assert m["deletion_auc"] < m["deletion_auc_random"], m


POINTING_IG_WHITE_FLOOR = 0.70  # measured 0.75 on these 40 cases with the seven-stage shapes-vlm (0.90 with the four-stage one)


def test_integrated_gradients_from_a_white_canvas_points_at_the_vlms_object():
    # the best pointer on the four-stage shapes-vlm's answer tokens (0.875 on the README's 600 cases); a
    # regression guard
    m = evaluate_faithfulness("shapes-vlm", "integrated_gradients", seed=SEED, n=20, sanity_cases=0,
                              deletion_steps=4, baseline="white", objective="log_prob")["metrics"]
    assert m["pointing_game"] >= POINTING_IG_WHITE_FLOOR, m


def test_faithfulness_cli_json():
    cmd = [sys.executable, "-m", "mmie_core.shapes", "faithfulness", "--model", "shapes-clip", "--method", "gradcam",
           "--seed", str(SEED), "--n", "3", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) == {"model", "method", "seed", "n", "metrics"}
    assert set(result["metrics"]) == {"pointing_game", "deletion_auc", "deletion_auc_random", "sanity_rank_corr"}
    assert result["method"] == "gradcam" and result["n"] == 3


def test_faithfulness_cli_runs_a_method_variant():
    from mmie_core.shapes.__main__ import parse_method_params

    assert parse_method_params(["smooth=true", "samples=4", "noise=0.1", "layers=[1, 2]", "head_fusion=max"]) == {
        "smooth": True, "samples": 4, "noise": 0.1, "layers": [1, 2], "head_fusion": "max"}
    with pytest.raises(SystemExit):
        parse_method_params(["smooth"])
    cmd = [sys.executable, "-m", "mmie_core.shapes", "faithfulness", "--model", "shapes-clip", "--method", "saliency",
           "--param", "smooth=true", "--param", "samples=2", "--seed", str(SEED), "--n", "2", "--json"]
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    assert result["params"] == {"smooth": True, "samples": 2}
    assert 0.0 <= result["metrics"]["pointing_game"] <= 1.0


def test_faithfulness_table_names_variants():
    from bench.faithfulness_table import variant

    assert variant({"method": "saliency"}) == "saliency"
    assert variant({"method": "saliency", "params": {"smooth": True, "samples": 8}}) == \
        "saliency (samples=8, smooth=true)"
