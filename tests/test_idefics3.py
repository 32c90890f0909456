"""Idefics3 / SmolVLM, the tiled family: the processor stretches an image onto whole tiles, cuts them
plus a global view of the whole image, and each tile's ViT patches are pixel-shuffled into a few
language-model tokens. Checked on a tiny random Idefics3 built in conftest (tiles of 32 px, patch 8,
shuffle 2: 2 x 2 tokens per tile; longest edge resized to 64 px)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmie_core import models
from mmie_core.chat import Turn, answer_sequence, answer_token_maps, greedy_answer_ids, language_model
from mmie_core.explain import METHODS, default_gradcam_layer, explain, explain_subject, make_subject, pixels_to_patches
from mmie_core.patches import TiledLayout, processor_view, tiled_layout, vision_grid

QUESTION = "what color is it?"


def _scene(size=(96, 32)) -> Image.Image:
    """White, with a yellow block over the top-left token cell of the 1 x 2 tiles (24 x 16 px)."""
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste((250, 220, 0), (0, 0, size[0] // 4, size[1] // 2))
    return image


@pytest.fixture()
def idefics3(tiny_idefics3_dir, fresh_cache):
    return models.load_model(tiny_idefics3_dir)


def _inputs(loaded, image, question=QUESTION):
    from mmie_core.chat import chat_inputs

    return chat_inputs(loaded, image, question)


def _answer(loaded, image, n=4) -> list[int]:
    """The model's own greedy answer, forced to `n` tokens (a random model stops at once otherwise)."""
    inputs = _inputs(loaded, image)
    out = loaded.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("size, tiles, shape", [((96, 32), (1, 2), (2, 4)), ((30, 90), (2, 1), (4, 2)),
                                                ((20, 12), (2, 2), (4, 4))])
def test_layout_reads_tiles_and_global_view_from_the_markers(idefics3, size, tiles, shape):
    inputs = _inputs(idefics3, _scene(size))
    layout = tiled_layout(idefics3, inputs["input_ids"])
    ids = inputs["input_ids"][0]
    assert (layout.tile_rows, layout.tile_cols) == tiles and layout.shape == shape
    assert list(layout.positions) == (ids == idefics3.model.config.image_token_id).nonzero().flatten().tolist()
    assert inputs["pixel_values"].shape[1] == layout.n_tiles == tiles[0] * tiles[1] + 1
    assert len(layout.positions) == layout.n_tiles * 4
    tokens = idefics3.processor.tokenizer.convert_ids_to_tokens(ids[list(layout.marker_positions)].tolist())
    assert tokens[:2] == ["<fake_token_around_image>", "<row_1_col_1>"] and tokens[-1] == "<fake_token_around_image>"
    assert "<global-img>" in tokens and "<image>" not in tokens
    view = processor_view(idefics3, _scene(size))
    assert view.tiles == tiles and view.box == (0, 0, *size)
    assert view.model_input.size == (tiles[1] * 32, tiles[0] * 32)  # the tiles put back together
    assert "global view" in " ".join(view.steps)


def test_a_small_image_without_splitting_is_one_global_view(idefics3):
    idefics3.processor.image_processor.do_image_splitting = False
    inputs = _inputs(idefics3, _scene())
    layout = tiled_layout(idefics3, inputs["input_ids"])
    assert (layout.tile_rows, layout.tile_cols, layout.n_tiles, layout.shape) == (0, 0, 1, (2, 2))
    assert inputs["pixel_values"].shape[1] == 1
    assert processor_view(idefics3, _scene()).tiles == (0, 0)
    values = torch.arange(4.0)
    np.testing.assert_array_equal(layout.token_map(values), values.reshape(2, 2).numpy())


def test_mosaic_puts_local_tiles_in_place_and_spreads_the_global_view():
    layout = TiledLayout(1, 2, 2, 2, 2, tuple(range(12)), ())
    local = torch.tensor([[1.0, 2], [3, 4], [5, 6], [7, 8]]).reshape(2, 2, 2)
    global_view = torch.tensor([[4.0, 0], [0, 8]])
    got = layout.mosaic(torch.cat([local, global_view[None]]))
    expected = np.array([[1, 2, 5, 6], [3, 4, 7, 8]], float)
    expected += np.array([[2, 2, 0, 0], [0, 0, 4, 4]], float)  # each global cell over 1 x 2 local cells
    np.testing.assert_array_equal(got, expected)
    assert got.sum() == pytest.approx(float(local.sum() + global_view.sum()))  # nothing lost or added


