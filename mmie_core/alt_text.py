"""Alt text: generation in three styles, post-processing, a checker for existing alt text, and
batches (with a CSV export).

Styles:
- concise: what is in the image, in one short sentence (the default; screen readers read it
  in full, so shorter is kinder);
- detailed: what is where, for images whose layout matters;
- functional: what the image is for on the page (a link or button), built from the page
  context with the concise description after it.

Captioners (BLIP) take no instruction: every style starts from their plain caption (the
functional style still puts the page context first).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image

from .chat import GenerationSettings, stream_answer
from .limits import TimeLimitError, check_deadline
from .models import LoadedModel

STYLES = ("concise", "detailed", "functional")
DEFAULT_MAX_CHARS = 125  # common screen-reader guidance
MAX_CONTEXT_CHARS = 500

# Prompts the embedded ShapesWorld VLM was trained on; Hub models get natural instructions.
_EMBEDDED_PROMPTS = {
    "concise": "write alt text for this image.",
    "detailed": "write detailed alt text for this image.",
    "functional": "write alt text for this image.",
}
_HUB_PROMPTS = {
    "concise": "Write concise alt text for this image in one sentence of at most {limit} characters.",
    "detailed": "Write detailed alt text for this image: the main objects, their colours and where they are.",
    "functional": "Write alt text that says what this image is for on the page, in at most {limit} characters.",
}

_FILLER = re.compile(
    r"^\s*(?:(?:this|the|an?)\s+)?(?:image|picture|photo|photograph|graphic|illustration)\s+"
    r"(?:of|shows|showing|depicts|depicting|contains|containing|with|is of)\s+",
    re.IGNORECASE,
)
_FILLER_START = re.compile(r"^\s*(?:here is|there is|there are|this is)\s+", re.IGNORECASE)
_FILE_NAME = re.compile(r"^\s*[\w\-. ]+\.(?:png|jpe?g|gif|webp|bmp|tiff?|svg|heic)\s*$|^(?:img|dsc|dcim|pxl)[_\-]?\d+",
                        re.IGNORECASE)


def instruction(loaded: LoadedModel, style: str, context: str = "", max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """The request sent to the model for `style`."""
    if style not in STYLES:
        raise ValueError(f"Unknown style {style!r}; choose {', '.join(STYLES)}.")
    if loaded.adapter.captions:  # a captioner takes no instruction: it writes its caption
        return ""
    if loaded.preset is not None and loaded.preset.embedded:
        return _EMBEDDED_PROMPTS[style]
    prompt = _HUB_PROMPTS[style].format(limit=max_chars)
    if context:
        prompt += f" The image appears on a page in this context: {context}"
    return prompt


def clean_alt_text(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Remove filler ("image of", "this image shows"), capitalise, cut at a sentence boundary
    within `max_chars` (or the last whole word), and end with punctuation."""
    if max_chars < 10:
        raise ValueError("The length limit must be at least 10 characters.")
    text = " ".join((text or "").split())
    for _ in range(2):
        text = _FILLER.sub("", text)
        text = _FILLER_START.sub("", text)
    text = text.strip(" ,;:-")
    if not text:
        return ""
    if len(text) > max_chars:
        window = text[:max_chars]
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", window)]
        if ends:
            text = window[: ends[-1]]
        else:
            cut = window.rfind(" ")
            text = window[: cut if cut > max_chars // 2 else max_chars - 1].rstrip(" ,;:-")
    text = text[0].upper() + text[1:]
    if text[-1] not in ".!?":
        text = text[: max_chars - 1] + "." if len(text) >= max_chars else text + "."
    return text


def _with_context(style: str, description: str, context: str) -> str:
    if style != "functional" or not context:
        return description
    purpose = context.strip().rstrip(".!?")
    return f"{purpose[0].upper() + purpose[1:]}: {description[0].lower() + description[1:]}"


@dataclass
class AltText:
    text: str  # cleaned alt text
    raw: str  # what the model wrote
    style: str
    answer_ids: list[int]  # generated token ids (for per-word heatmaps)
    question: str  # the instruction sent with the image
    generation: object = None  # the finished StreamState, with the rows recorded during generation (or None)


def generate_alt_text(
    loaded: LoadedModel,
    image: Image.Image,
    style: str = "concise",
    context: str = "",
    max_chars: int = DEFAULT_MAX_CHARS,
    settings: GenerationSettings | None = None,
    record_maps: bool = False,
) -> AltText:
    """Alt text for one image; `record_maps` keeps each answer token's attention rows, recorded while the
    text is generated (`chat.generation_token_maps`)."""
    context = (context or "").strip()
    if len(context) > MAX_CONTEXT_CHARS:
        raise ValueError(f"Page context is limited to {MAX_CONTEXT_CHARS} characters.")
    question = instruction(loaded, style, context, max_chars)
    *_, state = stream_answer(loaded, image, question, settings=settings or GenerationSettings(max_new_tokens=64),
                              record_maps=record_maps)
    if state.timed_out:
        check_deadline()  # a cut description is not alt text
    raw = state.text
    text = clean_alt_text(_with_context(style, clean_alt_text(raw, 10_000) or raw, context), max_chars)
    return AltText(text, raw, style, list(state.token_ids), question, state if record_maps else None)


@dataclass
class Finding:
    kind: str  # empty, too_long, file_name, redundant_prefix, repeated_words, low_match, ...
    message: str
    suggestion: str


@dataclass
class AltTextCheck:
    text: str
    findings: list[Finding]
    match: float | None  # 0..1 image-text match from the zero-shot model (None without image/model)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict:
        return {"text": self.text, "ok": self.ok, "match": self.match, "findings": [asdict(f) for f in self.findings]}


def image_text_match(loaded: LoadedModel, image: Image.Image, text: str) -> float:
    """How much better `text` fits the image than generic phrases, as the zero-shot model's
    probability (softmax for CLIP, sigmoid for SigLIP) over [text, "an image.", "a picture."]."""
    from .zero_shot import classify

    result = classify(loaded, [image], [text, "an image.", "a picture."], cache=None)
    return float(result.probs[0, 0])


def check_alt_text(text: str, max_chars: int = DEFAULT_MAX_CHARS, image: Image.Image | None = None,
                   matcher: LoadedModel | None = None, low_match: float = 0.5) -> AltTextCheck:
    """Problems of existing alt text, each with a suggestion."""
    raw = text or ""
    text = " ".join(raw.split())
    findings: list[Finding] = []
    if not text:
        findings.append(Finding("empty", "The alt text is empty.",
                                'Describe the image; use an empty alt (alt="") only for purely decorative images.'))
        return AltTextCheck(raw, findings, None)
    if len(text) > max_chars:
        findings.append(Finding("too_long", f"It is {len(text)} characters; screen readers read it all (limit {max_chars}).",
                                f"Shorten to the essentials, e.g. \"{clean_alt_text(text, max_chars)}\"."))
    if _FILE_NAME.search(text):
        findings.append(Finding("file_name", "It looks like a file name.", "Describe what the image shows instead."))
    if _FILLER.match(text) or re.match(r"^\s*(?:an?\s+)?(?:image|picture|photo)\b", text, re.IGNORECASE):
        findings.append(Finding("redundant_prefix", 'It starts with "image of" or similar; screen readers already say it is an image.',
                                f"Start with the content: \"{clean_alt_text(text, max(max_chars, len(text)))}\"."))
    repeated = re.search(r"\b(\w+)(?:\s+\1\b)+", text, re.IGNORECASE)
    if repeated:
        findings.append(Finding("repeated_words", f'The word "{repeated.group(1)}" is repeated.', "Remove the repetition."))
    if text[-1] not in ".!?":
        findings.append(Finding("no_end_punctuation", "It does not end with punctuation; screen readers pause better with it.",
                                "End the sentence with a full stop."))
    match = None
    if image is not None and matcher is not None:
        match = image_text_match(matcher, image, text)
        if match < low_match:
            findings.append(Finding("low_match", f"The zero-shot model finds a weak match between the text and the image ({match:.2f}).",
                                    "Check that the text describes what is actually in the image."))
    return AltTextCheck(raw, findings, match)


@dataclass
class BatchRow:
    file: str
    alt_text: str
    chars: int
    error: str = ""


def alt_text_batch(loaded: LoadedModel, items: Iterable[tuple[str, Image.Image | Exception]], style: str = "concise",
                   context: str = "", max_chars: int = DEFAULT_MAX_CHARS, progress=None) -> list[BatchRow]:
    """Alt text for many images. `items` yields (name, image) or (name, the error reading it);
    a bad file becomes a row with its error instead of stopping the batch."""
    rows = []
    items = list(items)
    for k, (name, image) in enumerate(items):
        if progress is not None:
            progress(k, len(items), name)
        if isinstance(image, Exception):
            rows.append(BatchRow(name, "", 0, str(image)))
            continue
        try:
            alt = generate_alt_text(loaded, image, style, context, max_chars)
        except TimeLimitError as err:  # keep what is done; say which files were not reached
            rows += [BatchRow(n, "", 0, f"not processed: {err}") for n, _ in items[k:]]
            break
        rows.append(BatchRow(name, alt.text, len(alt.text)))
    return rows


def rows_to_csv(rows: list[BatchRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file", "alt_text", "chars", "error"])
    for row in rows:
        writer.writerow([row.file, row.alt_text, row.chars, row.error])
    return buf.getvalue()


