"""Every Hub preset has a fixture at its checkpoint's true geometry (tests/fixtures/presets, built by
tests/preset_fixtures.py): it builds, loads through the project's loader, and its processor turns a
real photo (matplotlib's grace_hopper.jpg, 512 x 600) into the checkpoint's pixel size, crop or
squash, tiles and image-token count. The expected numbers below are written out from the
checkpoints' rules, not read back from the fixture files."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from mmie_core import models
from mmie_core.models import PRESETS, load_model
from preset_fixtures import PRESET_FIXTURES_DIR, PRESET_OF, build_preset, fixture_names

PHOTO = matplotlib.get_data_path() + "/sample_data/grace_hopper.jpg"
QUESTION = "What is in the image?"

BICUBIC, BILINEAR, LANCZOS = Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS

# What each checkpoint does to an image: side of the square model input, "crop" (shortest side
# resized, centre crop) or "squash" (resized to the square, aspect ratio lost), and the filter.
PIXELS = {
    "clip-vit-base-patch32": (224, "crop", BICUBIC),
    "clip-vit-base-patch16": (224, "crop", BICUBIC),
    "siglip-base-patch16-224": (224, "squash", BICUBIC),
    "siglip2-base-patch16-224": (224, "squash", BILINEAR),
    "llava-interleave-qwen-0.5b": (384, "squash", BICUBIC),
    "llava-interleave-qwen-0.5b-variant": (384, "squash", BICUBIC),
    "paligemma-3b-mix-224": (224, "squash", BICUBIC),
    "blip-image-captioning-base": (384, "squash", BICUBIC),
    "blip2-opt-2.7b": (224, "squash", BICUBIC),
    "instructblip-vicuna-7b": (224, "squash", BICUBIC),
    "instructblip-flan-t5-xl": (224, "squash", BICUBIC),
}
PATCH = {"clip-vit-base-patch32": 32, "clip-vit-base-patch16": 16, "siglip-base-patch16-224": 16,
         "siglip2-base-patch16-224": 16, "llava-interleave-qwen-0.5b": 14, "llava-interleave-qwen-0.5b-variant": 14,
         "paligemma-3b-mix-224": 14, "blip-image-captioning-base": 16, "smolvlm-256m-instruct": 16,
         "qwen2-vl-2b-instruct": 14, "blip2-opt-2.7b": 14, "instructblip-vicuna-7b": 14, "instructblip-flan-t5-xl": 14}
# CLS token in the vision tower's output? (CLIP and BLIP ViTs have one, SigLIP towers do not)
CLS = {"clip-vit-base-patch32": True, "clip-vit-base-patch16": True, "blip-image-captioning-base": True,
       "siglip-base-patch16-224": False, "siglip2-base-patch16-224": False, "llava-interleave-qwen-0.5b": False,
       "llava-interleave-qwen-0.5b-variant": False, "paligemma-3b-mix-224": False, "smolvlm-256m-instruct": False,
       "blip2-opt-2.7b": True, "instructblip-vicuna-7b": True, "instructblip-flan-t5-xl": True}


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    image = Image.open(PHOTO).convert("RGB")
    assert image.size == (512, 600)
    return image


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Fixture name -> LoadedModel (each built once, loaded through load_model with its own cache)."""
    saved = models.MODEL_CACHE
    models.MODEL_CACHE = models.ModelCache(max_models=len(fixture_names()))
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            folder = build_preset(name, tmp_path_factory.mktemp(name))
            if name.endswith("-variant"):  # refused by load_model (tests/test_true_geometry.py): the raw classes
                from transformers import AutoModelForImageTextToText, AutoProcessor

                cache[name] = models.LoadedModel(AutoModelForImageTextToText.from_pretrained(folder).eval(),
                                                 AutoProcessor.from_pretrained(folder), "llava", folder, None,
                                                 torch.device("cpu"), torch.float32)
            else:
                cache[name] = load_model(folder)
        return cache[name]

    try:
        yield get
    finally:
        models.MODEL_CACHE = saved


def _rgb(pixel_values: torch.Tensor, ip) -> np.ndarray:
    """(3, H, W) normalised pixels back to an (H, W, 3) image in [0, 1]."""
    mean = np.asarray(ip.image_mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(ip.image_std, dtype=np.float32).reshape(3, 1, 1)
    return (pixel_values.float().numpy() * std + mean).transpose(1, 2, 0)


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


def _squash(image: Image.Image, w: int, h: int, resample) -> np.ndarray:
    return _array(image.resize((w, h), resample))


def _crop(image: Image.Image, side: int, resample) -> np.ndarray:
    scale = side / min(image.size)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), resample)
    left, top = (resized.width - side) // 2, (resized.height - side) // 2
    return _array(resized.crop((left, top, left + side, top + side)))


