"""Batch jobs on Ray Data (`--engine ray`) give the local engine's rows: alt text, the search index, the
ShapesWorld evaluation and faithfulness, on a local Ray of 2 CPUs."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from imagefiles import scene_folder

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    yield scene_folder(tmp_path_factory.mktemp("batch"), 50_200, 3)
    if ray.is_initialized():
        ray.shutdown()


def test_alt_text_on_ray_equals_local(folder, tmp_path):
    from mmie_core.__main__ import main

    assert main(["alt-text", str(folder), "--out", str(tmp_path / "local.csv")]) == 0
    assert main(["alt-text", str(folder), "--out", str(tmp_path / "ray.csv"), "--engine", "ray", "--workers", "2"]) == 0
    local = list(csv.DictReader(open(tmp_path / "local.csv")))
    on_ray = list(csv.DictReader(open(tmp_path / "ray.csv")))
    assert local == on_ray and len(local) == 4
    # a folder: Ray Data writes the rows as CSV shards, each file once by its absolute path, in no fixed order
    assert main(["alt-text", str(folder), "--out", str(tmp_path / "shards") + "/", "--engine", "ray",
                 "--workers", "1"]) == 0  # one actor (it had held Ray's only CPU, and the files were never read)
    shards = sorted((tmp_path / "shards").glob("*.csv"))
    written = [row for shard in shards for row in csv.DictReader(open(shard))]
    assert shards and sorted(written, key=lambda r: r["file"]) == sorted(
        ({**row, "file": str((folder / row["file"]).resolve()) if not row["file"].startswith("/") else row["file"]}
         for row in local), key=lambda r: r["file"])
    assert main(["alt-text", str(folder), "--out", str(tmp_path / "shards")]) == 2  # locally, --out is one file
    # again into the same folder: refused (Ray Data would add a second set of shards beside the first)
    assert main(["alt-text", str(folder), "--out", str(tmp_path / "shards") + "/", "--engine", "ray"]) == 2
    assert sorted((tmp_path / "shards").glob("*.csv")) == shards
    assert sum(bool(r["error"]) for r in local) == 1 and all(r["alt_text"] for r in local if not r["error"])


def test_index_on_ray_equals_local(folder, tmp_path):
    from mmie_core.images import collect_image_files
    from mmie_core.models import load_model
    from mmie_core.search import build_index

    clip = load_model("shapes-clip")
    files = collect_image_files([folder])
    local, report = build_index(clip, files, tmp_path / "local")
    on_ray, ray_report = build_index(clip, files, tmp_path / "ray", engine="ray", workers=1)
    assert [e["hash"] for e in local.entries] == [e["hash"] for e in on_ray.entries] and len(local) == 3
    np.testing.assert_allclose(local.embeddings, on_ray.embeddings, atol=1e-6)
    assert report.skipped == ray_report.skipped and ray_report.skipped[0][0].endswith("broken.png")


def test_shapes_evaluation_on_ray_equals_local(folder, capsys):
    """The CLI with --engine ray prints the local engine's JSON (the same batches, answered alike)."""
    import json

    from mmie_core.shapes.__main__ import main

    outputs = []
    for engine in ("local", "ray"):
        assert main(["evaluate", "--model", "shapes-vlm", "--seed", "10000", "--n", "3", "--json",
                     "--engine", engine, "--workers", "2"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and set(outputs[0]["metrics"]) >= {"qa_color", "caption_exact"}


def test_faithfulness_on_ray_equals_local_case_for_case(folder):
    """A method with its sanity check (the randomised model built in every actor) and the random removal
    orders drawn in the plan: the same JSON, case for case."""
    from mmie_core.shapes.faithfulness import evaluate_faithfulness

    kwargs = dict(seed=50000, n=2, sanity_cases=1, deletion_steps=4)
    local = evaluate_faithfulness("shapes-vlm", "relevancy", **kwargs)
    on_ray = evaluate_faithfulness("shapes-vlm", "relevancy", engine="ray", workers=2, **kwargs)
    assert local == on_ray and local["cases"] == 4 and local["metrics"]["sanity_rank_corr"] is not None
