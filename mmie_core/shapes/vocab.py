"""The word-level tokenizer and chat template shared by the three ShapesWorld models.

Words carry a leading "▁" (Metaspace), punctuation stands alone, so decoding gives back
ordinary text ("a red circle, a blue square."). Unknown words map to `<unk>`.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .world import COLORS, NUMBER_WORDS, POSITIONS, SHAPES, SIZES

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
IMAGE = "<image>"
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE, USER, ASSISTANT, END]
PUNCTUATION = [".", ",", "?", "!", ":", ";", "'", '"', "-", "(", ")"]

# Everything the questions, answers, captions, alt texts and instructions use, plus common
# words a user may type, so that plain English questions mostly stay in vocabulary.
_WORDS = """
a an the of in on at and or is are there what which where how many much color colour shape
object objects shapes image picture scene photo this that it its to for with without one two three
zero four yes no not any some all left right top bottom middle center centre above below next
describe write alt text short detailed concise functional caption give me please can you see
do does show shows background light white empty small large big tiny size thing things here
tell about who why when word words colors colours circle circles square squares triangle
triangles diamond diamonds sentence page context used as link button icon logo describing
""".split()


def vocabulary() -> list[str]:
    words = set(_WORDS)
    for phrase in [*COLORS, *SHAPES, *SIZES, *NUMBER_WORDS, *POSITIONS]:
        words.update(phrase.split())
    words.update(f"{s}s" for s in SHAPES)
    return SPECIAL_TOKENS + PUNCTUATION + [f"▁{w}" for w in sorted(words)]


# A LLaVA-style template: the image placeholder goes where the user put it in the message.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' }}{% else %}{{ '<|assistant|>' }}{% endif %}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def chat_template(image_tokens: int = 1) -> str:
    """CHAT_TEMPLATE writing `image_tokens` image placeholders where the image goes (1: the processor expands
    it, as LlavaProcessor does; more: the template writes every image token itself, for a processor that
    does not, such as shapes-blip2's, whose Q-Former gives a fixed number of query tokens)."""
    return CHAT_TEMPLATE.replace("{{ '<image>' }}", "{{ '<image>' * %d }}" % image_tokens)


def build_tokenizer(*, add_bos_eos: bool, model_max_length: int) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over `vocabulary()`.

    add_bos_eos: wrap every encoded text in <s> ... </s> (the CLIP/SigLIP text towers pool on
    the end token); the VLM adds them through its chat template instead.
    """
    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(SPECIAL_TOKENS)
    if add_bos_eos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=model_max_length,
        extra_special_tokens={"image_token": IMAGE},
    )
