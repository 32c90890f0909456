"""Zero-shot classification tab: CLIP (softmax) and SigLIP (sigmoid) scores, explained by heatmaps."""

from __future__ import annotations

import gradio as gr

from mmie_core.explain import METHODS, explain
from mmie_core.images import load_image
from mmie_core.models import PRESETS, load_model
from mmie_core.render import bar_chart, figure_to_image, heatmap_figure
from mmie_core.zero_shot import classify as zs_classify
from mmie_core.zero_shot import parse_labels, resolve_templates

from .gpu import duration_classify, duration_explain, gpu
from .common import RuntimeChoices, example_images, photo_examples, image_input, model_picker, save_json, save_png, user_errors
from .patches_tab import COLORMAPS

INTRO = """
### Zero-shot classification
Type the labels you want to test; the model embeds the image and every label in one space and
scores how well they match, with no training on your labels. **CLIP** turns the scores into a
**softmax**: the labels compete and the bars sum to one. **SigLIP** gives each label its own
**sigmoid**: every label is a separate yes/no, so the bars need not sum to one (all can be low,
or several high). Pick a label and a method to see *where* in the image the score came from.
"""

DEFAULT_LABELS = "a red circle\na green square\na blue triangle\na yellow diamond\na purple circle\na orange square"
EXAMPLE_LABELS = "a red square, a yellow circle, a green square, a blue diamond, a purple triangle"
TEMPLATE_MODES = ["preset", "none", "single", "ensemble"]
COMPARE = ("shapes-clip", "shapes-siglip")
DEFAULT_METHOD = "relevancy"


def _score_panel(model_name: str, image, labels: list[str], templates: tuple[str, ...]) -> dict:
    loaded = load_model(model_name)
    result = zs_classify(loaded, [image], labels, templates)
    probs = result.probs[0].tolist()
    ranked = sorted(zip(labels, probs), key=lambda x: -x[1])
    return {
        "model": loaded.name,
        "activation": result.activation,
        "templates": len(templates),
        "scores": {label: round(p, 6) for label, p in zip(labels, probs)},
        "ranking": [label for label, _ in ranked],
        "sum": round(sum(probs), 4),
    }


def _templates_for(model_name: str, mode: str, template: str) -> tuple[str, ...]:
    preset = PRESETS.get(model_name)
    return resolve_templates(mode, template, preset.default_templates if preset else ("{}",))


@gpu(duration_classify)
@user_errors
def classify(image: str, labels_text: str, model_name: str = "shapes-clip", template_mode: str = "preset",
             template: str = "", compare: bool = False):
    """Zero-shot classification: score comma-separated labels against an image with a CLIP (softmax over the
    labels) or SigLIP (independent sigmoid per label) model.

    Args:
        image: the image (a file or URL).
        labels_text: the candidate labels, separated by commas or new lines, e.g. "a red circle, a blue square".
        model_name: shapes-clip, shapes-siglip or a CLIP / SigLIP Hub preset.
        template_mode: "preset" (the model's prompt templates), "none" (labels as written), "single" (the
            template below) or "ensemble" (the mean embedding over 80 ImageNet templates).
        template: one template with {} for the label, used when template_mode is "single".
        compare: score with every embedded dual encoder side by side.
    Returns:
        a bar chart (PNG), the scores as JSON ({model, activation, scores: {label: probability}}), a Markdown
        note on how to read the scores, and the label choices for explain_label.
    """
    img = load_image(image)
    labels = parse_labels(labels_text)
    models = list(COMPARE) if compare else [model_name]
    panels = [_score_panel(m, img, labels, _templates_for(m, template_mode, template)) for m in models]
    chart = bar_chart([(f"{p['model']} ({p['activation']})", labels, [p["scores"][l] for l in labels])
                       for p in panels], xlabel="probability")
    notes = []
    for p in panels:
        top = p["ranking"][0]
        if p["activation"] == "softmax":
            notes.append(f"**{p['model']}**: softmax over {len(labels)} labels, the bars sum to {p['sum']:.2f}; "
                         f"best: *{top}* ({p['scores'][top]:.3f}).")
        else:
            notes.append(f"**{p['model']}**: an independent sigmoid per label (sum {p['sum']:.2f}, not 1); "
                         f"best: *{top}* ({p['scores'][top]:.3f}).")
    data = {"labels": labels, "results": panels}
    choices = gr.update(choices=panels[0]["ranking"], value=panels[0]["ranking"][0])
    return save_png(figure_to_image(chart), "scores"), data, "\n\n".join(notes), choices


