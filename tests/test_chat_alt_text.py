"""Chat (streaming, history, stop, per-token maps) and alt text (prompts, cleaning, checks, batch)."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import threading

import pytest
from PIL import Image

from mmie_core import models
from mmie_core.alt_text import (
    alt_text_batch,
    check_alt_text,
    clean_alt_text,
    generate_alt_text,
    rows_to_csv,
)
from mmie_core.images import collect_image_files
from mmie_core.chat import GenerationSettings, Turn, answer_token_maps, build_messages, prompt_for, stream_answer
from mmie_core.shapes.world import make_scene


def test_generation_settings_validate():
    GenerationSettings().validate()
    for bad in [dict(max_new_tokens=0), dict(max_new_tokens=10_000), dict(temperature=-1), dict(top_p=0)]:
        with pytest.raises(ValueError):
            GenerationSettings(**bad).validate()
    assert GenerationSettings(temperature=0.7).generate_kwargs()["do_sample"] is True
    assert GenerationSettings().generate_kwargs()["do_sample"] is False


def test_history_puts_the_image_in_the_first_turn_only():
    msgs = build_messages([Turn("q1", "a1"), Turn("q2", "a2")], "q3")
    kinds = [[part["type"] for part in m["content"]] for m in msgs]
    assert kinds[0] == ["image", "text"] and all("image" not in k for k in kinds[1:])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert build_messages([], "q")[0]["content"][0]["type"] == "image"


def test_vlm_answers_follow_the_scene():
    loaded = models.load_model("shapes-vlm")
    scene = make_scene(77, n_objects=1)
    obj = scene.objects[0]
    img = scene.render(256)
    states = list(stream_answer(loaded, img, f"what color is the {obj.shape}?"))
    assert states[-1].finished and states[-1].text.strip(" .") == obj.color
    assert len(states) >= 2  # yielded as tokens arrived, then the final state
    # multi-turn: history is kept and the next question is answered in context
    history = [Turn(f"what color is the {obj.shape}?", states[-1].text)]
    follow = list(stream_answer(loaded, img, f"where is the {obj.color} {obj.shape}?", history))[-1]
    assert follow.text.strip(" .") == obj.position


def test_stream_can_be_stopped(tiny_llava_dir, fresh_cache):
    loaded = models.load_model(tiny_llava_dir)
    stop = threading.Event()
    stop.set()  # stop before the first token
    final = list(stream_answer(loaded, Image.new("RGB", (32, 32)), "describe the image.",
                               settings=GenerationSettings(max_new_tokens=50), stop=stop))[-1]
    assert final.stopped and len(final.token_ids) <= 1


def test_sampling_is_reproducible_with_a_seed(tiny_llava_dir, fresh_cache):
    loaded = models.load_model(tiny_llava_dir)
    img = Image.new("RGB", (32, 32), (255, 0, 0))
    settings = GenerationSettings(max_new_tokens=6, temperature=1.5, seed=3)
    a = list(stream_answer(loaded, img, "what?", settings=settings))[-1].token_ids
    b = list(stream_answer(loaded, img, "what?", settings=settings))[-1].token_ids
    assert a == b


def test_answer_token_maps_one_per_token():
    loaded = models.load_model("shapes-vlm")
    scene = make_scene(12, n_objects=2)
    img = scene.render(256)
    question = "describe the image."
    answer = list(stream_answer(loaded, img, question))[-1]
    maps = answer_token_maps(loaded, img, question, answer.token_ids)
    assert len(maps.tokens) == len(maps.heatmaps) == len(maps.image_reliance) == len(answer.token_ids)
    assert all(0.0 <= r <= 1.0 for r in maps.image_reliance)
    assert all(hm.grid == (8, 8) and abs(hm.values.sum() - 1) < 1e-6 for hm in maps.heatmaps)
    with pytest.raises(ValueError, match="no answer"):
        answer_token_maps(loaded, img, question, [])


def test_clean_alt_text():
    assert clean_alt_text("image of a red circle") == "A red circle."
    assert clean_alt_text("This image shows two squares") == "Two squares."
    assert clean_alt_text("a picture of a cat!") == "A cat!"
    long = "A red circle at the top left. " + "A blue square in the middle of the scene. " * 5
    out = clean_alt_text(long, 60)
    assert out == "A red circle at the top left."  # cut at the last sentence end within 60 characters
    words = clean_alt_text("word " * 50, 40)
    assert len(words) <= 40 and words.endswith(".") and not words.endswith(" .")
    assert clean_alt_text("   ") == ""


def test_check_alt_text_findings():
    kinds = lambda text, **kw: {f.kind for f in check_alt_text(text, **kw).findings}  # noqa: E731
    assert kinds("") == {"empty"}
    assert "file_name" in kinds("IMG_2043.jpg") and "file_name" in kinds("photo.png")
    assert "redundant_prefix" in kinds("Image of a red circle.")
    assert "repeated_words" in kinds("A red red circle.")
    assert "too_long" in kinds("A red circle. " * 20)
    assert kinds("A red circle at the top left.") == set()


def test_image_text_match_prefers_the_true_description():
    clip = models.load_model("shapes-clip")
    scene = make_scene(31, n_objects=1)
    obj = scene.objects[0]
    img = scene.render(256)
    good = check_alt_text(f"A {obj.color} {obj.shape}.", image=img, matcher=clip)
    other = "blue" if obj.color != "blue" else "red"
    bad = check_alt_text(f"A {other} {obj.shape}.", image=img, matcher=clip)
    assert good.match > bad.match


@pytest.mark.parametrize("style", ["concise", "detailed", "functional"])
def test_generate_alt_text_styles(style):
    loaded = models.load_model("shapes-vlm")
    scene = make_scene(44, n_objects=2)
    alt = generate_alt_text(loaded, scene.render(256), style, context="link to the shapes quiz", max_chars=125)
    assert alt.text and alt.text[0].isupper() and alt.text[-1] in ".!?" and len(alt.text) <= 125
    colors = [o.color for o in scene.objects]
    assert all(c in alt.text.lower() for c in colors), alt
    if style == "functional":
        assert alt.text.startswith("Link to the shapes quiz:")
    if style == "detailed":
        assert all(o.position in alt.text.lower() for o in scene.objects), alt


def test_batch_and_csv_and_cli(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for seed in (1, 2):
        make_scene(seed).render(128).save(folder / f"s{seed}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    files = collect_image_files([str(folder)])
    assert [f.name for f in files] == ["broken.png", "s1.png", "s2.png"]
    out = tmp_path / "alt.csv"
    run = subprocess.run([sys.executable, "-m", "mmie_core", "alt-text", str(folder), "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["file"].rsplit("/", 1)[-1] for r in rows] == ["broken.png", "s1.png", "s2.png"]
    assert rows[0]["error"] and not rows[0]["alt_text"]
    assert rows[1]["alt_text"].endswith(".") and not rows[1]["error"]
    missing = subprocess.run([sys.executable, "-m", "mmie_core", "alt-text", str(tmp_path / "nope"), "--out",
                              str(out)], capture_output=True, text=True)
    assert missing.returncode == 2 and "neither a file nor a folder" in missing.stderr
    loaded = models.load_model("shapes-vlm")
    rows = alt_text_batch(loaded, [("x", ValueError("bad")), ("y", make_scene(3).render(64))])
    assert rows_to_csv(rows).splitlines()[0] == "file,alt_text,chars,error"


def test_prompt_template_is_used(tiny_llava_dir, fresh_cache):
    loaded = models.load_model(tiny_llava_dir)
    assert prompt_for(loaded, "hi").endswith("<|assistant|>")


def test_a_finished_answer_is_never_reported_as_stopped():
    loaded = models.load_model("shapes-vlm")
    img = make_scene(5, n_objects=2).render(64)
    for _ in range(8):  # the generation thread may still be winding down when the last token arrives
        final = list(stream_answer(loaded, img, "how many shapes are there?"))[-1]
        assert final.finished and not final.stopped
