"""BLIP-2 / InstructBLIP: the Q-Former's query maps, and answer maps composed through them.

The fixtures are the true-geometry ones (224 px, patch 14, CLS + 16x16, 32 queries); their random
Q-Former reads every patch alike, so its cross-attention projections are sharpened here to give each
query a reading of its own. InstructBLIP Flan-T5 has an encoder-decoder language model: its answer
reads the query tokens through the T5 decoder's cross-attention.
"""

from __future__ import annotations

import matplotlib
import pytest
import torch
from PIL import Image

from preset_fixtures import build_preset

from mmie_core.attention import cross_modal_relevancy
from mmie_core.chat import (GenerationSettings, Turn, answer_batch, answer_sequence, answer_token_maps, chat_inputs,
                            generation_token_maps, greedy_answer_ids, prompt_for, stream_answer)
from mmie_core.explain import ENCODER_DECODER_QFORMER_RULE, QFORMER_RULE, explain
from mmie_core.families import UnsupportedModel, adapter_for
from mmie_core.models import attention_implementation, load_model
from mmie_core.qformer import query_maps, query_reads

PHOTO = Image.open(f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg").convert("RGB")
QUESTION = "What is in the image?"
T5 = "instructblip-flan-t5-xl"
NAMES = ["blip2-opt-2.7b", "instructblip-vicuna-7b", T5]


def _sharpen(loaded, gain: float = 15.0) -> None:
    """Distinct learned queries (BLIP-2 initialises them to zeros, which makes all 32 alike) and larger
    cross-attention projections."""
    torch.manual_seed(1)
    loaded.model.query_tokens.data = torch.randn_like(loaded.model.query_tokens)
    for module in loaded.adapter.cross_attention_modules(loaded.model).values():
        module.query.weight.data *= gain
        module.key.weight.data *= gain
    if loaded.adapter.encoder_decoder(loaded.model):
        # the random T5 head would answer with <pad> (its decoder start) or with the embedding table's padding rows,
        # which no tokenizer entry decodes: silence those, so that answers are words
        head = loaded.model.get_output_embeddings().weight
        tokenizer = loaded.processor.tokenizer
        head.data[len(tokenizer):] = 0
        head.data[[tokenizer.pad_token_id, tokenizer.unk_token_id, loaded.model.config.image_token_id]] = 0


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    out = {}
    for name in NAMES:
        loaded = load_model(build_preset(name, tmp_path_factory.mktemp(name)))
        _sharpen(loaded)
        out[name] = loaded
    return out


@pytest.fixture(scope="module")
def blip2(fixtures):
    return fixtures["blip2-opt-2.7b"]


def _own_outputs(loaded, inputs):
    """The model's own forward with eager attention, returning the language model's attentions and the
    vision tower's and Q-Former's attentions (they record them when their configs ask: the top-level call
    does not pass output_attentions down to them)."""
    configs = [loaded.model.qformer.config, loaded.model.vision_model.config]
    if loaded.adapter.encoder_decoder(loaded.model) and "decoder_input_ids" not in inputs:  # T5: a decoder start
        start = loaded.adapter.decoder_start(loaded.model)
        inputs = {**inputs, "decoder_input_ids": torch.tensor([[start]])}
    with attention_implementation(loaded.model, "eager"), torch.no_grad():
        for config in configs:
            config.output_attentions = True
        try:
            return loaded.model(**inputs, output_attentions=True)
        finally:
            for config in configs:
                config.output_attentions = False


@pytest.mark.parametrize("name", NAMES)
def test_query_reads_are_the_models_own_cross_attentions(fixtures, name):
    loaded = fixtures[name]
    inputs = chat_inputs(loaded, PHOTO, QUESTION)
    before = _hook_counts(loaded)
    reads = query_reads(loaded, inputs["pixel_values"], inputs)
    assert _hook_counts(loaded) == before  # every tap removed
    own = torch.stack([a[0] for a in _own_outputs(loaded, inputs).qformer_outputs.cross_attentions])
    assert reads.layers == [0, 2]  # cross_attention_frequency 2 over 4 layers
    assert reads.probs.shape == own.shape == (2, 2, 32, 257)  # (layers, heads, queries, CLS + 16x16)
    torch.testing.assert_close(reads.probs, own.float(), atol=1e-5, rtol=1e-4)
    fused = reads.fused_patches()
    torch.testing.assert_close(fused.sum(-1), torch.ones(32))


def _hook_counts(loaded) -> list[int]:
    """Forward hooks on the cross-attention modules (transformers keeps its own output recorders there)."""
    return [len(m._forward_hooks) for m in loaded.adapter.cross_attention_modules(loaded.model).values()]


def test_hooks_are_removed_when_the_pass_raises(blip2, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    inputs = chat_inputs(blip2, PHOTO, QUESTION)
    before = _hook_counts(blip2)
    monkeypatch.setattr(type(blip2.adapter), "image_features", lambda self, *a, **k: fail())
    with pytest.raises(RuntimeError, match="boom"):
        query_reads(blip2, inputs["pixel_values"], inputs)
    assert _hook_counts(blip2) == before


@pytest.mark.parametrize("name", NAMES)
def test_answer_attention_is_composed_through_the_queries_cross_attention(fixtures, name):
    """The attention map of an answer token = its last-layer attention over the 32 query tokens (heads
    averaged, renormalised) x each query's cross-attention over the patches (heads and cross-attention
    layers averaged, CLS dropped, rows renormalised), all read from the model's own eager outputs. For T5 the
    answer token's attention is its decoder position's cross-attention over the encoder's tokens."""
    loaded = fixtures[name]
    ids = greedy_answer_ids(loaded, PHOTO, QUESTION, max_new_tokens=3)
    seq = answer_sequence(loaded, PHOTO, QUESTION, ids)
    out = _own_outputs(loaded, seq.model_inputs())
    own = out.language_model_outputs
    answer_attentions = own.cross_attentions if loaded.adapter.encoder_decoder(loaded.model) else own.attentions
    for k in range(len(ids)):
        heat = explain(loaded, PHOTO, {"question": QUESTION, "answer_ids": ids, "token_index": k}, "attention")
        pos = seq.prompt_length + k - 1
        lm = answer_attentions[-1][0].float().mean(0)[pos, seq.image_positions]  # (32,)
        cross = torch.stack([a[0] for a in out.qformer_outputs.cross_attentions]).float().mean((0, 1))[:, 1:]
        cross = cross / cross.sum(-1, keepdim=True)  # (32, 256)
        expected = ((lm / lm.sum()) @ cross).reshape(16, 16).double().numpy()
        assert heat.values.shape == (16, 16)
        assert abs(heat.values - expected).max() < 1e-5
    assert seq.image_positions.tolist() == list(range(32))  # the processor puts the queries first


@pytest.mark.parametrize("method", ["rollout", "relevancy"])
def test_rollout_and_relevancy_run_through_the_q_former(blip2, method):
    ids = greedy_answer_ids(blip2, PHOTO, QUESTION, max_new_tokens=2)
    heat = explain(blip2, PHOTO, {"question": QUESTION, "answer_ids": ids, "token_index": 0}, method)
    assert heat.values.shape == (16, 16) and heat.values.min() >= 0 and heat.values.sum() > 0
    assert heat.params["rule"] == QFORMER_RULE
    with pytest.raises(ValueError, match="Q-Former"):
        explain(blip2, PHOTO, {"question": QUESTION, "answer_ids": ids, "token_index": 0}, "relevancy",
                through_vision=True)


def test_cross_relevancy_skips_layers_without_cross_attention_and_pads_query_rows():
    """A layer with no cross-attention changes only the text side; cross-attention of the first rows equals
    a full cross-attention whose other rows are zero."""
    torch.manual_seed(0)
    vision = [(torch.rand(2, 5, 5).softmax(-1), torch.randn(2, 5, 5))]
    self1, self2 = (torch.rand(2, 4, 4).softmax(-1), torch.randn(2, 4, 4)), (torch.rand(2, 4, 4).softmax(-1),
                                                                             torch.randn(2, 4, 4))
    cross_rows = (torch.rand(2, 3, 5).softmax(-1), torch.randn(2, 3, 5))
    padded = (torch.cat([cross_rows[0], torch.zeros(2, 1, 5)], 1), torch.cat([cross_rows[1], torch.zeros(2, 1, 5)], 1))
    zero = (torch.zeros(2, 4, 5), torch.zeros(2, 4, 5))
    a = cross_modal_relevancy(vision, [(self1, cross_rows), (self2, None)])
    b = cross_modal_relevancy(vision, [(self1, padded), (self2, zero)])
    torch.testing.assert_close(a, b)
    assert a[:3].abs().sum() > 0


def test_query_maps_view(fixtures, blip2):
    maps = query_maps(blip2, PHOTO)
    assert maps.per_layer.shape == (2, 32, 16, 16) and maps.fused.shape == (32, 16, 16)
    assert abs(maps.fused.sum((1, 2)) - 1).max() < 1e-6
    assert ((maps.spread >= 1) & (maps.spread <= 256)).all() and ((maps.focus >= 0) & (maps.focus <= 1)).all()
    assert 0 < maps.overlap < 0.999  # sharpened: the queries read different patches
    heat = maps.heatmap(3, layer=2)
    assert heat.values.shape == (16, 16) and abs(heat.values.sum() - 1) < 1e-6
    with pytest.raises(ValueError, match="no cross-attention"):
        maps.heatmap(3, layer=1)
    data = maps.to_json()
    assert len(data["queries"]) == 32 and data["layers"] == [0, 2] and "32 queries over 256 patches" in data["summary"]
    # a query's peak is where its fused map is largest
    q = data["queries"][5]
    r, c = q["peak"]
    assert maps.fused[5, r, c] == maps.fused[5].max()


def test_instructblip_queries_read_the_instruction_blip2_queries_do_not(fixtures, blip2):
    inst = fixtures["instructblip-vicuna-7b"]
    a, b = query_maps(inst, PHOTO, "What is the man wearing?"), query_maps(inst, PHOTO, "Describe the photograph.")
    assert abs(a.fused - b.fused).max() > 1e-4
    c, d = query_maps(blip2, PHOTO, "What is the man wearing?"), query_maps(blip2, PHOTO, "Describe the photograph.")
    assert abs(c.fused - d.fused).max() == 0


def test_prompts(fixtures, blip2):
    assert prompt_for(blip2, "What is it?") == "Question: What is it? Answer:"
    assert prompt_for(blip2, "And the colour?", [Turn("What is it?", "a man")]) == \
        "Question: What is it? Answer: a man. Question: And the colour? Answer:"
    inst = fixtures["instructblip-vicuna-7b"]
    assert prompt_for(inst, "Describe the photograph.") == "Describe the photograph."
    with pytest.raises(ValueError, match="one instruction at a time"):
        prompt_for(inst, "More?", [Turn("Describe it.", "a man")])
    ids = chat_inputs(blip2, PHOTO, QUESTION)["input_ids"][0]
    assert int((ids == blip2.model.config.image_token_id).sum()) == 32


def test_unsupported_q_former_checkpoints_are_refused(blip2):
    import transformers as tf

    t5 = tf.Blip2Config(text_config={"model_type": "t5"})
    adapter_for(t5)  # T5's decoder cross-attention is followed
    mt5 = tf.Blip2Config(text_config={"model_type": "mt5"})
    with pytest.raises(UnsupportedModel, match="encoder-decoder of type 'mt5'"):
        adapter_for(mt5)

    class OldProcessor:  # a revision from before transformers' image tokens
        num_query_tokens = None

    with pytest.raises(UnsupportedModel, match="predates the image tokens"):
        blip2.adapter.check_loaded(blip2.model, OldProcessor())

    class TemplateWithoutQueries:  # no num_query_tokens, and a chat template that writes no image tokens
        num_query_tokens = None
        tokenizer = blip2.processor.tokenizer

    before = blip2.processor.tokenizer.chat_template
    blip2.processor.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    try:
        with pytest.raises(UnsupportedModel, match="writes 0 image tokens"):
            blip2.adapter.check_loaded(blip2.model, TemplateWithoutQueries())
    finally:
        blip2.processor.tokenizer.chat_template = before


def test_studio_query_maps_view(blip2, tmp_path):
    import gradio as gr

    from studio.inside_tab import query_maps as view

    path = tmp_path / "photo.png"
    PHOTO.save(path)
    gallery, summary, one, data = view(str(path), blip2.source, "", 3, 2)
    assert Image.open(gallery).size[0] > 800 and Image.open(one).size[0] > 200
    assert "32 queries over 256 patches" in summary and len(data["queries"]) == 32
    with pytest.raises(gr.Error, match="no Q-Former"):
        view(str(path), "shapes-clip")
    with pytest.raises(gr.Error, match="no cross-attention"):
        view(str(path), blip2.source, "", 0, 1)


def test_interventions_refuse_regions_of_queries_that_read_the_whole_image(blip2):
    from mmie_core.explain import make_subject
    from mmie_core.interventions import knockout, knockout_map

    ids = greedy_answer_ids(blip2, PHOTO, QUESTION, max_new_tokens=2)
    subject = make_subject(blip2, PHOTO, {"question": QUESTION, "answer_ids": ids, "token_index": 0})
    with pytest.raises(ValueError, match="Q-Former queries"):
        knockout(subject, keys={"cells": [(0, 0)]})
    with pytest.raises(ValueError, match="Q-Former queries"):
        knockout_map(subject, window=4)
    per_query = knockout_map(subject)  # each query's own drop, spread over what it read
    assert per_query.values.shape == (16, 16) and per_query.values.any()


def test_shapes_blip2_recipe_builds_a_chat_model_whose_template_writes_the_queries(tmp_path):
    """The shapes-blip2 recipe: shapes-clip's tower copied into BLIP-2's (layers equal), the chat template
    writes the 32 query tokens inside the first user turn exactly as training encodes chats, and the model
    loads as the blip2 family with its chat prompt and answer maps through the queries."""
    from mmie_core.chat import answer_token_maps, user_message
    from mmie_core.shapes.recipes import QFormerRecipe, build_blip2, encode_chat
    from mmie_core.shapes.world import make_scene
    from transformers import CLIPModel

    model, processor = build_blip2(QFormerRecipe())
    clip = CLIPModel.from_pretrained("assets/models/shapes-clip", local_files_only=True).vision_model
    x = torch.randn(2, 65, clip.config.hidden_size)
    with torch.no_grad():  # one transformer layer computes the same function in both towers
        ours = model.vision_model.encoder.layers[1](x)
        theirs = clip.encoder.layers[1](x, attention_mask=None, causal_attention_mask=None)
    ours, theirs = (t[0] if isinstance(t, tuple) else t for t in (ours, theirs))
    assert torch.allclose(ours, theirs, atol=1e-5)

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.family == "blip2"
    prompt = prompt_for(loaded, "what color is the circle?")
    ids = loaded.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    encoded, _, _ = encode_chat(loaded.processor.tokenizer, [("what color is the circle?", "red")], 32)
    assert ids == encoded[: len(ids)] and ids.count(loaded.model.config.image_token_id) == 32
    # a second turn carries the history and no second image
    again = prompt_for(loaded, "how many shapes are there?", [Turn("what color is the circle?", "red")])
    assert again.startswith(prompt) and loaded.processor.tokenizer(again)["input_ids"].count(
        loaded.model.config.image_token_id) == 32
    image = make_scene(5, n_objects=3).render(64)
    answer = loaded.processor.tokenizer(" red", add_special_tokens=False)["input_ids"]
    maps = answer_token_maps(loaded, image, "what color is the circle?", answer)
    assert maps.attention.shape == (1, 8, 8) and (maps.attention >= 0).all() and float(maps.attention.sum()) > 0
    assert user_message("?")["content"][0] == {"type": "image"}


# --------------------------------------------------------------------------- InstructBLIP Flan-T5


@pytest.fixture(scope="module")
def t5(fixtures):
    return fixtures[T5]


def test_t5_answers_are_the_decoders_and_its_score_is_the_models_own_logit(t5):
    """The answer is what the T5 decoder generates after its start token (the encoder reads the 32 query tokens
    and the instruction); the explained score is the model's own logit at the answer token's decoder position."""
    head, embeddings = t5.model.get_output_embeddings().weight, t5.model.get_input_embeddings().weight
    assert head.data_ptr() != embeddings.data_ptr() and embeddings[0].norm() > 0  # untied, as in Flan-T5
    inputs = chat_inputs(t5, PHOTO, QUESTION)
    ids = inputs["input_ids"][0]
    assert ids[:32].tolist() == [t5.model.config.image_token_id] * 32  # the queries, then the instruction
    with torch.no_grad():
        raw = t5.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert raw[0, 0].item() == t5.adapter.decoder_start(t5.model) == 0  # T5 starts from <pad>
    answer = greedy_answer_ids(t5, PHOTO, QUESTION, max_new_tokens=3)
    assert answer == raw[0, 1:].tolist() and len(answer) == 3
    assert answer_batch(t5, [PHOTO], [QUESTION], max_new_tokens=3) == [t5.processor.decode(answer).strip()]
    seq = answer_sequence(t5, PHOTO, QUESTION, answer)
    assert seq.decoder_input_ids.tolist() == [[0, *answer]] and torch.equal(seq.input_ids, inputs["input_ids"])
    assert seq.target_ids is seq.decoder_input_ids and seq.prompt_length == 1
    with torch.no_grad():
        own = t5.model(**seq.model_inputs()).logits[0].float()  # (1 + answer, vocab)
        for k in range(len(answer)):
            ours = t5.adapter.answer_logits(t5, seq.model_inputs(), seq.prompt_length + k - 1)[0]
            torch.testing.assert_close(ours, own[k], atol=1e-4, rtol=1e-4)
            assert int(own[k].argmax()) == answer[k]  # greedy: each position predicts the next answer token


def test_t5_maps_recorded_during_generation_equal_the_analysis_pass(t5):
    state = None
    for state in stream_answer(t5, PHOTO, QUESTION, settings=GenerationSettings(4), record_maps=True):
        pass
    assert len(state.token_ids) == 4
    recorded = generation_token_maps(t5, PHOTO, QUESTION, state)
    analysed = answer_token_maps(t5, PHOTO, QUESTION, state.token_ids)
    assert recorded is not None and recorded.heatmaps[0].params["pass"] == "generation"
    assert abs(recorded.attention - analysed.attention).max() < 1e-5
    # image reliance: the share of each answer token's cross-attention on the query tokens rather than the
    # instruction's tokens
    assert all(0 < r < 1 for r in analysed.image_reliance)
    assert analysed.attention.shape == (4, 16, 16)


def _rollout_matrix(attentions) -> torch.Tensor:
    return torch.stack([a[0] for a in attentions])


def test_t5_rollout_chains_the_encoder_decoder_rules_over_the_models_own_attentions(t5):
    """Rollout of an InstructBLIP Flan-T5 answer token, recomputed from the model's own eager attentions: the
    encoder-decoder rules over the T5 encoder's self-attention and the decoder's self- and cross-attention, read
    at the token's decoder position on the query tokens, times the same rules over the vision tower and the
    Q-Former (queries x patches)."""
    ids = greedy_answer_ids(t5, PHOTO, QUESTION, max_new_tokens=2)
    seq = answer_sequence(t5, PHOTO, QUESTION, ids)
    out = _own_outputs(t5, seq.model_inputs())
    lm = out.language_model_outputs
    pairs = lambda attentions: [(a[0], None) for a in attentions]  # noqa: E731
    language = cross_modal_relevancy(pairs(lm.encoder_attentions),
                                     list(zip(pairs(lm.decoder_attentions), pairs(lm.cross_attentions))))
    qformer = out.qformer_outputs
    cross_of = dict(zip(t5.adapter.cross_attention_modules(t5.model), qformer.cross_attentions))
    selfs = [a for a in qformer.attentions if a.shape[-1] == a.shape[-2]]  # (its `attentions` holds both kinds)
    assert len(selfs) == 4 and sorted(cross_of) == [0, 2]
    chain = cross_modal_relevancy(pairs(out.vision_outputs.attentions),
                                  [((a[0], None), None if i not in cross_of else (cross_of[i][0], None))
                                   for i, a in enumerate(selfs)])[:32, 1:]  # queries x patches
    for k in range(len(ids)):
        heat = explain(t5, PHOTO, {"question": QUESTION, "answer_ids": ids, "token_index": k}, "rollout")
        values = language[seq.prompt_length + k - 1, seq.image_positions] @ chain
        expected = (values / values.sum()).reshape(16, 16).numpy()
        assert heat.params["rule"].startswith(ENCODER_DECODER_QFORMER_RULE)
        assert abs(heat.values - expected).max() < 1e-6


def test_t5_relevancy_and_every_method_runs(t5):
    ids = greedy_answer_ids(t5, PHOTO, QUESTION, max_new_tokens=2)
    target = {"question": QUESTION, "answer_ids": ids, "token_index": 1}
    heat = explain(t5, PHOTO, target, "relevancy")
    assert heat.params["rule"] == ENCODER_DECODER_QFORMER_RULE
    assert heat.values.shape == (16, 16) and heat.values.min() >= 0 and heat.values.sum() > 0
    for method, params in [("integrated_gradients", {"steps": 4}), ("saliency", {}), ("gradcam", {}),
                           ("occlusion", {"window": 4, "stride": 4})]:
        heat = explain(t5, PHOTO, target, method, **params)
        assert heat.values.shape == (16, 16) and abs(heat.values).sum() > 0, method
    with pytest.raises(ValueError, match="discard_ratio"):
        explain(t5, PHOTO, target, "rollout", discard_ratio=0.5)


def test_t5_prompts_and_interventions(t5):
    assert prompt_for(t5, "Describe the photograph.") == "Describe the photograph."
    with pytest.raises(ValueError, match="one instruction at a time"):
        prompt_for(t5, "More?", [Turn("Describe it.", "a man")])
    from mmie_core.explain import make_subject
    from mmie_core.interventions import knockout

    ids = greedy_answer_ids(t5, PHOTO, QUESTION, max_new_tokens=1)
    subject = make_subject(t5, PHOTO, {"question": QUESTION, "answer_ids": ids, "token_index": 0})
    with pytest.raises(ValueError, match="cross-attention"):
        knockout(subject)
    assert "encoder-decoder" in t5.adapter.language_tokens_note(t5, t5.adapter.vision_grid(t5), 32)


def test_t5_through_the_studios_chat_alt_text_and_token_heatmaps(t5, tmp_path):
    """The Chat and Alt text tabs' functions on the InstructBLIP Flan-T5 fixture (loaded from its folder, as a
    Hub id would be): the answer streams, its chips carry maps recorded during generation, and every chip can
    be explained by relevancy through the T5 decoder and the Q-Former."""
    from studio.alt_text_tab import alt_text
    from studio.chat_tab import chat, explain_token

    path = tmp_path / "photo.png"
    PHOTO.save(path)
    *_, last = chat(str(path), QUESTION, [], t5.source, 3)
    messages, _, chips, _, answer, _ = last
    assert messages[-1]["content"].strip() and 0 < len(answer["token_ids"]) <= 3
    assert answer["heatmaps"][0]["params"]["pass"] == "generation"
    png, data, _ = explain_token(str(path), answer, chips["value"], t5.source, "relevancy")
    assert Image.open(png).size[0] > 100 and data["params"]["rule"] == ENCODER_DECODER_QFORMER_RULE
    text, summary, chips, data = alt_text(str(path), "concise", "", 125, t5.source)
    from mmie_core.alt_text import instruction

    assert data["question"] == instruction(t5, "concise")  # InstructBLIP takes the style's instruction as it is
    assert len(data["token_ids"]) > 0 and len(chips["choices"]) == len(data["token_ids"])


def test_t5_row_taps_keep_the_position_bias_and_the_causal_mask(t5):
    """Row taps on T5 attention (sdpa with a relative position bias): the decoder's self-attention rows, whose
    causal mask the model leaves implicit, and its cross-attention rows equal the model's own eager attentions."""
    from mmie_core.attention import RowRecorder, register_rows_implementation

    ids = greedy_answer_ids(t5, PHOTO, QUESTION, max_new_tokens=3)
    seq = answer_sequence(t5, PHOTO, QUESTION, ids)
    _, decoder_self, cross = t5.adapter.encoder_decoder_modules(t5.model)
    rows = list(range(seq.target_ids.shape[1]))
    own = _own_outputs(t5, seq.model_inputs()).language_model_outputs
    for modules, attentions in ((decoder_self, own.decoder_attentions), (cross, own.cross_attentions)):
        with attention_implementation(t5.model, register_rows_implementation()), torch.no_grad(), RowRecorder(modules, rows) as rec:
            t5.model(**seq.model_inputs())
        for i in modules:
            torch.testing.assert_close(rec.maps[i], attentions[i].float(), atol=1e-6, rtol=1e-5)


def test_t5_segment_ablation_is_refused_with_the_alternative(t5):
    import numpy as np

    from mmie_core.segments import segment_ablation

    ids = greedy_answer_ids(t5, PHOTO, QUESTION, max_new_tokens=1)
    with pytest.raises(ValueError, match="encoder-decoder.*occlusion"):
        segment_ablation(t5, PHOTO, QUESTION, ids, np.zeros((PHOTO.height, PHOTO.width), int))
