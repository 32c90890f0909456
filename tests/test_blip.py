"""BLIP, the captioning family: a ViT with CLS and a BERT-style text decoder that reads the image
through cross-attention (no image tokens in its sequence), no chat and no instructions. Checked on a
tiny random model built in conftest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmie_core import models
from mmie_core.alt_text import generate_alt_text, instruction
from mmie_core.attention import cross_modal_relevancy
from mmie_core.chat import Turn, answer_sequence, answer_token_maps, greedy_answer_ids, prompt_for
from mmie_core.explain import METHODS, CaptionSubject, default_gradcam_layer, explain, explain_subject, make_subject
from mmie_core.patches import processor_view, vision_grid

IMAGE = Image.new("RGB", (48, 32), (255, 255, 255))
IMAGE.paste((250, 220, 0), (0, 0, 24, 16))


@pytest.fixture()
def blip(tiny_blip_dir, fresh_cache):
    return models.load_model(tiny_blip_dir)


def _generate(blip, prefix: str = "", n: int = 5) -> list[int]:
    """The model's own greedy caption (without [DEC], the prefix and [SEP])."""
    text = [prefix] if prefix else None
    inputs = blip.processor(images=[IMAGE], text=text, return_tensors="pt")
    out = blip.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0].tolist()
    start = 1 + (len(inputs["input_ids"][0]) - 2 if prefix else 0)
    return [t for t in out[start:] if t != blip.model.config.text_config.sep_token_id]


def test_loads_with_its_own_attention_and_a_cls_grid(blip):
    assert blip.family == "blip"
    assert blip.model.config._attn_implementation == "eager"  # BLIP refuses sdpa; loading must not ask for it
    grid = vision_grid(blip)
    assert (grid.rows, grid.cols, grid.prefix_tokens) == (4, 4, 1)
    assert processor_view(blip, IMAGE).box == (0, 0, 48, 32)  # plain resize, no crop


def test_captions_stream_like_generate_with_and_without_a_prefix(blip):
    for prefix in ("", "a picture of"):
        ids = greedy_answer_ids(blip, IMAGE, prefix, max_new_tokens=5)
        assert ids == _generate(blip, prefix)[: len(ids)] and ids
    assert prompt_for(blip, "a picture of") == "a picture of"
    with pytest.raises(ValueError, match="does not chat"):
        prompt_for(blip, "and now?", [Turn("a", "b")])


def test_teacher_forced_logits_reproduce_the_caption(blip):
    for prefix in ("", "a picture of"):
        ids = _generate(blip, prefix)
        seq = answer_sequence(blip, IMAGE, prefix, ids)
        assert seq.input_ids[0, 0].item() == blip.model.config.text_config.bos_token_id
        assert len(seq.image_positions) == 0
        with torch.no_grad():
            logits = blip.model(**seq.model_inputs()).logits[0]
        predicted = logits[seq.prompt_length - 1: -1].argmax(-1).tolist()
        assert predicted == ids
        subject = make_subject(blip, IMAGE, {"question": prefix, "answer_ids": ids, "token_index": 2})
        assert isinstance(subject, CaptionSubject)
        with torch.no_grad():
            assert subject.score(subject.pixel_values).item() == pytest.approx(logits[subject.position, ids[2]].item(),
                                                                               rel=1e-5)


