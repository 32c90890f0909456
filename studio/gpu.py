"""ZeroGPU on Hugging Face Spaces: model work runs on a GPU borrowed per request.

On a ZeroGPU Space (SPACES_ZERO_GPU=true), `spaces.GPU` runs a decorated handler in a worker
that holds a GPU for the estimated duration; everywhere else it returns the handler unchanged,
so the same code serves a laptop, a CPU Space and a GPU machine.

What ZeroGPU asks of an app, and where this studio does it:
- `spaces` is imported before torch touches CUDA: app.py imports this module first;
- models are moved to CUDA at start-up, in the main process (`preload_for_zero_gpu`), not inside
  the handlers;
- results cross a process boundary, so handlers return only picklable values (paths, dicts,
  strings, numbers: never PIL images or tensors);
- each handler asks for a duration estimated from its request (`duration_*` below).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import spaces  # before torch touches CUDA
from spaces.config import Config as _SpacesConfig

log = logging.getLogger("studio")

ZERO_GPU = bool(_SpacesConfig.zero_gpu)
MAX_DURATION = 120  # seconds: the longest a request may hold a ZeroGPU device

# Rough GPU seconds per explanation method for the embedded and base-size Hub models.
METHOD_SECONDS = {"attention": 10, "rollout": 10, "relevancy": 15, "integrated_gradients": 30, "saliency": 15,
                  "occlusion": 40, "gradcam": 15}


def _clamp(seconds: float) -> int:
    return int(min(MAX_DURATION, max(5, seconds)))


def duration_classify(image=None, labels_text: str = "", *args, **kwargs) -> int:
    n_labels = len([p for p in str(labels_text or "").replace("\n", ",").split(",") if p.strip()])
    return _clamp(10 + n_labels * 0.05)


def duration_explain(*args, method: str | None = None, **kwargs) -> int:
    """For explain_label (method is the 5th argument) and explain_token (the 5th too)."""
    method = method or (args[4] if len(args) > 4 else "relevancy")
    base = str(method).split(" ", 1)[0]  # a named variant ("integrated_gradients (white canvas, ...)") costs as its method
    return _clamp(5 + METHOD_SECONDS.get(base, 30))


def duration_chat(image=None, message: str = "", history=None, model_name: str = "", max_new_tokens=48,
                  *args, **kwargs) -> int:
    try:
        tokens = int(max_new_tokens)
    except (TypeError, ValueError):
        tokens = 48
    return _clamp(10 + 0.15 * tokens)


def duration_batch(files=None, *args, **kwargs) -> int:
    return _clamp(10 + 6 * len(files or []))


def gpu(duration: Callable[..., int] | int = 30):
    """Run the decorated handler on a ZeroGPU device for `duration` seconds (a number, or a
    function of the handler's arguments); a no-op anywhere but a ZeroGPU Space."""
    return spaces.GPU(duration=duration)


def preload_for_zero_gpu(names: tuple[str, ...] | None = None) -> list[str]:
    """On ZeroGPU, load the embedded models (or `names`) and move them to CUDA in the main process at
    start-up (ZeroGPU moves the weights to the borrowed GPU for each request). Elsewhere, load nothing:
    models load lazily on first use."""
    if not ZERO_GPU:
        return []
    from mmie_core import models

    names = names or tuple(p.name for p in models.PRESETS.values() if p.embedded)

    os.environ.setdefault("MMIE_DEVICE", "cuda")
    os.environ.setdefault("MMIE_MAX_MODELS", str(max(3, len(names))))
    loaded = []
    for name in names:
        try:
            models.load_model(name)
        except Exception:  # noqa: BLE001 - a failed preload must not stop the Space: that model loads on first use
            log.exception("ZeroGPU: could not preload %s; it will load on first use", name)
            continue
        log.info("ZeroGPU: %s loaded on cuda at start-up", name)
        loaded.append(name)
    return loaded
