"""Search tab: index images with CLIP or SigLIP, search them by text or by image, and see why each hit
matched."""

from __future__ import annotations

import re
import threading
import uuid
from pathlib import Path

import gradio as gr

from mmie_core.explain import METHODS
from mmie_core.images import load_image
from mmie_core.render import figure_to_image, heatmap_figure
from mmie_core.search import (ImageIndex, build_index, explain_image_match, explain_text_match, score_label,
                              search_image, search_text)
from mmie_core.models import PRESETS, load_model

from .common import OUTPUT_DIR, example_images, example_photos, model_picker, save_json, save_png, user_errors
from .gpu import gpu

INTRO = """
### Search images by meaning
A CLIP or SigLIP model turns every image into one vector and your query (words, or another image)
into a vector of the same space; search returns the images whose vectors are closest. Build an
index of the example images or of your uploads, search, then **pick a hit to see why it matched**:
for a text query, the heatmap of the text on the image; for an image query, how well each patch of
the hit matches its best patch in your query image.
"""

SOURCES = ("200 ShapesWorld scenes", "the example images and photos", "my uploads")
SCENE_SEED = 70_000  # the generated scenes: seeds 70000-70199, 128 px
MAX_UPLOADS = 200
_INDEXES: dict[str, Path] = {}  # index id -> folder under OUTPUT_DIR (ids are made here, never paths)
_lock = threading.Lock()


def _dual_encoder(model_name: str):
    preset = PRESETS.get(model_name)
    if preset is not None and not preset.adapter.zero_shot:
        raise ValueError(f"{model_name} is not a CLIP or SigLIP model: search embeds images and texts with one.")
    loaded = load_model(model_name or "shapes-clip")
    if not loaded.adapter.zero_shot:
        raise ValueError(f"{loaded.name} is not a CLIP or SigLIP model: search embeds images and texts with one.")
    return loaded


def _folder(index_id: str) -> Path:
    index_id = str(index_id or "").strip()
    with _lock:
        folder = _INDEXES.get(index_id) if re.fullmatch(r"[0-9a-f]{16}", index_id) else None
    if folder is None or not folder.exists():
        raise ValueError("Build an index first (or build it again: indexes are kept for this server's session).")
    return folder


def _scenes(n: int = 200) -> list[str]:
    """PNG files of n ShapesWorld scenes (made once per server)."""
    from mmie_core.shapes.world import make_scene

    folder = OUTPUT_DIR / "search-scenes"
    with _lock:
        folder.mkdir(exist_ok=True)
        paths = [folder / f"scene_{SCENE_SEED + i}.png" for i in range(n)]
        for i, path in enumerate(paths):
            if not path.exists():
                make_scene(SCENE_SEED + i).render(128).save(path)
    return [str(p) for p in paths]


@gpu(60)
@user_errors
def index_images(source: str = "200 ShapesWorld scenes", files=None, model_name: str = "shapes-clip",
                 progress=gr.Progress()):
    """Index 200 generated ShapesWorld scenes, the example images and photos, or the uploaded files. Returns
    (summary Markdown, index id)."""
    loaded = _dual_encoder(model_name)
    if source == "my uploads":
        paths = [f if isinstance(f, str) else getattr(f, "name", None) or f.get("path") for f in files or []]
        if not paths:
            raise ValueError("Upload some images first, or index the example images.")
        if len(paths) > MAX_UPLOADS:
            raise ValueError(f"At most {MAX_UPLOADS} images per index here; use `python -m mmie_core index` for more.")
    elif source == "200 ShapesWorld scenes":
        paths = _scenes()
    else:
        paths = example_images() + example_photos()
    index_id = uuid.uuid4().hex[:16]
    folder = OUTPUT_DIR / f"index-{index_id}"
    index, report = build_index(loaded, paths, folder,
                                progress=lambda k, n: progress((k, n), desc="embedding images"))
    with _lock:
        _INDEXES[index_id] = folder
    skipped = "".join(f"\n- skipped {Path(p).name}: {why}" for p, why in report.skipped)
    summary = (f"Indexed **{len(index)} images** with {loaded.name} ({report.encoded} embedded, "
               f"{report.images_per_second:.1f} images/s). Index id `{index_id}`.{skipped}")
    return summary, index_id


@gpu(30)
@user_errors
def search_images(index_id: str, model_name: str = "shapes-clip", text: str = "", image=None, k: int = 8):
    """Search an index by text or by image. Returns (summary Markdown, gallery [(path, caption)], hits JSON)."""
    loaded = _dual_encoder(model_name)
    index = ImageIndex.load(_folder(index_id))
    k = int(k)
    if not 1 <= k <= 50:
        raise ValueError("Show between 1 and 50 hits.")
    text = (text or "").strip()
    if text and image is not None:
        raise ValueError("Search by text or by image, not both: clear one of them.")
    if text:
        hits, score = search_text(loaded, index, text, k), score_label(loaded)
    elif image is not None:
        hits, score = search_image(loaded, index, load_image(image), k), "cosine similarity of the two images' vectors"
    else:
        raise ValueError("Type a text query or give a query image.")
    gallery = [(save_png(load_image(h.path), f"hit-{h.rank}"), f"{h.rank + 1}. {h.name} · {h.score:.3f}") for h in hits]
    summary = f"{len(hits)} hits of {len(index)} images. Score: **{score}**. Pick a hit to see why it matched."
    found = [{k: v for k, v in h.to_json().items() if k != "path"} for h in hits]  # no server paths to the client
    return summary, gallery, {"by": "text" if text else "image", "query": text, "score": score, "hits": found}


