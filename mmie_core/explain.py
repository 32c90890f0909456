"""One contract for every explanation: explain(model, image, target, method, **params) -> PatchHeatmap.

A *subject* wraps what is explained: the preprocessed image, the patch grid, and a differentiable
`score(pixel_values) -> (B,)` for the target:
- dual encoders (CLIP / SigLIP): the image-text logit of a label;
- VLMs (LLaVA, PaliGemma, Idefics3, BLIP): the logit of one answer token, given the image, the
  question and the answer tokens before it.

Every method returns values over the subject's `layout`: the vision tower's patch grid, or for
Idefics3 the mosaic of its tiles (with the global view spread over them, `patches.TiledLayout`).

Methods (each returns values over the vision tower's patch grid):
- attention: raw attention of chosen layers/heads (vision tower for dual encoders; the
  language model's row of the answer token over the image tokens for VLMs), fused by
  mean/max/min, renormalised over the image, optional removal of attention sinks;
- rollout: attention rollout (Abnar & Zuidema 2020) with identity mixing and a discard ratio;
- relevancy: gradient-weighted attention relevancy (Chefer et al. 2021);
- integrated_gradients: Captum LayerIntegratedGradients on the patch embedding, summed per patch;
- saliency: Captum Saliency (|grad|), optionally smoothed with NoiseTunnel (SmoothGrad);
- occlusion: Captum Occlusion, one patch or a window of patches, baseline = the processor mean;
- gradcam: Captum LayerGradCam on a ViT block, its tokens reshaped to the model's grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from .attention import AttentionRecorder, cross_modal_relevancy, fuse, relevancy, remove_sinks, rollout
from .chat import Turn, answer_layers, answer_sequence
from .cost import check as check_cost
from .heatmap import PatchHeatmap
from .limits import check_deadline
from .models import LoadedModel, attention_implementation
from .patches import (GridLayout, PatchGrid, ProcessorView, QueryLayout, TiledLayout, processor_view, vision_grid,
                      vision_tower)
from .zero_shot import encode_labels

METHODS = ("attention", "rollout", "relevancy", "integrated_gradients", "saliency", "occlusion", "gradcam")
ATTENTION_METHODS = ("attention", "rollout", "relevancy")
# Answer-token heatmaps also offer named variants: a method with chosen parameters. Integrated gradients
# from a white canvas on the log-probability is the best pointer measured on shapes-vlm's answer tokens
# (README, "Do the heatmaps point at the right place?").
NAMED_VARIANTS: dict[str, tuple[str, dict]] = {
    "integrated_gradients (white canvas, log-prob)": ("integrated_gradients",
                                                      {"baseline": "white", "objective": "log_prob"}),
}

__all__ = ["METHODS", "explain", "make_subject", "Subject"]


# --------------------------------------------------------------------------- subjects


@dataclass
class Subject:
    """What is explained, with the pieces every method needs."""

    loaded: LoadedModel
    pixel_values: torch.Tensor  # (1, 3, H, W) as the processor made it
    grid: PatchGrid
    view: ProcessorView
    target: dict  # JSON-able description of the target

    # Filled by the concrete subject:
    vision: nn.Module = None  # the ViT (has .embeddings.patch_embedding and .encoder.layers)
    # the input that stands for "no image" (the processor's mean colour); Idefics3 drops a tile that
    # is exactly 0 everywhere as padding, so its subjects use a value a hair above it
    zero_input: float = 0.0

    @property
    def layout(self) -> GridLayout | PatchGrid | TiledLayout:
        """Which map cell each image token and each ViT patch of `pixel_values` belongs to."""
        return self.grid

    def score(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B,)
        raise NotImplementedError

    def probability(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B,) in 0..1
        raise NotImplementedError

    def log_probability(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B,)
        raise NotImplementedError

    # attention-based methods need these two:
    def attention_modules(self) -> dict[int, nn.Module]:
        raise NotImplementedError

    def attention_readout(self, full: torch.Tensor) -> torch.Tensor:
        """From a (q, k) matrix over the attended sequence, the values over the patch grid."""
        raise NotImplementedError

    def run_forward(self) -> torch.Tensor:
        return self.score(self.pixel_values)


class DualEncoderSubject(Subject):
    """A label's logit in a CLIP or SigLIP model."""

    def __init__(self, loaded: LoadedModel, image: Image.Image, label: str, labels: list[str] | None = None,
                 templates: tuple[str, ...] = ("{}",)):
        view = processor_view(loaded, image)
        pixels = loaded.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        labels = list(labels) if labels else [label]
        if label not in labels:
            labels.append(label)
        super().__init__(loaded, pixels.to(loaded.device, loaded.dtype), vision_grid(loaded), view,
                         {"label": label, "labels": labels, "templates": list(templates)})
        self.vision = vision_tower(loaded)
        self.text = encode_labels(loaded, tuple(labels), tuple(templates)).clone()  # (L, D), no grad
        self.index = labels.index(label)

    def _logits(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, L)
        check_deadline()
        feats = self.loaded.model.get_image_features(pixel_values=pixel_values)
        feats = getattr(feats, "pooler_output", feats)
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        logits = feats @ self.text.t() * self.loaded.model.logit_scale.exp().float()
        bias = getattr(self.loaded.model, "logit_bias", None)  # SigLIP's learned sigmoid bias
        return logits if bias is None else logits + bias.float()

    def score(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._logits(pixel_values)[:, self.index]

    def probability(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.label_probability(self._logits(pixel_values))

    def log_probability(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = self._logits(pixel_values)
        if self.loaded.adapter.label_activation == "sigmoid":
            return torch.nn.functional.logsigmoid(logits[:, self.index])
        return logits.log_softmax(-1)[:, self.index]

    def label_probability(self, logits: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B,)
        """The label's probability from all labels' logits: sigmoid (SigLIP) or softmax (CLIP)."""
        if self.loaded.adapter.label_activation == "sigmoid":
            return torch.sigmoid(logits[:, self.index])
        return logits.softmax(-1)[:, self.index]

    def attention_modules(self) -> dict[int, nn.Module]:
        return {i: layer.self_attn for i, layer in enumerate(self.vision.encoder.layers)}

    def attention_readout(self, full: torch.Tensor) -> torch.Tensor:
        p = self.grid.prefix_tokens
        rows = full[0] if p else full[p:].mean(0)  # CLS row, or the mean row without a CLS
        return rows[p:]


class VLMSubject(Subject):
    """The logit of one answer token of a LLaVA-style model."""

    def __init__(self, loaded: LoadedModel, image: Image.Image, question: str, answer_ids: list[int], token_index: int,
                 history: list[Turn] | None = None):
        if not 0 <= token_index < len(answer_ids):
            raise ValueError(f"token_index {token_index} is outside the answer's {len(answer_ids)} tokens")
        seq = answer_sequence(loaded, image, question, answer_ids, history)
        self.sequence = seq
        self.input_ids = seq.input_ids
        self.position = seq.prompt_length + token_index - 1  # this position's output predicts the token
        self.token_id = int(answer_ids[token_index])
        tokenizer = loaded.processor.tokenizer
        super().__init__(loaded, seq.pixel_values, seq.grid, processor_view(loaded, image),
                         {"question": question, "token_index": token_index,
                          "token": tokenizer.decode([self.token_id]).strip(),
                          "answer": tokenizer.decode(answer_ids, skip_special_tokens=True).strip()})
        self.vision = vision_tower(loaded)
        self.image_positions = seq.image_positions
        self.zero_input = loaded.adapter.zero_input
        self.history = history
        self.answer_ids = list(answer_ids)

    def on_image(self, image: Image.Image) -> "VLMSubject":
        """The same question, answer and token on another image."""
        return type(self)(self.loaded, image, self.target["question"], self.answer_ids, self.target["token_index"],
                          self.history)

    @property
    def layout(self) -> GridLayout | PatchGrid | TiledLayout:
        return self.sequence.layout

    def _logits(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, vocab) float32 at the target position
        check_deadline()
        inputs = self.sequence.model_inputs(pixel_values.shape[0], pixel_values)
        return self.loaded.adapter.answer_logits(self.loaded, inputs, self.position)

    def score(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._logits(pixel_values)[:, self.token_id]

    def probability(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._logits(pixel_values).softmax(-1)[:, self.token_id]

    def log_probability(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._logits(pixel_values).log_softmax(-1)[:, self.token_id]

    def attention_modules(self) -> dict[int, nn.Module]:
        return dict(enumerate(answer_layers(self.loaded)))

    def attention_readout(self, full: torch.Tensor) -> torch.Tensor:
        return self.row_readout(full[self.position])

    def row_readout(self, row: torch.Tensor) -> torch.Tensor:
        """The target position's attention row over the sequence -> values over the image tokens."""
        return row[self.image_positions.to(row.device)]

    def cross_modal_modules(self) -> tuple[dict[int, nn.Module], dict[int, nn.Module], dict[int, nn.Module]]:
        """An encoder-decoder language model's (encoder self-attention, decoder self-attention, cross-attention)
        modules per layer (the encoder's tokens take the image's role in the encoder-decoder rules)."""
        return self.loaded.adapter.encoder_decoder_modules(self.loaded.model)

    def decoder_embeddings(self) -> nn.Module:
        """The module whose output is the decoder's token embeddings."""
        return self.loaded.adapter.language_model(self.loaded.model).embed_tokens


class CaptionSubject(VLMSubject):
    """The logit of one caption token of a captioner (BLIP): its text decoder reads the image
    through cross-attention, so the attention methods read cross-attention rows. `question` is the
    caption prefix ("" for a plain caption)."""

    def row_readout(self, row: torch.Tensor) -> torch.Tensor:  # (vision tokens,) -> patches
        return row[self.grid.prefix_tokens:]

    def cross_modal_modules(self) -> tuple[dict[int, nn.Module], dict[int, nn.Module], dict[int, nn.Module]]:
        """(vision self-attention, decoder self-attention, cross-attention) modules per layer."""
        layers = self.loaded.model.text_decoder.bert.encoder.layer
        return ({i: layer.self_attn for i, layer in enumerate(self.vision.encoder.layers)},
                {i: layer.attention for i, layer in enumerate(layers)},
                {i: layer.crossattention for i, layer in enumerate(layers)})

    def decoder_embeddings(self) -> nn.Module:
        return self.loaded.model.text_decoder.bert.embeddings


class VisionSubject(Subject):
    """The vision tower alone, with no target: for label-free views (attention, rollout)."""

    def __init__(self, loaded: LoadedModel, image: Image.Image):
        if not loaded.adapter.fixed_grid:
            raise ValueError(f"{loaded.name} makes a token grid that follows each image (tiles, or its native "
                             "size); the vision-tower views cover towers with one fixed grid. Its answers' "
                             "heatmaps (Chat, Alt text) cover the whole image.")
        view = processor_view(loaded, image)
        pixels = loaded.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        super().__init__(loaded, pixels.to(loaded.device, loaded.dtype), vision_grid(loaded), view,
                         {"view": "vision tower"})
        self.vision = vision_tower(loaded)

    def run_forward(self) -> torch.Tensor:
        check_deadline()
        return self.vision(pixel_values=self.pixel_values, output_hidden_states=True)

    def attention_modules(self) -> dict[int, nn.Module]:
        return {i: layer.self_attn for i, layer in enumerate(self.vision.encoder.layers)}

    attention_readout = DualEncoderSubject.attention_readout


def make_subject(loaded: LoadedModel, image: Image.Image, target: dict) -> Subject:
    """target: {"label": str, "labels": [...], "templates": [...]} for dual encoders, or
    {"question": str, "answer_ids": [...], "token_index": int, "history": [Turn or dict]} for VLMs
    (for a captioner, "question" is the caption prefix, often "")."""
    if loaded.adapter.zero_shot:
        if not target.get("label"):
            raise ValueError("Pick a label to explain.")
        return DualEncoderSubject(loaded, image, target["label"], target.get("labels"),
                                  tuple(target.get("templates") or ("{}",)))
    if "answer_ids" not in target or "token_index" not in target:
        raise ValueError("Pick an answer token to explain.")
    if not loaded.adapter.describes:
        raise ValueError(f"{loaded.name} is a {loaded.family} model: it neither scores labels nor answers.")
    if loaded.adapter.captions:
        if target.get("history"):
            raise ValueError(f"{loaded.name} writes captions; it has no chat history.")
        return CaptionSubject(loaded, image, target.get("question", ""), list(target["answer_ids"]),
                              int(target["token_index"]))
    history = [Turn(**t) if isinstance(t, dict) else t for t in target.get("history") or []]
    return VLMSubject(loaded, image, target.get("question", ""), list(target["answer_ids"]), int(target["token_index"]),
                      history)


# --------------------------------------------------------------------------- helpers


def pixels_to_patches(s: Subject, attr: torch.Tensor) -> np.ndarray:
    """Pixel attributions shaped like `pixel_values` ((1, C, H, W), or Idefics3's (1, tiles, C, H, W))
    summed per ViT patch of each image or tile, then placed on the subject's map."""
    g, p = s.grid, s.grid.patch_size
    a = attr.detach().float().reshape(-1, *attr.shape[-3:]).sum(1)  # (images or tiles, H, W)
    a = a[:, : g.rows * p, : g.cols * p].reshape(-1, g.rows, p, g.cols, p)
    return s.layout.patch_map(a.sum((2, 4)))


def _layers(requested, n_layers: int, default: list[int]) -> list[int]:
    if requested is None or requested == "all":
        return default if requested is None else list(range(n_layers))
    if isinstance(requested, int):
        requested = [requested]
    out = sorted({l % n_layers for l in requested if -n_layers <= l < n_layers})
    if not out:
        raise ValueError(f"layers must be between {-n_layers} and {n_layers - 1}")
    return out


# --------------------------------------------------------------------------- attention methods


def _attention(s: Subject, layers=None, heads=None, head_fusion: str = "mean", layer_fusion: str = "mean",
               sinks: bool = False):
    modules = s.attention_modules()
    chosen = _layers(layers, len(modules), default=[len(modules) - 1])
    row = getattr(s, "position", None)  # an answer token reads one row: keep only that row of each layer
    with torch.inference_mode(), AttentionRecorder({i: modules[i] for i in chosen},
                                                   rows=None if row is None else [row]) as rec:
        s.run_forward()
    per_layer = []
    for i in chosen:
        maps = rec.maps[i][0]  # (heads, q, k), or (heads, 1, k) for an answer token
        if heads is not None:
            idx = [heads] if isinstance(heads, int) else list(heads)
            maps = maps[idx]
        fused = fuse(maps, head_fusion, dim=0)  # (q, k)
        per_layer.append(s.attention_readout(fused) if row is None else s.row_readout(fused[0]))
    values = fuse(torch.stack(per_layer), layer_fusion, dim=0)  # (patches,)
    if sinks:
        values = remove_sinks(values)
    values = values / values.sum().clamp_min(1e-12)  # renormalise over the image
    return s.layout.token_map(values), {"layers": chosen, "heads": heads if heads is not None else "all",
                                   "head_fusion": head_fusion, "layer_fusion": layer_fusion, "remove_sinks": sinks}


def _recorded(recorder: AttentionRecorder, with_grad: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(attention, gradient or None) of each recorded layer in order; every layer must have its
    gradient when `with_grad`."""
    order = sorted(recorder.maps)
    missing = [i for i in order if with_grad and i not in recorder.grads]
    if missing:
        raise RuntimeError(f"no gradient reached attention layers {missing}")
    return [(recorder.maps[i][0].detach(), recorder.grads[i][0] if with_grad else None) for i in order]


def _cross_modal(s: "VLMSubject", with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values read at the subject's row, the Q-Former's chain (queries, patches) or None), recorded in one pass:
    the encoder's (a captioner's vision tower, or an encoder-decoder language model's encoder) self-attention
    and the decoder's self- and cross-attention, chained by the encoder-decoder rules
    (`attention.cross_modal_relevancy`); for a Q-Former model also the Q-Former's (`_QFormerRecorders`). Without
    gradients, the rollout form of the same rules."""
    recorders = [AttentionRecorder(m, keep_grad=with_grad) for m in s.cross_modal_modules()]
    pixels = s.pixel_values.clone().requires_grad_(with_grad)

    def track(module, args, output):  # the first decoder layer's self-attention does not depend on the
        return output.requires_grad_(True)  # image: track the text embeddings so that it gets a gradient

    handle = s.decoder_embeddings().register_forward_hook(track) if with_grad else None
    try:
        with torch.enable_grad() if with_grad else torch.inference_mode(), recorders[0] as re, recorders[1] as rs, \
                recorders[2] as rc, _QFormerRecorders(s, with_grad) as qf:
            score = s.score(pixels).sum()
            if with_grad:
                score.backward()
            chain = qf.chain() if qf.active else None
    finally:
        if handle is not None:
            handle.remove()

    decoder = list(zip(_recorded(rs, with_grad), _recorded(rc, with_grad)))  # (self, cross) per layer
    full = cross_modal_relevancy(_recorded(re, with_grad), decoder)  # (decoder positions, encoder tokens)
    return s.attention_readout(full), chain


QFORMER_RULE = ("language-model values on the query tokens x the queries' relevancy over the patches, by the "
                "encoder-decoder rules (Chefer et al. 2021b) over the vision tower and the Q-Former")
ENCODER_DECODER_QFORMER_RULE = (
    "the encoder-decoder rules (Chefer et al. 2021b) twice: over the language model (its encoder's self-attention "
    "on the query tokens and the prompt, its decoder's self- and cross-attention, read at the answer token's "
    "decoder position) for the query tokens' values, then over the vision tower and the Q-Former for each "
    "query's values on the patches")


def _encoder_decoder_lm(s: Subject) -> bool:
    """The subject is an answer token of an encoder-decoder language model (its decoder reads the image tokens
    through cross-attention)."""
    return isinstance(s, VLMSubject) and s.sequence.decoder_input_ids is not None


class _QFormerRecorders:
    """For a Q-Former model (a QueryLayout): record the vision tower's self-attention and the Q-Former's
    self- and cross-attention in the same pass, and chain them by the encoder-decoder rules
    (`attention.cross_modal_relevancy`: the Q-Former's queries are the "text" side, the vision tokens the
    image side; layers without cross-attention only mix the queries) into R (queries, patches). With
    gradients, the Q-Former's input is made to track gradients, so that its first layer gets one (its
    queries are parameters). Inactive, and free, for every other model."""

    def __init__(self, s: Subject, with_grad: bool):
        self.active = isinstance(getattr(s, "layout", None), QueryLayout)
        self.s, self.with_grad = s, with_grad
        self._recorders: list[AttentionRecorder] = []
        self._handle = None

    def __enter__(self) -> "_QFormerRecorders":
        if not self.active:
            return self
        adapter, model = self.s.loaded.adapter, self.s.loaded.model
        modules = (adapter.vision_attention_modules(self.s.vision), adapter.qformer_self_attention_modules(model),
                   adapter.cross_attention_modules(model))
        self._recorders = [AttentionRecorder(m, keep_grad=self.with_grad) for m in modules]
        try:
            for recorder in self._recorders:
                recorder.__enter__()
            if self.with_grad:
                def track(module, args, kwargs):
                    return (args[0].detach().requires_grad_(True), *args[1:]), kwargs

                self._handle = model.qformer.encoder.register_forward_pre_hook(track, with_kwargs=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for recorder in self._recorders:
            recorder.remove()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def chain(self) -> torch.Tensor:
        """(queries, patches) float64."""
        vision, selfs, crosses = (_recorded(r, self.with_grad) for r in self._recorders)
        cross_of = dict(zip(sorted(self._recorders[2].maps), crosses))
        decoder = [(pair, cross_of.get(i)) for i, pair in zip(sorted(self._recorders[1].maps), selfs)]
        n = self.s.layout.n_queries
        return cross_modal_relevancy(vision, decoder)[:n, self.s.grid.prefix_tokens:]


def _rollout(s: Subject, discard_ratio: float = 0.0, head_fusion: str = "mean"):
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError("discard_ratio must be in [0, 1)")
    if isinstance(s, CaptionSubject):  # the encoder-decoder recursion with rollout's matrices
        if discard_ratio or head_fusion != "mean":
            raise ValueError("rollout on a captioner takes no discard_ratio or head_fusion (mean over heads)")
        values, _ = _cross_modal(s, with_grad=False)
        values = values / values.sum().clamp_min(1e-12)
        return s.layout.token_map(values), {"rule": "encoder-decoder rollout (Chefer et al. 2021b, no gradients)"}
    if _encoder_decoder_lm(s):
        if discard_ratio or head_fusion != "mean":
            raise ValueError(f"rollout on {s.loaded.name}'s encoder-decoder language model takes no discard_ratio or "
                             "head_fusion (mean over heads)")
        values, chain = _cross_modal(s, with_grad=False)
        values = values.double() @ chain
        values = values / values.sum().clamp_min(1e-12)
        return s.grid.token_map(values), {"rule": ENCODER_DECODER_QFORMER_RULE + " (rollout form, no gradients)"}
    modules = s.attention_modules()
    with torch.inference_mode(), AttentionRecorder(modules) as rec, _QFormerRecorders(s, with_grad=False) as qf:
        s.run_forward()
    maps = [rec.maps[i][0] for i in sorted(rec.maps)]  # each (heads, q, k)
    keep = tuple(range(s.grid.prefix_tokens)) if isinstance(s, DualEncoderSubject) else (0,)
    full = rollout(maps, discard_ratio=discard_ratio, head_fusion=head_fusion, keep=keep)
    values = s.attention_readout(full)
    used = {"discard_ratio": discard_ratio, "head_fusion": head_fusion}
    if qf.active:  # the query tokens' values, carried to the patches by the Q-Former's rollout
        values = values.double() @ qf.chain()
        used["rule"] = QFORMER_RULE
    values = values / values.sum().clamp_min(1e-12)
    return s.layout.token_map(values) if not qf.active else s.grid.token_map(values), used


def _relevancy(s: Subject, through_vision: bool = False):
    if isinstance(s, CaptionSubject):
        if through_vision:
            raise ValueError("through_vision is for chat VLMs; a captioner's relevancy already runs through "
                             "its vision tower")
        values = _cross_modal(s, with_grad=True)[0].clamp_min(0)
        return s.layout.token_map(values), {"rule": "encoder-decoder relevancy (Chefer et al. 2021b)"}
    if through_vision and not isinstance(s, VLMSubject):
        raise ValueError("through_vision is for chat VLMs (a dual encoder's relevancy is its vision tower's)")
    if through_vision and isinstance(s.layout, TiledLayout):
        raise ValueError(f"through_vision needs one image token per vision token; {s.loaded.name} merges "
                         f"{s.layout.merge}x{s.layout.merge} patches into each token")
    modules = s.attention_modules()
    # through_vision: also the vision blocks up to the last one whose tokens reach the language model
    vision = ({i: vision_blocks(s)[i].self_attn for i in range(default_gradcam_layer(s) + 1)}
              if through_vision else {})
    if through_vision and isinstance(s.layout, QueryLayout):
        raise ValueError(f"{s.loaded.name}'s image tokens are Q-Former queries: its relevancy already runs through "
                         "the Q-Former and the vision tower")
    if _encoder_decoder_lm(s):
        values, chain = _cross_modal(s, with_grad=True)
        values = values.clamp_min(0).double() @ chain
        return s.grid.token_map(values.clamp_min(0)), {"rule": ENCODER_DECODER_QFORMER_RULE}
    pixels = s.pixel_values.clone().requires_grad_(True)
    with torch.enable_grad(), AttentionRecorder(modules, keep_grad=True) as rec, \
            AttentionRecorder(vision, keep_grad=True) as vision_rec, _QFormerRecorders(s, with_grad=True) as qf:
        score = s.score(pixels).sum()
        score.backward()

    def chain(recorder: AttentionRecorder) -> torch.Tensor:
        return relevancy(*zip(*_recorded(recorder, with_grad=True)))

    values = s.attention_readout(chain(rec))  # relevancy of each image token for the answer token
    if qf.active:  # each query token's relevancy, carried to the patches through the Q-Former
        values = values.clamp_min(0).double() @ qf.chain()
        return s.grid.token_map(values.clamp_min(0)), {"rule": QFORMER_RULE}
    if through_vision:
        # spread each image token's relevancy over the patches its vision token drew from
        p = s.grid.prefix_tokens
        values = values @ chain(vision_rec)[list(s.layout.vision_tokens), p:].to(values)
        return s.grid.token_map(values.clamp_min(0)), {"through_vision": True}
    values = values.clamp_min(0)
    return s.layout.token_map(values), {"through_vision": through_vision} if through_vision else {}


# --------------------------------------------------------------------------- Captum methods


OBJECTIVES = ("logit", "log_prob")  # what gradient methods explain: the target's logit, or its log-probability
IG_BASELINES = ("mean", "black", "white")  # mean: the processor's mean colour (all-zero input); else a plain image
_PLAIN_RGB = {"black": (0, 0, 0), "white": (255, 255, 255)}


def _objective(s: Subject, objective: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The target's logit (the default), or its log-probability: the logit against the competing
    labels or tokens, which credits evidence that tells the answer apart rather than any evidence
    that raises every logit."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    return s.score if objective == "logit" else s.log_probability


def _constant_image(s: Subject, rgb: tuple[int, int, int]) -> torch.Tensor:
    """A plain image of colour `rgb`, as the processor would hand it to the model."""
    ip = s.loaded.processor.image_processor
    value = torch.tensor(rgb, dtype=torch.float32) * (ip.rescale_factor if ip.do_rescale else 1.0)
    if ip.do_normalize:
        value = (value - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
    shape = [1] * (s.pixel_values.dim() - 3) + [3, 1, 1]  # (1, 3, 1, 1), or (1, 1, 3, 1, 1) for tiles
    return value.view(shape).to(s.pixel_values).expand_as(s.pixel_values).clone()


def _integrated_gradients(s: Subject, steps: int = 32, internal_batch_size: int = 32, baseline: str = "mean",
                          objective: str = "logit"):
    if not 2 <= steps <= 512:
        raise ValueError("steps must be between 2 and 512")
    if baseline not in IG_BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(IG_BASELINES)}, not {baseline!r}")
    start = (torch.full_like(s.pixel_values, s.zero_input) if baseline == "mean"
             else _constant_image(s, _PLAIN_RGB[baseline]))
    embedding = s.loaded.adapter.patch_embedding(s.vision)
    forward = _objective(s, objective)
    # Captum reports completeness (its convergence delta) per example; a tiled input's layer output has one
    # row per tile, which Captum cannot match to the one score, so there the same delta is summed by hand
    tiled = s.pixel_values.dim() == 5
    with torch.enable_grad():
        if embedding is not None:  # on the patch embedding, summed over its channels
            from captum.attr import LayerIntegratedGradients  # Captum is imported on first use (cold start)

            out = LayerIntegratedGradients(forward, embedding).attribute(
                s.pixel_values, baselines=start, n_steps=steps, internal_batch_size=internal_batch_size,
                return_convergence_delta=not tiled)
            attr, delta = out if not tiled else (out, None)
            values = s.layout.patch_map(attr.detach().float().sum(1))  # attr: (images or tiles, D, rows, cols)
        else:  # a tower that patchifies inside the score (Qwen2-VL): on the pixels, summed per patch (the
            # same sums, as the patch embedding is linear)
            from captum.attr import IntegratedGradients

            attr, delta = IntegratedGradients(forward).attribute(
                s.pixel_values, baselines=start, n_steps=steps, internal_batch_size=internal_batch_size,
                return_convergence_delta=True)
            values = pixels_to_patches(s, attr)
    total = float(attr.detach().double().sum())
    if delta is None:  # tiled: score(image) - score(baseline) measured here
        with torch.inference_mode():
            gap = float((forward(s.pixel_values) - forward(start)).sum())
        delta = total - gap
    else:  # Captum's delta = sum(attributions) - (score(image) - score(baseline))
        delta = float(delta.detach().sum())
        gap = total - delta
    delta = abs(delta)
    return values, {"steps": steps, "internal_batch_size": internal_batch_size,
                    "baseline": "processor mean" if baseline == "mean" else baseline, "objective": objective,
                    "completeness_delta": delta, "completeness_error": delta / max(abs(gap), 1e-12)}


def _saliency(s: Subject, smooth: bool = False, samples: int = 16, noise: float = 0.15, objective: str = "logit"):
    from captum.attr import NoiseTunnel, Saliency

    sal = Saliency(_objective(s, objective))
    pixels = s.pixel_values.clone().requires_grad_(True)
    with torch.enable_grad():
        if smooth:
            if not 1 <= samples <= 256:
                raise ValueError("samples must be between 1 and 256")
            attr = NoiseTunnel(sal).attribute(pixels, nt_type="smoothgrad", nt_samples=samples,
                                              nt_samples_batch_size=samples, stdevs=noise, abs=True)
        else:
            attr = sal.attribute(pixels, abs=True)
    params = {"smooth": smooth} | ({"samples": samples, "noise": noise} if smooth else {}) | {"objective": objective}
    return pixels_to_patches(s, attr), params


def _occlusion(s: Subject, window: int = 1, stride: int = 1, batch: int = 16):
    p = s.grid.patch_size * s.layout.unit  # pixels per map cell side (Idefics3: one token's patches)
    if not (1 <= window <= min(s.grid.rows, s.grid.cols) // s.layout.unit and 1 <= stride <= window):
        raise ValueError("window must fit the grid and stride must be between 1 and window")
    lead = (1,) * (s.pixel_values.dim() - 4)  # tiles: one tile at a time
    from captum.attr import Occlusion

    occ = Occlusion(s.score)
    with torch.inference_mode():
        attr = occ.attribute(s.pixel_values, sliding_window_shapes=(*lead, 3, window * p, window * p),
                             strides=(*lead, 3, stride * p, stride * p), baselines=s.zero_input,
                             perturbations_per_eval=batch)
    values = pixels_to_patches(s, attr) / (p * p * 3)  # mean score drop per pixel of the cell
    return values, {"window": window, "stride": stride, "baseline": "processor mean"}


class _TokenGrid(nn.Module):
    """Identity on (B, D, rows, cols): the layer Captum's LayerGradCam attaches to."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def vision_blocks(s: Subject) -> nn.ModuleList:
    """The transformer blocks of the subject's vision tower."""
    return s.loaded.adapter.vision_blocks(s.vision)


def _grid_view(s: Subject):
    """(to_grid, from_grid): a vision block's output tokens <-> (B, D, rows, cols) over the ViT grid."""
    return s.loaded.adapter.grid_view(s.grid, s.layout)


def default_gradcam_layer(s: Subject) -> int:
    """Last vision block whose patch tokens still reach the score (the family adapter knows: CLIP reads
    only the CLS token of its last block, LLaVA reads `vision_feature_layer`, SigLIP pools every token,
    BLIP's decoder cross-attends every token of the last block)."""
    return s.loaded.adapter.feature_block(s.loaded, len(vision_blocks(s)))


def _gradcam(s: Subject, layer: int | None = None):
    blocks = vision_blocks(s)
    index = default_gradcam_layer(s) if layer is None else layer % len(blocks)
    block = blocks[index]
    view = _TokenGrid()
    to_grid, from_grid = _grid_view(s)

    def reshape(module, args, output):  # tokens -> (B, D, rows, cols) -> tokens, through `view`
        tokens = output[0] if isinstance(output, tuple) else output
        rebuilt = from_grid(view(to_grid(tokens)), tokens)
        return (rebuilt, *output[1:]) if isinstance(output, tuple) else rebuilt

    # prepend: transformers' own output-capturing hooks (installed on the first forward that asks for
    # hidden states) must record the output that went through `view`, on every call, not only the first
    handle = block.register_forward_hook(reshape, prepend=True)
    try:
        with torch.enable_grad():
            # (1, 1, rows, cols); Idefics3: one map per tile (tiles, 1, rows, cols)
            from captum.attr import LayerGradCam

            attr = LayerGradCam(s.score, view).attribute(s.pixel_values, relu_attributions=True)
    finally:
        handle.remove()
    return s.layout.patch_map(attr.detach().float()[:, 0]), {"layer": index}


_IMPL: dict[str, Callable] = {
    "attention": _attention,
    "rollout": _rollout,
    "relevancy": _relevancy,
    "integrated_gradients": _integrated_gradients,
    "saliency": _saliency,
    "occlusion": _occlusion,
    "gradcam": _gradcam,
}


def explain_subject(subject: Subject, method: str, **params) -> PatchHeatmap:
    """Run `method` on a prepared subject (reuse one subject for several methods)."""
    if method not in _IMPL:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    check_cost(subject, method, params)  # refuses, with advice, what would cost too much at this geometry
    model = subject.loaded.model
    t0 = time.perf_counter()
    impl = "eager" if method in ATTENTION_METHODS else model.config._attn_implementation
    with attention_implementation(model, impl):
        values, used = _IMPL[method](subject, **params)
    return PatchHeatmap(
        values=values,
        method=method,
        target={k: v for k, v in subject.target.items() if k != "labels"},
        box=subject.view.box,
        image_size=subject.view.original_size,
        params=used,
        model=subject.loaded.name,
        seconds=time.perf_counter() - t0,
    )


def explain(loaded: LoadedModel, image: Image.Image, target: dict, method: str, **params) -> PatchHeatmap:
    """Heatmap over image patches of where `target` came from, by `method` (see METHODS)."""
    return explain_subject(make_subject(loaded, image, target), method, **params)
