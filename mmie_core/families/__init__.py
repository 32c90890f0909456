"""Model families as adapters: one module per family, each the one place that knows its architecture.

`adapter_for(config)` picks the adapter from the config's model_type (and checks the vision tower's
type and the features the studio would otherwise map wrongly); `adapter_named(name)` finds one by
its short name (a preset's family). Adding a family: a module with a `Family` subclass and a
`FAMILY` instance, listed in `ADAPTERS`, plus its true-geometry fixture under
`tests/fixtures/presets/` (see docs/hub-families.md).
"""

from __future__ import annotations

from . import blip, blip2, clip, idefics3, llava, paligemma, qwen2_vl, siglip
from .base import Family, UnsupportedModel, vision_config

ADAPTERS: tuple[Family, ...] = (clip.FAMILY, siglip.FAMILY, llava.FAMILY, paligemma.FAMILY, idefics3.FAMILY,
                                qwen2_vl.FAMILY, blip.FAMILY, blip2.FAMILY)

# Relatives of supported families whose image tokens the studio would map wrongly: refused by model type.
LOOKALIKES = {
    "siglip2": "SigLIP 2's NaFlex checkpoints cut each image into a variable number of patches, which the "
               "zero-shot maps do not follow; the fixed-resolution SigLIP 2 checkpoints (such as "
               "google/siglip2-base-patch16-224) load as siglip.",
    "qwen2_5_vl": "Qwen2.5-VL's vision tower reorders its patches into attention windows, which the vision-side "
                  "maps do not undo yet; Qwen2-VL checkpoints are supported.",
}

_BY_TYPE = {t: a for a in ADAPTERS for t in a.model_types}
_BY_NAME = {a.name: a for a in ADAPTERS}
NAMES = tuple(_BY_NAME)


def adapter_for(config) -> Family:
    """The adapter of a transformers config, or UnsupportedModel saying why not."""
    model_type = getattr(config, "model_type", "")
    if model_type in LOOKALIKES:
        raise UnsupportedModel(f"Model type {model_type!r} is not supported: {LOOKALIKES[model_type]}")
    if model_type not in _BY_TYPE:
        raise UnsupportedModel(f"Model type {model_type!r} is not supported; supported families: {', '.join(NAMES)}.")
    adapter = _BY_TYPE[model_type]
    adapter.check_config(config)
    return adapter


def adapter_named(name: str) -> Family:
    """The adapter called `name` (a preset's family)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnsupportedModel(f"Unknown family {name!r}; known: {', '.join(NAMES)}.") from None


__all__ = ["ADAPTERS", "Family", "LOOKALIKES", "NAMES", "UnsupportedModel", "adapter_for", "adapter_named",
           "vision_config"]