@gpu(30)
@user_errors
def explain_match(index_id: str, model_name: str = "shapes-clip", rank: int = 0, text: str = "", image=None,
                  k: int = 8, method: str = "relevancy"):
    """Why hit `rank` (0 = the best) of the search for this query matched. Returns (heatmap PNG, Markdown,
    heatmap JSON path)."""
    loaded = _dual_encoder(model_name)
    index = ImageIndex.load(_folder(index_id))
    text = (text or "").strip()
    rank = int(rank)
    if not 0 <= rank < int(k):
        raise ValueError(f"Pick one of the {int(k)} hits.")
    if text and image is not None:
        raise ValueError("Search by text or by image, not both: clear one of them.")
    if text:
        hits = search_text(loaded, index, text, int(k))
    elif image is not None:
        hits = search_image(loaded, index, load_image(image), int(k))
    else:
        raise ValueError("Type a text query or give a query image.")
    if rank >= len(hits):
        raise ValueError(f"There are only {len(hits)} hits.")
    return _explain_hit(loaded, hits[rank], text, image, method)


def _explain_hit(loaded, hit, text: str, image, method: str):
    picture = load_image(hit.path)
    if text:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")
        heatmap = explain_text_match(loaded, picture, text, method)
        about = (f"Hit {hit.rank + 1}, **{hit.name}** (score {hit.score:.3f}): where the image supports "
                 f"\"{text}\" ({method}).")
        title = f"{method}: \"{text}\" on {hit.name}"
    else:
        heatmap, _ = explain_image_match(loaded, load_image(image), picture)
        about = (f"Hit {hit.rank + 1}, **{hit.name}** (cosine similarity {hit.score:.3f}): each patch's best cosine "
                 "similarity to a patch of your query image (the vision tower's last layer). Bright patches have a "
                 "close match in the query.")
        title = f"patch match: {hit.name}"
    png = save_png(figure_to_image(heatmap_figure(picture, heatmap, title=title)), "match")
    return png, about, save_json(heatmap.to_json(), "match")


@user_errors
def _pick(index_id, model_name, found, image, method, evt: gr.SelectData):
    """A click on the gallery explains that hit of the search that filled it (not of the boxes' current query)."""
    from mmie_core.search import Hit

    hits = (found or {}).get("hits") or []
    if evt is None or not 0 <= int(evt.index) < len(hits):
        raise ValueError("Search first, then pick a hit.")
    index = ImageIndex.load(_folder(index_id))
    h = hits[int(evt.index)]
    entry = index.entries[int(h["index"])]
    hit = Hit(h["rank"], h["index"], h["name"], entry["path"], h["score"], h["similarity"])
    by_image = found.get("by") == "image"
    if by_image and image is None:
        raise ValueError("The query image was cleared: search again.")
    return _explain_hit(_dual_encoder(model_name), hit, "" if by_image else found.get("query", ""), image, method)


def build_search_tab() -> None:
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1):
            model = model_picker("zero_shot", "shapes-clip")
            source = gr.Radio(list(SOURCES), value=SOURCES[0], label="Images to index")
            uploads = gr.File(label="Your images", file_count="multiple", file_types=["image"], height=140)
            build = gr.Button("Build the index", variant="primary", elem_id="search-build")
            status = gr.Markdown(elem_id="search-status")
            index_id = gr.Textbox(label="Index id", interactive=False, elem_id="search-index-id")
        with gr.Column(scale=2):
            with gr.Row():
                text = gr.Textbox(label="Search by text", value="a red circle", elem_id="search-text")
                query_image = gr.Image(label="...or by image", type="filepath", height=160, sources=["upload", "clipboard"])
            with gr.Row():
                k = gr.Slider(1, 24, value=8, step=1, label="Hits")
                method = gr.Dropdown(list(METHODS), value="relevancy", label="Why-this-match method (text queries)")
                go = gr.Button("Search", variant="primary", elem_id="search-go")
            summary = gr.Markdown()
            gallery = gr.Gallery(label="Hits (pick one)", columns=4, height=320, elem_id="search-gallery",
                                 allow_preview=False)
            hits_json = gr.JSON(label="Hits", visible=False)
    with gr.Row():
        match_png = gr.Image(label="Why this match", format="png", elem_id="search-match")
        with gr.Column():
            match_md = gr.Markdown()
            match_json = gr.File(label="Heatmap JSON")
    build.click(index_images, inputs=[source, uploads, model], outputs=[status, index_id], api_name="index")
    model.change(lambda: ("", "*The model changed: build the index again.*"), outputs=[index_id, status],
                 api_name=False)
    go.click(search_images, inputs=[index_id, model, text, query_image, k], outputs=[summary, gallery, hits_json],
             api_name="search")
    gallery.select(_pick, inputs=[index_id, model, hits_json, query_image, method],
                   outputs=[match_png, match_md, match_json], api_name=False)
    hidden_rank = gr.Number(value=0, visible=False, precision=0)
    gr.Button("Explain hit", visible=False).click(
        explain_match, inputs=[index_id, model, hidden_rank, text, query_image, k, method],
        outputs=[match_png, match_md, match_json], api_name="explain_match")
