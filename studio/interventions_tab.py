"""Interventions tab: change the model's computation and watch the answer. Attention knockout, the
information-flow chart, activation patching with counterfactual images, and Captum's segment ablation."""

from __future__ import annotations

import json

import gradio as gr
import numpy as np
from PIL import Image

from mmie_core import interventions as iv
from mmie_core.chat import answer_sequence, greedy_answer_ids
from mmie_core.explain import make_subject
from mmie_core.heatmap import PatchHeatmap
from mmie_core.images import load_image
from mmie_core.patches import processor_view
from mmie_core.render import curves_figure, figure_to_image, head_gallery, heatmap_figure, overlay_heatmap, \
    token_bar_chart
from mmie_core.segments import BASELINES, SEGMENT_METHODS, grid_segments, mask_segments, segment_ablation
from mmie_core.shapes.world import CHANGES, counterfactual, make_scene

from .chat_tab import chat_model
from .common import example_images, image_input, model_picker, photo_examples, save_json, save_png, user_errors
from .gpu import gpu

INTRO = """
### Interventions: what the answer needs
Heatmaps show where a model *looked*. Here the studio **changes the computation** and watches the
answer: it cuts attention between parts of the prompt, swaps internal activations between two
images, or removes parts of the image. If the answer falls, the model needed what was removed.
Ask a question; every view explains the first answer token unless you pick another.
"""

KNOCKOUT_INTRO = """
**Attention knockout** removes attention edges inside the language model: the chosen positions
(every text token, the question, or only the position that writes the answer) stop reading the
chosen image tokens (all of them, a box, or patches you click) in the chosen layers. The bars
compare the answer before and after; the curve slides a window of layers over depth, so you see
*where* the image is read. The map blocks one patch at a time (in every layer): when an object
covers several patches, blocking one may change nothing, because the others still show it.
"""

FLOW_INTRO = """
**Information flow** cuts three routes, one window of layers at a time: image → question tokens,
image → the answer position, question → the answer position. A big drop at some depth says that
route carries what the answer needs there (Zhang et al., CVPR 2025, found that large VLMs first move
the image into the question's tokens, then the question into the answer).
"""

PATCHING_INTRO = """
**Activation patching** runs the model on a *corrupted* image (the same scene with one object
changed, your edited copy, or the photo with a region blurred) and copies, one image token and one
layer at a time, the hidden state of the clean run into it. The map shows how much of the clean
answer's log-probability comes back (1 = all of it): the places and depths where the answer is
decided. Try a ShapesWorld counterfactual: the changed object should light up.
"""

SEGMENT_INTRO = """
**Segment ablation** (Captum's `LLMAttribution` with `FeatureAblation` or Shapley sampling over
an `ImageMaskInput`) paints whole segments with a plain colour and measures how the answer token's
log-probability falls: a value per segment. Segments: the objects of a ShapesWorld scene, a grid,
or a region you draw.
"""

QUERY_CHOICES = {"every text token": "text", "the question's tokens": "question", "the answer position": "answer"}
KEY_CHOICES = ("every image token", "the box", "the picked patches")
SEGMENT_CHOICES = ("ShapesWorld objects", "grid", "drawn region")


# --------------------------------------------------------------------------- shared


def _subject(image, model_name: str, question: str, token: int | float | None):
    if image is None:
        raise ValueError("Add an image first (upload, paste, draw, or pick an example).")
    question = (question or "").strip()
    if not question:
        raise ValueError("Ask a question about the image first.")
    loaded = chat_model(model_name or "shapes-vlm")
    img = load_image(image)
    answer_ids = greedy_answer_ids(loaded, img, question)
    k = int(token or 0)
    if not 0 <= k < len(answer_ids):
        raise ValueError(f"The answer has {len(answer_ids)} tokens: pick a token from 0 to {len(answer_ids) - 1}.")
    subject = make_subject(loaded, img, {"question": question, "answer_ids": answer_ids, "token_index": k})
    iv.check_subject(subject)
    return loaded, img, subject


def _answer_line(subject) -> str:
    return (f"Answer: **{subject.target['answer']}**; explained token {subject.target['token_index']}: "
            f"**{subject.target['token']!r}**.")


