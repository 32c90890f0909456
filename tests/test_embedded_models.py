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


@pytest.mark.parametrize("name", ["shapes-clip", "shapes-siglip", "shapes-vlm"])
def test_folder_is_a_complete_hf_model(name):
    folder = EMBEDDED_DIR / name
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "README.md"} <= files or (
        {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    )
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    card = (folder / "README.md").read_text()
    assert "not photographs" in card
    evaluation = json.loads((folder / "evaluation.json").read_text())
    assert evaluation["n"] == 500


def test_embedded_models_fit_the_size_budget():
    total = sum(p.stat().st_size for p in EMBEDDED_DIR.rglob("*") if p.is_file())
    assert total < 30 * 1024 * 1024


@pytest.mark.parametrize("name", ["shapes-clip", "shapes-siglip"])
def test_dual_encoders_zero_shot(name):
    metrics = evaluate_model(name, seed=SEED, n=100)["metrics"]
    assert metrics["zero_shot_top1_single"] >= 0.92
    assert metrics["zero_shot_top1_multi_present"] >= 0.85


def test_vlm_answers_and_captions():
    metrics = evaluate_model("shapes-vlm", seed=SEED, n=100)["metrics"]
    for kind in ("qa_color", "qa_shape", "qa_count", "qa_position", "qa_existence"):
        assert metrics[kind] >= 0.87, (kind, metrics)
    assert metrics["caption_exact"] >= 0.75, metrics


def test_vlm_chat_template_and_unknown_words():
    loaded = load_model("shapes-vlm")
    tok = loaded.processor.tokenizer
    ids = tok("what colour is the zebra?", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id in ids  # unknown words map to <unk>, nothing fails
    prompt = loaded.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    assert prompt.startswith("<s><|user|><image>") and prompt.endswith("<|assistant|>")
