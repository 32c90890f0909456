"""Qwen2-VL, the native-resolution family: the processor resizes an image to whole cells (no fixed
size), cuts patches and hands them over flattened, without a batch axis; the merger joins 2 x 2
patches into one language-model token; rotary positions are 3-D. Checked on a tiny random Qwen2-VL
built in conftest (patches of 4 px, 8 px cells, 64 to 4096 px of area)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmie_core import models
from mmie_core.chat import answer_sequence, answer_token_maps, chat_inputs, greedy_answer_ids, special_token_ids
from mmie_core.explain import METHODS, _constant_image, _grid_view, default_gradcam_layer, explain_subject, make_subject, \
    pixels_to_patches
from mmie_core.patches import TiledLayout, processor_view, qwen_patchify, vision_grid

QUESTION = "what color is it?"


def _scene(size=(40, 24)) -> Image.Image:
    """White, with a yellow block over the top-left quarter."""
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste((250, 220, 0), (0, 0, size[0] // 4, size[1] // 2))
    return image


@pytest.fixture()
def qwen(tiny_qwen2vl_dir, fresh_cache):
    return models.load_model(tiny_qwen2vl_dir)


def _answer(loaded, image, n=4) -> list[int]:
    inputs = chat_inputs(loaded, image, QUESTION)
    out = loaded.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _subject(loaded, image, token_index=0, n=4):
    return make_subject(loaded, image, {"question": QUESTION, "answer_ids": _answer(loaded, image, n),
                                        "token_index": token_index})


@pytest.mark.parametrize("size, canvas, cells", [((40, 24), (40, 24), (3, 5)), ((50, 30), (48, 32), (4, 6)),
                                                 ((300, 200), (72, 48), (6, 9))])
def test_grid_follows_the_image_and_patches_round_trip(qwen, size, canvas, cells):
    image = _scene(size)
    inputs = chat_inputs(qwen, image, QUESTION)
    view = processor_view(qwen, image)
    assert view.model_input.size == canvas and view.box == (0, 0, *size)
    assert (view.grid.rows, view.grid.cols) == (canvas[1] // 4, canvas[0] // 4)
    seq = answer_sequence(qwen, image, QUESTION, _answer(qwen, image, 1))
    assert isinstance(seq.layout, TiledLayout) and seq.layout.shape == cells
    ids = inputs["input_ids"][0]
    assert list(seq.layout.positions) == (ids == qwen.model.config.image_token_id).nonzero().flatten().tolist()
    assert seq.pixel_values.shape == (1, 3, canvas[1], canvas[0])  # the resized image, what Captum sees
    # the differentiable patchify gives back exactly what the processor made
    torch.testing.assert_close(seq.to_model(seq.pixel_values), inputs["pixel_values"], rtol=0, atol=0)
    tokens = qwen.processor.tokenizer.convert_ids_to_tokens(ids[list(seq.layout.marker_positions)].tolist())
    assert tokens == ["<|vision_start|>", "<|vision_end|>"]
    with pytest.raises(ValueError, match="follows each image"):
        vision_grid(qwen)


def test_image_tokens_read_the_pixels_of_their_own_cell(qwen):
    """With the vision blocks removed, token k's gradient reaches only the pixels of the cell
    `token_map` puts it in (the merge-window order of the patches is undone correctly)."""
    image = _scene((40, 24))
    subject = _subject(qwen, image, n=1)
    seq = subject.sequence
    visual = qwen.model.model.visual
    saved = visual.blocks
    visual.blocks = torch.nn.ModuleList()
    try:
        canvas = seq.pixel_values.clone().requires_grad_(True)
        out = qwen.model.model.get_image_features(pixel_values=seq.to_model(canvas),
                                                  image_grid_thw=seq.image_extra["image_grid_thw"])
        features = torch.cat(list(out.pooler_output))  # (tokens, D)
        assert features.shape[0] == len(seq.layout.positions) == 15
        for k in range(features.shape[0]):
            (grad,) = torch.autograd.grad(features[k].sum(), canvas, retain_graph=True)
            one_hot = torch.zeros(features.shape[0])
            one_hot[k] = 1.0
            np.testing.assert_array_equal(pixels_to_patches(subject, grad.abs()) > 0, seq.layout.token_map(one_hot) > 0)
    finally:
        visual.blocks = saved


def test_analysis_passes_reproduce_generation_and_leave_shared_state_alone(qwen):
    image = _scene((50, 30))
    ids = _answer(qwen, image)
    streamed = greedy_answer_ids(qwen, image, QUESTION, max_new_tokens=4)
    special = special_token_ids(qwen.processor.tokenizer)  # the chat shows no special tokens
    assert streamed and [t for t in ids if t not in special][: len(streamed)] == streamed
    seq = answer_sequence(qwen, image, QUESTION, ids)
    assert seq.position_ids.shape == (3, 1, seq.input_ids.shape[1])
    sentinel = torch.tensor([[12345]])
    qwen.model.model.rope_deltas = sentinel  # what a running generation keeps between its steps
    with torch.no_grad():
        logits = qwen.model(**seq.model_inputs()).logits[0]
        batched = qwen.model(**seq.model_inputs(3, seq.pixel_values.repeat(3, 1, 1, 1))).logits
    assert qwen.model.model.rope_deltas is sentinel
    assert logits[seq.prompt_length - 1: -1].argmax(-1).tolist() == ids
    torch.testing.assert_close(batched, logits.expand(3, -1, -1), rtol=1e-4, atol=1e-5)


def test_token_maps_are_the_language_models_attention(qwen):
    image = _scene((40, 24))
    ids = _answer(qwen, image)
    maps = answer_token_maps(qwen, image, QUESTION, ids)
    seq = answer_sequence(qwen, image, QUESTION, ids)
    assert maps.attention.shape == (len(ids), 3, 5) and maps.image_share.shape == (2, 2)
    with models.attention_implementation(qwen.model, "eager"), torch.no_grad():
        out = qwen.model(**seq.model_inputs(), output_attentions=True)
    attn = torch.stack([a[0] for a in out.attentions]).mean((0, 1))
    positions, markers = list(seq.layout.positions), list(seq.layout.marker_positions)
    for k in range(len(ids)):
        row = attn[seq.prompt_length - 1 + k]
        on_image = row[positions]
        np.testing.assert_allclose(maps.attention[k], seq.layout.token_map(on_image), rtol=1e-4, atol=1e-7)
        text = row.sum() - on_image.sum() - row[markers].sum()  # no BOS in Qwen's template
        assert maps.image_reliance[k] == pytest.approx(float(on_image.sum() / (on_image.sum() + text)), rel=1e-4)


def test_every_method_explains_an_answer_token(qwen):
    image = _scene((50, 30))  # not square: 4 x 6 cells
    subject = _subject(qwen, image, token_index=1)
    assert default_gradcam_layer(subject) == 1  # the merger reads the last block
    for method in METHODS:
        heatmap = explain_subject(subject, method)
        assert heatmap.values.shape == (4, 6) and np.isfinite(heatmap.values).all(), method
        assert heatmap.box == (0, 0, 50, 30)
        if method != "gradcam":
            assert heatmap.values.std() > 0, method
    for params in ({"baseline": "white", "objective": "log_prob"}, {"baseline": "black"}):
        assert np.isfinite(explain_subject(subject, "integrated_gradients", steps=4, **params).values).all()
    assert explain_subject(subject, "occlusion", window=2, stride=1).values.shape == (4, 6)
    with pytest.raises(ValueError, match="merges 2x2 patches"):
        explain_subject(subject, "relevancy", through_vision=True)


def test_gradcam_grid_view_undoes_the_merge_window_order(qwen):
    subject = _subject(qwen, _scene((50, 30)), n=1)
    to_grid, from_grid = _grid_view(subject)
    g = subject.grid
    tokens = torch.randn(2 * g.n_patches, 5)  # two images' worth of (patches, D) rows
    grid = to_grid(tokens)
    assert grid.shape == (2, 5, g.rows, g.cols)
    torch.testing.assert_close(from_grid(grid, tokens), tokens)
    # patch row n of the model input sits at (block_row * 2 + i, block_col * 2 + j) of the grid
    canvas = torch.arange(g.rows * g.cols, dtype=torch.float).reshape(1, 1, g.rows, g.cols).expand(1, 3, -1, -1)
    order = qwen_patchify(canvas, 1, 2, 2)[:, 0]  # patch size 1: each row holds its own grid index
    np.testing.assert_array_equal(to_grid(order[:, None])[0, 0].numpy(), canvas[0, 0].numpy())


def test_integrated_gradients_completeness(qwen):
    # from a black canvas: the tiny random tower's features are nearly scale-free (the merger's layer
    # norm), so its score jumps right next to the all-zero input, which no path integral resolves
    image = _scene((40, 24))
    subject = _subject(qwen, image)
    heatmap = explain_subject(subject, "integrated_gradients", steps=128, baseline="black")
    with torch.no_grad():
        gap = subject.score(subject.pixel_values) - subject.score(_constant_image(subject, (0, 0, 0)))
    assert heatmap.values.sum() == pytest.approx(float(gap), rel=0.05, abs=1e-3)


def test_chat_alt_text_and_the_studio_serve_qwen(tiny_qwen2vl_dir, fresh_cache, tmp_path):
    from studio.alt_text_tab import alt_text
    from studio.chat_tab import chat, explain_token
    from studio.inside_tab import robustness
    from studio.patches_tab import inspect, patches

    path = tmp_path / "scene.png"
    _scene((50, 30)).save(path)
    messages, _, chips, _, data, _ = list(chat(str(path), QUESTION, [], tiny_qwen2vl_dir))[-1]
    assert data["token_ids"]
    _, heat, files = explain_token(str(path), data, chips["choices"][0], tiny_qwen2vl_dir, "gradcam")
    assert heat["method"] == "gradcam" and np.array(heat["values"]).shape == (4, 6) and files
    _, _, chips, alt = alt_text(str(path), "concise", "", 125, tiny_qwen2vl_dir)
    _, heat, _ = explain_token(str(path), alt, chips["value"], tiny_qwen2vl_dir, "occlusion")
    assert np.array(heat["values"]).shape == (4, 6)
    _, model_input, summary, info = patches(str(path), tiny_qwen2vl_dir)
    assert info["grid"] == [8, 12] and info["language_model_image_tokens"] == 24 and info["merge"] == 2
    assert "follows your image" in summary
    with pytest.raises(Exception, match="follows each image"):  # refused with a message, not a wrong map
        inspect(str(path), tiny_qwen2vl_dir, -1)
    with pytest.raises(Exception, match="one grid of image"):
        robustness(str(path), tiny_qwen2vl_dir, "noise", QUESTION)
