"""Alt-text tab: write alt text in three styles, check existing alt text, and run batches."""

from __future__ import annotations

import gradio as gr

from mmie_core.alt_text import (
    DEFAULT_MAX_CHARS,
    STYLES,
    alt_text_batch,
    check_alt_text as check_text,
    generate_alt_text,
    rows_to_csv,
)
from mmie_core.chat import answer_token_maps, generation_token_maps
from mmie_core.images import ImageInputError, load_image
from mmie_core.models import load_model

from .chat_tab import TOKEN_METHODS, chat_model, explain_token
from .gpu import duration_batch, gpu
from .common import AnswerJSON, SafeImage, TokenPicker, example_images, photo_examples, image_input, model_picker, save_text, user_errors
from .patches_tab import COLORMAPS

INTRO = """
### Alt text
Alt text is what a screen reader says instead of showing the image. Good alt text is short,
starts with the content (never "image of"), and says what matters on the page. Generate it in a
style, check alt text you already have, or run a whole folder at once; pick a word of the result
to see which part of the image it came from.
"""

MAX_BATCH = 50
MATCH_MODEL = "shapes-clip"


@gpu(30)
@user_errors
def alt_text(image: str, style: str = "concise", context: str = "", max_chars: int = DEFAULT_MAX_CHARS,
             model_name: str = "shapes-vlm"):
    """Write alt text for an image with a vision-language model, cleaned and checked against the length limit.

    Args:
        image: the image (a file or URL).
        style: "concise", "detailed" or "functional" (what the image does on the page; give the context).
        context: the page context for the functional style, e.g. "link to the shop's contact page".
        max_chars: the length limit in characters (20 to 1000; 125 is the usual screen-reader advice).
        model_name: shapes-vlm or a chat VLM / captioner Hub preset.
    Returns:
        the alt text, a Markdown summary (length, checks), the words as chips, and the answer JSON (what
        explain_token takes to explain a word).
    """
    img = load_image(image)
    if not 20 <= int(max_chars) <= 1000:
        raise ValueError("The length limit must be between 20 and 1000 characters.")
    loaded = chat_model(model_name, task="alt_text")
    result = generate_alt_text(loaded, img, style, context or "", int(max_chars), record_maps=True)
    if not result.answer_ids:
        raise ValueError("The model wrote nothing for this image.")
    # the rows recorded while the text was written, or the analysis pass where they cannot serve
    maps = (generation_token_maps(loaded, img, result.question, result.generation)
            or answer_token_maps(loaded, img, result.question, result.answer_ids))
    chips = [f"{k}: {tok}" for k, tok in enumerate(maps.tokens)]
    data = {
        "model": loaded.name,
        "style": style,
        "alt_text": result.text,
        "raw": result.raw,
        "chars": len(result.text),
        "question": result.question,
        "history": [],
        "token_ids": result.answer_ids,
        "tokens": maps.tokens,
        "image_reliance": [None if r is None else round(r, 4) for r in maps.image_reliance],
        "heatmaps": [hm.to_json() for hm in maps.heatmaps],
    }
    summary = f"{len(result.text)} characters (limit {int(max_chars)}). The model wrote: *{result.raw}*"
    return result.text, summary, gr.update(choices=chips, value=chips[0]), data


@gpu(15)
@user_errors
def check_alt_text(text: str, image: str | None = None, max_chars: int = DEFAULT_MAX_CHARS):
    """Check existing alt text for common problems (file names, "image of", length, empty text), and with an
    image, how well the text matches it.

    Args:
        text: the alt text to check.
        image: optionally the image it describes (a file or URL).
        max_chars: the length limit in characters.
    Returns:
        a Markdown list of findings with suggestions, and the findings as JSON.
    """
    img = load_image(image) if image is not None else None
    matcher = load_model(MATCH_MODEL) if img is not None else None
    result = check_text(text, int(max_chars), img, matcher)
    if result.ok:
        lines = ["**No problems found.**"]
    else:
        lines = [f"- **{f.kind.replace('_', ' ')}**: {f.message} *Suggestion:* {f.suggestion}" for f in result.findings]
    if result.match is not None:
        lines.append(f"\nImage-text match ({MATCH_MODEL}): **{result.match:.2f}** (0 = no match, 1 = clear match).")
    return "\n".join(lines), result.to_json()


