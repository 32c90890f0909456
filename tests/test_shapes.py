"""ShapesWorld: deterministic scenes, ground truth that matches the pixels, the CLI's JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mmie_core.shapes.world import COLORS, POSITIONS, QA_TYPES, SHAPES, make_scene


def test_same_seed_same_scene_at_every_size():
    a, b = make_scene(123), make_scene(123)
    assert a == b
    small = np.asarray(a.render(64), dtype=float)
    big = np.asarray(a.render(256).resize((64, 64)), dtype=float)
    assert np.abs(small - big).mean() < 6  # same scene, only sampling differs
    assert make_scene(124) != a


def test_scene_contents_are_valid():
    counts = set()
    for seed in range(300):
        scene = make_scene(seed)
        n = len(scene.objects)
        counts.add(n)
        assert 1 <= n <= 3
        assert len({o.position for o in scene.objects}) == n
        assert len({(o.color, o.shape) for o in scene.objects}) == n
        assert all(o.color in COLORS and o.shape in SHAPES and o.position in POSITIONS for o in scene.objects)
        assert all(min(scene.background) >= 222 for _ in [0])
    assert counts == {1, 2, 3}
    assert all(len(make_scene(s, n_objects=2).objects) == 2 for s in range(20))
    with pytest.raises(ValueError):
        make_scene(1, n_objects=4)


@pytest.mark.parametrize("size", [64, 300])
def test_boxes_cover_the_drawn_pixels(size):
    for seed in range(40):
        scene = make_scene(seed)
        img = np.asarray(scene.render(size)).astype(int)
        bg = np.array(scene.background)
        ink = np.abs(img - bg).sum(-1) > 60  # pixels clearly not background
        covered = np.zeros_like(ink)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box(size)
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            covered[y0:y1, x0:x1] = True
            # the colour at the centre of a circle/square/diamond/triangle box is the object's
            cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
            assert np.abs(img[cy, cx] - np.array(obj.rgb)).sum() < 40
        assert ink[~covered].sum() == 0


def test_position_names_match_the_cells():
    for seed in range(50):
        for obj in make_scene(seed).objects:
            row, col = divmod(POSITIONS.index(obj.position), 3)
            assert int(obj.cx * 3) == col and int(obj.cy * 3) == row


def test_qa_answers_follow_ground_truth():
    types = set()
    for seed in range(200):
        scene = make_scene(seed)
        present = {(o.color, o.shape) for o in scene.objects}
        for qa in scene.qa():
            types.add(qa["type"])
            q, a = qa["question"], qa["answer"]
            if qa["type"] == "existence":
                phrase = q.removeprefix("is there a ").removesuffix("?")
                assert (tuple(phrase.split()) in present) == (a == "yes")
            if qa["type"] == "position":
                color, shape = q.removeprefix("where is the ").removesuffix("?").split()
                assert [o.position for o in scene.objects if (o.color, o.shape) == (color, shape)] == [a]
            if q == "how many shapes are there?":
                assert a == ["zero", "one", "two", "three"][len(scene.objects)]
    assert types == set(QA_TYPES)


def test_caption_lists_objects_in_reading_order():
    scene = make_scene(20, n_objects=3)
    caption = scene.caption
    idx = [caption.index(f"{o.color} {o.shape} at the {o.position}") for o in scene.sorted_objects()]
    assert idx == sorted(idx) and caption.endswith(".")


def test_generate_cli_writes_pngs_and_scenes_json(tmp_path):
    out = tmp_path / "scenes"
    cmd = [sys.executable, "-m", "mmie_core.shapes", "generate", "--seed", "5", "--n", "3", "--size", "96",
           "--objects", "2", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    records = json.loads((out / "scenes.json").read_text())
    assert len(records) == 3
    for i, rec in enumerate(records):
        assert set(rec) == {"file", "seed", "size", "caption", "objects", "qa"}
        assert rec["seed"] == 5 + i and rec["size"] == 96 and len(rec["objects"]) == 2
        assert (out / rec["file"]).is_file()
        for obj in rec["objects"]:
            assert set(obj) == {"color", "shape", "size", "position", "box"}
            assert len(obj["box"]) == 4 and obj["box"][2] <= 96
        assert {q["type"] for q in rec["qa"]} <= set(QA_TYPES)
        for q in rec["qa"]:  # a question about one object names it (its index in "objects")
            about_one = q["type"] in ("color", "shape", "position")
            assert set(q) == {"type", "question", "answer"} | ({"object"} if about_one else set())
            if about_one:
                obj = rec["objects"][q["object"]]
                assert q["answer"] == obj[q["type"]]
    bad = subprocess.run(cmd[:-2] + ["--n", "0", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "--n" in bad.stderr