def _chat_inputs(loaded, image, question=QUESTION):
    processor = loaded.processor
    if loaded.family == "paligemma":  # no chat template: PaliGemma's prompt is "<image>" + task prefix
        return processor(images=image, text="<image>answer en " + question, return_tensors="pt")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=prompt, return_tensors="pt")


# --------------------------------------------------------------------------- every fixture


def test_one_fixture_per_hub_preset():
    hub = {name for name, preset in PRESETS.items() if not preset.embedded}
    names = set(fixture_names())
    assert {PRESET_OF[n] for n in names} == hub
    assert names == hub | {"llava-interleave-qwen-0.5b-variant"}
    for name in names:
        files = {p.name for p in (PRESET_FIXTURES_DIR / name).iterdir()}
        assert {"config.json", "preprocessor_config.json"} <= files


@pytest.mark.parametrize("name", fixture_names())
def test_builds_loads_and_keeps_the_checkpoint_family(built, name):
    loaded = built(name)
    family = PRESETS[PRESET_OF[name]].family
    assert loaded.family == family
    expected = {"clip": "CLIPModel", "siglip": "SiglipModel", "llava": "LlavaForConditionalGeneration",
                "idefics3": "Idefics3ForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
                "paligemma": "PaliGemmaForConditionalGeneration", "blip": "BlipForConditionalGeneration",
                "blip2": ("Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration")}
    assert type(loaded.model).__name__ in expected[family]
    n_params = sum(p.numel() for p in loaded.model.parameters())
    assert n_params < 2_000_000, n_params  # widths and depths shrunk
    tok = loaded.processor.tokenizer
    words = "what is in the image a photo of cat dog person describe answer en caption".split()
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(words) and tok.unk_token_id not in ids


@pytest.mark.parametrize("name", sorted(PIXELS))
def test_pixels_are_the_checkpoints_size_crop_and_filter(built, photo, name):
    loaded = built(name)
    side, fit, resample = PIXELS[name]
    ip = loaded.processor.image_processor
    pixel_values = ip(photo, return_tensors="pt")["pixel_values"]
    assert tuple(pixel_values.shape) == (1, 3, side, side)
    rgb = _rgb(pixel_values[0], ip)
    right = _squash(photo, side, side, resample) if fit == "squash" else _crop(photo, side, resample)
    wrong = _crop(photo, side, resample) if fit == "squash" else _squash(photo, side, side, resample)
    assert np.abs(rgb - right).mean() < 2e-3
    assert np.abs(rgb - wrong).mean() > 0.05  # the other geometry is far off: the check tells them apart
    grid = side // PATCH[name]
    vision = loaded.model.config.vision_config
    assert (vision.image_size, vision.patch_size) == (side, PATCH[name])
    model = loaded.model
    tower = getattr(model, "vision_model", None) or model.model.vision_tower
    with torch.no_grad():
        out = tower(pixel_values=pixel_values)
    assert out.last_hidden_state.shape[1] == grid * grid + int(CLS[name])  # CLS or not, as the checkpoint


# --------------------------------------------------------------------------- dual encoders


@pytest.mark.parametrize("name", ["clip-vit-base-patch32", "clip-vit-base-patch16"])
def test_clip_text_pools_on_the_end_token(built, photo, name):
    loaded = built(name)
    tok = loaded.processor.tokenizer
    inputs = loaded.processor(text=["a photo of a cat", "a dog"], images=photo, return_tensors="pt", padding=True)
    ids = inputs["input_ids"]
    # as in the checkpoint: text_config.eos_token_id == 2 selects the legacy argmax pooling, which is
    # right only because <|endoftext|> has the highest id of the vocabulary
    assert loaded.model.config.text_config.eos_token_id == 2
    assert tok.convert_ids_to_tokens(int(ids.max())) == "<|endoftext|>" == tok.eos_token
    assert ids.max().item() == len(tok) - 1
    assert ids[:, 0].tolist() == [tok.convert_tokens_to_ids("<|startoftext|>")] * 2
    with torch.no_grad():
        out = loaded.model(**inputs)
    assert out.logits_per_image.shape == (1, 2)


@pytest.mark.parametrize("name, pad, eos", [("siglip-base-patch16-224", "</s>", "</s>"),
                                            ("siglip2-base-patch16-224", "<pad>", "<eos>")])