@gpu(duration_explain)
@user_errors
def explain_label(image: str, labels_text: str, label: str, model_name: str = "shapes-clip", method: str = DEFAULT_METHOD,
                  template_mode: str = "preset", template: str = "", colormap: str = "inferno",
                  opacity: float = 0.6, upsample: str = "blocks"):
    """Heatmap over the image patches of where one label's score came from, by an explanation method.

    Args:
        image: the image (a file or URL).
        labels_text: the labels scored together (as for classify).
        label: the label to explain; one of labels_text.
        model_name: shapes-clip, shapes-siglip or a CLIP / SigLIP Hub preset.
        method: attention, rollout, relevancy, integrated_gradients, saliency, occlusion or gradcam.
        template_mode: as for classify.
        template: as for classify.
        colormap: a matplotlib colormap name for the overlay.
        opacity: overlay opacity from 0 to 1.
        upsample: "blocks" (one colour per patch) or "smooth".
    Returns:
        the overlay (PNG), the heatmap as JSON (grid values, method, parameters, target, image box), and the
        files to download.
    """
    img = load_image(image)
    labels = parse_labels(labels_text)
    if not label:
        raise ValueError("Pick a label to explain (classify first).")
    if label not in labels:
        raise ValueError(f"{label!r} is not one of the labels.")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    loaded = load_model(model_name)
    templates = _templates_for(model_name, template_mode, template)
    heatmap = explain(loaded, img, {"label": label, "labels": labels, "templates": list(templates)}, method)
    png = save_png(figure_to_image(heatmap_figure(img, heatmap, colormap, float(opacity), upsample)), "heatmap")
    data = heatmap.to_json()
    return png, data, [png, save_json(data, "heatmap")]


def build_zero_shot_tab() -> None:
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input("zs-image")
            labels = gr.Textbox(DEFAULT_LABELS, lines=6, label="Labels (one per line, or comma-separated)")
            model = model_picker("zero_shot", "shapes-clip")
            compare = gr.Checkbox(label="Compare shapes-clip and shapes-siglip side by side", value=False)
            with gr.Accordion("Prompt templates", open=False):
                template_mode = gr.Radio(TEMPLATE_MODES, value="preset", label="Templates",
                                         info="preset: the model's default (none for ShapesWorld models, the 80 "
                                              "ImageNet templates for Hub CLIP); ensemble: average of 80 templates")
                template = gr.Textbox("a photo of a {}.", label="Single template (use {} for the label)")
            run = gr.Button("Classify", variant="primary")
        with gr.Column(scale=1):
            chart = gr.Image(label="Scores", format="png", interactive=False, elem_id="zs-chart")
            notes = gr.Markdown()
            scores = gr.JSON(label="Scores (JSON)")
        with gr.Column(scale=1):
            label = RuntimeChoices([], label="Label to explain", allow_custom_value=True, elem_id="zs-label")
            method = gr.Dropdown(list(METHODS), value=DEFAULT_METHOD, label="Method")
            with gr.Row():
                colormap = gr.Dropdown(COLORMAPS, value="inferno", label="Colormap")
                opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Opacity")
            upsample = gr.Radio(["blocks", "smooth"], value="blocks", label="Upsampling")
            explain_btn = gr.Button("Explain this label")
            overlay = gr.Image(label="Where the score came from", format="png", interactive=False, elem_id="zs-overlay")
            heat_json = gr.JSON(label="Heatmap (JSON)")
            files = gr.File(label="Download (PNG, JSON)", file_count="multiple", interactive=False)
    gr.Examples(
        examples=[[p, EXAMPLE_LABELS] for p in example_images()[:3]],
        inputs=[image, labels], outputs=[chart, scores, notes, label], fn=classify,
        cache_examples=True, cache_mode="lazy", label="ShapesWorld examples (results cached on first click)",
    )
    photo_examples([image])
    run.click(classify, inputs=[image, labels, model, template_mode, template, compare],
              outputs=[chart, scores, notes, label], api_name="classify", concurrency_id="model")
    explain_btn.click(explain_label,
                      inputs=[image, labels, label, model, method, template_mode, template, colormap, opacity, upsample],
                      outputs=[overlay, heat_json, files], api_name="explain_label", concurrency_id="model")