def test_caption_token_maps_are_the_models_own_cross_attention(blip):
    ids = _generate(blip)
    maps = answer_token_maps(blip, IMAGE, "", ids)
    assert maps.image_reliance == [None] * len(ids)  # undefined: all cross-attention is on the image
    assert maps.image_share.shape == (2, 2) and maps.attention.shape == (len(ids), 4, 4)
    seq = answer_sequence(blip, IMAGE, "", ids)
    with torch.no_grad():
        image_embeds = blip.model.vision_model(pixel_values=seq.pixel_values).last_hidden_state
        out = blip.model.text_decoder(input_ids=seq.input_ids, encoder_hidden_states=image_embeds,
                                      output_attentions=True, return_dict=True)
    cross = torch.stack([a[0] for a in out.cross_attentions]).mean((0, 1))  # layers, heads -> (text, 1 + patches)
    for k in range(len(ids)):
        row = cross[seq.prompt_length - 1 + k, 1:]  # CLS (key 0) is not a patch
        np.testing.assert_allclose(maps.attention[k].ravel(), row.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(maps.heatmaps[k].values.ravel(), (row / row.sum()).numpy(), rtol=1e-5, atol=1e-7)


def test_every_method_explains_a_caption_token(blip):
    ids = _generate(blip)
    subject = make_subject(blip, IMAGE, {"question": "", "answer_ids": ids, "token_index": 1})
    embeddings = blip.model.text_decoder.bert.embeddings
    hooks_before = dict(embeddings._forward_hooks)
    for method in METHODS:
        heatmap = explain_subject(subject, method)
        assert heatmap.values.shape == (4, 4) and np.isfinite(heatmap.values).all(), method
        if method not in ("gradcam",):  # ReLU'd GradCAM may be all zero on a random model
            assert heatmap.values.std() > 0, method
    assert dict(embeddings._forward_hooks) == hooks_before  # relevancy's gradient hook is gone
    assert default_gradcam_layer(subject) == 1  # the last block: the decoder reads every token of it
    with pytest.raises(ValueError, match="no chat history"):
        make_subject(blip, IMAGE, {"question": "", "answer_ids": ids, "token_index": 0, "history": [Turn("a", "b")]})


def test_cross_modal_relevancy_follows_cross_attention():
    # one vision layer, one decoder layer: text position 1 attends only to vision token 2, with
    # gradients that keep everything; its relevancy must peak on token 2
    heads, n_img, n_txt = 2, 4, 3
    vision = [(torch.full((heads, n_img, n_img), 1 / n_img), torch.ones(heads, n_img, n_img))]
    self_attn = torch.eye(n_txt).expand(heads, -1, -1).clone()
    cross = torch.full((heads, n_txt, n_img), 1 / n_img)
    cross[:, 1] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    r = cross_modal_relevancy(vision, [((self_attn, torch.ones_like(self_attn)), (cross, torch.ones_like(cross)))])
    assert r.shape == (n_txt, n_img) and r[1].argmax().item() == 2
    assert torch.allclose(r[0], r[0][0].expand(n_img))  # uniform attention, uniform relevancy
    rolled = cross_modal_relevancy([(vision[0][0], None)], [((self_attn, None), (cross, None))])
    assert rolled[1].argmax().item() == 2


def test_alt_text_from_a_captioner(blip):
    assert instruction(blip, "detailed") == ""  # a captioner takes no instruction
    alt = generate_alt_text(blip, IMAGE, "functional", context="Link to the gallery")
    assert alt.question == "" and alt.answer_ids
    assert alt.text.startswith("Link to the gallery:")
    explained = explain(blip, IMAGE, {"question": alt.question, "answer_ids": alt.answer_ids, "token_index": 0},
                        "attention")
    assert explained.values.shape == (4, 4)


def test_studio_alt_text_and_token_heatmaps_serve_a_captioner(tiny_blip_dir, fresh_cache, tmp_path):
    from studio.alt_text_tab import alt_text
    from studio.chat_tab import chat, explain_token

    path = tmp_path / "scene.png"
    IMAGE.save(path)
    text, summary, chips, data = alt_text(str(path), "concise", "", 125, tiny_blip_dir)
    assert data["model"] and data["token_ids"] and data["image_reliance"][0] is None
    png, heat, files = explain_token(str(path), data, chips["value"], tiny_blip_dir, "relevancy")
    assert heat["method"] == "relevancy" and len(heat["values"]) == 4
    with pytest.raises(Exception, match="cannot chat"):  # the chat tab refuses it with a message
        list(chat(str(path), "what is it?", [], tiny_blip_dir))


def test_patches_tab_shows_a_captioners_grid_and_vision_attention(tiny_blip_dir, fresh_cache, tmp_path):
    from studio.patches_tab import inspect, patches

    path = tmp_path / "scene.png"
    IMAGE.save(path)
    _, _, summary, info = patches(str(path), tiny_blip_dir)
    assert info["grid"] == [4, 4] and info["prefix_tokens"] == 1 and info["language_model_image_tokens"] == 0
    assert "cross-attention" in summary
    *_, data, files = inspect(str(path), tiny_blip_dir, -1)
    assert len(data["heads"]) == 2 and len(data["rollout"]["values"]) == 4 and files
