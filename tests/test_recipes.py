"""Training recipes: losses, chat encoding and a few real optimisation steps on tiny models."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mmie_core import models
from mmie_core.shapes.recipes import (
    ContrastiveRecipe,
    VLMRecipe,
    build_blip2,
    _contrastive_batch,
    chat_turns,
    contrastive_loss,
    encode_chat,
    train_contrastive,
    train_vlm,
)
from mmie_core.shapes.world import make_scene


def test_contrastive_match_matrix_has_no_false_negatives():
    scenes = [make_scene(s) for s in range(64)]
    texts, match = _contrastive_batch(scenes, random.Random(0))
    assert match.diagonal().all()
    for i, scene in enumerate(scenes):
        present = {o.phrase for o in scene.objects}
        for j, text in enumerate(texts):
            if not text.endswith("."):  # a phrase
                phrase = " ".join(text.split()[-2:])
                assert bool(match[i, j]) == (phrase in present)


def test_losses_prefer_the_right_pairs():
    match = torch.eye(4)
    good, bad = 10 * torch.eye(4), 10 * (1 - torch.eye(4))
    for family in ("clip", "siglip"):
        assert contrastive_loss(family, good, match) < contrastive_loss(family, bad, match)


def test_encode_chat_equals_the_chat_template(tiny_llava_dir, fresh_cache):
    loaded = models.load_model(tiny_llava_dir)
    proc = loaded.processor
    turns = chat_turns(make_scene(3), random.Random(1), max_turns=4)
    while len(turns) < 2:
        turns = chat_turns(make_scene(3), random.Random(len(turns) + 7), max_turns=4)
    n_img = loaded.model.config.image_seq_length
    ids, labels, weights = encode_chat(proc.tokenizer, turns, n_img)
    assert len(weights) == len(ids) and all((w > 0) == (lab != -100) for w, lab in zip(weights, labels))
    messages = []
    for k, (q, a) in enumerate(turns):
        content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    text = proc.apply_chat_template(messages, tokenize=False)
    from PIL import Image

    expected = proc(images=[Image.new("RGB", (32, 32))], text=[text], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == expected
    answer_ids = [i for i, lab in zip(ids, labels) if lab != -100]
    decoded = proc.tokenizer.decode(answer_ids, skip_special_tokens=True)
    assert decoded.replace(" ", "") == "".join(a for _, a in turns).replace(" ", "")


def test_tiny_training_runs_save_and_load(tmp_path, tiny_clip_dir, fresh_cache):
    recipe = ContrastiveRecipe(family="siglip", image_size=32, hidden_size=32, vision_layers=1, text_layers=1,
                               heads=2, projection_dim=16, n_scenes=64, steps=3, batch_size=16, warmup_steps=1)
    train_contrastive(recipe, tmp_path / "siglip")
    assert json.loads((tmp_path / "siglip" / "training.json").read_text())["recipe"]["steps"] == 3
    assert (tmp_path / "siglip" / "training_log.csv").read_text().startswith("step,loss")
    assert models.load_model(str(tmp_path / "siglip")).family == "siglip"
    vlm = VLMRecipe(clip_dir=tiny_clip_dir, text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64,
                    n_scenes=32, steps=2, batch_size=4, warmup_steps=1, freeze_vision=False)
    train_vlm(vlm, tmp_path / "vlm")
    loaded = models.load_model(str(tmp_path / "vlm"))
    clip = models.load_model(tiny_clip_dir)
    # the vision tower starts from the CLIP it was given (then trains at a low learning rate)
    a = loaded.model.model.vision_tower.embeddings.patch_embedding.weight
    b = clip.model.vision_model.embeddings.patch_embedding.weight
    assert torch.allclose(a, b, atol=0.05)


def test_descriptions_only_come_last():
    from mmie_core.shapes.recipes import ALT_TEXT_PROMPTS, CAPTION_PROMPTS, DETAILED_ALT_PROMPTS

    descriptions = set(CAPTION_PROMPTS + ALT_TEXT_PROMPTS + DETAILED_ALT_PROMPTS)
    rng = random.Random(0)
    lengths = set()
    for seed in range(300):
        turns = chat_turns(make_scene(seed), rng, max_turns=4)
        lengths.add(len(turns))
        assert 1 <= len(turns) <= 4
        assert not any(q in descriptions for q, _ in turns[:-1])
    assert lengths == {1, 2, 3, 4}


def test_weighted_loss_equals_plain_loss_with_unit_weights():
    from mmie_core.shapes.recipes import weighted_lm_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, -100, 3], [-100, -100, 4, 5, 6]])
    weights = (labels != -100).float()
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    assert torch.allclose(weighted_lm_loss(logits, labels, weights), plain)


def test_questions_are_distinct_within_a_chat():
    rng = random.Random(0)
    for seed in range(200):
        turns = chat_turns(make_scene(seed), rng, max_turns=7, distinct=True)
        questions = [q for q, _ in turns]
        assert len(questions) == len(set(questions))
        assert 1 <= len(turns) <= 7


def test_train_cli_sets_recipe_fields():
    from mmie_core.shapes.__main__ import set_recipe_field

    recipe = VLMRecipe()
    for item in ("text_embedding_std=1.5", "max_turns=4", "distinct_questions=false", "init_from=/some/dir"):
        set_recipe_field(recipe, item)
    assert (recipe.text_embedding_std, recipe.max_turns, recipe.distinct_questions) == (1.5, 4, False)
    assert recipe.init_from == "/some/dir"
    for bad in ("nope=1", "max_turns=many", "distinct_questions=maybe", "steps"):
        with pytest.raises(SystemExit):
            set_recipe_field(recipe, bad)


def test_frozen_vision_tower_keeps_the_clip_weights(tmp_path, tiny_clip_dir, fresh_cache):
    vlm = VLMRecipe(clip_dir=tiny_clip_dir, text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64,
                    n_scenes=16, steps=2, batch_size=4, warmup_steps=1, freeze_vision=True, text_embedding_std=0.3)
    model, _ = train_vlm(vlm, tmp_path / "vlm")
    clip = models.load_model(tiny_clip_dir).model.vision_model.state_dict()
    for name, value in model.model.vision_tower.state_dict().items():
        assert torch.equal(value, clip[name]), name
    assert json.loads((tmp_path / "vlm" / "training.json").read_text())["recipe"]["freeze_vision"] is True


def test_second_stage_starts_from_the_given_model(tmp_path, tiny_clip_dir, fresh_cache):
    first = VLMRecipe(clip_dir=tiny_clip_dir, text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64,
                      n_scenes=16, steps=2, batch_size=4, warmup_steps=1)
    stage1, _ = train_vlm(first, tmp_path / "stage1")
    second = VLMRecipe(init_from=str(tmp_path / "stage1"), n_scenes=16, steps=1, batch_size=4, warmup_steps=1,
                       lr=0.0, vision_lr=0.0, seed=1)
    stage2, _ = train_vlm(second, tmp_path / "stage2")  # learning rate 0: the weights must stay the loaded ones
    for (name, a), (_, b) in zip(stage1.state_dict().items(), stage2.state_dict().items()):
        assert torch.equal(a, b), name
    record = json.loads((tmp_path / "stage2" / "training.json").read_text())
    assert record["recipe"]["init_from"] == str(tmp_path / "stage1")
    assert record["first_stage"]["recipe"]["steps"] == 2


def test_chats_without_question_weights_keep_the_random_stream_of_the_shipped_recipes():
    # Fingerprints of the chats drawn before question weights existed (the shipped shapes-vlm
    # stages were trained on them): a recipe without weights must still draw exactly these.
    import hashlib

    for distinct, expected in ((False, "2af8f964650ba9e1"), (True, "4e423885e2aaa76a")):
        rng = random.Random(7)
        chats = [chat_turns(make_scene(s), rng, 7, distinct) for s in range(300)]
        assert hashlib.sha256(repr(chats).encode()).hexdigest()[:16] == expected


def test_question_weights_shift_the_mix_of_question_types():
    from mmie_core.shapes.recipes import parse_question_weights

    assert parse_question_weights("") is None
    weights = parse_question_weights("position=4, count=0")
    assert weights["position"] == 4 and weights["count"] == 0 and weights["color"] == 1

    def share(spec, kind_word):
        rng, n, hits = random.Random(0), 0, 0
        for seed in range(400):
            for q, _ in chat_turns(make_scene(seed), rng, 7, True, parse_question_weights(spec)):
                n += 1
                hits += q.startswith(kind_word)
        return hits / n

    assert share("position=4", "where is") > 1.4 * share("", "where is")
    assert share("count=0", "how many") == 0.0
    for bad in ("position", "place=2", "position=x", "position=-1", "color=0,shape=0,count=0,position=0,existence=0"):
        with pytest.raises(ValueError):
            parse_question_weights(bad)


def test_model_cards_give_one_command_per_training_stage():
    from mmie_core.shapes.evaluate import reproduce_text, training_stages

    def record(recipe, seconds, first=None):
        out = {"recipe": recipe, "train_seconds": seconds, "torch_threads": 2, "device": "cpu"}
        return out | ({"first_stage": first} if first else {})

    from dataclasses import asdict

    one = record(asdict(VLMRecipe()), 100.0)
    two = record(asdict(VLMRecipe(lr=3e-4, seed=1, steps=1500, init_from="/x")), 50.0, one)
    three = record(asdict(VLMRecipe(lr=3e-4, seed=2, steps=900, question_weights="position=4", init_from="/y")), 40.0,
                   two)
    assert [s["train_seconds"] for s in training_stages(three)] == [100.0, 50.0, 40.0]
    text = reproduce_text(three, "vlm")
    assert "in 3 stages" in text
    assert "1. `python -m mmie_core.shapes train vlm --out STAGE1` (100 s)" in text
    assert ("2. `python -m mmie_core.shapes train vlm --out STAGE2 --set init_from=STAGE1 --set lr=0.0003 "
            "--set seed=1 --steps 1500` (50 s)") in text
    assert ("3. `python -m mmie_core.shapes train vlm --out DIR --set init_from=STAGE2 "
            "--set question_weights=position=4 --set lr=0.0003 --set seed=2 --steps 900` (40 s)") in text
    assert reproduce_text(one, "vlm").startswith("Reproduce: `python -m mmie_core.shapes train vlm --out DIR` (100 s")


def test_blip2_recipe_trains_its_groups_and_continues_from_a_stage(tmp_path, fresh_cache):
    """shapes-blip2's loop: with the tower frozen it keeps the copied weights while the Q-Former moves; a second
    stage from that folder with every learning rate 0 changes nothing and records the first stage."""
    from mmie_core.shapes.recipes import QFormerRecipe, train_blip2

    first = QFormerRecipe(qformer_hidden=32, qformer_layers=2, qformer_heads=2, queries=8, n_scenes=16, steps=2,
                          batch_size=4, warmup_steps=1)
    stage1, processor = train_blip2(first, tmp_path / "stage1")
    fresh, _ = build_blip2(QFormerRecipe(qformer_hidden=32, qformer_layers=2, qformer_heads=2, queries=8))
    assert torch.equal(stage1.vision_model.encoder.layers[0].mlp.fc1.weight,
                       fresh.vision_model.encoder.layers[0].mlp.fc1.weight)  # frozen: shapes-clip's copy
    assert not torch.equal(stage1.qformer.layernorm.weight, fresh.qformer.layernorm.weight)  # trained
    second = QFormerRecipe(init_from=str(tmp_path / "stage1"), n_scenes=16, steps=1, batch_size=4, warmup_steps=1,
                           lr=0.0, language_lr=0.0, seed=1, queries=8)
    stage2, _ = train_blip2(second, tmp_path / "stage2")
    for (name, a), (_, b) in zip(stage1.state_dict().items(), stage2.state_dict().items()):
        assert torch.equal(a, b), name
    record = json.loads((tmp_path / "stage2" / "training.json").read_text())
    assert record["first_stage"]["recipe"]["steps"] == 2
    loaded = models.load_model(str(tmp_path / "stage2"))
    assert loaded.family == "blip2" and loaded.model.config.num_query_tokens == 8