def test_siglip_text_is_padded_to_64(built, photo, name, pad, eos):
    loaded = built(name)
    tok = loaded.processor.tokenizer
    inputs = loaded.processor(text=["a photo of a cat"], images=photo, return_tensors="pt", padding="max_length")
    ids = inputs["input_ids"][0].tolist()
    assert len(ids) == 64 == loaded.model.config.text_config.max_position_embeddings
    assert tok.convert_ids_to_tokens(ids[:6]) == ["▁a", "▁photo", "▁of", "▁a", "▁cat", eos]
    assert set(ids[6:]) == {tok.convert_tokens_to_ids(pad)} == {loaded.model.config.text_config.pad_token_id}
    with torch.no_grad():
        out = loaded.model(**inputs)
    assert out.logits_per_image.shape == (1, 1)


# --------------------------------------------------------------------------- chat models


def test_llava_interleave_full_strategy_gives_729_tokens(built, photo):
    loaded = built("llava-interleave-qwen-0.5b")
    config = loaded.model.config
    assert (config.vision_feature_select_strategy, config.vision_feature_layer) == ("full", -1)
    assert loaded.processor.vision_feature_select_strategy == "full"
    assert (loaded.processor.patch_size, loaded.processor.num_additional_image_tokens) == (14, 0)
    inputs = _chat_inputs(loaded, photo)
    ids = inputs["input_ids"][0]
    positions = (ids == config.image_token_id).nonzero().flatten().tolist()
    assert len(positions) == 729 == (384 // 14) ** 2
    assert positions == list(range(positions[0], positions[0] + 729))  # one block, where <image> was
    tok = loaded.processor.tokenizer
    assert tok.convert_ids_to_tokens(ids[: positions[0]].tolist()) == ["<|im_start|>", "▁user", "\n"]
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 384, 384)
    with torch.no_grad():
        features = loaded.model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        loaded.model(**inputs)  # tokens and features agree
    assert sum(f.shape[0] for f in features) == 729


def test_llava_interleave_variant_default_strategy_drops_a_patch(built, photo):
    """The other reading: "default" drops the first vision token as if it were a CLS token, but the
    SigLIP tower has none; with num_additional_image_tokens=1 the processor still writes 729
    placeholders, so transformers' forward refuses the 728 features."""
    loaded = built("llava-interleave-qwen-0.5b-variant")
    config = loaded.model.config
    assert config.vision_feature_select_strategy == "default"
    assert (loaded.processor.vision_feature_select_strategy, loaded.processor.num_additional_image_tokens) == \
        ("default", 1)
    inputs = _chat_inputs(loaded, photo)
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 27 * 27 + 1 - 1
    with torch.no_grad():
        features = loaded.model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        assert sum(f.shape[0] for f in features) == 728
        with pytest.raises(ValueError, match="do not match"):
            loaded.model(**inputs)


def test_paligemma_puts_256_image_tokens_first(built, photo):
    loaded = built("paligemma-3b-mix-224")
    config = loaded.model.config
    assert loaded.processor.image_seq_length == 256 == (224 // 14) ** 2
    assert loaded.processor.chat_template is None  # the mix checkpoints have none
    inputs = _chat_inputs(loaded, photo)
    ids = inputs["input_ids"][0].tolist()
    tok = loaded.processor.tokenizer
    assert ids[:256] == [config.image_token_id] * 256 and config.image_token_id not in ids[256:]
    assert tok.convert_ids_to_tokens(ids[256:]) == ["<bos>", "▁answer", "▁en", "▁what", "▁is", "▁in",
                                                    "▁the", "▁image", "?", "\n"]
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 224, 224)
    with torch.no_grad():
        loaded.model(**{k: v for k, v in inputs.items() if k != "labels"})


