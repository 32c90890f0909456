"""Model families as adapters: chosen from the config, and the only code that knows a family by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mmie_core import families
from mmie_core.families import ADAPTERS, NAMES, UnsupportedModel, adapter_for, adapter_named
from mmie_core.models import PRESETS

ROOT = Path(__file__).resolve().parent.parent


def _family_name_comparisons(path: Path) -> list[str]:
    """Comparisons (==, !=, in, not in) against a family name or a tuple of them, and uses of names
    ending in _FAMILIES, in one source file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def names_in(node) -> bool:
        if isinstance(node, ast.Constant) and node.value in NAMES:
            return True
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(names_in(e) for e in node.elts)
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(names_in(c) for c in [node.left, *node.comparators]):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        if isinstance(node, ast.Name) and node.id.endswith("_FAMILIES"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} ({node.id})")
    return found


def test_no_code_outside_the_families_package_compares_family_names():
    files = [p for d in ("mmie_core", "studio") for p in sorted((ROOT / d).rglob("*.py"))
             if "families" not in p.relative_to(ROOT).parts]
    assert len(files) > 20
    found = [hit for p in files for hit in _family_name_comparisons(p)]
    assert found == [], "ask the family adapter instead: " + ", ".join(found)


def test_the_counter_sees_a_comparison(tmp_path):
    sample = ROOT / "tests" / "_sample_family_check.py"
    sample.write_text('def f(loaded):\n    return loaded.family == "llava" or loaded.family in ("clip", "x")\n'
                      'VLM_FAMILIES = ()\n')
    try:
        assert len(_family_name_comparisons(sample)) == 3
    finally:
        sample.unlink()


def test_every_preset_names_a_family_adapter():
    for preset in PRESETS.values():
        assert preset.adapter.name == preset.family
    assert [a.name for a in ADAPTERS] == list(NAMES)
    assert len(set(NAMES)) == len(ADAPTERS) == 8


def test_adapters_are_chosen_from_the_config_and_lookalikes_refused():
    import transformers as tf

    assert adapter_for(tf.CLIPConfig()).name == "clip"
    assert adapter_for(tf.SiglipConfig()).name == "siglip"
    assert adapter_for(tf.SmolVLMConfig()).name == "idefics3"
    assert adapter_for(tf.Idefics3Config()).name == "idefics3"
    assert adapter_for(tf.BlipConfig()).name == "blip"
    with pytest.raises(UnsupportedModel, match="NaFlex"):
        adapter_for(tf.Siglip2Config())
    with pytest.raises(UnsupportedModel, match="not supported"):
        adapter_for(tf.BertConfig())
    with pytest.raises(UnsupportedModel, match="Unknown family"):
        adapter_named("nope")


def test_llava_prefix_tokens_come_from_its_vision_config():
    import transformers as tf

    clip_tower = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig().to_dict())
    siglip_tower = tf.LlavaConfig(vision_config={"model_type": "siglip_vision_model"})
    llava = adapter_for(clip_tower)
    assert llava.prefix_tokens(clip_tower) == 1
    assert llava.prefix_tokens(siglip_tower) == 0
    unknown_tower = tf.LlavaConfig(vision_config={"model_type": "dinov2"})
    with pytest.raises(UnsupportedModel, match="vision tower type 'dinov2'"):
        adapter_for(unknown_tower)


def test_prefix_tokens_match_the_towers_position_embeddings():
    """The table keyed by vision model type agrees with the modules: position embeddings = prefix + patches."""
    import transformers as tf

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                 patch_size=8)
    for config_cls, model_cls in [(tf.CLIPVisionConfig, tf.CLIPVisionModel), (tf.SiglipVisionConfig, tf.SiglipVisionModel),
                                  (tf.BlipVisionConfig, tf.BlipVisionModel)]:
        config = config_cls(**small)
        model = model_cls(config)
        emb = getattr(model, "vision_model", model).embeddings
        pos = emb.position_embedding
        n_pos = pos.weight.shape[0] if hasattr(pos, "weight") else pos.shape[1]  # BLIP: a bare parameter
        assert n_pos - (32 // 8) ** 2 == families.base.prefix_tokens_of(config), config_cls.__name__


def test_paligemma_2_soft_capping_is_refused_by_name():
    import transformers as tf

    config = tf.PaliGemmaConfig(text_config={"model_type": "gemma2", "attn_logit_softcapping": 50.0,
                                             "final_logit_softcapping": 30.0})
    with pytest.raises(UnsupportedModel, match="PaliGemma 2"):
        adapter_for(config)
