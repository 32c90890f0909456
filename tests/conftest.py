"""Shared fixtures: tiny random-weight models built from configs in code, saved to temp folders."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _save(model, processor, tmp_path_factory, name: str) -> str:
    """Save a tiny model and its processor to a fresh temp folder, loadable like a Hub checkout."""
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def _save_tiny_dual_encoder(family: str, tmp_path_factory) -> str:
    """A tiny CLIP or SigLIP (image 32, patch 8, width 32, 2 layers) with the ShapesWorld tokenizer."""
    from mmie_core.shapes.recipes import ContrastiveRecipe, build_contrastive

    recipe = ContrastiveRecipe(family=family, image_size=32, patch_size=8, hidden_size=32,
                               vision_layers=2, text_layers=2, heads=2, projection_dim=16)
    model, processor = build_contrastive(recipe)
    return _save(model, processor, tmp_path_factory, f"tiny-{family}")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    return _save_tiny_dual_encoder("clip", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
    return _save_tiny_dual_encoder("siglip", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, tiny_clip_dir):
    from mmie_core.shapes.recipes import VLMRecipe, build_vlm

    recipe = VLMRecipe(clip_dir=tiny_clip_dir, text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64)
    model, processor = build_vlm(recipe)
    return _save(model, processor, tmp_path_factory, "tiny-llava")


@pytest.fixture(scope="session")
def tiny_paligemma_dir(tmp_path_factory):
    """A tiny PaliGemma (SigLIP 32 px / patch 8 -> 16 image tokens first, Gemma with grouped-query
    attention and a bidirectional prefix), with the ShapesWorld tokenizer and no chat template."""
    import torch
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessor, SiglipVisionConfig)

    from mmie_core.shapes.vocab import END, IMAGE, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(add_bos_eos=False, model_max_length=256)
    vision = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)
    text = GemmaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids(END))
    config = PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                             image_token_id=tok.convert_tokens_to_ids(IMAGE), projection_dim=32)
    model = PaliGemmaForConditionalGeneration(config)
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    return _save(model, processor, tmp_path_factory, "tiny-paligemma")


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory):
    """A tiny BLIP captioner (ViT 32 px / patch 8 -> CLS + 4x4 patches; BERT-style decoder with
    cross-attention; [DEC] starts captions, [SEP] ends them) with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models as tmodels, normalizers, pre_tokenizers, processors
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor,
                              PreTrainedTokenizerFast)

    from mmie_core.shapes.vocab import PUNCTUATION, vocabulary

    torch.manual_seed(0)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    words = [w for w in vocabulary() if w.startswith("▁")] + PUNCTUATION
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(tmodels.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(  # BERT-style, as BLIP's generate expects
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]",
                                        model_max_length=64)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=vocab["[DEC]"],
                sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"], pad_token_id=vocab["[PAD]"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, initializer_range=0.02)  # BLIP's default 1e-10 makes every vision token alike
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():  # sharper cross-attention, so that maps localise (random q/k at 0.02 are flat)
        for layer in model.text_decoder.bert.encoder.layer:
            for lin in (layer.crossattention.self.query, layer.crossattention.self.key):
                lin.weight.normal_(0, 0.5)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    return _save(model, processor, tmp_path_factory, "tiny-blip")


