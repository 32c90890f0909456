"""Model presets, loading (embedded folder or Hub id), device/dtype choice and an LRU cache.

Every model, embedded or from the Hub, goes through `load_model`: safetensors only, never
remote code, local folders strictly offline. Attention implementation is switched per use
with `attention_implementation(model, "eager")` instead of loading a second copy.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .templates import IMAGENET_TEMPLATES, SIGLIP_TEMPLATE

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DIR = REPO_ROOT / "assets" / "models"

TASKS = ("patches", "zero_shot", "chat", "alt_text")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do instead."""


@dataclass(frozen=True)
class Preset:
    """One entry of the model picker."""

    name: str  # what the UI shows and the API takes
    source: str  # Hub id, or a folder name under assets/models for embedded models
    family: str  # the family adapter's name (mmie_core.families): checked against the loaded config
    tasks: tuple[str, ...]  # subset of TASKS this model serves
    embedded: bool = False  # shipped in the repo, works offline
    # Hub commit to pin (None for embedded): one whose tree holds safetensors weights, since the loader
    # never reads pickled ones (the main branches of openai/clip-* and Salesforce/blip-* hold only
    # pytorch_model.bin; their pins are the safetensors conversions, for clip-vit-base-patch16 a
    # pull-request ref because no converted commit was merged)
    revision: str | None = None
    about: str = ""  # one or two sentences for the model picker
    default_templates: tuple[str, ...] = field(default=("{}",))  # zero-shot prompt templates
    quantize: str | None = None  # "4bit" / "8bit": bitsandbytes weights on CUDA (MMIE_QUANTIZE overrides)

    @property
    def location(self) -> str:
        return str(EMBEDDED_DIR / self.source) if self.embedded else self.source

    @property
    def adapter(self):
        """The family adapter named by the preset (known before anything is downloaded)."""
        from .families import adapter_named

        return adapter_named(self.family)


