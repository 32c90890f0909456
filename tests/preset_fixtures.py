"""Tiny random-weight models at the true geometry of each Hub preset.

Each folder under tests/fixtures/presets/ holds the config, processor files and chat template of one
Hub checkpoint, transcribed from the public checkpoint with only widths, depths, head counts and the
vocabulary shrunk (see tests/fixtures/presets/README.md for every changed value and its source).
`build_preset` turns such a folder into a loadable model folder: a small word-level tokenizer that
holds the checkpoint's special and marker tokens, the processor loaded from the fixture's own files
(so image size, crop or squash, tiles, patch and merge sizes, token counts are the checkpoint's),
and a random-weight model of the real architecture class.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PRESET_FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "presets"

# English words every fixture tokenizer knows, so that the studio's prompts tokenise. The ShapesWorld
# words come first (mmie_core's own prompts use them), then words that photo prompts and the chat
# templates need ("you are a helpful assistant", "caption en", "answer en ...").
_EXTRA_WORDS = """
cat cats dog dogs person people man woman photograph answer question caption en briefly brief
user assistant system helpful are picture video wearing uniform portrait face
""".split()
PUNCTUATION = [".", ",", "?", "!", ":", ";", "'", '"', "-", "(", ")"]


def _words() -> list[str]:
    from mmie_core.shapes.vocab import vocabulary

    words = {t[1:] for t in vocabulary() if t.startswith("▁")} | set(_EXTRA_WORDS)
    return [f"▁{w}" for w in sorted(words)] + PUNCTUATION


@dataclass(frozen=True)
class TokenizerSpec:
    """Layout of a fixture's word-level vocabulary: `head` tokens take ids 0.., then the words, then
    `tail`. Special tokens sit where the real tokenizer keeps them when those ids are small (Gemma's
    <pad>/<eos>/<bos>/<unk> at 0-3, SmolLM's <|endoftext|>/<|im_start|>/<|im_end|> at 0-2, BERT's
    [PAD] 0 and [UNK]/[CLS]/[SEP]/[MASK] 100-103), and after the words, in the real order, when the
    real ids are at the end of a large vocabulary (Qwen's, CLIP's, the Idefics3 markers)."""

    head: tuple[str, ...]
    tail: tuple[str, ...]
    unk: str
    model_max_length: int
    pad: str | None = None
    bos: str | None = None
    eos: str | None = None
    cls: str | None = None
    sep: str | None = None
    mask: str | None = None
    template: str | None = None  # post-processor, e.g. "$A </s>"
    newline: bool = False  # "\n" as its own token (chat templates and PaliGemma's prompt end with it)
    extra_special: dict[str, str] = field(default_factory=dict)  # e.g. {"image_token": "<image>"}
    added_special: tuple[str, ...] = ()  # tokens of `tail`/`head` that are special (never split)
    pad_words_to: int | None = None  # BERT: [unusedN] fill ids up to [UNK]


_QWEN = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
         "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
         "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
_ROWS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
_PALIGEMMA_EXTRA = tuple(f"<loc{i:0>4}>" for i in range(1024)) + tuple(f"<seg{i:0>3}>" for i in range(128))

_CLIP = TokenizerSpec(head=("<unk>",), tail=("<|startoftext|>", "<|endoftext|>"), unk="<unk>", model_max_length=77,
                      pad="<|endoftext|>", bos="<|startoftext|>", eos="<|endoftext|>",
                      template="<|startoftext|> $A <|endoftext|>")
_LLAVA = TokenizerSpec(head=("<unk>",), tail=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"), unk="<unk>",
                       model_max_length=32768, pad="<|endoftext|>", eos="<|im_end|>", newline=True,
                       extra_special={"image_token": "<image>"})

TOKENIZERS: dict[str, TokenizerSpec] = {
    "clip-vit-base-patch32": _CLIP,
    "clip-vit-base-patch16": _CLIP,
    "siglip-base-patch16-224": TokenizerSpec(head=("<pad>", "</s>", "<unk>"), tail=(), unk="<unk>",
                                             model_max_length=64, pad="</s>", eos="</s>", template="$A </s>"),
    "siglip2-base-patch16-224": TokenizerSpec(head=("<pad>", "<eos>", "<bos>", "<unk>"), tail=(), unk="<unk>",
                                              model_max_length=64, pad="<pad>", bos="<bos>", eos="<eos>",
                                              template="$A <eos>"),
    "llava-interleave-qwen-0.5b": _LLAVA,
    "llava-interleave-qwen-0.5b-variant": _LLAVA,
    "smolvlm-256m-instruct": TokenizerSpec(
        head=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        tail=("<global-img>", *_ROWS, "<fake_token_around_image>", "<image>", "<end_of_utterance>"),
        unk="<|endoftext|>", model_max_length=8192, pad="<|im_end|>", bos="<|im_start|>", eos="<end_of_utterance>",
        newline=True),
    "qwen2-vl-2b-instruct": TokenizerSpec(head=("<unk>",), tail=_QWEN, unk="<unk>", model_max_length=32768,
                                          pad="<|endoftext|>", eos="<|im_end|>", newline=True,
                                          extra_special={"image_token": "<|image_pad|>",
                                                         "video_token": "<|video_pad|>"}),
    "paligemma-3b-mix-224": TokenizerSpec(head=("<pad>", "<eos>", "<bos>", "<unk>"),
                                          tail=(*_PALIGEMMA_EXTRA, "<image>"), unk="<unk>", model_max_length=8192,
                                          pad="<pad>", bos="<bos>", eos="<eos>", newline=True,
                                          added_special=("<image>",)),
    "blip-image-captioning-base": TokenizerSpec(head=("[PAD]",), tail=("[DEC]", "[ENC]"), unk="[UNK]",
                                                model_max_length=512, pad="[PAD]", bos="[DEC]", cls="[CLS]",
                                                sep="[SEP]", mask="[MASK]", template="[CLS] $A [SEP]",
                                                pad_words_to=100),
}

# Q-Former models: BLIP-2 OPT (GPT-2 byte-level BPE of OPT, "</s>" prepended, "\n" ends an answer) and
# InstructBLIP Vicuna (Llama's SentencePiece ids <unk> 0, <s> 1, </s> 2, then [PAD] and <image> at the end);
# InstructBLIP's Q-Former has its own BERT tokenizer with [DEC] added (QFORMER_TOKENIZERS). The processors add
# "<image>" themselves (as an AddedToken; a tokenizer attribute `image_token` would break them): it is kept
# as the last, special token, where it already is.
TOKENIZERS["blip2-opt-2.7b"] = TokenizerSpec(head=("<s>", "<pad>", "</s>", "<unk>"), tail=("<image>",), unk="<unk>",
                                             model_max_length=2048, pad="<pad>", bos="</s>", eos="</s>",
                                             template="</s> $A", newline=True)
TOKENIZERS["instructblip-vicuna-7b"] = TokenizerSpec(head=("<unk>", "<s>", "</s>"), tail=("[PAD]", "<image>"),
                                                     unk="<unk>", model_max_length=2048, pad="[PAD]", bos="<s>",
                                                     eos="</s>", template="<s> $A", newline=True)
# InstructBLIP Flan-T5: T5's SentencePiece ids <pad> 0 (also the decoder's start), </s> 1, <unk> 2, "</s>" appended
# to every text, no bos, no newline token (T5 folds it into a space); <image> after the words.
TOKENIZERS["instructblip-flan-t5-xl"] = TokenizerSpec(head=("<pad>", "</s>", "<unk>"), tail=("<image>",), unk="<unk>",
                                                      model_max_length=512, pad="<pad>", eos="</s>", template="$A </s>")
_QFORMER_BERT = TokenizerSpec(head=("[PAD]",), tail=("[DEC]",), unk="[UNK]", model_max_length=512, pad="[PAD]",
                              bos="[DEC]", cls="[CLS]", sep="[SEP]", mask="[MASK]", template="[CLS] $A [SEP]",
                              pad_words_to=100)
QFORMER_TOKENIZERS: dict[str, TokenizerSpec] = {"instructblip-vicuna-7b": _QFORMER_BERT,
                                                "instructblip-flan-t5-xl": _QFORMER_BERT}

# The preset each fixture stands for (mmie_core.models.PRESETS); the variant is a second reading of
# the LLaVA-Interleave checkpoint (see README.md).
PRESET_OF = ({name: name for name in TOKENIZERS}
             | {"llava-interleave-qwen-0.5b-variant": "llava-interleave-qwen-0.5b"})


def fixture_names() -> list[str]:
    """Every fixture folder (one per non-embedded preset, plus the LLaVA-Interleave variant)."""
    return sorted(p.name for p in PRESET_FIXTURES_DIR.iterdir() if (p / "config.json").is_file())


def vocabulary(name: str, spec: TokenizerSpec | None = None) -> list[str]:
    """The fixture tokenizer's tokens in id order (of `spec` when given)."""
    spec = spec or TOKENIZERS[name]
    words = _words()
    head = list(spec.head)
    if spec.pad_words_to:  # BERT: [PAD], [unused0..98], then [UNK] [CLS] [SEP] [MASK] at 100-103
        head += [f"[unused{i}]" for i in range(spec.pad_words_to - len(head))]
        head += [spec.unk, spec.cls, spec.sep, spec.mask]
    newline = ["\n"] if spec.newline else []
    return head + words + newline + list(spec.tail)


