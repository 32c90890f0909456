"""Evaluation of the embedded models on fresh ShapesWorld scenes, and their model cards.

Metrics (all accuracies in 0..1):
- clip/siglip: `zero_shot_top1_single` (top-1 over every colour x shape label on one-object
  scenes) and `zero_shot_top1_multi_present` (top label names an object present in a 2 or
  3 object scene);
- vlm: `qa_color`, `qa_shape`, `qa_count`, `qa_position`, `qa_existence` (exact match of the
  greedy answer) and `caption_exact` (every object's colour, shape and position named, and
  nothing else).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..chat import answer_batch
from ..models import LoadedModel, load_model
from ..zero_shot import classify
from .recipes import CAPTION_PROMPTS, TRAIN_SEED_OFFSET, QFormerRecipe, VLMRecipe
from .world import COLORS, POSITIONS, QA_TYPES, SHAPES, Scene, all_labels, make_scene

EVAL_RENDER_SIZE = 64
CARD_EVAL_SEED = 10_000  # seeds of the model cards' evaluation (never training seeds)
CARD_EVAL_N = 500


def _check_seeds(seed: int, n: int) -> None:
    if seed < 0 or seed + n > TRAIN_SEED_OFFSET:
        raise ValueError(f"evaluation seeds must lie in [0, {TRAIN_SEED_OFFSET}), the training seeds start there")


def _label(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def _zero_shot_units(seed: int, n: int, batch: int = 100) -> list[tuple[str, int, int]]:
    """("single" | "multi", first scene, last scene + 1) per batch of images classified at once."""
    return [(kind, start, min(start + batch, n)) for kind in ("single", "multi") for start in range(0, n, batch)]


def _zero_shot_scenes(kind: str, seed: int, start: int, end: int) -> list[Scene]:
    return [make_scene(seed + i, n_objects=1 if kind == "single" else 2 + i % 2) for i in range(start, end)]


def _zero_shot_unit(loaded: LoadedModel, seed: int, unit: tuple[str, int, int]) -> list[bool]:
    """Hits of one batch: the top label is the object (single) or one of the objects (multi)."""
    labels = [_label(*phrase.split()) for phrase in all_labels()]
    kind, start, end = unit
    scenes = _zero_shot_scenes(kind, seed, start, end)
    probs = classify(loaded, [s.render(EVAL_RENDER_SIZE) for s in scenes], labels).probs
    tops = [labels[int(k)] for k in probs.argmax(-1)]
    return [t in {_label(o.color, o.shape) for o in s.objects} for s, t in zip(scenes, tops)]


def _zero_shot_metrics(units: list, results: list[list[bool]], n: int) -> dict[str, float]:
    hits = {"single": [], "multi": []}
    for (kind, _, _), r in zip(units, results):
        hits[kind] += r
    return {"zero_shot_top1_single": sum(hits["single"]) / n, "zero_shot_top1_multi_present": sum(hits["multi"]) / n}


def evaluate_zero_shot(loaded: LoadedModel, seed: int, n: int, batch: int = 100) -> dict[str, float]:
    units = _zero_shot_units(seed, n, batch)
    return _zero_shot_metrics(units, [_zero_shot_unit(loaded, seed, u) for u in units], n)


def normalize_answer(text: str) -> str:
    return re.sub(r"[\s.?!,]+$", "", text.strip().lower())


def caption_triples(text: str) -> set[tuple[str, str, str]]:
    """(colour, shape, position) triples named in a caption such as the VLM writes."""
    positions = "|".join(sorted(POSITIONS, key=len, reverse=True))
    pattern = rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) at the ({positions})\b"
    return {m.groups() for m in re.finditer(pattern, text.lower())}


def _vlm_jobs(seed: int, n: int) -> list[tuple[str, int, str, str]]:
    """(kind, scene index, question, expected) of every question and one caption per scene, short answers
    first (they batch together), captions last."""
    jobs = []
    for i in range(n):
        scene = make_scene(seed + i)
        jobs += [(p["type"], i, p["question"], p["answer"]) for p in scene.qa()]
        jobs.append(("caption", i, CAPTION_PROMPTS[0], scene.caption))
    jobs.sort(key=lambda j: j[0] == "caption")
    return jobs


def _vlm_unit(loaded: LoadedModel, seed: int, chunk: list[tuple[str, int, str, str]]) -> list[tuple[str, bool]]:
    """(kind, right?) of one batch of questions, answered together (greedy, left padding)."""
    images = {i: make_scene(seed + i).render(EVAL_RENDER_SIZE) for i in sorted({j[1] for j in chunk})}
    answers = answer_batch(loaded, [images[j[1]] for j in chunk], [j[2] for j in chunk])
    out = []
    for (kind, _, _, expected), answer in zip(chunk, answers):
        if kind == "caption":
            ok = caption_triples(answer) == caption_triples(expected)
        else:
            ok = normalize_answer(answer) == normalize_answer(expected)
        out.append((kind, bool(ok)))
    return out


def _vlm_metrics(results: list[list[tuple[str, bool]]]) -> dict[str, float]:
    hits: dict[str, list[bool]] = {t: [] for t in (*QA_TYPES, "caption")}
    for chunk in results:
        for kind, ok in chunk:
            hits[kind].append(ok)
    metrics = {f"qa_{t}": sum(hits[t]) / len(hits[t]) for t in QA_TYPES}
    metrics["caption_exact"] = sum(hits["caption"]) / len(hits["caption"])
    return metrics


def _vlm_units(seed: int, n: int, batch: int = 64) -> list:
    jobs = _vlm_jobs(seed, n)
    return [jobs[start : start + batch] for start in range(0, len(jobs), batch)]


def evaluate_vlm(loaded: LoadedModel, seed: int, n: int, batch: int = 64) -> dict[str, float]:
    units = _vlm_units(seed, n, batch)
    return _vlm_metrics([_vlm_unit(loaded, seed, u) for u in tqdm(units, desc="evaluate", leave=False)])


class EvaluateWorker:
    """Ray Data actor: loads the model once and evaluates the batches (work units) it is given, each exactly
    as the local engine batches it."""

    def __init__(self, model: str, seed: int, n: int):
        self.loaded = load_model(model)
        self.seed, self.n = seed, n
        self.units = _zero_shot_units(seed, n) if self.loaded.adapter.zero_shot else _vlm_units(seed, n)

    def __call__(self, batch: dict) -> dict:
        import json

        run = _zero_shot_unit if self.loaded.adapter.zero_shot else _vlm_unit
        with torch.inference_mode():
            rows = [json.dumps(run(self.loaded, self.seed, self.units[int(k)])) for k in batch["index"]]
        return {"index": np.asarray(batch["index"]), "result": np.array(rows)}


def evaluate_model(model: str, seed: int, n: int, engine: str = "local", workers: int = 2,
                   address: str | None = None) -> dict:
    """`{"model", "seed", "n", "metrics"}` for a model folder or preset on fresh scenes. `engine="ray"`
    evaluates the same batches on Ray Data actors (the same answers, so the same metrics)."""
    _check_seeds(seed, n)
    loaded = load_model(str(model))
    if not (loaded.adapter.zero_shot or loaded.adapter.chat):
        raise ValueError(f"ShapesWorld evaluation covers zero-shot and chat models, not {loaded.family}")
    if engine == "ray":
        from ..batch import ray_map_indices

        units = _zero_shot_units(seed, n) if loaded.adapter.zero_shot else _vlm_units(seed, n)
        results = ray_map_indices(len(units), EvaluateWorker, {"model": str(model), "seed": seed, "n": n},
                                  workers=workers, address=address)
        metrics = (_zero_shot_metrics(units, results, n) if loaded.adapter.zero_shot
                   else _vlm_metrics([[tuple(x) for x in r] for r in results]))
    elif engine == "local":
        with torch.inference_mode():
            metrics = evaluate_zero_shot(loaded, seed, n) if loaded.adapter.zero_shot else evaluate_vlm(loaded, seed, n)
    else:
        raise ValueError(f"engine must be local or ray, not {engine!r}")
    return {"model": str(model), "seed": seed, "n": n, "metrics": {k: round(v, 4) for k, v in metrics.items()}}


_CARD = """---
library_name: transformers
license: apache-2.0
tags: [shapesworld, mmie-studio, {family}]
---

