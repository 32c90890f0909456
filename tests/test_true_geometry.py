"""Every Hub preset at its checkpoint's true geometry, on real photos.

Models are built from tests/fixtures/presets (random weights, shrunk widths, the real processors).

- Locality, without trusting the layout code: the vision blocks are replaced by identity, so each
  token sees only its own pixels; a distinctive square is pasted into the original photo, and the
  tokens whose features change (found in the model's own activations) are put on the map by the
  layout code; the map's maximum cell, placed in original-image coordinates by the processor view's
  box, must cover the square, through crop, squash, tiles, global view and merged patches. Pixels a
  centre crop drops must change no token at all.
- Every view and method the family supports runs on a portrait, a wide and a tall photo
  (`mmie_core.check_presets`, cheap settings), and the image-token count is the one in input_ids.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from preset_fixtures import build_preset, fixture_names

from mmie_core.heatmap import PatchHeatmap, cell_box

HOPPER = Image.open(f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg").convert("RGB")  # 512 x 600


def photos() -> dict[str, Image.Image]:
    """A portrait (512x600), a wide (900x300) and a tall (300x900) photo made from it."""
    wide = HOPPER.resize((900, 1054)).crop((0, 300, 900, 600))
    tall = HOPPER.resize((300, 352)).resize((300, 900))
    return {"portrait": HOPPER, "wide": wide, "tall": tall}


@pytest.fixture(scope="module")
def preset_dirs(tmp_path_factory):
    """Each preset fixture built once for this module (folders, loaded through load_model)."""
    return {name: build_preset(name, tmp_path_factory.mktemp(name)) for name in fixture_names()}


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


def _identity_tower(loaded):
    """Every vision block returns its input, so each token keeps only its own patch (the blocks stay in
    place: transformers records hidden states through hooks on them)."""
    vision = loaded.adapter.vision_tower(loaded.model)
    for block in loaded.adapter.vision_blocks(vision):
        block.forward = _pass_through


def _paste(image: Image.Image, box) -> Image.Image:
    out = image.copy()
    draw = ImageDraw.Draw(out)
    x0, y0, x1, y1 = box
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(255, 0, 255))
    draw.rectangle([x0 + (x1 - x0) // 4, y0 + (y1 - y0) // 4, x1 - (x1 - x0) // 4, y1 - (y1 - y0) // 4],
                   fill=(0, 255, 0))
    return out


def _token_change_map(loaded, image: Image.Image, changed: Image.Image) -> PatchHeatmap:
    """How much each image token's features change between two photos, on the layout's map."""
    from mmie_core.chat import answer_sequence
    from mmie_core.patches import processor_view, vision_grid

    view = processor_view(loaded, image)
    # the vision tower's patch tokens (a Q-Former model's language model reads queries, which hold no position;
    # tests/test_qformer.py checks how its maps reach the patches)
    if loaded.adapter.zero_shot or loaded.adapter.captions or loaded.adapter.query_tokens:
        grid = vision_grid(loaded)
        ip = loaded.processor.image_processor
        feats = []
        for img in (image, changed):
            pixels = ip(images=[img], return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                out = loaded.adapter.vision_tower(loaded.model)(pixel_values=pixels)
            feats.append(out.last_hidden_state[0, grid.prefix_tokens:])
        delta = (feats[1] - feats[0]).norm(dim=-1)
        return PatchHeatmap(grid.token_map(delta), "delta", {}, view.box, view.original_size)
    # the language model's input at the image positions
    ids = loaded.processor.tokenizer("image", add_special_tokens=False)["input_ids"][:1]
    feats, layout = [], None
    for img in (image, changed):
        seq = answer_sequence(loaded, img, "What is in the image?", ids)
        layout = seq.layout
        first = loaded.adapter.language_model(loaded.model).layers[0]
        captured = {}

        def keep(module, args, kwargs):
            captured.setdefault("h", (args[0] if args else kwargs["hidden_states"]).detach())

        handle = first.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with torch.inference_mode():
                loaded.model(**seq.model_inputs())
        finally:
            handle.remove()
        feats.append(captured["h"][0, seq.image_positions])
    delta = (feats[1] - feats[0]).norm(dim=-1)
    return PatchHeatmap(layout.token_map(delta), "delta", {}, view.box, view.original_size)


def _square_for(name: str, kind: str, image: Image.Image) -> tuple[int, int, int, int]:
    """A square well inside what the model sees (off-centre, so a flipped axis would miss it)."""
    w, h = image.size
    s = max(w, h) // 8
    x0, y0 = int(w * 0.62), int(h * 0.28)
    return x0, y0, x0 + s, y0 + s


RUNNABLE = [n for n in fixture_names() if not n.endswith("-variant")]  # the variant is refused at load time


@pytest.mark.parametrize("name", RUNNABLE)
def test_the_map_lands_on_a_pasted_square_in_original_coordinates(preset_dirs, name, fresh_cache):
    from mmie_core.models import load_model

    loaded = load_model(preset_dirs[name])
    _identity_tower(loaded)
    for kind, photo in photos().items():
        square = _square_for(name, kind, photo)
        heat = _token_change_map(loaded, photo, _paste(photo, square))
        assert heat.values.max() > 0, f"{name} {kind}: the square changed no token"
        r, c = np.unravel_index(np.argmax(heat.values), heat.values.shape)
        x0, y0, x1, y1 = cell_box(heat.box, *heat.values.shape, r, c)
        sx0, sy0, sx1, sy1 = square
        overlap = max(0, min(x1, sx1) - max(x0, sx0)) * max(0, min(y1, sy1) - max(y0, sy0))
        assert overlap > 0, f"{name} {kind}: the maximum cell {(x0, y0, x1, y1)} misses the square {square}"
        # every cell that changed a lot touches the square (no second, misplaced copy)
        strong = np.argwhere(heat.values > 0.5 * heat.values.max())
        for rr, cc in strong:
            bx0, by0, bx1, by1 = cell_box(heat.box, *heat.values.shape, rr, cc)
            margin = max(bx1 - bx0, by1 - by0)  # a resize kernel reaches into the next cell
            assert bx1 + margin > sx0 and bx0 - margin < sx1 and by1 + margin > sy0 and by0 - margin < sy1, \
                f"{name} {kind}: cell ({rr}, {cc}) lights up far from the square"


def test_the_box_covers_only_the_pixels_of_whole_patches(preset_dirs, fresh_cache):
    """SigLIP 384 px with 14 px patches: 27 patches cover 378 px; the cells are drawn over that part only."""
    from mmie_core.models import load_model
    from mmie_core.patches import processor_view

    view = processor_view(load_model(preset_dirs["llava-interleave-qwen-0.5b"]), HOPPER)  # squashed, no crop
    assert view.box == pytest.approx((0, 0, 512 * 378 / 384, 600 * 378 / 384))
    assert any("cover 378x378 of the 384x384" in step for step in view.steps)


@pytest.mark.parametrize("name", [n for n in fixture_names() if n.startswith("clip-")])
def test_pixels_outside_the_centre_crop_light_no_cell(preset_dirs, name, fresh_cache):
    from mmie_core.models import load_model
    from mmie_core.patches import processor_view

    loaded = load_model(preset_dirs[name])
    _identity_tower(loaded)
    wide = photos()["wide"]  # 900x300 -> 672x224 -> the centre 224: x in [300, 600) of the original
    view = processor_view(loaded, wide)
    assert view.box[0] == pytest.approx(300, abs=2) and view.box[2] == pytest.approx(600, abs=2)
    heat = _token_change_map(loaded, wide, _paste(wide, (20, 100, 120, 200)))
    assert heat.values.max() == 0


# cheap settings: the point is that every path runs at the true geometry (a whole tile per occlusion window)
MATRIX = dict(ig_steps=2, max_new_tokens=3, occlusion_cells=1)


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_view_and_method_runs_on_a_portrait_a_wide_and_a_tall_photo(preset_dirs, name, tmp_path, fresh_cache):
    from mmie_core.chat import chat_inputs
    from mmie_core.check_presets import CheckSettings, check_model
    from mmie_core.explain import METHODS, NAMED_VARIANTS
    from mmie_core.models import load_model
    from studio.patches_tab import patches

    loaded = load_model(preset_dirs[name])
    for kind, photo in photos().items():
        path = tmp_path / f"{kind}.png"
        photo.save(path)
        report = check_model(preset_dirs[name], path, CheckSettings(**MATRIX))
        assert set(report) == {"model", "family", "image", "vision_tokens", "image_tokens", "grid", "checks"}
        failed = {c["name"]: c["error"] for c in report["checks"] if not c["ok"]}
        assert failed == {}, f"{name} on the {kind} photo"
        names = {c["name"] for c in report["checks"]}
        assert {f"explain: {m}" for m in METHODS} <= names
        if loaded.adapter.describes:
            assert {f"explain: {v}" for v in NAMED_VARIANTS} | {"answer", "token_maps", "image_token_layout"} <= names
            ids = chat_inputs(loaded, photo, "Describe the image.")["input_ids"]
            in_prompt = 0 if loaded.adapter.captions else int((ids == loaded.model.config.image_token_id).sum())
            assert report["image_tokens"] == in_prompt
        if loaded.adapter.query_tokens:
            assert "query_maps" in names
        if loaded.adapter.token_grid:
            assert {"sequence", "patch_to_words", "logit_lens", "robustness", "inspect_vision",
                    "explain: relevancy (through the vision tower)"} <= names
        # the Patches tab reports the same counts
        _, _, summary, info = patches(str(path), preset_dirs[name])
        if loaded.adapter.describes:
            assert info["language_model_image_tokens"] == report["image_tokens"]
            assert str(report["image_tokens"]) in summary


def test_llava_with_a_processor_that_disagrees_with_its_tower_is_refused_at_load(preset_dirs, fresh_cache):
    """The variant: strategy 'default' with num_additional_image_tokens=1 on a SigLIP tower (no CLS) makes
    729 placeholders for 728 features; transformers cannot run it, and the studio says why at load time."""
    from mmie_core.models import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="num_additional_image_tokens"):
        load_model(preset_dirs["llava-interleave-qwen-0.5b-variant"])


def test_llava_default_strategy_on_a_tower_without_cls_drops_the_first_patch(preset_dirs, tmp_path, fresh_cache):
    """Strategy 'default' with num_additional_image_tokens=0 on SigLIP: 728 image tokens, the top-left patch
    has none (transformers drops the first vision token). Every view works and leaves that cell empty."""
    import json
    import shutil

    from mmie_core.check_presets import CheckSettings, check_model
    from mmie_core.chat import answer_token_maps, greedy_answer_ids
    from mmie_core.models import load_model
    from mmie_core.sequence import sequence_view

    folder = tmp_path / "llava-default"
    shutil.copytree(preset_dirs["llava-interleave-qwen-0.5b"], folder)
    for file, changes in [("config.json", {"vision_feature_select_strategy": "default"}),
                          ("processor_config.json", {"vision_feature_select_strategy": "default",
                                                     "num_additional_image_tokens": 0})]:
        data = json.loads((folder / file).read_text())
        (folder / file).write_text(json.dumps(data | changes))
    path = tmp_path / "portrait.png"
    HOPPER.save(path)
    report = check_model(str(folder), path, CheckSettings(**MATRIX))
    assert {c["name"]: c["error"] for c in report["checks"] if not c["ok"]} == {}
    assert report["image_tokens"] == 27 * 27 - 1 and report["grid"] == [27, 27]
    loaded = load_model(str(folder))
    ids = greedy_answer_ids(loaded, HOPPER, "What is in the image?", max_new_tokens=2)
    maps = answer_token_maps(loaded, HOPPER, "What is in the image?", ids)
    assert maps.attention.shape[1:] == (27, 27) and (maps.attention[:, 0, 0] == 0).all()
    assert (maps.attention[:, 0, 1] > 0).all()
    view = sequence_view(loaded, HOPPER, "What is in the image?")
    assert view.counts["image"] == 728 and any("top-left patch" in n for n in view.notes)


def test_llava_with_a_list_of_feature_layers(preset_dirs, tmp_path, fresh_cache):
    """vision_feature_layer as a list: the layers' features are concatenated; GradCAM and relevancy through
    the vision tower go up to the deepest of them."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    from mmie_core.check_presets import CheckSettings, check_model
    from mmie_core.explain import default_gradcam_layer, make_subject
    from mmie_core.models import load_model

    source = preset_dirs["llava-interleave-qwen-0.5b"]
    config = AutoConfig.from_pretrained(source)
    config.vision_feature_layer = [-3, -2]
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    folder = tmp_path / "llava-layers"
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(source).save_pretrained(folder)
    path = tmp_path / "portrait.png"
    HOPPER.save(path)
    report = check_model(str(folder), path, CheckSettings(**MATRIX))
    assert {c["name"]: c["error"] for c in report["checks"] if not c["ok"]} == {}
    loaded = load_model(str(folder))
    ids = loaded.processor.tokenizer("image", add_special_tokens=False)["input_ids"][:1]
    subject = make_subject(loaded, HOPPER, {"question": "What is in the image?", "answer_ids": ids, "token_index": 0})
    n = len(loaded.adapter.vision_blocks(subject.vision))
    assert default_gradcam_layer(subject) == n - 2  # hidden_states[-2] is the output of block n - 2