@gpu(duration_batch)
@user_errors
def alt_text_batch_files(files, style: str = "concise", context: str = "", max_chars: int = DEFAULT_MAX_CHARS,
                         model_name: str = "shapes-vlm", progress=gr.Progress()):
    """Alt text for many images. Returns (table rows, CSV file)."""
    paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]
    if not paths:
        raise ValueError("Upload one or more images.")
    if len(paths) > MAX_BATCH:
        raise ValueError(f"{len(paths)} files is too many for one batch; the limit is {MAX_BATCH}.")
    loaded = chat_model(model_name, task="alt_text")

    def items():
        for path in paths:
            name = path.rsplit("/", 1)[-1]
            try:
                yield name, load_image(path)
            except ImageInputError as err:
                yield name, err

    def report(k, total, name):
        progress((k, total), desc=f"alt text for {name}")

    rows = alt_text_batch(loaded, items(), style, context or "", int(max_chars), progress=report)
    csv_path = save_text(rows_to_csv(rows), "alt-text", ".csv")
    table = [[r.file, r.alt_text, r.chars, r.error] for r in rows]
    return table, csv_path


def build_alt_text_tab() -> None:
    gr.Markdown(INTRO)
    with gr.Tabs():
        with gr.Tab("Write"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = image_input("alt-image")
                    model = model_picker("alt_text", "shapes-vlm")
                    style = gr.Radio(list(STYLES), value="concise", label="Style",
                                     info="concise: what is there; detailed: what is where; functional: what it is for")
                    context = gr.Textbox("", label="Page context (optional, used by the functional style)",
                                         placeholder="e.g. link to the shapes quiz")
                    max_chars = gr.Slider(20, 400, value=DEFAULT_MAX_CHARS, step=5, label="Length limit (characters)")
                    run = gr.Button("Write alt text", variant="primary")
                    gr.Examples(examples=[[p] for p in example_images()[:4]], inputs=[image], label="ShapesWorld examples")
                    photo_examples([image])
                with gr.Column(scale=1):
                    text = gr.Textbox(label="Alt text", lines=3, buttons=["copy"], elem_id="alt-text")
                    summary = gr.Markdown()
                    words = TokenPicker([], label="Words: pick one to see where it came from", elem_id="alt-words")
                    with gr.Row():
                        method = gr.Dropdown(list(TOKEN_METHODS), value="attention", label="Method")
                        colormap = gr.Dropdown(COLORMAPS, value="inferno", label="Colormap")
                    opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Opacity")
                    upsample = gr.Radio(["blocks", "smooth"], value="blocks", label="Upsampling")
                    overlay = gr.Image(label="Where this word came from", format="png", interactive=False,
                                      elem_id="alt-overlay")
                    with gr.Accordion("JSON and downloads", open=False):
                        answer = AnswerJSON(label="Alt text (JSON)")
                        heat_json = gr.JSON(label="Heatmap (JSON)")
                        files = gr.File(label="Download (PNG, JSON)", file_count="multiple", interactive=False)
            run.click(alt_text, [image, style, context, max_chars, model], [text, summary, words, answer],
                      api_name="alt_text", concurrency_id="model")
            words.change(explain_token, [image, answer, words, model, method, colormap, opacity, upsample],
                         [overlay, heat_json, files], api_name=False, concurrency_id="model")
        with gr.Tab("Check"):
            with gr.Row():
                with gr.Column():
                    existing = gr.Textbox(label="Existing alt text", lines=3, placeholder="e.g. IMG_2043.jpg")
                    check_image = SafeImage(label="Image (optional: adds an image-text match score)", type="filepath",
                                            height=220)
                    check_limit = gr.Slider(20, 400, value=DEFAULT_MAX_CHARS, step=5, label="Length limit")
                    check = gr.Button("Check", variant="primary")
                with gr.Column():
                    findings = gr.Markdown()
                    findings_json = gr.JSON(label="Findings (JSON)")
            check.click(check_alt_text, [existing, check_image, check_limit], [findings, findings_json],
                        api_name="check_alt_text", concurrency_id="model")
        with gr.Tab("Batch"):
            with gr.Row():
                with gr.Column():
                    uploads = gr.File(label=f"Images (up to {MAX_BATCH})", file_count="multiple", file_types=["image"])
                    batch_style = gr.Radio(list(STYLES), value="concise", label="Style")
                    batch_context = gr.Textbox("", label="Page context (optional)")
                    batch_limit = gr.Slider(20, 400, value=DEFAULT_MAX_CHARS, step=5, label="Length limit")
                    batch_model = model_picker("alt_text", "shapes-vlm")
                    batch = gr.Button("Write alt text for all", variant="primary")
                with gr.Column():
                    table = gr.Dataframe(headers=["file", "alt_text", "chars", "error"], label="Results",
                                         interactive=False, wrap=True)
                    csv_file = gr.File(label="CSV", interactive=False)
            batch.click(alt_text_batch_files, [uploads, batch_style, batch_context, batch_limit, batch_model],
                        [table, csv_file], api_name="alt_text_batch", concurrency_id="model")