# {name}

{summary}

**It knows ShapesWorld, not photographs.** It has only ever seen scenes of one to three
coloured shapes (circle, square, triangle, diamond in red, green, blue, yellow, purple or
orange; small or large; in a 3x3 layout) on a light background. On photographs, drawings with
other objects or text, its outputs are meaningless; that is the lesson it is built for.

## Architecture
{architecture}

## Data and recipe
Scenes from `mmie_core.shapes` with seeds from {train_offset} upward (evaluation seeds are
below that, so they are never seen in training). Recipe (from `training.json`):

```json
{recipe}
```

{reproduce}

## Evaluation
`python -m mmie_core.shapes evaluate --model {folder} --seed {seed} --n {n} --json`
({eval_seconds:.0f} s):

| metric | value |
|---|---|
{rows}

## Limits
- Input {image_size} px; larger images are downscaled by the processor.
- Labels and questions outside the word-level vocabulary map to `<unk>`.
{extra_limits}
"""


def training_stages(training: dict) -> list[dict]:
    """The training records of a model, first stage first (each later stage continued from the
    one before with `init_from`; `training.json` nests the earlier stages under "first_stage")."""
    chain = []
    while training:
        chain.append(training)
        training = training.get("first_stage")
    return chain[::-1]


def reproduce_text(training: dict, kind: str) -> str:
    """How to reproduce a model from its training record: one command per stage."""
    stages = training_stages(training)
    where = f"on {training['device']} with {training['torch_threads']} threads, plus rendering"
    if len(stages) == 1:
        return (f"Reproduce: `python -m mmie_core.shapes train {kind} --out DIR` ({training['train_seconds']:.0f} s "
                f"of training {where}). Loss log: `training_log.csv`.")
    defaults = {"vlm": lambda: asdict(VLMRecipe()), "blip2": lambda: asdict(QFormerRecipe())}.get(kind, dict)()
    commands = []
    for k, stage in enumerate(stages, start=1):
        recipe = stage["recipe"]
        flags = [f"--set init_from=STAGE{k - 1}"] if k > 1 else []
        flags += [f"--set {name}={str(v).lower() if isinstance(v, bool) else v}" for name, v in recipe.items()
                  if name not in ("steps", "init_from") and name in defaults and v != defaults[name]]
        if k > 1 or recipe.get("steps") != defaults.get("steps"):
            flags.append(f"--steps {recipe['steps']}")
        out = "DIR" if k == len(stages) else f"STAGE{k}"
        command = " ".join([f"python -m mmie_core.shapes train {kind} --out {out}", *flags])
        commands.append(f"{k}. `{command}` ({stage['train_seconds']:.0f} s)")
    return (f"Reproduce in {len(stages)} stages, each a new warmup and cosine schedule from the weights of the "
            f"stage before ({where}):\n\n" + "\n".join(commands) + "\n\nThe recipe above is the last stage's; the "
            "earlier stages' are nested in `training.json`. Loss log of the last stage: `training_log.csv`.")


def _blip2_architecture(config: dict, vision: dict) -> tuple[str, str]:
    text, q = config["text_config"], config["qformer_config"]
    cross = len(range(0, q["num_hidden_layers"], q.get("cross_attention_frequency", 2)))
    architecture = (
        f"`Blip2ForConditionalGeneration`: BLIP-2 ViT ({vision['num_hidden_layers']} layers, width "
        f"{vision['hidden_size']}, patch {vision['patch_size']}; CLS + patches) -> Q-Former ({q['num_hidden_layers']} "
        f"layers, width {q['hidden_size']}, cross-attention to the vision tokens in {cross} of them, "
        f"{config['num_query_tokens']} learned queries) -> linear projection -> Llama ({text['num_hidden_layers']} "
        f"layers, width {text['hidden_size']}); the language model reads {config['num_query_tokens']} query "
        "tokens per image, written by the chat template inside the first user turn."
    )
    extra = ("- Answers single words for questions; captions list objects in reading order.\n"
             "- Its image tokens are queries, not patches: maps over the image go through each query's "
             "cross-attention (Inside > Q-Former queries).")
    return architecture, extra


def _vlm_architecture(config: dict, vision: dict) -> tuple[str, str]:
    text = config["text_config"]
    architecture = (
        f"`LlavaForConditionalGeneration`: CLIP ViT ({vision['num_hidden_layers']} layers, width "
        f"{vision['hidden_size']}, patch {vision['patch_size']}) -> MLP projector -> Llama "
        f"({text['num_hidden_layers']} layers, width {text['hidden_size']}); "
        f"{config['image_seq_length']} image tokens per image (CLS dropped)."
    )
    return architecture, "- Answers single words for questions; captions list objects in reading order."


def _dual_encoder_architecture(config: dict, vision: dict) -> tuple[str, str]:
    architecture = (
        f"`{config['architectures'][0]}`: ViT ({vision['num_hidden_layers']} layers, width "
        f"{vision['hidden_size']}, patch {vision['patch_size']}) and a text transformer; labels are "
        "plain phrases such as \"a red circle\" (no prompt template)."
    )
    return architecture, "- Labels beyond colour + shape (+ size) phrases and captions were never trained."


_ARCHITECTURES = {"vlm": _vlm_architecture, "blip2": _blip2_architecture}  # model-card kind -> its description


def write_model_card(folder: Path, kind: str, seed: int = CARD_EVAL_SEED, n: int = CARD_EVAL_N,
                     known_issues: str = "") -> dict:
    """Evaluate `folder` and write its README.md model card (with `known_issues`, Markdown, under
    Limits). Returns the evaluation."""
    folder = Path(folder)
    t0 = time.time()
    result = evaluate_model(str(folder), seed=seed, n=n)
    eval_seconds = time.time() - t0
    training = json.loads((folder / "training.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    vision = config.get("vision_config", {})
    summaries = {
        "clip": "A CLIP dual encoder trained with the contrastive softmax loss on ShapesWorld scenes, "
        "captions and single-object phrases.",
        "siglip": "A SigLIP dual encoder trained with the pairwise sigmoid loss on the same data as shapes-clip.",
        "vlm": "A LLaVA-style chat model: the vision tower of shapes-clip, a two-layer projector and a small "
        "Llama decoder, trained to answer questions (colour, shape, count, position, existence), "
        "describe scenes and write alt text.",
        "blip2": "A BLIP-2-style chat model: a vision tower started from shapes-clip's, a Q-Former whose learned "
        "queries read the image through cross-attention, and shapes-vlm's language model, trained on the same "
        "chats as shapes-vlm (questions, captions, alt text).",
    }
    architecture, extra = _ARCHITECTURES.get(kind, _dual_encoder_architecture)(config, vision)
    reproduce = reproduce_text(training, kind)
    card = _CARD.format(
        reproduce=reproduce,
        family=config.get("model_type", kind),
        name=folder.name,
        summary=summaries[kind],
        architecture=architecture,
        train_offset=TRAIN_SEED_OFFSET,
        recipe=json.dumps(training["recipe"], indent=2),
        kind=kind,
        folder=f"assets/models/{folder.name}",
        seed=seed,
        n=n,
        eval_seconds=eval_seconds,
        rows="\n".join(f"| `{k}` | {v:.3f} |" for k, v in result["metrics"].items()),
        image_size=vision.get("image_size"),
        extra_limits=extra + (f"\n\n### Known issues\n{known_issues.strip()}\n" if known_issues else ""),
    )
    (folder / "README.md").write_text(card)
    (folder / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
