"""Shared pieces of the benchmarks: timing, machine description, and random-weight models of
realistic shape (built from configs in code, nothing downloaded).

Every benchmark measures its baseline in the same process and run as the studio's way, and
reports ratios; absolute seconds depend on the machine and are printed only beside them.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """Median wall seconds of `repeat` calls of `fn`, and the last result (on CUDA, with the queued
    kernels finished before and after each call)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    times, result = [], None
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def loaded_model(model, processor, family: str, name: str, dtype: torch.dtype = torch.float32):
    """Wrap a freshly built model as the studio's LoadedModel (on the default device, in `dtype`)."""
    from mmie_core.models import LoadedModel, choose_device

    device = choose_device()
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedModel(model, processor, family, name, None, device, dtype)


def random_clip_b32(seed: int = 0):
    """A random-weight CLIP of ViT-B/32 shape (224 px, patch 32, 12 x 768 vision, 12 x 512 text) with
    the ShapesWorld tokenizer: the compute of openai/clip-vit-base-patch32 without its weights."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from mmie_core.shapes.vocab import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(add_bos_eos=True, model_max_length=77)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12),
        projection_dim=512,
    )
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        tokenizer=tok,
    )
    return loaded_model(CLIPModel(config), processor, "clip", "random CLIP ViT-B/32 shape")


LLAVA_15_7B = dict(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
                   text_hidden=4096, text_intermediate=11008, text_layers=32, text_heads=32, vocab=32064)


def random_llava_15(dtype: torch.dtype = torch.bfloat16, seed: int = 0, name: str = "", **shape):
    """A random-weight LLaVA of llava-hf/llava-1.5-7b-hf's shape (CLIP ViT-L/14 at 336 px: 576 image tokens;
    Llama 32 x 4096, 32 heads, MLP 11008, vocabulary 32064; 7.1 B parameters), built directly on the default
    device in `dtype` (no float32 copy, no download). `shape` overrides entries of LLAVA_15_7B (a scaled-down
    model on the same code path; `vocab=0`: the tokenizer's size). The ShapesWorld tokenizer writes the
    prompt; its ids lie inside the vocabulary, so the language-model head keeps its real size."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from mmie_core.models import choose_device
    from mmie_core.shapes.vocab import CHAT_TEMPLATE, END, IMAGE, build_tokenizer

    s = {**LLAVA_15_7B, **shape}
    torch.manual_seed(seed)
    tok = build_tokenizer(add_bos_eos=False, model_max_length=4096)
    tok.chat_template = CHAT_TEMPLATE
    vision = CLIPVisionConfig(image_size=s["image_size"], patch_size=s["patch_size"], hidden_size=s["vision_hidden"],
                              intermediate_size=4 * s["vision_hidden"], num_hidden_layers=s["vision_layers"],
                              num_attention_heads=s["vision_heads"])
    text = LlamaConfig(vocab_size=max(s["vocab"], len(tok)), hidden_size=s["text_hidden"],
                       intermediate_size=s["text_intermediate"], num_hidden_layers=s["text_layers"],
                       num_attention_heads=s["text_heads"], num_key_value_heads=s["text_heads"],
                       max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.convert_tokens_to_ids(END))
    grid = s["image_size"] // s["patch_size"]
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_id=tok.convert_tokens_to_ids(IMAGE), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=grid * grid)
    config.vision_config.model_type = "clip_vision_model"
    size = s["image_size"]
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                                  crop_size={"height": size, "width": size}),
                               tokenizer=tok, patch_size=s["patch_size"], vision_feature_select_strategy="default",
                               chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(choose_device()):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.set_attn_implementation("sdpa")
    params = sum(p.numel() for p in model.parameters()) / 1e9
    name = name or (f"random LLaVA-1.5 shape ({grid * grid} image tokens, Llama {s['text_layers']}x{s['text_hidden']}, "
                    f"{params:.2f} B parameters, {str(dtype).removeprefix('torch.')})")
    return loaded_model(model, processor, "llava", name, dtype)


def random_llava_576(seed: int = 0):
    """A random-weight LLaVA with 576 image tokens (384 px, patch 16: a 24 x 24 grid, as LLaVA-1.5's 336/14)
    and a Llama of 8 x 512 in float32: the realistic sequence at a size this CPU can run."""
    return random_llava_15(torch.float32, seed, name="random LLaVA (576 image tokens, Llama 8x512)", image_size=384,
                           patch_size=16, vision_hidden=256, vision_layers=4, vision_heads=4, text_hidden=512,
                           text_intermediate=1408, text_layers=8, text_heads=8, vocab=0)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")
