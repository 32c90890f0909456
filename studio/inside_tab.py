"""Inside tab: the views that show how a VLM turns an image into tokens and what those tokens
become: the sequence the language model reads, patch to words, patch similarity, the logit lens
over image patches, a robustness panel, and the Q-Former's queries of BLIP-2 / InstructBLIP."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import gradio as gr

from mmie_core.chat import answer_token_maps, greedy_answer_ids, patch_to_words as words_for_patch
from mmie_core.explain import METHODS
from mmie_core.images import load_image
from mmie_core.inspect_vision import patch_similarity as similarity_map
from mmie_core.lens import DEFAULT_QUESTION, logit_lens as run_logit_lens
from mmie_core.models import PRESETS, load_model, presets_for
from mmie_core.patches import patch_at, processor_view, vision_grid
from mmie_core.qformer import query_maps as run_query_maps
from mmie_core.render import (
    curves_figure,
    figure_to_image,
    head_gallery,
    heatmap_figure,
    highlight_patches,
    token_bar_chart,
    words_on_grid,
)
from mmie_core.robustness import PERTURBATIONS, STRENGTH_LABELS, robustness as run_robustness
from mmie_core.sequence import sequence_view
from mmie_core.zero_shot import classify as zs_classify
from mmie_core.zero_shot import parse_labels

from .chat_tab import chat_model
from .common import example_images, photo_examples, image_input, save_png, user_errors
from .gpu import gpu
from .patches_tab import COLORMAPS, layer_slider

PICK_SIZE = 640  # long side of the images that can be clicked to pick a patch
HEAD_FUSIONS = ["mean", "max", "min"]

INTRO = """
### Inside the model
A chat VLM turns your image into a row of **image tokens**, one per patch, and reads them in
the same sequence as the words of your question. These views open that up: the exact sequence,
which answer words drew on a patch, which patches a patch resembles, what words the language
model already "reads" in each patch, and how the answer holds up when the image degrades.
**Click on a picture with a grid** to pick a patch.
"""

SEQUENCE_INTRO = """
**The sequence** is the prompt exactly as the language model receives it, after the processor:
text tokens, special tokens (roles, begin/end) and the image placeholder expanded into one token
per patch. Pick an image token to see which patch it carries. The counts show how much of the
context the image takes.
"""

PATCH_WORDS_INTRO = """
**Patch to words** is the reverse of a token heatmap: pick a patch, and each bar shows how much
attention one answer token paid to it (averaged over the chosen layers, heads fused as chosen).
A patch on the object the answer names should get the highest bars on the words about it.
"""

SIMILARITY_INTRO = """
**Patch similarity**: the cosine similarity between the picked patch's features and every other
patch's, at one depth of the vision tower (0 = the patch embeddings). In a good vision model the
whole object lights up, because its patches have come to share features.
"""

LENS_INTRO = """
**Logit lens**: every image token's hidden state, at one depth of the language model, read as if
it were the last layer's: through the final norm and the word head. The top word is written on
each patch (pick a patch for its top-k at every depth). Depth 0 is the image token as the
language model receives it. Read it with care: at every position a language model is trained to
predict the *next* token, and after an image token the next token is another image token, which
it never has to predict; so these words show what the model keeps in a patch, not a sentence about
it. In LLaVA the image comes before the question, so these words do not depend on what you ask.
"""

ROBUST_INTRO = """
**Robustness**: the image is degraded step by step and the model asked again. The curve is the
probability of the clean answer's first token (chat models) or of the clean top label (CLIP /
SigLIP). For **occlusion**, patches are covered in the order of a heatmap, most important first,
and compared with random orders: a faithful heatmap makes its curve fall faster.
"""

QUERIES_INTRO = """
**Q-Former queries** (BLIP-2, InstructBLIP): these models do not hand the language model one token
per patch. A small transformer, the Q-Former, owns a fixed set of learned **queries** (32); each
query reads the vision tokens through cross-attention and becomes one image token of the language
model. Each small map shows where one query read (its cross-attention, heads and layers averaged, or
one layer); the summary says how spread or focused the queries are and how much they overlap. Every
answer heatmap of these models passes through these maps: a query's share of the answer is spread
over the patches it read. InstructBLIP's queries also read your instruction, so their maps change
with it; BLIP-2's do not.
"""
QFORMER_MODELS = [p.name for p in PRESETS.values() if p.adapter.query_tokens]


# --------------------------------------------------------------------------- shared pieces


def _vlm(model_name: str):
    """A chat model whose image tokens form one grid (the Inside views click and map patches)."""
    loaded = chat_model(model_name or "shapes-vlm")
    if not loaded.adapter.token_grid:
        raise ValueError(f"The Inside views map one grid of image tokens to patches; {loaded.name} "
                         f"({loaded.family}) makes a token grid that follows each image (tiles plus a global view, or its native size). Its answers' "
                         "heatmaps are in the Chat and Alt text tabs.")
    return loaded


def _patch(loaded, row, col) -> tuple[int, int]:
    grid = vision_grid(loaded)
    try:
        r, c = int(row), int(col)
    except (TypeError, ValueError):
        raise ValueError("Row and column must be whole numbers.") from None
    if not (0 <= r < grid.rows and 0 <= c < grid.cols):
        raise ValueError(f"Patch ({r}, {c}) is outside {loaded.name}'s {grid.rows} x {grid.cols} grid "
                         f"(rows and columns count from 0).")
    return r, c


def _picker(img, loaded, patches) -> str:
    return save_png(highlight_patches(img, processor_view(loaded, img), vision_grid(loaded), patches,
                                      target=PICK_SIZE), "patch-pick")


@user_errors
def pick_patch(image, model_name: str, evt: gr.SelectData):
    """A click on a picture with a grid -> (row, col) of the patch under it."""
    if image is None or evt is None or not isinstance(evt.index, (list, tuple)):
        raise ValueError("Add an image first, then click on the picture with the grid.")
    img = load_image(image)
    loaded = load_model(model_name)
    scale = PICK_SIZE / max(img.size)
    x, y = evt.index[0] / scale, evt.index[1] / scale
    return patch_at(processor_view(loaded, img), vision_grid(loaded), x, y)


_answers: OrderedDict[tuple, list[int]] = OrderedDict()
_answers_lock = threading.Lock()


def _answer_ids(loaded, img, question: str) -> list[int]:
    """The greedy answer, remembered for a few (model, image, question) so that clicking patches
    does not regenerate it."""
    key = (loaded.name, hashlib.sha1(img.tobytes()).hexdigest(), img.size, question)
    with _answers_lock:
        if key in _answers:
            _answers.move_to_end(key)
            return _answers[key]
    ids = greedy_answer_ids(loaded, img, question)
    with _answers_lock:
        _answers[key] = ids
        while len(_answers) > 32:
            _answers.popitem(last=False)
    return ids


# --------------------------------------------------------------------------- sequence


def _token_highlight(img, loaded, token: dict):
    if token["kind"] != "image" or "row" not in token:
        return None, f"Token {token['index']} `{token['text']}` is a **{token['kind']}** token: it carries no patch."
    r, c = token["row"], token["col"]
    return _picker(img, loaded, [(r, c)]), (f"Token {token['index']} is an **image token**: patch row {r}, "
                                            f"column {c} (image {token['tile']}).")


@gpu(20)
@user_errors
def sequence(image: str, question: str, model_name: str = "shapes-vlm", token_index: int = -1):
    """The prompt exactly as a chat VLM's language model receives it: every text, special and image token,
    each image token with the patch it carries.

    Args:
        image: the image (a file or URL).
        question: the question in the prompt.
        model_name: shapes-vlm or a chat VLM Hub preset whose image is one grid of tokens.
        token_index: the token to describe (its position in the sequence); -1 for the first image token.
    Returns:
        the tokens as highlighted chips, a Markdown summary (counts per kind, the image's share of the context),
        the picked token's patch outlined on the image (PNG), Markdown about that token, and the sequence JSON.
    """
    img = load_image(image)
    loaded = _vlm(model_name)
    view = sequence_view(loaded, img, question or DEFAULT_QUESTION)
    data = view.to_json()
    chips = [(f"▣{t.patch[0]},{t.patch[1]}" if t.patch else t.text, t.kind) for t in view.tokens]
    counts = view.counts
    groups = data["image_groups"]
    summary = (f"**{len(view.tokens)} tokens**: {counts['text']} text, {counts['special']} special, "
               f"**{counts['image']} image** ({view.image_share:.0%} of the context). "
               + " ".join(f"Image {g['tile']}: tokens {g['start']} to {g['end']}, a {g['grid'][0]} x {g['grid'][1]} "
                          f"grid ({g['tokens']} tokens)." for g in groups)
               + "\n\n" + " ".join(view.notes))
    index = int(token_index) if token_index is not None and int(token_index) >= 0 else (
        groups[0]["start"] if groups else 0)
    token = view.token_at(index).to_json()
    png, about = _token_highlight(img, loaded, token)
    return chips, summary, png, about, data


@user_errors
def sequence_pick(image, model_name: str, data: dict | None, evt: gr.SelectData):
    """A picked chip -> (PNG of its patch, markdown)."""
    if not data or evt is None:
        raise ValueError("Show the sequence first, then pick a token.")
    index = evt.index if isinstance(evt.index, int) else int(evt.index[0])
    if not 0 <= index < len(data["tokens"]):
        raise ValueError(f"Token {index} is outside the sequence.")
    return _token_highlight(load_image(image), _vlm(model_name), data["tokens"][index])


# --------------------------------------------------------------------------- patch to words


@gpu(30)
@user_errors
def patch_to_words(image, question: str, model_name: str = "shapes-vlm", row: int = 0, col: int = 0,
                   first_layer: int = 0, last_layer: int = -1, head_fusion: str = "mean"):
    """How much each answer token attended to patch (row, col).

    Returns (picker PNG with the patch outlined, bar chart PNG, JSON)."""
    img = load_image(image)
    loaded = _vlm(model_name)
    r, c = _patch(loaded, row, col)
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"Head fusion must be one of {', '.join(HEAD_FUSIONS)}.")
    n = len(loaded.model.model.language_model.layers)
    lo, hi = (int(v) + n if int(v) < 0 else int(v) for v in (first_layer, last_layer))  # -1 = the last layer
    if not 0 <= lo <= hi < n:
        raise ValueError(f"Pick a layer range within 0..{n - 1} (first <= last); got {first_layer}..{last_layer}.")
    question = (question or "").strip() or DEFAULT_QUESTION
    ids = _answer_ids(loaded, img, question)
    maps = answer_token_maps(loaded, img, question, ids, layers=list(range(lo, hi + 1)), head_fusion=head_fusion)
    pairs = words_for_patch(maps, r, c)
    chart = token_bar_chart([t for t, _ in pairs], [v for _, v in pairs],
                            f"patch ({r}, {c}) · layers {lo}-{hi} · {head_fusion}",
                            "attention probability")
    data = {"model": loaded.name, "question": question,
            "answer": loaded.processor.tokenizer.decode(ids, skip_special_tokens=True).strip(),
            "patch": [r, c], "layers": maps.layers, "head_fusion": head_fusion,
            "tokens": [{"token": t, "attention": round(v, 6)} for t, v in pairs]}
    return _picker(img, loaded, [(r, c)]), save_png(figure_to_image(chart), "patch-to-words"), data


# --------------------------------------------------------------------------- patch similarity


@gpu(20)
@user_errors
def patch_similarity(image, model_name: str = "shapes-clip", row: int = 0, col: int = 0, depth: int = -1,
                     colormap: str = "viridis", opacity: float = 0.6):
    """Cosine similarity of patch (row, col) to every patch at one vision-tower depth.

    Returns (picker PNG with the patch outlined, overlay PNG, heatmap JSON)."""
    img = load_image(image)
    loaded = load_model(model_name or "shapes-clip")
    r, c = _patch(loaded, row, col)
    heatmap = similarity_map(loaded, img, r, c, int(depth))
    title = f"patch ({r}, {c}) · depth {heatmap.params['depth']}"
    overlay = figure_to_image(heatmap_figure(img, heatmap, colormap, float(opacity), "blocks", title=title))
    return _picker(img, loaded, [(r, c)]), save_png(overlay, "patch-similarity"), heatmap.to_json()


# --------------------------------------------------------------------------- logit lens


@gpu(20)
@user_errors
def logit_lens(image: str, question: str = DEFAULT_QUESTION, model_name: str = "shapes-vlm", depth: int = -1,
               row: int = 0, col: int = 0, top_k: int = 5):
    """Logit lens over image patches: each image token's hidden state at one depth of the language model,
    read through the final norm and the word head; the top word is written on its patch.

    Args:
        image: the image (a file or URL).
        question: the question in the prompt.
        model_name: shapes-vlm or a chat VLM Hub preset whose image is one grid of tokens.
        depth: the language-model depth (0 = its input; -1 = the last layer).
        row: the picked patch's row (from 0).
        col: the picked patch's column (from 0).
        top_k: how many words to list for the picked patch.
    Returns:
        the grid of top words (PNG, the picked patch outlined), Markdown of the picked patch's top-k words at
        every depth, and the whole lens as JSON.
    """
    img = load_image(image)
    loaded = _vlm(model_name)
    r, c = _patch(loaded, row, col)
    lens = run_logit_lens(loaded, img, (question or "").strip() or DEFAULT_QUESTION, top_k=int(top_k))
    n = len(lens.layers)
    if not -n <= int(depth) < n:
        raise ValueError(f"{loaded.name}'s language model has depths 0 to {n - 1}; got {depth}.")
    d = lens.layers[int(depth) % n]
    png = words_on_grid(img, processor_view(loaded, img), vision_grid(loaded), lens.top_words(d), (r, c),
                        target=PICK_SIZE)
    lines = [f"**Patch ({r}, {c})**, top {int(top_k)} words at every depth (depth {d} shown on the grid):", "",
             "| depth | words |", "|---|---|"]
    for layer in lens.layers:
        words = ", ".join(f"{w} ({p:.2f})" for w, p in lens.patch_top_k(layer, r, c))
        lines.append(f"| {'**' + str(layer) + '**' if layer == d else layer} | {words} |")
    data = lens.to_json()
    data["shown_depth"], data["patch"] = d, [r, c]
    return save_png(png, "logit-lens"), "\n".join(lines), data


# --------------------------------------------------------------------------- robustness


ROBUST_MODELS = [p.name for p in presets_for("zero_shot")] + [p.name for p in presets_for("chat")]


@gpu(60)
@user_errors
def robustness(image, model_name: str = "shapes-clip", perturbation: str = "noise", prompt: str = "",
               method: str = "relevancy"):
    """Score and answer under a perturbation at increasing strengths.

    `prompt` is the candidate labels for CLIP/SigLIP (comma or newline separated; the target is
    the clean top label) or the question for a chat model (the target is the clean answer's first
    token). Returns (curve PNG, gallery of (PNG, caption), markdown table, JSON)."""
    img = load_image(image)
    loaded = load_model(model_name or "shapes-clip")
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"Unknown perturbation {perturbation!r}; choose one of {', '.join(PERTURBATIONS)}.")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if loaded.adapter.zero_shot:
        labels = parse_labels(prompt or "")
        preset = PRESETS.get(loaded.name)
        templates = preset.default_templates if preset else ("{}",)
        probs = zs_classify(loaded, [img], labels, templates).probs[0]
        target = {"label": labels[int(probs.argmax())], "labels": labels, "templates": list(templates)}
        what = f"P({target['label']})"
    elif loaded.adapter.token_grid:
        question = (prompt or "").strip() or DEFAULT_QUESTION
        ids = _answer_ids(loaded, img, question)
        target = {"question": question, "answer_ids": ids, "token_index": 0}
        what = f"P(first answer token \"{loaded.processor.tokenizer.decode(ids[:1]).strip()}\")"
    else:
        raise ValueError(f"The robustness panel covers zero-shot models and chat models with one grid of image "
                         f"tokens; {loaded.name} is {loaded.family}.")
    result = run_robustness(loaded, img, target, perturbation, method=method)
    series = {"heatmap order (top first)" if result.random_scores else what: result.scores}
    if result.random_scores:
        series["random order"] = result.random_scores
    fig = curves_figure(result.strengths, series, STRENGTH_LABELS[perturbation], what,
                        f"{loaded.name}: {perturbation}")
    gallery = [(save_png(im, "perturbed"), f"{s:g}: {out}") for s, im, out in
               zip(result.strengths, result.images, result.outputs)]
    rows = ["| strength | score | " + ("random | " if result.random_scores else "") + "output |",
            "|---|---|" + ("---|" if result.random_scores else "") + "---|"]
    for k, (s, p, out) in enumerate(zip(result.strengths, result.scores, result.outputs)):
        rand = f"{result.random_scores[k]:.3f} | " if result.random_scores else ""
        rows.append(f"| {s:g} | {p:.3f} | {rand}{out}{' (changed)' if result.changed[k] else ''} |")
    data = result.to_json()
    return save_png(figure_to_image(fig), "robustness"), gallery, "\n".join(rows), data


# --------------------------------------------------------------------------- layout


# --------------------------------------------------------------------------- Q-Former queries


@gpu(30)
@user_errors
def query_maps(image, model_name: str = "shapes-blip2", instruction: str = "", query: int = 0, layer: int = -1,
               colormap: str = "inferno", opacity: float = 0.6):
    """Which image patches each learned query of a BLIP-2 / InstructBLIP Q-Former reads (its cross-attention).

    Args:
        image: the image (path or upload).
        model_name: a BLIP-2 or InstructBLIP model (preset name or model folder).
        instruction: InstructBLIP's instruction, which its queries also read (BLIP-2 ignores it).
        query: the query shown large (0-based).
        layer: a Q-Former layer with cross-attention, or -1 for the layers averaged.
        colormap: matplotlib colormap name.
        opacity: heatmap opacity over the image (0..1).

    Returns (all queries as a grid of small maps PNG, summary Markdown, the picked query's overlay PNG,
    the maps as JSON)."""
    img = load_image(image)
    loaded = load_model(model_name or "blip2-opt-2.7b")
    if not loaded.adapter.query_tokens:
        raise ValueError(f"{loaded.name} ({loaded.family}) has no Q-Former: its language model reads one token per "
                         "patch (see the Sequence view). Pick a BLIP-2 or InstructBLIP model.")
    maps = run_query_maps(loaded, img, instruction or "")
    chosen = None if int(layer) < 0 else int(layer)
    heats = [maps.heatmap(k, chosen) for k in range(maps.n_queries)]
    gallery = figure_to_image(head_gallery(img, heats, columns=8, colormap=colormap, opacity=float(opacity)))
    one = maps.heatmap(int(query), chosen)
    big = figure_to_image(heatmap_figure(img, one, colormap, float(opacity), "blocks",
                                         title=one.params["caption"]))
    return save_png(gallery, "query-maps"), maps.summary(), save_png(big, "query-map"), maps.to_json()


def _vision_depth_slider(model_name: str):
    return layer_slider(model_name, depths=True)


def _lm_layers_update(model_name: str):
    try:
        loaded = load_model(model_name)
        n = len(loaded.model.model.language_model.layers)
    except Exception:  # noqa: BLE001
        return gr.update(), gr.update(), gr.update()
    return (gr.update(minimum=0, maximum=n - 1, value=0), gr.update(minimum=0, maximum=n - 1, value=n - 1),
            gr.update(minimum=0, maximum=n, value=n))


def _row_col(prefix: str):
    with gr.Row():
        row = gr.Number(value=3, precision=0, label="Patch row", minimum=0, elem_id=f"{prefix}-row")
        col = gr.Number(value=3, precision=0, label="Patch column", minimum=0, elem_id=f"{prefix}-col")
    return row, col


def build_inside_tab() -> None:
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input("inside-image")
            gr.Examples(examples=[[p] for p in example_images()[:6]], inputs=[image], label="ShapesWorld examples")
            photo_examples([image])
        with gr.Column(scale=1):
            vlm = gr.Dropdown([p.name for p in presets_for("chat")], value="shapes-vlm", label="Chat model (VLM)")
            question = gr.Textbox(value="what color is the circle?", label="Question", lines=1,
                                  elem_id="inside-question")
            with gr.Row():
                first = gr.Slider(0, 3, value=0, step=1, label="First language-model layer")
                last = gr.Slider(0, 3, value=3, step=1, label="Last language-model layer")
            fusion = gr.Radio(HEAD_FUSIONS, value="mean", label="Head fusion")
    with gr.Tabs():
        with gr.Tab("Sequence", id="sequence"):
            gr.Markdown(SEQUENCE_INTRO)
            seq_btn = gr.Button("Show the sequence", variant="primary")
            seq_summary = gr.Markdown()
            chips = gr.HighlightedText(label="Tokens (pick one)", combine_adjacent=False, show_legend=True,
                                       color_map={"text": "#74c0fc", "special": "#ffa94d", "image": "#b2f2bb"},
                                       elem_id="inside-sequence")
            with gr.Row():
                seq_patch = gr.Image(label="The picked token's patch", format="png", interactive=False,
                                     elem_id="inside-seq-patch")
                with gr.Column():
                    seq_about = gr.Markdown()
                    seq_index = gr.Number(value=-1, precision=0, label="Token to show (-1: the first image token)")
            seq_json = gr.JSON(label="Sequence (JSON)")
        with gr.Tab("Patch to words", id="patch_to_words"):
            gr.Markdown(PATCH_WORDS_INTRO)
            ptw_row, ptw_col = _row_col("inside-ptw")
            ptw_btn = gr.Button("Show patch to words", variant="primary")
            with gr.Row():
                with gr.Column(scale=1):
                    ptw_pick = gr.Image(label="Click a patch", format="png", interactive=False,
                                        elem_id="inside-ptw-pick")
                with gr.Column(scale=2):
                    ptw_chart = gr.Image(label="Attention of each answer token to the patch", format="png",
                                         interactive=False, elem_id="inside-ptw-chart")
            ptw_json = gr.JSON(label="Patch to words (JSON)")
        with gr.Tab("Patch similarity", id="patch_similarity"):
            gr.Markdown(SIMILARITY_INTRO)
            with gr.Row():
                sim_model = gr.Dropdown([p.name for p in presets_for("patches")], value="shapes-clip",
                                        label="Model (any vision tower)")
                depth = gr.Slider(0, 4, value=4, step=1, label="Vision-tower depth (0 = patch embeddings)")
                sim_cmap = gr.Dropdown(COLORMAPS, value="viridis", label="Colormap")
                sim_opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Opacity")
            sim_row, sim_col = _row_col("inside-sim")
            sim_btn = gr.Button("Show patch similarity", variant="primary")
            with gr.Row():
                sim_pick = gr.Image(label="Click a patch", format="png", interactive=False, elem_id="inside-sim-pick")
                sim_map = gr.Image(label="Cosine similarity to the picked patch", format="png", interactive=False,
                                   elem_id="inside-sim-map")
            sim_json = gr.JSON(label="Similarity (JSON)")
        with gr.Tab("Logit lens", id="logit_lens"):
            gr.Markdown(LENS_INTRO)
            with gr.Row():
                lens_depth = gr.Slider(0, 4, value=3, step=1, label="Language-model depth (0 = input)")
                top_k = gr.Slider(1, 10, value=5, step=1, label="Top-k on pick")
            lens_row, lens_col = _row_col("inside-lens")
            lens_btn = gr.Button("Read the patches", variant="primary")
            with gr.Row():
                lens_img = gr.Image(label="Top word per patch (click a patch)", format="png", interactive=False,
                                    elem_id="inside-lens")
                lens_md = gr.Markdown()
            lens_json = gr.JSON(label="Logit lens (JSON)")
        with gr.Tab("Robustness", id="robustness"):
            gr.Markdown(ROBUST_INTRO)
            with gr.Row():
                rob_model = gr.Dropdown(ROBUST_MODELS, value="shapes-clip", label="Model")
                perturbation = gr.Radio(list(PERTURBATIONS), value="noise", label="Perturbation")
                rob_method = gr.Dropdown(list(METHODS), value="relevancy", label="Heatmap for occlusion order")
            rob_prompt = gr.Textbox(value="a red circle, a green square, a blue triangle, a yellow diamond",
                                    label="Labels (CLIP / SigLIP) or question (chat model)", lines=1)
            rob_btn = gr.Button("Run the robustness panel", variant="primary")
            with gr.Row():
                rob_plot = gr.Image(label="Score as the image degrades", format="png", interactive=False,
                                    elem_id="inside-robustness")
                rob_table = gr.Markdown()
            rob_gallery = gr.Gallery(label="Perturbed images (strength: output)", columns=6, height=220)
            rob_json = gr.JSON(label="Robustness (JSON)")

        with gr.Tab("Q-Former queries", id="query_maps"):
            gr.Markdown(QUERIES_INTRO)
            with gr.Row():
                qf_model = gr.Dropdown(QFORMER_MODELS, value=QFORMER_MODELS[0], allow_custom_value=True,
                                       label="BLIP-2 / InstructBLIP model (preset, or a model folder)")
                qf_instruction = gr.Textbox(value="", label="Instruction (InstructBLIP's queries read it)", lines=1)
            with gr.Row():
                qf_query = gr.Number(value=0, precision=0, minimum=0, label="Query to show large")
                qf_layer = gr.Number(value=-1, precision=0, label="Q-Former layer (-1: layers averaged)")
                qf_cmap = gr.Dropdown(COLORMAPS, value="inferno", label="Colormap")
                qf_opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Opacity")
            qf_btn = gr.Button("Show the queries", variant="primary")
            qf_summary = gr.Markdown()
            qf_gallery = gr.Image(label="Every query's reading", format="png", interactive=False,
                                  elem_id="inside-query-maps")
            with gr.Row():
                qf_one = gr.Image(label="One query", format="png", interactive=False, elem_id="inside-query-map")
                qf_json = gr.JSON(label="Query maps (JSON)")

    vlm.change(_lm_layers_update, vlm, [first, last, lens_depth], api_name=False)
    sim_model.change(_vision_depth_slider, sim_model, depth, api_name=False)

    seq_inputs = [image, question, vlm, seq_index]
    seq_outputs = [chips, seq_summary, seq_patch, seq_about, seq_json]
    seq_btn.click(sequence, seq_inputs, seq_outputs, api_name="sequence", concurrency_id="model")
    chips.select(sequence_pick, [image, vlm, seq_json], [seq_patch, seq_about], api_name=False)

    ptw_inputs = [image, question, vlm, ptw_row, ptw_col, first, last, fusion]
    ptw_outputs = [ptw_pick, ptw_chart, ptw_json]
    ptw_btn.click(patch_to_words, ptw_inputs, ptw_outputs, api_name="patch_to_words", concurrency_id="model")
    ptw_pick.select(pick_patch, [image, vlm], [ptw_row, ptw_col], api_name=False).success(
        patch_to_words, ptw_inputs, ptw_outputs, api_name=False, concurrency_id="model")

    sim_inputs = [image, sim_model, sim_row, sim_col, depth, sim_cmap, sim_opacity]
    sim_outputs = [sim_pick, sim_map, sim_json]
    sim_btn.click(patch_similarity, sim_inputs, sim_outputs, api_name="patch_similarity", concurrency_id="model")
    sim_pick.select(pick_patch, [image, sim_model], [sim_row, sim_col], api_name=False).success(
        patch_similarity, sim_inputs, sim_outputs, api_name=False, concurrency_id="model")

    lens_inputs = [image, question, vlm, lens_depth, lens_row, lens_col, top_k]
    lens_outputs = [lens_img, lens_md, lens_json]
    lens_btn.click(logit_lens, lens_inputs, lens_outputs, api_name="logit_lens", concurrency_id="model")
    lens_img.select(pick_patch, [image, vlm], [lens_row, lens_col], api_name=False).success(
        logit_lens, lens_inputs, lens_outputs, api_name=False, concurrency_id="model")

    rob_btn.click(robustness, [image, rob_model, perturbation, rob_prompt, rob_method],
                  [rob_plot, rob_gallery, rob_table, rob_json], api_name="robustness", concurrency_id="model")
    qf_btn.click(query_maps, [image, qf_model, qf_instruction, qf_query, qf_layer, qf_cmap, qf_opacity],
                 [qf_gallery, qf_summary, qf_one, qf_json], api_name="query_maps", concurrency_id="model")
