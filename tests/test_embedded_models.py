"""The shipped ShapesWorld models load offline and still meet their targets on fresh scenes.

Thresholds sit a few points below the targets of the model cards (measured on 500 scenes);
these runs use 100 scenes from a seed the cards did not use.
"""

from __future__ import annotations

import json

import pytest

from mmie_core.models import EMBEDDED_DIR, load_model
from mmie_core.shapes.evaluate import evaluate_model

SEED = 20_000  # fresh: neither training seeds nor the model cards' evaluation seeds


@pytest.mark.parametrize("name", ["shapes-clip", "shapes-siglip", "shapes-vlm", "shapes-blip2"])
def test_folder_is_a_complete_hf_model(name):
    folder = EMBEDDED_DIR / name
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "README.md"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    card = (folder / "README.md").read_text()
    assert "not photographs" in card
    evaluation = json.loads((folder / "evaluation.json").read_text())
    assert evaluation["n"] == 500


def test_embedded_models_fit_the_size_budget():
    """Four models in 32 MiB (shapes-blip2 ships float16 weights, 7 MiB; the others float32)."""
    total = sum(p.stat().st_size for p in EMBEDDED_DIR.rglob("*") if p.is_file())
    assert total < 32 * 1024 * 1024


@pytest.mark.parametrize("name", ["shapes-clip", "shapes-siglip"])
def test_dual_encoders_zero_shot(name):
    metrics = evaluate_model(name, seed=SEED, n=100)["metrics"]
    assert metrics["zero_shot_top1_single"] >= 0.92
    assert metrics["zero_shot_top1_multi_present"] >= 0.85


# shapes-vlm meets the project's targets on every question type and on captions (positions only
# just: 0.907 on the 500 card scenes). The floors sit a few points under what it measured on these
# 100 scenes (color 0.94, shape 0.96, count 0.98, position 0.89, existence 0.99, captions 0.89; on
# the 500 card scenes 0.93 / 0.96 / 0.98 / 0.91 / 0.99 / 0.93), so any regression fails the suite.
VLM_FLOORS = {"qa_color": 0.90, "qa_shape": 0.92, "qa_count": 0.94, "qa_position": 0.85, "qa_existence": 0.94,
              "caption_exact": 0.84}


def test_vlm_answers_and_captions():
    metrics = evaluate_model("shapes-vlm", seed=SEED, n=100)["metrics"]
    for kind, floor in VLM_FLOORS.items():
        assert metrics[kind] >= floor, (kind, metrics)


def test_vlm_is_right_on_one_object_scenes():
    """With one object there is nothing to confuse: every answer must be right."""
    from mmie_core.chat import answer_batch
    from mmie_core.shapes.world import make_scene

    loaded = load_model("shapes-vlm")
    scenes = [make_scene(SEED + i, n_objects=1) for i in range(30)]
    jobs = [(s.render(64), p) for s in scenes for p in s.qa() if p["type"] in ("color", "shape", "position")]
    answers = answer_batch(loaded, [img for img, _ in jobs], [p["question"] for _, p in jobs], max_new_tokens=4)
    right = sum(a.strip(" .") == p["answer"] for a, (_, p) in zip(answers, jobs))
    assert right / len(jobs) >= 0.95, right / len(jobs)


def test_vlm_chat_template_and_unknown_words():
    loaded = load_model("shapes-vlm")
    tok = loaded.processor.tokenizer
    ids = tok("what colour is the zebra?", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id in ids  # unknown words map to <unk>, nothing fails
    prompt = loaded.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    assert prompt == "<s><|user|><image> hi<|end|><|assistant|>"


# shapes-blip2 on the same 100 scenes: color 0.86, shape 0.83, count 0.94, existence 0.98; positions at chance
# (0.12; one of nine cells is 0.11), which its model card explains. The floors sit a few points under.
BLIP2_FLOORS = {"qa_color": 0.80, "qa_shape": 0.77, "qa_count": 0.88, "qa_existence": 0.92}


def test_blip2_answers_through_its_q_former():
    metrics = evaluate_model("shapes-blip2", seed=SEED, n=100)["metrics"]
    for kind, floor in BLIP2_FLOORS.items():
        assert metrics[kind] >= floor, (kind, metrics)
    assert metrics["qa_position"] < 0.3, metrics  # the known issue: a fix should update the card and this test