def _save_tiny_idefics3(tmp_path_factory, smolvlm: bool) -> str:
    """A tiny Idefics3 (the SmolVLM v1 classes; with `smolvlm`, SmolVLM2's): SigLIP-style tiles of
    32 px / patch 8 (4x4 patches, no CLS), pixel shuffle 2 -> 2x2 = 4 language-model tokens per tile; the processor resizes the longest
    edge to 64 px and cuts 32-px tiles plus one global 32-px view. Word-level tokenizer with the
    processor's marker tokens (<fake_token_around_image>, <row_r_col_c>, <global-img>) and SmolVLM's
    chat template."""
    import torch
    from tokenizers import AddedToken
    import transformers as tf
    from transformers import GenerationConfig, LlamaConfig

    from mmie_core.shapes.vocab import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(add_bos_eos=False, model_max_length=512)
    markers = ["<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>",
               *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]]  # the processor looks up 6x6
    tok.add_special_tokens({"additional_special_tokens": markers})
    tok.add_tokens([AddedToken("\n", normalized=False)])  # rows of tiles end with a newline; the
    # normaliser would fold it into a space and split every word at it
    tok.bos_token, tok.eos_token = "<|im_start|>", "<end_of_utterance>"
    template = (  # SmolVLM's chat template
        "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
        "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
        "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
        "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
    eos = tok.convert_tokens_to_ids("<end_of_utterance>")
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=eos)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    prefix = "SmolVLM" if smolvlm else "Idefics3"
    config = getattr(tf, f"{prefix}Config")(text_config=text.to_dict(), vision_config=vision, scale_factor=2,
                                            image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = getattr(tf, f"{prefix}ForConditionalGeneration")(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    sizes = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    image_processor = getattr(tf, f"{prefix}ImageProcessor")(**sizes)
    videos = {"video_processor": tf.SmolVLMVideoProcessor(**sizes)} if smolvlm else {}  # SmolVLM2 requires one
    processor = getattr(tf, f"{prefix}Processor")(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                                  chat_template=template, **videos)
    return _save(model, processor, tmp_path_factory, f"tiny-{prefix.lower()}")


@pytest.fixture(scope="session")
def tiny_idefics3_dir(tmp_path_factory):
    return _save_tiny_idefics3(tmp_path_factory, smolvlm=False)


@pytest.fixture(scope="session")
def tiny_smolvlm_dir(tmp_path_factory):
    return _save_tiny_idefics3(tmp_path_factory, smolvlm=True)


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tmp_path_factory):
    """A tiny Qwen2-VL: ViT patches of 4 px merged 2 x 2 into one language-model token per 8 x 8 px
    cell; images resized to whole cells with 64 <= H x W <= 4096 px, so the grid follows the image.
    Word-level tokenizer with Qwen's special tokens and its chat template (without the default system
    turn)."""
    import torch
    from tokenizers import AddedToken
    from transformers import (GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from mmie_core.shapes.vocab import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(add_bos_eos=False, model_max_length=512)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_tokens([AddedToken("\n", normalized=False)])
    tok.eos_token = "<|im_end|>"
    tok.image_token, tok.video_token = "<|image_pad|>", "<|video_pad|>"  # what the processor expands
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tid = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=1024, eos_token_id=tid("<|im_end|>"),
                pad_token_id=tok.pad_token_id, bos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]})  # sums to head_dim / 2 = 8
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)  # vision hidden_size = merger output = LM width
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=tid("<|image_pad|>"),
                           video_token_id=tid("<|video_pad|>"), vision_start_token_id=tid("<|vision_start|>"),
                           vision_end_token_id=tid("<|vision_end|>"))
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=tid("<|im_end|>"), pad_token_id=tok.pad_token_id,
                                               do_sample=False)
    size = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=64 * 64)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**size), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(**size), chat_template=template)
    return _save(model, processor, tmp_path_factory, "tiny-qwen2vl")


@pytest.fixture()
def fresh_cache(monkeypatch):
    """An empty model cache for the test, restored afterwards."""
    from mmie_core import models

    cache = models.ModelCache()
    monkeypatch.setattr(models, "MODEL_CACHE", cache)
    return cache


@pytest.fixture(scope="session")
def studio_url():
    """The studio (app.demo, as `python app.py` configures it) served on a free local port."""
    import app
    from studio.app import MAX_FILE_SIZE, configure_queue

    configure_queue(app.demo).launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                                     max_file_size=MAX_FILE_SIZE)
    try:
        yield app.demo.local_url
    finally:
        app.demo.close()


@pytest.fixture(scope="session")
def client(studio_url):
    from gradio_client import Client

    return Client(studio_url, verbose=False)