def test_tile_pixels_land_where_they_are_in_the_original(idefics3):
    # the yellow block covers exactly the top-left token cell of the local tiles (24 x 16 of 96 x 32)
    image = _scene()
    pixels = _inputs(idefics3, image)["pixel_values"]  # (1, 3 tiles, 3, 32, 32)
    white = torch.ones(3).view(1, 1, 3, 1, 1)  # white after normalisation (mean 0.5, std 0.5)
    yellow = (pixels - white).abs()
    yellow[:, -1] = 0  # local tiles only
    subject = make_subject(idefics3, image, {"question": QUESTION, "answer_ids": _answer(idefics3, image, 1),
                                             "token_index": 0})
    where = pixels_to_patches(subject, yellow)
    assert where.shape == (2, 4) and np.unravel_index(where.argmax(), where.shape) == (0, 0)
    assert where[0, 0] > 50 * where.ravel()[1:].max()


def test_image_tokens_read_the_patches_of_their_own_cell(idefics3):
    """End to end without the ViT's mixing: with the vision blocks removed, the gradient of image token k
    reaches only the pixels of one tile and one token cell, the cell `token_map` puts it in."""
    image = _scene()
    inputs = _inputs(idefics3, image)
    layout = tiled_layout(idefics3, inputs["input_ids"])
    vision = idefics3.model.model.vision_model
    saved = vision.encoder.layers
    vision.encoder.layers = torch.nn.ModuleList()
    subject = make_subject(idefics3, image, {"question": QUESTION, "answer_ids": _answer(idefics3, image, 1),
                                             "token_index": 0})
    try:
        pixels = inputs["pixel_values"].clone().requires_grad_(True)
        features = idefics3.model.model.get_image_features(
            pixel_values=pixels, pixel_attention_mask=inputs["pixel_attention_mask"])
        features = getattr(features, "pooler_output", features)  # per image: (tiles, tokens per tile, D)
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        assert features.shape[0] == len(layout.positions)
        for k in range(features.shape[0]):
            (grad,) = torch.autograd.grad(features[k].sum(), pixels, retain_graph=True)
            reached = pixels_to_patches(subject, grad.abs())
            one_hot = torch.zeros(features.shape[0])
            one_hot[k] = 1.0
            placed = layout.token_map(one_hot)
            np.testing.assert_array_equal(reached > 0, placed > 0)
    finally:
        vision.encoder.layers = saved


def test_generation_streams_and_teacher_forcing_reproduces_it(idefics3):
    image = _scene()
    ids = _answer(idefics3, image)
    streamed = greedy_answer_ids(idefics3, image, QUESTION, max_new_tokens=4)
    assert streamed and ids[: len(streamed)] == streamed
    seq = answer_sequence(idefics3, image, QUESTION, ids)
    assert isinstance(seq.layout, TiledLayout) and "pixel_attention_mask" in seq.image_extra
    with torch.no_grad():
        logits = idefics3.model(**seq.model_inputs()).logits[0]
        batched = idefics3.model(**seq.model_inputs(3, seq.pixel_values.repeat(3, 1, 1, 1, 1))).logits
    assert logits[seq.prompt_length - 1: -1].argmax(-1).tolist() == ids
    torch.testing.assert_close(batched, logits.expand(3, -1, -1), rtol=1e-4, atol=1e-5)
    turn = Turn(QUESTION, idefics3.processor.tokenizer.decode(streamed, skip_special_tokens=True))
    assert answer_sequence(idefics3, image, "and its shape?", ids, [turn]).prompt_length > seq.prompt_length


