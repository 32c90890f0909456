"""`python -m mmie_core check-presets`: the table, the JSON format and the exit code."""

from __future__ import annotations

import json

from mmie_core.__main__ import main
from mmie_core.check_presets import example_photos


def test_json_report_of_every_check(capsys, tiny_llava_dir, tiny_clip_dir, fresh_cache):
    photo = str(example_photos()[0])
    code = main(["check-presets", "--model", tiny_llava_dir, "--model", tiny_clip_dir, "--image", photo, "--json",
                 "--quiet", "--ig-steps", "2", "--max-new-tokens", "2"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [r["model"] for r in report["models"]] == [tiny_llava_dir, tiny_clip_dir]
    vlm, clip = report["models"]
    for r in report["models"]:
        assert set(r) == {"model", "family", "image", "vision_tokens", "image_tokens", "grid", "checks"}
        assert r["image"] == photo
        for c in r["checks"]:
            assert set(c) == {"name", "ok", "seconds", "error"} and c["ok"] and c["error"] is None
    assert vlm["family"] == "llava" and clip["family"] == "clip"
    assert vlm["image_tokens"] == 16 and vlm["vision_tokens"] == 17 and vlm["grid"] == [4, 4]  # 32 px, patch 8, CLS
    assert clip["image_tokens"] == 0
    assert "sequence" in {c["name"] for c in vlm["checks"]} and "classify" in {c["name"] for c in clip["checks"]}


def test_table_failures_and_exit_code(capsys, tmp_path, tiny_clip_dir, fresh_cache):
    photo = str(example_photos()[0])
    code = main(["check-presets", "--model", str(tmp_path / "missing"), "--model", tiny_clip_dir, "--image", photo,
                 "--quiet", "--no-robustness"])
    out = capsys.readouterr().out
    assert code == 1  # one model failed to load
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["model", "image", "family"]
    assert "missing" in lines[1] and "load" in lines[1]
    assert "clip" in lines[2] and lines[2].split()[-1] == "11/11"  # all 11 checks passed, none named
    assert main(["check-presets", "--model", tiny_clip_dir, "--image", str(tmp_path / "nope.jpg")]) == 2


def test_example_photos_have_credits():
    photos = example_photos()
    assert len(photos) >= 4
    credits = (photos[0].parent / "CREDITS.md").read_text()
    for p in photos:
        assert f"`{p.name}`" in credits
    assert "CC0" in credits and "Public domain" in credits
