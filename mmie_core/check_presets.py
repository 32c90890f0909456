"""Check that every view and method a model's family supports runs on real photos.

`check_model(model, image_path)` loads a preset or a model folder, reads its geometry on the image
(vision tokens, image tokens counted in the processor's output, the heatmap grid) and runs each
check the family's capabilities call for, timing each one and catching its error, so one broken
view does not hide the others. `python -m mmie_core check-presets` runs it over presets x photos.

Settings are cheap on purpose (few integrated-gradient steps, large occlusion windows, 4 answer
tokens): the point is that every path runs at the model's true geometry, not a converged figure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .models import REPO_ROOT

PHOTOS_DIR = REPO_ROOT / "assets" / "examples" / "photos"
LABELS = ["a photo of a person", "a photo of a cat", "a photo of a cup of coffee", "a photo of a rocket"]
QUESTION = "What is in the image?"


@dataclass
class CheckSettings:
    """Costs of the checks (the defaults keep a whole preset x photo matrix cheap on a CPU)."""

    ig_steps: int = 4  # integrated gradients' steps
    max_new_tokens: int = 4  # answer length
    occlusion_cells: int = 2  # occlusion windows per grid side (window = side // this)
    robustness: bool = True  # the robustness panel (a few more forward passes)


def example_photos() -> list[Path]:
    """The example photographs shipped with the studio."""
    return sorted(p for p in PHOTOS_DIR.glob("*.jpg"))


def _method_params(subject, method: str, settings: CheckSettings) -> dict:
    if method == "integrated_gradients":
        return {"steps": settings.ig_steps, "internal_batch_size": settings.ig_steps}
    if method == "occlusion":
        side = min(subject.grid.rows, subject.grid.cols) // subject.layout.unit
        window = max(1, side // settings.occlusion_cells)
        return {"window": window, "stride": window}
    return {}


def _answer_ids(loaded, image, settings: CheckSettings) -> tuple[list[int], str]:
    """The greedy answer's ids; a random-weight model may end at once, then a fixed word stands in."""
    from .chat import greedy_answer_ids

    try:
        return greedy_answer_ids(loaded, image, QUESTION, max_new_tokens=settings.max_new_tokens), "generated"
    except ValueError as err:
        if "no answer" not in str(err):
            raise
    ids = loaded.processor.tokenizer("image", add_special_tokens=False)["input_ids"]
    return list(ids[:1]), "fixed (the model ended its answer at once)"