_SHAPES_NOTE = (
    "Trained by this project on ShapesWorld (coloured circles, squares, triangles and diamonds on a "
    "light background): it knows those scenes, not photographs."
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("shapes-clip", "shapes-clip", "clip", ("patches", "zero_shot"), embedded=True,
               about="Embedded CLIP (softmax over labels). " + _SHAPES_NOTE),
        Preset("shapes-siglip", "shapes-siglip", "siglip", ("patches", "zero_shot"), embedded=True,
               about="Embedded SigLIP (independent sigmoid per label). " + _SHAPES_NOTE),
        Preset("shapes-vlm", "shapes-vlm", "llava", ("patches", "chat", "alt_text"), embedded=True,
               about="Embedded LLaVA-style chat model (CLIP vision tower + small Llama). " + _SHAPES_NOTE),
        Preset("shapes-blip2", "shapes-blip2", "blip2", ("patches", "chat", "alt_text"), embedded=True,
               about="Embedded BLIP-2-style chat model (a Q-Former's 32 learned queries read the image for "
                     "shapes-vlm's language model). " + _SHAPES_NOTE),
        Preset("clip-vit-base-patch32", "openai/clip-vit-base-patch32", "clip", ("patches", "zero_shot"),
               revision="eaee4c876b93e66f7fac584b529025a96d71ad66",
               about="OpenAI CLIP ViT-B/32 (Hub, needs network).", default_templates=IMAGENET_TEMPLATES),
        Preset("clip-vit-base-patch16", "openai/clip-vit-base-patch16", "clip", ("patches", "zero_shot"),
               revision="refs/pr/10",
               about="OpenAI CLIP ViT-B/16 (Hub, needs network).", default_templates=IMAGENET_TEMPLATES),
        Preset("siglip-base-patch16-224", "google/siglip-base-patch16-224", "siglip", ("patches", "zero_shot"),
               revision="7fd15f0689c79d79e38b1c2e2e2370a7bf2761ed",
               about="Google SigLIP base (Hub, needs network).", default_templates=(SIGLIP_TEMPLATE,)),
        Preset("siglip2-base-patch16-224", "google/siglip2-base-patch16-224", "siglip", ("patches", "zero_shot"),
               revision="75de2d55ec2d0b4efc50b3e9ad70dba96a7b2fa2",
               about="Google SigLIP 2 base (Hub, needs network).", default_templates=(SIGLIP_TEMPLATE,)),
        Preset("llava-interleave-qwen-0.5b", "llava-hf/llava-interleave-qwen-0.5b-hf", "llava",
               ("patches", "chat", "alt_text"), revision="08647831752d66cc51831ff4f2a476de6ba2af9c",
               about="LLaVA-Interleave 0.5B (Hub, needs network)."),
        Preset("smolvlm-256m-instruct", "HuggingFaceTB/SmolVLM-256M-Instruct", "idefics3",
               ("patches", "chat", "alt_text"), revision="7e3e67edbbed1bf9888184d9df282b700a323964",
               about="SmolVLM 256M, Idefics3 architecture (Hub, needs network)."),
        Preset("qwen2-vl-2b-instruct", "Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl", ("patches", "chat", "alt_text"),
               revision="895c3a49bc3fa70a340399125c650a463535e71c",
               about="Qwen2-VL 2B (Hub, needs network and a GPU for comfort)."),
        Preset("paligemma-3b-mix-224", "google/paligemma-3b-mix-224", "paligemma", ("patches", "chat", "alt_text"),
               revision="d1d8734c9c3ad0ccfeea4afc270faa356c2ba515",
               about="PaliGemma 3B mix (Hub, gated, needs network and a GPU)."),
        Preset("blip-image-captioning-base", "Salesforce/blip-image-captioning-base", "blip",
               ("patches", "alt_text"), revision="9cfcdbcaccbcadb2b53b36d4b50042c4eeaa0c25",
               about="BLIP captioning base (Hub, needs network)."),
        Preset("blip2-opt-2.7b", "Salesforce/blip2-opt-2.7b", "blip2", ("patches", "chat", "alt_text"),
               revision="51572668da0eb669e01a189dc22abe6088589a24",
               about="BLIP-2 with OPT-2.7B: a Q-Former's 32 learned queries read the image for the language model "
                     "(Hub, needs network and a GPU for comfort)."),
        Preset("instructblip-vicuna-7b", "Salesforce/instructblip-vicuna-7b", "blip2", ("patches", "chat", "alt_text"),
               revision="19103d0c5b5263c8a7891012e08573439fb6607f",
               about="InstructBLIP with Vicuna-7B: the Q-Former's queries also read the instruction (Hub, needs "
                     "network and a GPU)."),
        Preset("instructblip-flan-t5-xl", "Salesforce/instructblip-flan-t5-xl", "blip2", ("patches", "chat", "alt_text"),
               revision="bf9bd58cb3bb06e88c03b80f9cc346b90094bc6d",
               about="InstructBLIP with Flan-T5-XL, an encoder-decoder: each answer token reads the query tokens "
                     "through the T5 decoder's cross-attention (Hub, needs network and a GPU for comfort)."),
    ]
}

EMBEDDED_ALTERNATIVE = {
    "zero_shot": "shapes-clip",
    "patches": "shapes-clip",
    "chat": "shapes-vlm",
    "alt_text": "shapes-vlm",
}


def presets_for(task: str) -> list[Preset]:
    """Presets serving `task`, embedded first."""
    return sorted((p for p in PRESETS.values() if task in p.tasks), key=lambda p: not p.embedded)


def get_preset(name: str) -> Preset:
    """The preset called `name`, or a clear error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelLoadError(
            f"Unknown model preset {name!r}. Known presets: {', '.join(PRESETS)}."
        ) from None


# --------------------------------------------------------------------------- device and dtype

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def choose_device() -> torch.device:
    """MMIE_DEVICE if set, else cuda, then mps, then cpu."""
    wanted = os.environ.get("MMIE_DEVICE", "").strip()
    if wanted:
        try:
            device = torch.device(wanted)
        except RuntimeError as err:
            raise ModelLoadError(f"MMIE_DEVICE={wanted!r} is not a device (try cpu, cuda, cuda:0 or mps).") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("MMIE_DEVICE asks for cuda but no CUDA GPU is available.")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ModelLoadError("MMIE_DEVICE asks for mps but MPS is not available.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def choose_dtype(device: torch.device) -> torch.dtype:
    """MMIE_DTYPE if set, else bf16 on CUDA where supported (fp16 otherwise), fp32 elsewhere."""
    wanted = os.environ.get("MMIE_DTYPE", "").strip().lower()
    if wanted:
        if wanted not in _DTYPES:
            raise ModelLoadError(f"MMIE_DTYPE={wanted!r} is not one of {', '.join(sorted(_DTYPES))}.")
        return _DTYPES[wanted]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A model with its processor and where it came from."""

    model: torch.nn.Module
    processor: object
    family: str
    source: str
    preset: Preset | None
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return self.preset.name if self.preset else self.source

    @functools.cached_property
    def adapter(self):
        """The family adapter (mmie_core.families) of this model, chosen from its config (once)."""
        from .families import adapter_for

        return adapter_for(self.model.config)


