"""Presets, loading from folders, device/dtype choice, Hub errors and the LRU cache."""

from __future__ import annotations

import re

import pytest
import torch

from mmie_core import models
from mmie_core.models import ModelCache, ModelLoadError, attention_implementation, choose_device, choose_dtype


def test_registry_presets_are_well_formed():
    names = set(models.PRESETS)
    assert {"shapes-clip", "shapes-siglip", "shapes-vlm"} <= names
    for preset in models.PRESETS.values():
        assert preset.adapter.name == preset.family
        assert preset.tasks and set(preset.tasks) <= set(models.TASKS)
        assert preset.about
        if not preset.embedded:
            assert "/" in preset.source
            # pinned: a full commit hash (or, where no converted commit was merged, a pull-request ref)
            assert re.fullmatch(r"[0-9a-f]{40}|refs/pr/\d+", preset.revision or ""), preset.name
        else:
            assert preset.revision is None
    families = {p.family for p in models.PRESETS.values()}
    from mmie_core.families import NAMES

    assert families == set(NAMES)
    assert models.presets_for("zero_shot")[0].embedded
    with pytest.raises(ModelLoadError, match="Known presets"):
        models.get_preset("nope")


def test_loads_local_folder_offline(tiny_clip_dir, fresh_cache):
    loaded = models.load_model(tiny_clip_dir)
    assert loaded.family == "clip" and loaded.device.type == "cpu" and loaded.dtype == torch.float32
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == "sdpa"
    assert models.load_model(tiny_clip_dir) is loaded  # cached


def test_loads_llava_folder(tiny_llava_dir, fresh_cache):
    loaded = models.load_model(tiny_llava_dir)
    assert loaded.family == "llava"
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"


def test_from_pretrained_safety_flags(tiny_clip_dir, fresh_cache, monkeypatch):
    import transformers

    seen = []
    real = transformers.CLIPModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", classmethod(spy))
    models.load_model(tiny_clip_dir)
    assert seen and seen[0]["use_safetensors"] is True and seen[0]["trust_remote_code"] is False
    assert seen[0]["local_files_only"] is True


def test_hub_id_offline_names_embedded_alternative(fresh_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        models.load_model("clip-vit-base-patch32")
    assert "shapes-clip" in str(err.value) and "openai/clip-vit-base-patch32" in str(err.value)
    with pytest.raises(ModelLoadError) as err:
        models.load_model("smolvlm-256m-instruct")
    assert "shapes-vlm" in str(err.value)


def test_arbitrary_hub_ids_need_opt_in(fresh_cache, monkeypatch):
    monkeypatch.delenv("MMIE_ALLOW_ANY_MODEL", raising=False)
    with pytest.raises(ModelLoadError, match="MMIE_ALLOW_ANY_MODEL"):
        models.load_model("someone/some-model")


def test_corrupt_folder_gives_clear_error(tiny_clip_dir, tmp_path, fresh_cache):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="Could not load the model folder"):
        models.load_model(str(broken))


def test_device_and_dtype_env(monkeypatch):
    monkeypatch.delenv("MMIE_DEVICE", raising=False)
    monkeypatch.delenv("MMIE_DTYPE", raising=False)
    device = choose_device()
    assert device.type == ("cuda" if torch.cuda.is_available() else device.type)
    if device.type == "cpu":
        assert choose_dtype(device) == torch.float32
    monkeypatch.setenv("MMIE_DEVICE", "cpu")
    assert choose_device().type == "cpu"
    monkeypatch.setenv("MMIE_DTYPE", "bf16")
    assert choose_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv("MMIE_DTYPE", "int3")
    with pytest.raises(ModelLoadError, match="MMIE_DTYPE"):
        choose_dtype(torch.device("cpu"))
    monkeypatch.setenv("MMIE_DEVICE", "toaster")
    with pytest.raises(ModelLoadError, match="MMIE_DEVICE"):
        choose_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("MMIE_DEVICE", "cuda")
        with pytest.raises(ModelLoadError, match="no CUDA"):
            choose_device()


def test_cuda_prefers_bf16(monkeypatch):
    monkeypatch.delenv("MMIE_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_dtype(torch.device("cuda")) == torch.float16


def test_lru_cache_evicts_oldest(tiny_clip_dir, tiny_siglip_dir, tiny_llava_dir, monkeypatch):
    monkeypatch.setenv("MMIE_MAX_MODELS", "2")
    cache = ModelCache()
    cache.get(tiny_clip_dir)
    cache.get(tiny_siglip_dir)
    cache.get(tiny_clip_dir)  # now most recent
    cache.get(tiny_llava_dir)  # evicts siglip
    assert cache.keys() == [tiny_clip_dir, tiny_llava_dir]
    monkeypatch.setenv("MMIE_MAX_MODELS", "1")
    cache.get(tiny_siglip_dir)
    assert cache.keys() == [tiny_siglip_dir]


def test_attention_implementation_switch_restores(tiny_clip_dir, fresh_cache):
    model = models.load_model(tiny_clip_dir).model
    with attention_implementation(model, "eager"):
        assert model.config._attn_implementation == "eager"
        assert model.vision_model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError):
        with attention_implementation(model, "eager"):
            raise RuntimeError("boom")
    assert model.vision_model.config._attn_implementation == "sdpa"


def test_hub_presets_load_their_pinned_revision(fresh_cache, monkeypatch):
    import transformers

    seen = []

    def spy(location, **kwargs):
        seen.append((location, kwargs.get("revision"), kwargs.get("use_safetensors")))
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", spy)
    with pytest.raises(ModelLoadError):
        models.load_model("blip-image-captioning-base")
    assert seen == [("Salesforce/blip-image-captioning-base", models.PRESETS["blip-image-captioning-base"].revision,
                     None)]


def test_family_of_refuses_lookalike_model_types_by_name():
    from types import SimpleNamespace

    from mmie_core.models import ModelLoadError, family_of

    for model_type, family in [("siglip", "siglip"), ("smolvlm", "idefics3"), ("qwen2_vl", "qwen2_vl"),
                               ("blip", "blip")]:
        assert family_of(SimpleNamespace(model_type=model_type)) == family
    with pytest.raises(ModelLoadError, match="NaFlex"):
        family_of(SimpleNamespace(model_type="siglip2"))
    with pytest.raises(ModelLoadError, match="attention windows"):
        family_of(SimpleNamespace(model_type="qwen2_5_vl"))
    with pytest.raises(ModelLoadError, match="supported families"):
        family_of(SimpleNamespace(model_type="mllama"))