def _checks(loaded, image, settings: CheckSettings, facts: dict) -> list[tuple[str, Callable[[], object]]]:
    """(name, thunk) for every view and method the family supports."""
    from .chat import answer_sequence, answer_token_maps, patch_to_words
    from .explain import METHODS, NAMED_VARIANTS, explain_subject, make_subject
    from .inspect_vision import inspect_vision, patch_similarity
    from .lens import logit_lens
    from .robustness import robustness
    from .sequence import sequence_view
    from .zero_shot import classify

    from .patches import processor_view, vision_grid
    from .render import draw_grid_on_input, draw_grid_on_original

    adapter = loaded.adapter
    checks: list[tuple[str, Callable[[], object]]] = []

    def patches_view():  # the Patches tab's two pictures
        view = processor_view(loaded, image)
        grid = view.grid or vision_grid(loaded)
        return draw_grid_on_original(image, view, grid), draw_grid_on_input(view, grid)

    checks.append(("patches", patches_view))

    class State(dict):
        def __missing__(self, key):
            raise RuntimeError("nothing to analyse: the answer check failed")

    state = State()

    if adapter.zero_shot:
        target = {"label": LABELS[0], "labels": LABELS, "templates": ["{}"]}
        checks.append(("classify", lambda: classify(loaded, [image], LABELS)))
    else:
        def answer():
            state["ids"], _ = _answer_ids(loaded, image, settings)
            return state["ids"]

        checks.append(("answer", answer))

        def geometry():
            seq = answer_sequence(loaded, image, QUESTION, state["ids"])
            carried = len(seq.image_positions) + len(getattr(seq.layout, "marker_positions", ()) or ()) \
                if adapter.token_grid else len(seq.image_positions)
            if facts["image_tokens"] and carried != facts["image_tokens"]:
                raise AssertionError(f"the layout places {carried} image tokens; the prompt holds "
                                     f"{facts['image_tokens']}")
            return carried

        checks.append(("image_token_layout", geometry))
        checks.append(("token_maps", lambda: answer_token_maps(loaded, image, QUESTION, state["ids"])))

    def subject():
        if "subject" not in state:
            state["subject"] = make_subject(loaded, image, target if adapter.zero_shot else
                                            {"question": QUESTION, "answer_ids": state["ids"], "token_index": 0})
            facts["grid"] = list(state["subject"].layout.shape)
        return state["subject"]

    variants = {m: (m, {}) for m in METHODS}
    if adapter.describes:
        variants |= NAMED_VARIANTS
    if adapter.token_grid:
        variants["relevancy (through the vision tower)"] = ("relevancy", {"through_vision": True})
    for name, (method, params) in variants.items():
        checks.append((f"explain: {name}", lambda method=method, params=params: explain_subject(
            subject(), method, **(_method_params(subject(), method, settings) | params))))

    if adapter.fixed_grid:  # the vision-tower views
        checks.append(("inspect_vision", lambda: inspect_vision(loaded, image)))
        checks.append(("patch_similarity", lambda: patch_similarity(loaded, image, 0, 0)))
    if adapter.query_tokens:
        from .qformer import query_maps

        checks.append(("query_maps", lambda: query_maps(loaded, image, QUESTION)))
    if adapter.token_grid:
        checks.append(("sequence", lambda: sequence_view(loaded, image, QUESTION)))

        def words():
            maps = answer_token_maps(loaded, image, QUESTION, state["ids"])
            return patch_to_words(maps, maps.attention.shape[1] // 2, maps.attention.shape[2] // 2)

        checks.append(("patch_to_words", words))
        checks.append(("logit_lens", lambda: logit_lens(loaded, image, QUESTION, layers=[0, 1], top_k=3)))
    if settings.robustness and (adapter.zero_shot or adapter.token_grid):
        def panel():
            tgt = target if adapter.zero_shot else {"question": QUESTION, "answer_ids": state["ids"], "token_index": 0}
            return robustness(loaded, image, tgt, "blur", strengths=[0.0, 4.0])

        checks.append(("robustness", panel))
    return checks


def check_model(model: str, image_path: str | Path, settings: CheckSettings | None = None) -> dict:
    """One model on one image: its geometry and every check, as the JSON of `check-presets`."""
    from .chat import image_token_count
    from .images import load_image
    from .models import load_model
    from .patches import processor_view, vision_grid

    settings = settings or CheckSettings()
    loaded = load_model(str(model))
    image = load_image(Path(image_path))
    view = processor_view(loaded, image)
    grid = view.grid or vision_grid(loaded)
    views = (view.tiles[0] * view.tiles[1] + 1) if view.tiles else 1  # Idefics3: tiles + the global view
    facts = {"model": str(model), "family": loaded.family, "image": str(image_path),
             "vision_tokens": views * grid.n_tokens,
             "image_tokens": image_token_count(loaded, image) if loaded.adapter.describes else 0,
             "grid": [grid.rows, grid.cols]}
    checks = []
    for name, thunk in _checks(loaded, image, settings, facts):
        t0 = time.perf_counter()
        try:
            thunk()
            error = None
        except Exception as err:  # noqa: BLE001 - every failure is reported, none stops the others
            error = f"{type(err).__name__}: {err}"
        checks.append({"name": name, "ok": error is None, "seconds": round(time.perf_counter() - t0, 3),
                       "error": error})
    return facts | {"checks": checks}


def check_presets(models: list[str], images: list[str | Path], settings: CheckSettings | None = None,
                  progress: Callable[[int, int, str], None] | None = None) -> dict:
    """`{"models": [check_model(...) for every model x image]}`; a model that does not load is reported
    as one failed `load` check."""
    from .models import ModelLoadError

    results = []
    total = len(models) * len(images)
    for i, model in enumerate(models):
        for j, image in enumerate(images):
            if progress:
                progress(i * len(images) + j, total, f"{model} x {Path(image).name}")
            try:
                results.append(check_model(model, image, settings))
            except (ModelLoadError, ValueError, OSError) as err:
                results.append({"model": str(model), "family": None, "image": str(image), "vision_tokens": None,
                                "image_tokens": None, "grid": None,
                                "checks": [{"name": "load", "ok": False, "seconds": 0.0, "error": str(err)}]})
    return {"models": results}


def format_table(report: dict) -> str:
    """A plain-text table: one row per model x image, failed checks named."""
    lines = [f"{'model':<36} {'image':<22} {'family':<10} {'vision':>7} {'image':>6} {'grid':>7} {'ok':>7}  failed"]
    for r in report["models"]:
        ok = sum(c["ok"] for c in r["checks"])
        failed = ", ".join(c["name"] for c in r["checks"] if not c["ok"])
        grid = "x".join(map(str, r["grid"])) if r["grid"] else "-"
        lines.append(f"{Path(r['model']).name:<36} {Path(r['image']).name:<22} {str(r['family']):<10} "
                     f"{str(r['vision_tokens']):>7} {str(r['image_tokens']):>6} {grid:>7} "
                     f"{ok:>3}/{len(r['checks']):<3}  {failed}")
    return "\n".join(lines)