def family_of(config) -> str:
    """The family (adapter name) of a transformers config, or a clear error."""
    from .families import UnsupportedModel, adapter_for

    try:
        return adapter_for(config).name
    except UnsupportedModel as err:
        raise ModelLoadError(str(err)) from None


def _any_model_allowed() -> bool:
    return os.environ.get("MMIE_ALLOW_ANY_MODEL", "") == "1"


QUANTIZE = ("4bit", "8bit")


def placement(preset: Preset | None, dtype: torch.dtype) -> dict:
    """from_pretrained arguments that place a big model: `device_map` (MMIE_DEVICE_MAP, e.g. "auto": accelerate
    spreads the layers over every GPU, then CPU memory, then disk) and bitsandbytes 4-bit / 8-bit weights
    (MMIE_QUANTIZE, or the preset's `quantize`; CUDA only, placed with device_map "auto" unless one is set).
    Empty for a model that goes whole onto one device."""
    quantize = (os.environ.get("MMIE_QUANTIZE", "").strip().lower() or (preset.quantize if preset else None) or "")
    device_map = os.environ.get("MMIE_DEVICE_MAP", "").strip() or None
    if quantize in ("none", "off", "0"):
        quantize = ""
    if quantize and quantize not in QUANTIZE:
        raise ModelLoadError(f"MMIE_QUANTIZE={quantize!r} is not one of {', '.join(QUANTIZE)} (or empty for none).")
    out: dict = {}
    if quantize:
        if not torch.cuda.is_available():
            raise ModelLoadError(f"{quantize} weights (MMIE_QUANTIZE) need a CUDA GPU (bitsandbytes); none is "
                                 "available here. Unset MMIE_QUANTIZE to load full weights.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelLoadError(f"{quantize} weights (MMIE_QUANTIZE) need bitsandbytes: pip install bitsandbytes") \
                from None
        from transformers import BitsAndBytesConfig

        config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
                  if quantize == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        out["quantization_config"] = config
        device_map = device_map or "auto"
    if device_map:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ModelLoadError("MMIE_DEVICE_MAP (and quantized weights) need accelerate: pip install accelerate") \
                from None
        if device_map.startswith("{"):  # an explicit map: {"module prefix": "cuda:0" | 0 | "cpu" | "disk"}
            import json

            try:
                device_map = json.loads(device_map)
            except json.JSONDecodeError as err:
                raise ModelLoadError(f"MMIE_DEVICE_MAP is not valid JSON: {err}") from None
            if "disk" in device_map.values():  # offloaded weights are read from this folder when needed
                import tempfile

                out["offload_folder"] = os.environ.get("MMIE_OFFLOAD_DIR") or tempfile.mkdtemp(prefix="mmie-offload-")
        out["device_map"] = device_map
    return out


def input_device(model) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings (the first module of a model that
    device_map spread over several devices; accelerate's hooks move activations between the others). A dual
    encoder without one (CLIPModel does not name its input embeddings): its first module that holds weights,
    each tower's hooks moving its own inputs."""
    try:
        embeddings = model.get_input_embeddings()
    except NotImplementedError:
        embeddings = None
    if embeddings is None:
        embeddings = next(m for m in model.modules() if next(m.parameters(recurse=False), None) is not None)
    execution = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)  # offloaded weights
    if execution is not None:
        return torch.device(f"cuda:{execution}" if isinstance(execution, int) else execution)
    device = next(embeddings.parameters()).device
    return device if device.type != "meta" else torch.device("cpu")


def _from_pretrained(family: str, location: str, *, local: bool, revision: str | None, dtype: torch.dtype,
                     placed: dict | None = None):
    import transformers

    from .families import adapter_named

    adapter = adapter_named(family)
    common = dict(local_files_only=local, revision=revision, trust_remote_code=False)
    processor = transformers.AutoProcessor.from_pretrained(location, **common)
    # sdpa for speed, where the family takes the argument
    attn = {"attn_implementation": adapter.attn_implementation} if adapter.attn_implementation else {}
    model = adapter.model_class().from_pretrained(location, use_safetensors=True, dtype=dtype, **attn, **common,
                                                  **(placed or {}))
    found = family_of(model.config)  # the checkpoint's own config decides, also for a preset
    if found != family:
        raise ModelLoadError(f"{location} is a {found} model, not {family}.")
    adapter.check_loaded(model, processor)
    return model, processor


def _load_uncached(name_or_path: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    import transformers

    from .families import UnsupportedModel

    preset = PRESETS.get(name_or_path)
    if preset is not None:
        location, family, revision = preset.location, preset.family, preset.revision
    elif Path(name_or_path).is_dir():
        location, revision = name_or_path, None
        family = family_of(transformers.AutoConfig.from_pretrained(location, local_files_only=True))
    elif _any_model_allowed():
        location, revision = name_or_path, None
        family = family_of(transformers.AutoConfig.from_pretrained(location, trust_remote_code=False))
    else:
        raise ModelLoadError(
            f"{name_or_path!r} is neither a preset nor a local model folder. Loading other Hub ids is "
            "off; set MMIE_ALLOW_ANY_MODEL=1 to allow it."
        )
    local = Path(location).is_dir()
    if preset is not None and preset.embedded and not local:
        raise ModelLoadError(f"The embedded model folder {location} is missing from this installation.")
    placed = placement(preset, dtype)
    try:
        model, processor = _from_pretrained(family, location, local=local, revision=revision, dtype=dtype,
                                            placed=placed)
    except UnsupportedModel as err:
        raise ModelLoadError(f"{location} cannot be analysed: {err}") from None
    except Exception as err:  # noqa: BLE001 - safetensors, OSError, HTTP errors...: all become one message
        if local:
            raise ModelLoadError(f"Could not load the model folder {location}: {err}") from err
        task = preset.tasks[-1] if preset else "patches"
        alternative = EMBEDDED_ALTERNATIVE[task]
        raise ModelLoadError(
            f"Could not load {location!r} from the Hugging Face Hub: {_first_line(err)}. "
            f"Without network access, use the embedded model '{alternative}', which works offline."
        ) from err
    if placed:  # device_map placed it (and quantized weights cannot move): inputs go to its first module
        model.eval().requires_grad_(False)
        device = input_device(model)
    else:
        model.to(device).eval().requires_grad_(False)  # inference only: gradients flow to inputs, not weights
    return LoadedModel(model, processor, family, location, preset, device, dtype)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class ModelCache:
    """LRU cache of loaded models, bounded by count (MMIE_MAX_MODELS, default 3)."""

    def __init__(self, max_models: int | None = None):
        self._max = max_models
        self._items: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.RLock()

    @property
    def max_models(self) -> int:
        if self._max is not None:
            return self._max
        raw = os.environ.get("MMIE_MAX_MODELS", "3")
        try:
            return max(1, int(raw))
        except ValueError:
            raise ModelLoadError(f"MMIE_MAX_MODELS={raw!r} is not a whole number.") from None

    def get(self, name_or_path: str) -> LoadedModel:
        device = choose_device()
        dtype = choose_dtype(device)
        key = (name_or_path, str(device), str(dtype))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            while len(self._items) >= self.max_models:
                self._evict_oldest()
            loaded = _load_uncached(name_or_path, device, dtype)
            self._items[key] = loaded
            log.info("loaded %s on %s (%s)", name_or_path, device, dtype)
            return loaded

    def _evict_oldest(self) -> None:
        key, _ = self._items.popitem(last=False)
        log.info("evicted %s from the model cache", key[0])
        free_memory()

    def keys(self) -> list[str]:
        with self._lock:
            return [k[0] for k in self._items]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
        free_memory()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


MODEL_CACHE = ModelCache()


def load_model(name_or_path: str) -> LoadedModel:
    """Load (or fetch from the LRU cache) a preset name or a local model folder."""
    return MODEL_CACHE.get(name_or_path)


@contextlib.contextmanager
def attention_implementation(model, implementation: str) -> Iterator[None]:
    """Temporarily switch a loaded model's attention ("eager" when weights are needed)."""
    previous = model.config._attn_implementation
    if previous == implementation:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
