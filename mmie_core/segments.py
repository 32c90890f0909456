"""Segment ablation of a chat model's answer with Captum's LLMAttribution over an ImageMaskInput.

The image is split into segments (ShapesWorld's object masks, a regular grid, or a mask a user
drew); Captum's FeatureAblation (or ShapleyValueSampling) removes segments (their pixels become the
baseline colour), re-runs the processor and the model on the edited image, and reports for every
answer token how much its log-probability falls: a value per segment, drawn over the image. Captum's
API is used as it is: `LLMAttribution(method(model), tokenizer)` and `ImageMaskInput(image, mask,
baseline, processor_fn)`, with the answer as the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .chat import chat_inputs
from .heatmap import PatchHeatmap
from .limits import check_deadline
from .models import LoadedModel

SEGMENT_METHODS = ("feature_ablation", "shapley")
BASELINES = ("mean", "white", "black")


def grid_segments(size: tuple[int, int], rows: int, cols: int) -> np.ndarray:
    """(height, width) int map of a rows x cols grid of segments over an image of `size` (width, height)."""
    if rows < 1 or cols < 1:
        raise ValueError("the grid needs at least one row and one column")
    w, h = size
    r = np.minimum(np.arange(h) * rows // h, rows - 1)
    c = np.minimum(np.arange(w) * cols // w, cols - 1)
    return r[:, None] * cols + c[None, :]


def mask_segments(mask: np.ndarray) -> np.ndarray:
    """A drawn mask (non-zero = drawn) -> segments 1 (drawn) and 0 (the rest)."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.max(-1)
    out = (mask > 0).astype(np.int64)
    if not out.any():
        raise ValueError("the drawn mask is empty: draw over the region to ablate")
    return out


def baseline_colour(loaded: LoadedModel, name) -> tuple[int, int, int]:
    """The RGB colour ablated pixels take: the processor's mean colour, white, black, or an (r, g, b)."""
    if not isinstance(name, str):
        rgb = tuple(int(v) for v in name)
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise ValueError(f"a baseline colour is three values 0-255, not {name!r}")
        return rgb  # type: ignore[return-value]
    if name == "white":
        return (255, 255, 255)
    if name == "black":
        return (0, 0, 0)
    if name != "mean":
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, not {name!r}")
    mean = getattr(loaded.processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    return tuple(int(round(255 * m)) for m in mean)  # type: ignore[return-value]


@dataclass
class SegmentResult:
    values: np.ndarray  # (segments,): the explained token's log-probability drop when the segment is removed
    segments: np.ndarray  # (height, width) int map of segment ids (values[i] belongs to the i-th sorted id)
    ids: list[int]
    token: str
    method: str
    baseline: tuple[int, int, int]

    def pixel_map(self) -> np.ndarray:
        """(height, width): each pixel carries its segment's value."""
        lookup = {sid: v for sid, v in zip(self.ids, self.values)}
        return np.vectorize(lookup.get, otypes=[np.float64])(self.segments)

    def heatmap(self, image: Image.Image, target: dict, model: str, cells: int = 64) -> PatchHeatmap:
        """The pixel map averaged over a grid of at most `cells` cells per side, as a PatchHeatmap."""
        values = self.pixel_map()
        h, w = values.shape
        rows, cols = min(h, cells), min(w, cells)
        r = np.minimum(np.arange(h) * rows // h, rows - 1)
        c = np.minimum(np.arange(w) * cols // w, cols - 1)
        sums = np.zeros((rows, cols))
        counts = np.zeros((rows, cols))
        np.add.at(sums, (r[:, None], c[None, :]), values)
        np.add.at(counts, (r[:, None], c[None, :]), 1)
        return PatchHeatmap(sums / np.maximum(counts, 1), "segment_ablation", target, (0, 0, w, h), image.size,
                            {"method": self.method, "baseline": list(self.baseline)}, model)

    def to_json(self) -> dict:
        return {"method": self.method, "token": self.token, "baseline": list(self.baseline),
                "segments": [{"id": int(i), "value": round(float(v), 6), "pixels": int((self.segments == i).sum())}
                             for i, v in zip(self.ids, self.values)]}


class _PromptAndAnswer(torch.nn.Module):
    """The chat model as Captum's LLMAttribution calls it (prompt inputs with the answer appended to
    `input_ids`), with the family's other per-token inputs lengthened to match."""

    def __init__(self, loaded: LoadedModel):
        super().__init__()
        self.loaded = loaded
        self.model = loaded.model

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, **inputs):
        inputs = self.loaded.adapter.extend_inputs(inputs, inputs["input_ids"].shape[-1])
        return self.model(**inputs)


def segment_ablation(loaded: LoadedModel, image: Image.Image, question: str, answer_ids: list[int],
                     segments: np.ndarray, token_index: int = 0, method: str = "feature_ablation",
                     baseline="mean", samples: int = 8) -> SegmentResult:
    """Each segment's effect on answer token `token_index` (log-probability, Captum's sign: positive = the
    segment supports the token). `segments`: (height, width) ints over `image`; `baseline`: the colour of
    removed pixels (see `baseline_colour`); `samples`: Shapley permutations."""
    from captum.attr import FeatureAblation, ImageMaskInput, LLMAttribution, ShapleyValueSampling

    if not loaded.adapter.chat:
        raise ValueError(f"{loaded.name} does not answer questions: segment ablation explains a chat model's answer.")
    if loaded.adapter.encoder_decoder(loaded.model):
        raise ValueError(f"{loaded.name}'s language model is an encoder-decoder: segment ablation runs Captum's "
                         "LLMAttribution, which appends the answer to the prompt of a decoder-only model. Use the "
                         "token heatmaps' occlusion for this model.")
    if method not in SEGMENT_METHODS:
        raise ValueError(f"method must be one of {', '.join(SEGMENT_METHODS)}, not {method!r}")
    if not 0 <= token_index < len(answer_ids):
        raise ValueError(f"token_index {token_index} is outside the answer's {len(answer_ids)} tokens")
    image = image.convert("RGB")
    segments = np.asarray(segments)
    if segments.shape != (image.height, image.width):
        raise ValueError(f"the segments ({segments.shape[1]}x{segments.shape[0]}) must match the image "
                         f"({image.width}x{image.height})")
    ids = sorted(int(i) for i in np.unique(segments))
    colour = baseline_colour(loaded, baseline)

    def processor_fn(img: Image.Image):
        check_deadline()
        return chat_inputs(loaded, img, question)

    forward = _PromptAndAnswer(loaded)
    algorithm = FeatureAblation(forward) if method == "feature_ablation" else ShapleyValueSampling(forward)
    llm = LLMAttribution(algorithm, loaded.processor.tokenizer)
    inp = ImageMaskInput(image, mask=torch.from_numpy(segments), baseline=colour, processor_fn=processor_fn)
    target = torch.tensor(answer_ids[: token_index + 1], dtype=torch.long)
    kwargs = {"n_samples": int(samples)} if method == "shapley" else {}
    with torch.inference_mode(False), torch.no_grad():
        # one teacher-forced pass per ablation (Captum's token-by-token mode drops the image after its first
        # step with transformers 5's generation inputs, which would give every segment 0)
        result = llm.attribute(inp, target=target, forward_in_tokens=False, **kwargs)
    values = result.token_attr[token_index].detach().float().cpu().numpy()  # (segments,)
    token = loaded.processor.tokenizer.decode([int(answer_ids[token_index])]).strip()
    return SegmentResult(values, segments, ids, token, method, colour)