def parse_box(text: str) -> tuple[float, float, float, float]:
    """"x0, y0, x1, y1" in pixels of the original image."""
    try:
        values = [float(v) for v in str(text or "").replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError("A box is four numbers: x0, y0, x1, y1 (pixels of your image).") from None
    if len(values) != 4 or values[2] <= values[0] or values[3] <= values[1]:
        raise ValueError("A box is four numbers x0, y0, x1, y1 with x1 > x0 and y1 > y0 (pixels of your image).")
    return tuple(values)  # type: ignore[return-value]


def _cells(picked) -> list[tuple[int, int]]:
    if isinstance(picked, str):
        picked = json.loads(picked or "[]")
    return [tuple(int(v) for v in c) for c in picked or []]


def _progress(progress: gr.Progress, what: str):
    return lambda done, total: progress((done, total), desc=what)


def _layers(text: str, n_layers: int) -> list[int] | None:
    """"" (every layer) or "0, 2, 5" / "3-6"."""
    text = str(text or "").strip()
    if not text:
        return None
    out = []
    for part in text.split(","):
        a, sep, b = part.strip().partition("-")
        try:
            out += list(range(int(a), int(b) + 1)) if sep else [int(a)]
        except ValueError:
            raise ValueError(f"Layers are numbers or ranges (\"0, 2, 5-7\"), not {part.strip()!r}.") from None
    if any(not 0 <= l < n_layers for l in out):
        raise ValueError(f"The language model has {n_layers} layers: 0 to {n_layers - 1}.")
    return sorted(set(out))


# --------------------------------------------------------------------------- picking patches


def map_grid(loaded, img: Image.Image) -> PatchHeatmap:
    """An empty map over the image-token layout of `img` (the cells a knockout selection names)."""
    seq = answer_sequence(loaded, img, "?", [])
    view = processor_view(loaded, img)
    return PatchHeatmap(np.zeros(seq.layout.shape), "selection", {}, view.box, view.original_size)


def _picker_png(img: Image.Image, grid: PatchHeatmap, cells) -> str:
    values = np.zeros(grid.grid)
    for r, c in cells:
        values[r, c] = 1.0
    grid.values = values
    return save_png(overlay_heatmap(img, grid, "viridis", 0.7, grid_lines=True, target=512), "picked")


@user_errors
def show_picker(image, model_name: str, picked):
    """The image with the model's map grid and the picked cells."""
    if image is None:
        return None
    img = load_image(image)
    return _picker_png(img, map_grid(chat_model(model_name or "shapes-vlm"), img), _cells(picked))


@user_errors
def pick_cell(image, model_name: str, picked, evt: gr.SelectData):
    """A click on the picker toggles the map cell under it."""
    if image is None or evt is None or not isinstance(evt.index, (list, tuple)):
        raise ValueError("Add an image, then click on a patch of the grid.")
    img = load_image(image)
    grid = map_grid(chat_model(model_name or "shapes-vlm"), img)
    scale = 512 / max(img.size)
    x, y = evt.index[0] / scale, evt.index[1] / scale
    x0, y0, x1, y1 = grid.box
    rows, cols = grid.grid
    if not (x0 <= x < x1 and y0 <= y < y1):
        raise ValueError("That point is outside the part of the image the model sees.")
    cell = (min(rows - 1, int((y - y0) / (y1 - y0) * rows)), min(cols - 1, int((x - x0) / (x1 - x0) * cols)))
    cells = _cells(picked)
    cells = [c for c in cells if c != cell] if cell in cells else cells + [cell]
    return _picker_png(img, grid, cells), json.dumps(cells)


def clear_cells(image, model_name: str):
    return show_picker(image, model_name, "[]"), "[]"


# --------------------------------------------------------------------------- the four views


def _keys(keys: str, box: str, picked):
    if keys == "the box":
        return {"box": parse_box(box)}
    if keys == "the picked patches":
        cells = _cells(picked)
        if not cells:
            raise ValueError("Click on the picker to pick patches first.")
        return {"cells": cells}
    return "image"


@gpu(60)
@user_errors
def knockout_view(image, model_name: str = "shapes-vlm", question: str = "", token: int = 0,
                  queries: str = "every text token", keys: str = "every image token", box: str = "", picked="[]",
                  window: int = 1, patch_map: bool = True, progress=gr.Progress()):
    """Attention knockout. Returns (summary Markdown, before/after bars PNG, window-sweep PNG, per-patch map
    PNG or None, JSON path)."""
    loaded, img, subject = _subject(image, model_name, question, token)
    q = QUERY_CHOICES.get(queries, queries)
    k = _keys(keys, box, picked)
    result = iv.knockout(subject, q, k)
    sweep = iv.window_sweep(subject, q, k, int(window), progress=_progress(progress, "window sweep"))
    data = {"model": loaded.name, "target": subject.target, "queries": q, "keys": k if isinstance(k, str) else
            {key: list(v) for key, v in k.items()}, "all_layers": result, "sweep": sweep}
    bars = token_bar_chart(["clean", "blocked"], [result["clean"]["probability"], result["blocked"]["probability"]],
                           f"P({subject.target['token']!r}), every layer cut", "probability")
    labels = [f"{a}" if a == b else f"{a}-{b}" for a, b in sweep["windows"]]
    curve = curves_figure(list(range(len(labels))), {"blocked in this window": sweep["probability"],
                                                      "clean": [sweep["clean"]] * len(labels)},
                          f"language-model layers ({', '.join(labels)})", "answer probability",
                          f"cut {int(window)} layer(s) at a time", xticks=True)
    map_png = None
    if patch_map:
        heatmap = iv.knockout_map(subject, q, progress=_progress(progress, "knockout map"))
        data["map"] = heatmap.to_json()
        map_png = save_png(figure_to_image(heatmap_figure(
            img, heatmap, title=f"log-prob drop of {subject.target['token']!r}, per patch")), "knockout-map")
    blocked = result["blocked"]
    summary = (f"{_answer_line(subject)}\n\nCutting **{queries} → {keys}** in every layer moves "
               f"P({subject.target['token']!r}) from **{result['clean']['probability']:.3f}** to "
               f"**{blocked['probability']:.3f}** (top answer then: **{blocked['top_token']!r}**, "
               f"{blocked['top_probability']:.3f}); {result['edges']:,} edges removed.")
    return (summary, save_png(figure_to_image(bars), "knockout-bars"), save_png(figure_to_image(curve), "knockout-sweep"),
            map_png, save_json(data, "knockout"))


@gpu(60)
@user_errors
def information_flow_view(image, model_name: str = "shapes-vlm", question: str = "", token: int = 0,
                          window: int = 1, progress=gr.Progress()):
    """Information flow. Returns (summary Markdown, chart PNG, JSON path)."""
    loaded, img, subject = _subject(image, model_name, question, token)
    flow = iv.information_flow(subject, int(window), progress=_progress(progress, "information flow"))
    labels = [f"{a}" if a == b else f"{a}-{b}" for a, b in flow["windows"]]
    chart = curves_figure(list(range(len(labels))), {name: [100 * v for v in drops] for name, drops in flow["flows"].items()},
                          f"language-model layers ({', '.join(labels)})", "drop of the answer's probability (%)",
                          f"cutting each route, {int(window)} layer(s) at a time", ylim=None, xticks=True)
    summary = _answer_line(subject) + "\n\n" + "\n".join(f"- {s}" for s in flow["summary"])
    data = {"model": loaded.name, "target": subject.target} | flow
    return summary, save_png(figure_to_image(chart), "information-flow"), save_json(data, "information-flow")


@gpu(90)
@user_errors
def patching_view(image, corrupted=None, model_name: str = "shapes-vlm", question: str = "", token: int = 0,
                  blur_box: str = "", layers: str = "", window: int = 0, progress=gr.Progress()):
    """Activation patching from the clean image into a corrupted one (the corrupted image, or the clean one
    with `blur_box` blurred). Returns (summary Markdown, per-layer maps PNG, per-layer curve PNG, JSON path)."""
    loaded, img, subject = _subject(image, model_name, question, token)
    if corrupted is not None:
        bad = load_image(corrupted)
        if bad.size != img.size:
            raise ValueError(f"The corrupted image is {bad.width}x{bad.height}, the clean one {img.width}x{img.height}: "
                             "patching needs a copy of the same size.")
    elif str(blur_box or "").strip():
        bad = iv.blurred_copy(img, parse_box(blur_box))
    else:
        raise ValueError("Give a corrupted image (a ShapesWorld counterfactual or your edited copy) or a box to blur.")
    n = len(loaded.adapter.answer_layers(loaded.model))
    result = iv.patching(subject, bad, _layers(layers, n), int(window or 0), progress=_progress(progress, "patching"))
    for heatmap, best in zip(result.maps, result.restored.max(1)):
        heatmap.params["caption"] = f"layer {heatmap.params['layer']}: best {best:.2f}"
    maps = head_gallery(img, result.maps, columns=min(4, len(result.maps)))
    curve = curves_figure(result.layers, {"every image position patched": list(result.per_layer),
                                          "best single patch": list(result.restored.max(1))},
                          "language-model layer", "clean answer restored (1 = all)",
                          f"patching {subject.target['token']!r} back", ylim=None, xticks=True)
    layer, group = result.best
    summary = (f"{_answer_line(subject)}\n\nClean image: P = **{result.clean.probability:.3f}**; corrupted: "
               f"**{result.corrupted.probability:.3f}** (its top answer: **{result.corrupted.top_token!r}**). "
               f"Patching one image position restores at most **{result.restored.max():.2f}** of the gap, at layer "
               f"{layer}, map cells {result.cells[group]}.")
    data = {"model": loaded.name, "target": subject.target} | result.to_json()
    return (summary, save_png(figure_to_image(maps), "patching-maps"), save_png(figure_to_image(curve), "patching-curve"),
            save_json(data, "patching"))


def _scene_segments(img: Image.Image, seed) -> np.ndarray:
    if seed is None or str(seed).strip() == "":
        raise ValueError("Give the ShapesWorld scene's seed (the scene picker fills it in).")
    scene = make_scene(int(seed))
    if img.width != img.height or np.abs(np.asarray(scene.render(img.width), dtype=int)
                                         - np.asarray(img, dtype=int)).max() > 2:
        raise ValueError(f"This image is not ShapesWorld scene {int(seed)}: make it with the scene picker, or choose "
                         "grid or drawn-region segments.")
    return scene.masks(img.width)


def _drawn(drawing, img: Image.Image) -> np.ndarray:
    layers = (drawing or {}).get("layers") or []
    if not layers:
        raise ValueError("Draw over the region to remove (the drawing pad under the segments choice).")
    layer = layers[0] if isinstance(layers[0], Image.Image) else Image.fromarray(np.asarray(layers[0]))
    alpha = np.asarray(layer.convert("RGBA").resize(img.size, Image.Resampling.NEAREST))[..., 3]
    return mask_segments(alpha)


@gpu(60)
@user_errors
def segment_ablation_view(image, model_name: str = "shapes-vlm", question: str = "", token: int = 0,
                          segments: str = "grid", grid: int = 4, scene_seed=None, drawing=None,
                          method: str = "feature_ablation", baseline: str = "mean", samples: int = 8):
    """Captum segment ablation. Returns (summary Markdown, overlay PNG, per-segment bars PNG, JSON path)."""
    loaded, img, subject = _subject(image, model_name, question, token)
    if segments == "ShapesWorld objects":
        seg = _scene_segments(img, scene_seed)
        names = ["background"] + [o.phrase for o in make_scene(int(scene_seed)).sorted_objects()]
        colour = make_scene(int(scene_seed)).background if baseline == "mean" else baseline
    elif segments == "drawn region":
        seg, names, colour = _drawn(drawing, img), ["rest of the image", "drawn region"], baseline
    else:
        g = int(grid)
        if not 1 <= g <= 8:
            raise ValueError("The grid has 1 to 8 rows and columns.")
        seg, names, colour = grid_segments(img.size, g, g), [f"cell {i // g},{i % g}" for i in range(g * g)], baseline
    result = segment_ablation(loaded, img, subject.target["question"], subject.answer_ids, seg,
                              subject.target["token_index"], method, colour, int(samples))
    heatmap = result.heatmap(img, subject.target, loaded.name)
    overlay = heatmap_figure(img, heatmap, upsample="smooth" if segments != "grid" else "blocks",
                             title=f"{method}: log-prob drop of {subject.target['token']!r} per segment")
    labels = [names[i] if i < len(names) else f"segment {i}" for i in result.ids]
    bars = token_bar_chart(labels, [float(v) for v in result.values], "removing each segment", "log-prob drop")
    best = int(np.argmax(result.values))
    summary = (f"{_answer_line(subject)}\n\nRemoved pixels take RGB {result.baseline}. The segment the token needs "
               f"most: **{labels[best]}** (log-probability drop {result.values[best]:.3f}).")
    data = {"model": loaded.name, "target": subject.target, "segment_names": labels} | result.to_json()
    return (summary, save_png(figure_to_image(overlay), "segments"), save_png(figure_to_image(bars), "segment-bars"),
            save_json(data, "segment-ablation"))


@user_errors
def make_counterfactual(seed, object_index, change: str, size: int = 256):
    """A ShapesWorld scene and its counterfactual. Returns (scene PNG, counterfactual PNG, Markdown, seed)."""
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise ValueError("The scene seed is a whole number.") from None
    scene = make_scene(seed)
    changed = counterfactual(scene, int(object_index), change)
    before = scene.sorted_objects()[int(object_index)]
    after = next(o for o in changed.objects if o not in scene.objects)
    note = (f"Scene {seed}: {scene.alt_text} The counterfactual changes the {before.phrase} at the {before.position} "
            f"into a {after.phrase} at the {after.position}; nothing else moves. Ask about that object.")
    return save_png(scene.render(int(size)), f"scene-{seed}"), save_png(changed.render(int(size)), f"counterfactual-{seed}"), \
        note, seed


# --------------------------------------------------------------------------- layout


def build_interventions_tab() -> None:
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input("iv-image", label="Image (the clean one)")
            gr.Examples(examples=[[p] for p in example_images()[:6]], inputs=image, label="ShapesWorld examples")
            photo_examples(image)
            model = model_picker("chat", "shapes-vlm")
            question = gr.Textbox(label="Question", value="what color is the circle?", elem_id="iv-question")
            token = gr.Number(label="Answer token to explain (0 = the first)", value=0, precision=0, minimum=0)
            with gr.Accordion("ShapesWorld scene and counterfactual", open=True):
                with gr.Row():
                    seed = gr.Number(label="Scene seed", value=50003, precision=0)
                    obj = gr.Dropdown([0, 1, 2], value=0, label="Object (reading order)")
                    change = gr.Dropdown(list(CHANGES), value="color", label="Change")
                make = gr.Button("Make the scene and its counterfactual", elem_id="iv-make")
                scene_note = gr.Markdown()
        with gr.Column(scale=1):
            corrupted = gr.Image(label="Corrupted image (for patching)", type="filepath", height=260,
                                 elem_id="iv-corrupted")
            picker = gr.Image(label="Pick patches (click to toggle; used by 'the picked patches')", interactive=False,
                              height=320, elem_id="iv-picker")
            picked = gr.Textbox(value="[]", label="Picked map cells (row, col)", elem_id="iv-picked")
            clear = gr.Button("Clear the picked patches", size="sm")

    with gr.Tab("Knockout"):
        gr.Markdown(KNOCKOUT_INTRO)
        with gr.Row():
            queries = gr.Radio(list(QUERY_CHOICES), value="every text token", label="Who stops reading")
            keys = gr.Radio(list(KEY_CHOICES), value="every image token", label="What they stop reading")
            box = gr.Textbox(label="Box x0, y0, x1, y1 (pixels of your image)", placeholder="e.g. 0, 0, 32, 32")
        with gr.Row():
            window = gr.Slider(1, 8, value=1, step=1, label="Layers per window (sweep)")
            patch_map = gr.Checkbox(value=True, label="Also the per-patch knockout map")
            run_knockout = gr.Button("Knock out", variant="primary", elem_id="iv-knockout")
        knockout_md = gr.Markdown()
        with gr.Row():
            bars = gr.Image(label="Before and after", format="png", elem_id="iv-knockout-bars")
            sweep = gr.Image(label="Window sweep", format="png")
            kmap = gr.Image(label="Per-patch knockout map", format="png", elem_id="iv-knockout-map")
        knockout_json = gr.File(label="JSON")

    with gr.Tab("Information flow"):
        gr.Markdown(FLOW_INTRO)
        with gr.Row():
            flow_window = gr.Slider(1, 8, value=1, step=1, label="Layers per window")
            run_flow = gr.Button("Trace the flow", variant="primary", elem_id="iv-flow")
        flow_md = gr.Markdown()
        flow_png = gr.Image(label="Routes cut per window", format="png", elem_id="iv-flow-chart")
        flow_json = gr.File(label="JSON")

    with gr.Tab("Patching"):
        gr.Markdown(PATCHING_INTRO)
        with gr.Row():
            blur = gr.Textbox(label="Or blur a box of the clean image: x0, y0, x1, y1", placeholder="e.g. 0, 20, 30, 45")
            patch_layers = gr.Textbox(label="Layers (empty = all; e.g. 0, 2-3)")
            patch_window = gr.Slider(0, 8, value=0, step=1, label="Patch squares of cells (0 = each image token)")
            run_patch = gr.Button("Run patching", variant="primary", elem_id="iv-patching")
        patch_md = gr.Markdown()
        with gr.Row():
            patch_maps = gr.Image(label="Restored per patch and layer", format="png", elem_id="iv-patching-maps")
            patch_curve = gr.Image(label="Per layer", format="png")
        patch_json = gr.File(label="JSON")

    with gr.Tab("Segment ablation"):
        gr.Markdown(SEGMENT_INTRO)
        with gr.Row():
            segments = gr.Radio(list(SEGMENT_CHOICES), value="ShapesWorld objects", label="Segments")
            grid = gr.Slider(1, 8, value=4, step=1, label="Grid rows and columns")
            seg_method = gr.Radio(list(SEGMENT_METHODS), value="feature_ablation", label="Captum method")
            baseline = gr.Radio(list(BASELINES), value="mean", label="Removed pixels become",
                                info="mean: the processor's mean colour (ShapesWorld objects: the scene's background)")
            samples = gr.Slider(2, 32, value=8, step=1, label="Shapley permutations")
        drawing = gr.ImageEditor(label="Drawn region (for 'drawn region'): draw over the part to remove", type="pil",
                                 height=260, brush=gr.Brush(colors=["#ff00ff"], default_size=12, color_mode="fixed"))
        run_seg = gr.Button("Ablate segments", variant="primary", elem_id="iv-segments")
        seg_md = gr.Markdown()
        with gr.Row():
            seg_png = gr.Image(label="Value per segment", format="png", elem_id="iv-segment-map")
            seg_bars = gr.Image(label="Per segment", format="png")
        seg_json = gr.File(label="JSON")

    make.click(make_counterfactual, inputs=[seed, obj, change], outputs=[image, corrupted, scene_note, seed],
               api_name="counterfactual")
    image.change(show_picker, inputs=[image, model, picked], outputs=picker, api_name=False)
    image.change(lambda path: path, inputs=image, outputs=drawing, api_name=False)  # draw over the clean image
    picker.select(pick_cell, inputs=[image, model, picked], outputs=[picker, picked], api_name=False)
    clear.click(clear_cells, inputs=[image, model], outputs=[picker, picked], api_name=False)
    run_knockout.click(knockout_view, inputs=[image, model, question, token, queries, keys, box, picked, window, patch_map],
                       outputs=[knockout_md, bars, sweep, kmap, knockout_json], api_name="knockout")
    run_flow.click(information_flow_view, inputs=[image, model, question, token, flow_window],
                   outputs=[flow_md, flow_png, flow_json], api_name="information_flow")
    run_patch.click(patching_view, inputs=[image, corrupted, model, question, token, blur, patch_layers, patch_window],
                    outputs=[patch_md, patch_maps, patch_curve, patch_json], api_name="patching")
    run_seg.click(segment_ablation_view,
                  inputs=[image, model, question, token, segments, grid, seed, drawing, seg_method, baseline, samples],
                  outputs=[seg_md, seg_png, seg_bars, seg_json], api_name="segment_ablation")