def test_qwen2vl_grid_follows_the_photo(built, photo):
    loaded = built("qwen2-vl-2b-instruct")
    ip = loaded.processor.image_processor
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)
    # smart_resize: each side to the nearest multiple of 28 (patch 14 x merge 2), 56 x 56 <= H x W <= 28 x 28 x 16384
    h, w = round(600 / 28) * 28, round(512 / 28) * 28
    assert (h, w) == (588, 504) and 3136 <= h * w <= 12845056
    inputs = _chat_inputs(loaded, photo)
    assert inputs["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]
    n_patches = (h // 14) * (w // 14)
    assert tuple(inputs["pixel_values"].shape) == (n_patches, 3 * 2 * 14 * 14)
    config = loaded.model.config
    ids = inputs["input_ids"][0]
    positions = (ids == config.image_token_id).nonzero().flatten().tolist()
    assert len(positions) == n_patches // 4 == 378
    assert ids[positions[0] - 1] == config.vision_start_token_id
    assert ids[positions[-1] + 1] == config.vision_end_token_id
    assert config.text_config.rope_parameters["mrope_section"] == [4, 6, 6]  # sums to head_dim / 2
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    # undo the patchify: (t, h/2, w/2, 2, 2, C, T, 14, 14) -> the resized photo, 504 x 588, no crop
    pv = inputs["pixel_values"].reshape(1, h // 28, w // 28, 2, 2, 3, 2, 14, 14)
    canvas = pv.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(2, 3, h, w)[0]
    rgb = _rgb(canvas, ip)
    assert np.abs(rgb - _squash(photo, w, h, BICUBIC)).mean() < 2e-3
    with torch.no_grad():
        loaded.model(**inputs)


def test_smolvlm_keeps_512px_tiles_and_64_tokens_each(built, photo):
    loaded = built("smolvlm-256m-instruct")
    ip = loaded.processor.image_processor
    assert ip.size["longest_edge"] == 2048 and ip.max_image_size == {"longest_edge": 512}
    assert loaded.processor.image_seq_len == 64 == (512 // 16) ** 2 // 4 ** 2
    assert loaded.model.config.scale_factor == 4 and loaded.model.config.vision_config.image_size == 512
    # longest edge to 2048 (600 -> 2048, 512 -> 1748), then each side up to whole 512-px tiles: 4 x 4
    rows = cols = math.ceil(2048 / 512)
    assert math.ceil(1748 / 512) == cols
    inputs = _chat_inputs(loaded, photo)
    n_tiles = rows * cols + 1  # and the global view
    assert tuple(inputs["pixel_values"].shape) == (1, n_tiles, 3, 512, 512)
    ids = inputs["input_ids"][0]
    config = loaded.model.config
    assert int((ids == config.image_token_id).sum()) == 64 * n_tiles == 1088
    tok = loaded.processor.tokenizer
    markers = [t for t in tok.convert_ids_to_tokens(ids.tolist()) if t.startswith("<row_") or t == "<global-img>"]
    assert markers == [f"<row_{r}_col_{c}>" for r in range(1, rows + 1) for c in range(1, cols + 1)] + ["<global-img>"]
    # the tiles put back together and the global view are both the photo squashed to a square
    tiles = inputs["pixel_values"][0]
    mosaic = torch.cat([torch.cat(list(tiles[r * cols:(r + 1) * cols]), dim=2) for r in range(rows)], dim=1)
    small = Image.fromarray((_rgb(mosaic, ip).clip(0, 1) * 255).round().astype(np.uint8)).resize((256, 256), BICUBIC)
    assert np.abs(_array(small) - _squash(photo, 256, 256, BICUBIC)).mean() < 0.01
    glob = _rgb(tiles[-1], ip)
    assert np.abs(glob - _squash(photo, 512, 512, LANCZOS)).mean() < 0.01
    with torch.no_grad():
        out = loaded.model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                    pixel_attention_mask=inputs["pixel_attention_mask"])
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features.flatten(0, -2)
    assert features.shape[0] == n_tiles * 64  # one feature per <image> placeholder


def test_blip_captions_start_with_dec(built, photo):
    loaded = built("blip-image-captioning-base")
    tok = loaded.processor.tokenizer
    inputs = loaded.processor(images=photo, text="a photo of", return_tensors="pt")
    assert tok.convert_ids_to_tokens(inputs["input_ids"][0].tolist()) == ["[CLS]", "▁a", "▁photo", "▁of", "[SEP]"]
    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    assert [tok.convert_tokens_to_ids(t) for t in specials] == [0, 100, 101, 102, 103]  # BERT's ids
    text = loaded.model.config.text_config
    assert (text.bos_token_id, text.sep_token_id, text.pad_token_id) == (tok.convert_tokens_to_ids("[DEC]"), 102, 0)
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 384, 384)
    with torch.no_grad():
        vision = loaded.model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        out = loaded.model.generate(**inputs, max_new_tokens=3)
    assert vision.shape[1] == (384 // 16) ** 2 + 1  # CLS + 24 x 24 patches
    assert out[0, 0].item() == text.bos_token_id and out.shape[1] <= 4 + 3


@pytest.mark.parametrize("name", ["llava-interleave-qwen-0.5b", "smolvlm-256m-instruct", "qwen2-vl-2b-instruct",
                                  "paligemma-3b-mix-224"])
def test_generation_stops_at_the_end_of_turn(built, photo, name):
    loaded = built(name)
    tok = loaded.processor.tokenizer
    end = {"llava-interleave-qwen-0.5b": "<|im_end|>", "smolvlm-256m-instruct": "<end_of_utterance>",
           "qwen2-vl-2b-instruct": "<|im_end|>", "paligemma-3b-mix-224": "<eos>"}[name]
    eos = loaded.model.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids(end) in (eos if isinstance(eos, list) else [eos])
    inputs = _chat_inputs(loaded, photo.resize((128, 150)))
    inputs.pop("labels", None)
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 2