def test_cost_limits_refuse_with_advice_before_running(preset_dirs, monkeypatch, fresh_cache):
    """SmolVLM on the portrait: 16 tiles + a global view. Occlusion one token cell at a time is refused with
    the window that fits; the window it names runs."""
    from mmie_core.cost import CostLimitError, estimate
    from mmie_core.explain import explain_subject, make_subject
    from mmie_core.models import load_model

    loaded = load_model(preset_dirs["smolvlm-256m-instruct"])
    ids = loaded.processor.tokenizer("image", add_special_tokens=False)["input_ids"][:1]
    subject = make_subject(loaded, HOPPER, {"question": "What is in the image?", "answer_ids": ids, "token_index": 0})
    cost = estimate(subject, "occlusion", {})
    assert cost.passes == 17 * 64 + 1 and cost.tokens > 17 * 1024  # every token cell of every view
    with pytest.raises(CostLimitError, match=r"occlusion here needs about 1,089 forward passes.*window=(\d)") as err:
        explain_subject(subject, "occlusion")
    window = int(err.value.args[0].split("window=")[1][0])
    assert estimate(subject, "occlusion", {"window": window, "stride": window}).work <= 5_000_000
    monkeypatch.setenv("MMIE_MAX_ATTENTION_MB", "1")
    with pytest.raises(CostLimitError, match="GB of attention maps.*a smaller image"):
        explain_subject(subject, "rollout")
    monkeypatch.setenv("MMIE_MAX_WORK", "0")  # no limit
    monkeypatch.setenv("MMIE_MAX_ATTENTION_MB", "0")
    assert estimate(subject, "attention", {}).attention_bytes < estimate(subject, "rollout", {}).attention_bytes / 100