def build_tokenizer(name: str, spec: TokenizerSpec | None = None):
    """The fixture's word-level fast tokenizer (lower-cased words, punctuation apart); `spec` for a second
    tokenizer of the same fixture (InstructBLIP's Q-Former)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    spec = spec or TOKENIZERS[name]
    tokens = vocabulary(name, spec)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=spec.unk))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"[ \t]+"), " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    words = set(_words())
    plain = [t for t in tokens if t.startswith(("<loc", "<seg"))]  # PaliGemma adds these as ordinary tokens
    specials = [t for t in tokens if t not in words and t != "\n" and not t.startswith("[unused") and t not in plain]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in plain])
    if spec.newline:  # the normaliser would fold "\n" into a space; keep it a token of its own
        tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    if spec.template:
        named = [t for t in spec.template.split() if t != "$A"]
        tok.post_processor = processors.TemplateProcessing(single=spec.template,
                                                           special_tokens=[(t, vocab[t]) for t in named])
    kwargs = {k: getattr(spec, k) for k in ("pad", "bos", "eos", "cls", "sep", "mask") if getattr(spec, k)}
    kwargs = {f"{k}_token": v for k, v in kwargs.items()}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=spec.unk,
                                        model_max_length=spec.model_max_length, **kwargs,
                                        **({"extra_special_tokens": dict(spec.extra_special)}
                                           if spec.extra_special else {}))
    assert len(tokenizer) == len(tokens), (name, len(tokenizer), len(tokens))
    return tokenizer


# --------------------------------------------------------------------------- building

_MODEL_CLASSES = {
    "clip": "CLIPModel",
    "siglip": "SiglipModel",
    "llava": "LlavaForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "paligemma": "PaliGemmaForConditionalGeneration",
    "blip": "BlipForConditionalGeneration",
    "blip-2": "Blip2ForConditionalGeneration",
    "instructblip": "InstructBlipForConditionalGeneration",
}


def _token_ids(config, tokenizer) -> dict[str, int]:
    """The special-token ids of the fixture config that must point at the right tokenizer entries."""
    tid = tokenizer.convert_tokens_to_ids
    mt = config.model_type
    if mt == "qwen2_vl":
        return {"image_token_id": tid("<|image_pad|>"), "video_token_id": tid("<|video_pad|>"),
                "vision_start_token_id": tid("<|vision_start|>"), "vision_end_token_id": tid("<|vision_end|>"),
                "vision_token_id": tid("<|vision_pad|>")}
    if mt in ("llava", "idefics3", "smolvlm", "paligemma", "blip-2", "instructblip"):
        return {"image_token_id": tid("<image>")}
    return {}


def _eos_ids(config, tokenizer) -> list[int]:
    """The end-of-turn tokens generate() stops at."""
    tid = tokenizer.convert_tokens_to_ids
    if config.model_type == "qwen2_vl":
        return [tid("<|im_end|>"), tid("<|endoftext|>")]
    if config.model_type in ("idefics3", "smolvlm"):
        return [tid("<end_of_utterance>"), tid("<|im_end|>")]
    if config.model_type == "llava":
        return [tid("<|im_end|>")]
    if config.model_type == "paligemma":
        return [tid("<eos>")]
    if config.model_type == "blip":
        return [tid("[SEP]")]
    if config.model_type == "blip-2":
        return [config.text_config.eos_token_id]  # "\n" (the conversion script's eos for OPT)
    if config.model_type == "instructblip":
        return [tid("</s>")]  # Vicuna's and T5's end of sequence
    return []


def build_preset(name: str, out_dir) -> str:
    """Build the fixture `name` into `out_dir` (created if missing): random weights (seed 0) of the
    real architecture class, the processor read from the fixture's own files with the fixture
    tokenizer, saved with save_pretrained. Returns the folder, loadable by mmie_core.models.load_model."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    src = PRESET_FIXTURES_DIR / name
    if not (src / "config.json").is_file():
        raise ValueError(f"No preset fixture {name!r}; known: {', '.join(fixture_names())}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"fixture-{name}-") as staging:
        for f in src.iterdir():
            if f.is_file() and f.suffix in (".json", ".jinja"):
                shutil.copy(f, staging)
        tokenizer = build_tokenizer(name)
        tokenizer.save_pretrained(staging)
        if name in QFORMER_TOKENIZERS:  # InstructBlipProcessor reads it from this subfolder
            build_tokenizer(name, QFORMER_TOKENIZERS[name]).save_pretrained(Path(staging) / "qformer_tokenizer")
        # the checkpoint's own processor files, read by the checkpoint's own processor classes
        processor = AutoProcessor.from_pretrained(staging, local_files_only=True)
        config = AutoConfig.from_pretrained(staging, local_files_only=True)
    for key, expected in _token_ids(config, processor.tokenizer).items():
        got = getattr(config, key)
        if got != expected:
            raise ValueError(f"{name}: config.{key} = {got} but the fixture tokenizer has it at {expected}")
    torch.manual_seed(0)
    model = getattr(transformers, _MODEL_CLASSES[config.model_type])(config).eval()
    text = fixture_json(name, "config.json").get("text_config", {})
    if text.get("is_encoder_decoder") and text.get("tie_word_embeddings") is False:
        # T5Config ties the head to the embeddings whatever it is given; Flan-T5 keeps them apart: a head of its
        # own, which loading keeps (its saved values differ from the embeddings')
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(torch.randn_like(head.weight) * config.initializer_range)
    eos = _eos_ids(config, processor.tokenizer)
    if eos:
        tok = processor.tokenizer
        model.generation_config = GenerationConfig(
            eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, do_sample=False)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def fixture_json(name: str, filename: str) -> dict:
    """A JSON file of a fixture folder, parsed."""
    return json.loads((PRESET_FIXTURES_DIR / name / filename).read_text())
