"""Semantic image search: the index (content hashes, reuse, skipped files), the scores, the neighbours
engines, why a hit matched, retrieval metrics and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmie_core import search
from imagefiles import scene_folder

from mmie_core.images import collect_image_files, load_image
from mmie_core.models import load_model
from mmie_core.shapes.world import make_scene
from mmie_core.zero_shot import encode_images, encode_texts, scores_from_embeddings


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return scene_folder(tmp_path_factory.mktemp("collection"), 50_000, 12)


def test_index_reuses_known_files_and_skips_unreadable_ones(collection, tmp_path):
    clip = load_model("shapes-clip")
    files = collect_image_files([collection])
    assert len(files) == 13
    index, report = search.build_index(clip, files[:8], tmp_path / "idx", batch=3)
    assert (report.encoded, report.reused) == (7, 0) and report.skipped[0][0].endswith("broken.png")
    assert "not an image" in report.skipped[0][1]
    grown, report = search.build_index(clip, files, tmp_path / "idx")
    assert (report.encoded, report.reused, len(grown)) == (5, 7, 12)
    loaded = search.ImageIndex.load(tmp_path / "idx")
    assert loaded.key == search.model_key(clip) and loaded.key["revision"].startswith("weights-")
    # every stored vector is the model's embedding of that file, whichever run encoded it
    fresh = encode_images(clip, [load_image(e["path"]) for e in loaded.entries]).numpy()
    np.testing.assert_allclose(loaded.embeddings, fresh, atol=1e-5)
    assert [e["hash"] for e in loaded.entries] == [search.file_hash(e["path"]) for e in loaded.entries]
    # another model rebuilds the index instead of mixing embeddings
    siglip = load_model("shapes-siglip")
    rebuilt, report = search.build_index(siglip, files, tmp_path / "idx")
    assert report.reused == 0 and rebuilt.key["model"] == "shapes-siglip"
    with pytest.raises(ValueError, match="made with shapes-siglip"):
        search.search_text(clip, rebuilt, "a red circle")


def test_text_scores_are_the_models_own(collection, tmp_path):
    files = collect_image_files([collection])
    for name in ("shapes-clip", "shapes-siglip"):
        loaded = load_model(name)
        index, _ = search.build_index(loaded, files)
        hits = search.search_text(loaded, index, "a red circle", k=12)
        logits, probs = scores_from_embeddings(loaded, torch.from_numpy(index.embeddings),
                                               encode_texts(loaded, ["a red circle"]))
        if loaded.adapter.label_activation == "softmax":  # CLIP: softmax over the collection
            expected = torch.softmax(logits[:, 0], 0).numpy()
            assert sum(h.score for h in hits) == pytest.approx(1.0, abs=1e-5)
        else:
            expected = probs[:, 0].numpy()
        for h in hits:
            assert h.score == pytest.approx(float(expected[h.index]), abs=1e-5)
        assert [h.index for h in hits] == list(np.argsort(-expected, kind="stable"))
        assert "softmax" in search.score_label(loaded) or "sigmoid" in search.score_label(loaded)


def test_exact_and_faiss_neighbours_agree():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:5] + 0.01 * rng.normal(size=(5, 32)).astype(np.float32)
    exact = search.Neighbours(vectors, "exact").search(queries, 10)
    faiss = search.Neighbours(vectors, "faiss").search(queries, 10)
    np.testing.assert_array_equal(exact[1], faiss[1])
    np.testing.assert_allclose(exact[0], faiss[0], atol=1e-5)
    assert list(exact[1][:, 0]) == [0, 1, 2, 3, 4]
    assert search.Neighbours(vectors[:10]).engine == "exact"


def test_image_query_finds_itself_and_explains_the_match(collection):
    clip = load_model("shapes-clip")
    index, _ = search.build_index(clip, collect_image_files([collection]))
    paths = [e["path"] for e in index.entries]
    query = load_image(paths[4])
    hits = search.search_image(clip, index, query, k=3)
    assert hits[0].index == 4 and hits[0].score == pytest.approx(1.0, abs=1e-5)
    heatmap, pairs = search.explain_image_match(clip, query, load_image(paths[4]))
    assert heatmap.grid == (8, 8) and np.allclose(heatmap.values, 1.0, atol=1e-5)  # every patch finds itself
    assert pairs[3][5] == (3, 5)
    other, _ = search.explain_image_match(clip, query, load_image(paths[7]))
    assert other.values.min() < 0.99


def test_text_match_heatmap_points_at_the_named_object():
    clip = load_model("shapes-clip")
    hits = 0
    for i in range(6):
        scene = make_scene(50_100 + i, n_objects=2)
        obj = scene.sorted_objects()[0]
        heatmap = search.explain_text_match(clip, scene.render(64), f"a {obj.phrase}")
        r, c = heatmap.argmax()
        x0, y0, x1, y1 = heatmap.patch_box(r, c)
        bx0, by0, bx1, by1 = obj.box(64)
        hits += x1 > bx0 - 8 and x0 < bx1 + 8 and y1 > by0 - 8 and y0 < by1 + 8
    assert hits >= 5


def test_retrieval_metrics_and_shapes_retrieval():
    m = search.retrieval_metrics([0, 0, 3, 7, 20])
    assert m["recall@1"] == 0.4 and m["recall@5"] == 0.6 and m["recall@10"] == 0.8
    assert m["mrr"] == pytest.approx(np.mean([1, 1, 1 / 4, 1 / 8, 1 / 21]))
    result = search.shapes_retrieval("shapes-clip", 50_000, n=100)
    assert result["metrics"]["recall@10"] > 5 * result["chance"]["recall@10"]
    assert result["metrics"]["recall@1"] <= result["metrics"]["recall@5"] <= result["metrics"]["recall@10"]


def test_index_and_search_commands(collection, tmp_path, capsys):
    from mmie_core.__main__ import main

    assert main(["index", str(collection), "--model", "shapes-clip", "--out", str(tmp_path / "idx")]) == 0
    out = capsys.readouterr()
    assert "indexed 12 images" in out.out and "12 encoded" in out.out and "broken.png" in out.err
    assert main(["index", str(collection), "--model", "shapes-clip", "--out", str(tmp_path / "idx")]) == 0
    assert "0 encoded" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "idx"), "--model", "shapes-clip", "--text", "a red circle", "--k", "3",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["hits"]) == 3 and data["score"].startswith("softmax")
    assert main(["search", str(tmp_path / "nowhere"), "--text", "x"]) == 2
    assert "no index" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "missing"), "--out", str(tmp_path / "i2")]) == 2


def test_search_refuses_a_chat_model(collection):
    with pytest.raises(ValueError, match="CLIP or SigLIP"):
        search.build_index(load_model("shapes-vlm"), collect_image_files([collection])[:2])