def test_token_maps_are_the_language_models_attention_over_every_tile(idefics3):
    image = _scene()
    ids = _answer(idefics3, image)
    maps = answer_token_maps(idefics3, image, QUESTION, ids)
    seq = answer_sequence(idefics3, image, QUESTION, ids)
    layout = seq.layout
    assert maps.attention.shape == (len(ids), 2, 4) and maps.image_share.shape == (2, 2)
    with models.attention_implementation(idefics3.model, "eager"), torch.no_grad():
        out = idefics3.model(**seq.model_inputs(), output_attentions=True)
    attn = torch.stack([a[0] for a in out.attentions]).mean((0, 1))  # layers, heads -> (seq, seq)
    positions = torch.tensor(layout.positions)
    markers = torch.tensor(layout.marker_positions)
    for k in range(len(ids)):
        row = attn[seq.prompt_length - 1 + k]
        on_image = row[positions]
        np.testing.assert_allclose(maps.attention[k], layout.token_map(on_image), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(maps.heatmaps[k].values.sum(), 1.0, rtol=1e-6)
        text = row.sum() - on_image.sum() - row[markers].sum() - row[seq.input_ids[0] == idefics3.processor.tokenizer.bos_token_id].sum()
        assert maps.image_reliance[k] == pytest.approx(float(on_image.sum() / (on_image.sum() + text)), rel=1e-4)
    assert len(language_model(idefics3).layers) == 2


def test_every_method_explains_an_answer_token_over_the_tiles(idefics3):
    image = _scene((30, 90))  # portrait: 2 x 1 tiles
    ids = _answer(idefics3, image)
    subject = make_subject(idefics3, image, {"question": QUESTION, "answer_ids": ids, "token_index": 1})
    assert subject.zero_input > 0  # an all-zero tile would be dropped as padding
    assert default_gradcam_layer(subject) == 1  # the connector reads the last block
    for method in METHODS:
        heatmap = explain_subject(subject, method)
        assert heatmap.values.shape == (4, 2) and np.isfinite(heatmap.values).all(), method
        assert heatmap.box == (0, 0, 30, 90)
        if method != "gradcam":  # ReLU'd GradCAM may be all zero on a random model
            assert heatmap.values.std() > 0, method
    for params in ({"baseline": "white", "objective": "log_prob"}, {"baseline": "black"}):
        assert np.isfinite(explain_subject(subject, "integrated_gradients", steps=4, **params).values).all()
    assert explain_subject(subject, "occlusion", window=2).values.shape == (4, 2)  # a whole tile at once
    assert explain_subject(subject, "saliency", smooth=True, samples=2).values.shape == (4, 2)
    with pytest.raises(ValueError, match="window"):
        explain_subject(subject, "occlusion", window=3)
    with pytest.raises(ValueError, match="merges 2x2 patches"):
        explain_subject(subject, "relevancy", through_vision=True)


def test_integrated_gradients_completeness_over_the_tiles(idefics3):
    # attributions over all tiles (the global view spread over the mosaic) add up to score(x) - score(baseline)
    image = _scene()
    ids = _answer(idefics3, image)
    subject = make_subject(idefics3, image, {"question": QUESTION, "answer_ids": ids, "token_index": 0})
    heatmap = explain_subject(subject, "integrated_gradients", steps=128)
    with torch.no_grad():
        gap = subject.score(subject.pixel_values) - subject.score(torch.full_like(subject.pixel_values, 1e-4))
    assert heatmap.values.sum() == pytest.approx(float(gap), rel=0.05, abs=1e-3)


def test_alt_text_and_the_studio_serve_a_tiled_model(tiny_idefics3_dir, fresh_cache, tmp_path):
    from studio.alt_text_tab import alt_text
    from studio.chat_tab import chat, explain_token
    from studio.inside_tab import patch_to_words
    from studio.patches_tab import inspect, patches

    path = tmp_path / "scene.png"
    _scene().save(path)
    messages, _, chips, _, data, _ = list(chat(str(path), QUESTION, [], tiny_idefics3_dir))[-1]
    assert messages[-1]["role"] == "assistant" and data["model"] and data["token_ids"]
    png, heat, files = explain_token(str(path), data, chips["choices"][0], tiny_idefics3_dir, "relevancy")
    assert heat["method"] == "relevancy" and np.array(heat["values"]).shape == (2, 4) and files
    text, summary, chips, alt = alt_text(str(path), "concise", "", 125, tiny_idefics3_dir)
    assert alt["token_ids"] and alt["question"]  # an instruction-following model gets the instruction
    png, heat, files = explain_token(str(path), alt, chips["value"], tiny_idefics3_dir, "saliency")
    assert heat["method"] == "saliency" and np.array(heat["values"]).shape == (2, 4) and files
    _, _, summary, info = patches(str(path), tiny_idefics3_dir)
    assert info["tiles"] == [1, 2] and info["grid"] == [2, 4] and info["language_model_image_tokens"] == 12
    assert "global view" in summary
    with pytest.raises(Exception, match="tiles"):  # refused with a message, not a wrong map
        inspect(str(path), tiny_idefics3_dir, -1)
    with pytest.raises(Exception, match="tiles"):
        patch_to_words(str(path), QUESTION, tiny_idefics3_dir, 0, 0)


def test_explain_entry_point(idefics3):
    image = _scene()
    heatmap = explain(idefics3, image, {"question": QUESTION, "answer_ids": _answer(idefics3, image, 2),
                                        "token_index": 0}, "attention")
    assert heatmap.values.shape == (2, 4) and vision_grid(idefics3).rows == 4


def test_smolvlm2_classes_take_the_same_path(tiny_smolvlm_dir, fresh_cache):
    loaded = models.load_model(tiny_smolvlm_dir)
    assert loaded.family == "idefics3" and type(loaded.model).__name__ == "SmolVLMForConditionalGeneration"
    image = _scene()
    ids = _answer(loaded, image)
    seq = answer_sequence(loaded, image, QUESTION, ids)
    assert seq.layout.shape == (2, 4) and seq.layout.n_tiles == 3
    with torch.no_grad():
        logits = loaded.model(**seq.model_inputs()).logits[0]
    assert logits[seq.prompt_length - 1: -1].argmax(-1).tolist() == ids
    assert answer_token_maps(loaded, image, QUESTION, ids).attention.shape == (len(ids), 2, 4)
    subject = make_subject(loaded, image, {"question": QUESTION, "answer_ids": ids, "token_index": 0})
    for method in METHODS:
        params = {"steps": 4} if method == "integrated_gradients" else {}
        assert np.isfinite(explain_subject(subject, method, **params).values).all(), method
