"""Visual question answering with chat VLMs.

- Prompts go through the model's own chat template; the image is attached to the first user
  turn (as a PIL image, never a path or URL).
- `stream_answer` yields the answer token by token (generation on sdpa, in a thread) and can
  be stopped.
- `answer_token_maps` runs one analysis pass over prompt + answer (sdpa, plus only the softmax
  rows of the answer positions) and returns, for every answer token, its attention over the
  image tokens (a PatchHeatmap) and its image reliance (the share of its attention that went to
  image tokens rather than text).
- `stream_answer(..., record_maps=True)` records the same rows while the answer is generated (each
  layer's last query row at every step, over the KV cache), and `generation_token_maps` turns them
  into the same TokenMaps with no second pass.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from .attention import (AttentionRecorder, RowRecorder, biased_mask, fuse, register_rows_implementation,
                        rows_from_cache)
from .heatmap import PatchHeatmap
from .limits import DeadlineCriteria, check_deadline, current_deadline
from .models import LoadedModel, attention_implementation
from .patches import GridLayout, PatchGrid, TiledLayout, processor_view

MAX_NEW_TOKENS_LIMIT = 512
MAX_PROMPT_CHARS = 4000


@dataclass
class GenerationSettings:
    """Decoding controls (greedy by default)."""

    max_new_tokens: int = 48  # 1..MAX_NEW_TOKENS_LIMIT
    temperature: float = 0.0  # 0 = greedy; otherwise sample
    top_p: float = 1.0  # nucleus sampling mass (with temperature > 0)
    seed: int | None = None  # for reproducible sampling

    def validate(self) -> "GenerationSettings":
        if not 1 <= int(self.max_new_tokens) <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}.")
        if not 0.0 <= float(self.temperature) <= 5.0:
            raise ValueError("temperature must be between 0 and 5.")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError("top-p must be in (0, 1].")
        return self

    def generate_kwargs(self) -> dict:
        if self.temperature > 0:
            return dict(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p),
                        max_new_tokens=int(self.max_new_tokens))
        return dict(do_sample=False, max_new_tokens=int(self.max_new_tokens))


@dataclass
class Turn:
    user: str
    assistant: str = ""


def user_message(question: str, with_image: bool = True) -> dict:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return {"role": "user", "content": content}


def build_messages(history: list[Turn], question: str) -> list[dict]:
    """Chat-template messages: earlier turns, then `question`; the image goes with the first user turn."""
    messages: list[dict] = []
    for k, turn in enumerate(history):
        messages.append(user_message(turn.user, with_image=k == 0))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.assistant}]})
    messages.append(user_message(question, with_image=not history))
    return messages


def _check_question(question: str) -> str:
    question = (question or "").strip()
    if not question:
        raise ValueError("Type a question.")
    if len(question) > MAX_PROMPT_CHARS:
        raise ValueError(f"The message is {len(question)} characters; the limit is {MAX_PROMPT_CHARS}.")
    return question


def prompt_for(loaded: LoadedModel, question: str, history: list[Turn] | None = None) -> str:
    """The generation prompt as the model's family builds it: its chat template, PaliGemma's task
    prompt (one question at a time), or a captioner's optional caption prefix."""
    return loaded.adapter.prompt(loaded, question, history or [])


def chat_inputs(loaded: LoadedModel, image: Image.Image, question: str, history: list[Turn] | None = None):
    """Processor inputs (input_ids, attention_mask, pixel_values) for one chat turn."""
    if loaded.adapter.captions:  # the question is an optional caption prefix
        prefix = prompt_for(loaded, (question or "").strip(), history)
        if len(prefix) > MAX_PROMPT_CHARS:
            raise ValueError(f"The caption prefix is {len(prefix)} characters; the limit is {MAX_PROMPT_CHARS}.")
        return processor_inputs(loaded, [image], [prefix] if prefix else None)
    question = _check_question(question)
    return processor_inputs(loaded, [image], [prompt_for(loaded, question, history)])


def image_token_count(loaded: LoadedModel, image: Image.Image, question: str = "Describe the image.") -> int:
    """How many image tokens the processor puts in a prompt with `image` (0 for a captioner, whose
    decoder reads the image by cross-attention): counted in its output, never taken from a config."""
    if loaded.adapter.captions:
        return 0
    ids = chat_inputs(loaded, image, question)["input_ids"]
    return int((ids == loaded.model.config.image_token_id).sum())


def processor_inputs(loaded: LoadedModel, images: list[Image.Image], prompts: list[str] | None, **kwargs):
    """The processor's model inputs on the model's device, pixels in its dtype, no training labels."""
    inputs = loaded.processor(images=images, text=prompts, return_tensors="pt", **kwargs)
    inputs.pop("labels", None)  # PaliGemma's processor makes training labels too
    inputs = inputs.to(loaded.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    return inputs


@torch.inference_mode()
def answer_batch(
    loaded: LoadedModel, images: list[Image.Image], questions: list[str], max_new_tokens: int = 48
) -> list[str]:
    """Greedy answers to one question per image, batched with left padding."""
    if len(images) != len(questions):
        raise ValueError("answer_batch needs one question per image")
    from transformers import StoppingCriteriaList

    check_deadline()
    prompts = [prompt_for(loaded, _check_question(q)) for q in questions]
    inputs = processor_inputs(loaded, images, prompts, padding=True, padding_side="left")
    timer = DeadlineCriteria(current_deadline())
    out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                stopping_criteria=StoppingCriteriaList([timer]))
    if timer.fired:
        check_deadline()  # cut answers are not answers
    # a decoder-only model returns prompt + answer; an encoder-decoder the decoder's start token + answer
    new_tokens = out[:, 1:] if loaded.adapter.encoder_decoder(loaded.model) else out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in loaded.processor.batch_decode(new_tokens, skip_special_tokens=True)]


def special_token_ids(tokenizer) -> set[int]:
    """Ids of every special token, including added ones such as chat-role markers."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special)
    return ids


class _StopOnEvent:
    """A generation stopping criterion that fires when `event` is set (the Stop button)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class StreamState:
    """Text so far and the generated token ids, updated as the stream advances."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    stopped: bool = False  # ended early: the Stop button, or the time limit (then timed_out too)
    timed_out: bool = False
    generated_ids: list[int] = field(default_factory=list)  # every generated id, special ones included
    rows: "GenerationRows | None" = None  # with record_maps: each layer's attention row at every step


class GenerationRows(RowRecorder):
    """Attention rows recorded while generate() runs (batch of one): at every call of each tapped layer, the
    softmax row of the last query position over every key so far (the KV cache): the prompt's last
    position at the first call, then each newly fed token. Row t is the one that predicted generated token
    t, exactly the row the teacher-forced analysis pass computes for it. Memory: layers x heads x tokens x
    sequence floats, never sequence^2.

    The prefill's row is computed at once. At a decoding step the tap only keeps the step's query row and a
    reference to the key cache (no kernel, so generation runs at its own pace on a GPU); those rows are
    computed when first read (`steps`, `per_head`), all steps of a layer in one product with the final keys,
    which a cache that makes a new, longer tensor at every step (transformers' dynamic cache) never changes.
    A cache written in place (static, ring buffer) gets each row at its step; one whose new tensor does not
    just grow (a sliding window) first gets its pending rows from the keys they saw."""

    def __init__(self, modules: dict):
        super().__init__(modules, rows=[0])
        self._rows: dict[int, list[torch.Tensor]] = {i: [] for i in modules}
        self._pending: dict[int, list[tuple]] = {i: [] for i in modules}  # (query row, mask row, key length)
        self._keys: dict[int, torch.Tensor | None] = dict.fromkeys(modules)  # each layer's latest key cache
        self._scaling: dict[int, float | None] = {}
        self._half = False

    def _tap(self, layer: int):
        def tap(module, query, key, attention_mask, scaling, bias=None):
            if bias is not None:  # T5's position bias: folded into the last row's mask
                attention_mask = biased_mask(attention_mask, bias)
            key = key.detach()
            held = self._keys[layer]
            q = query.detach()[:, :, -1:]
            mask = None if attention_mask is None else attention_mask[..., -1:, : key.shape[2]]
            self._keys[layer], self._scaling[layer] = key, scaling
            self._half = query.dtype in (torch.float16, torch.bfloat16)
            if held is None or key.untyped_storage().data_ptr() == held.untyped_storage().data_ptr():
                # the prefill, or a cache written in place (static, ring buffer), whose keys may change later:
                # this row now
                self._pending[layer].append((q, mask, key.shape[2]))
                self._flush(layer)
                return
            if key.shape[2] != held.shape[2] + query.shape[2]:  # a new tensor that did not just grow (a window):
                self._keys[layer] = held  # the pending rows come from the keys they saw
                self._flush(layer)
                self._keys[layer] = key
            self._pending[layer].append((q, mask, key.shape[2]))

        return tap

    def _flush(self, layer: int) -> None:
        pending, key = self._pending[layer], self._keys[layer]
        if pending:
            rows = rows_from_cache([q for q, _, _ in pending], key, [n for _, _, n in pending],
                                   [m for _, m, _ in pending], self._scaling[layer])
            # a half-precision model's rows are kept in float16: its relative error (2^-11) is below that of
            # the bf16 / fp16 attention they come from, and memory halves; a float32 model's stay float32
            # (a copy either way: a view would keep the layer's whole product alive next to per_head's tensor)
            self._rows[layer] += [r[0].to(torch.float16) if self._half else r[0].clone() for r in rows]  # (heads, keys)
            pending.clear()

    @property
    def steps(self) -> dict[int, list[torch.Tensor]]:
        """Each layer's rows, one per step ((heads, keys so far) each), computed from the cache when first read."""
        for layer in self._pending:
            self._flush(layer)
            self._keys[layer] = None  # generation is over: the cache is no longer needed
        return self._rows

    def per_head(self, layers: list[int], steps: list[int], length: int) -> torch.Tensor:
        """(layers, heads, len(steps), length): the chosen steps' rows, zero beyond each row's keys (the
        positions after it, which a causal row never sees). The recorded rows become views of this tensor as
        it fills, so the rows are held once, not twice."""
        recorded = self.steps
        first = recorded[layers[0]][steps[0]]
        out = torch.zeros(len(layers), first.shape[0], len(steps), length, dtype=first.dtype, device=first.device)
        for j, i in enumerate(layers):
            for k, t in enumerate(steps):
                r = recorded[i][t]
                out[j, :, k, : r.shape[-1]] = r
                recorded[i][t] = out[j, :, k, : r.shape[-1]]
        return out


def stream_answer(
    loaded: LoadedModel,
    image: Image.Image,
    question: str,
    history: list[Turn] | None = None,
    settings: GenerationSettings | None = None,
    stop: threading.Event | None = None,
    record_maps: bool = False,
) -> Iterator[StreamState]:
    """Generate an answer, yielding the state after every new token. `record_maps`: also record every
    language-model layer's attention row at each step (for `generation_token_maps`; models whose answer
    reads the image by cross-attention record nothing)."""
    from transformers import StoppingCriteriaList

    settings = (settings or GenerationSettings()).validate()
    check_deadline()
    inputs = chat_inputs(loaded, image, question, history)
    recorder = None
    if record_maps and not loaded.adapter.captions:
        recorder = GenerationRows(dict(enumerate(answer_layers(loaded))))
    stop = stop or threading.Event()
    timer = DeadlineCriteria(current_deadline())  # generation runs in another thread
    tokenizer = loaded.processor.tokenizer
    special = special_token_ids(tokenizer)
    state = StreamState()
    new_ids: list[int] = []
    lock = threading.Condition()
    error: list[BaseException] = []

    class _Collect:
        prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            ids = value.reshape(-1).tolist()
            if not self.prompt_seen:  # generate sends the prompt first (a captioner's may be one token)
                self.prompt_seen = True
                return
            with lock:
                new_ids.extend(ids)
                lock.notify_all()

        def end(self) -> None:
            with lock:
                state.finished = True
                lock.notify_all()

    def run() -> None:
        try:
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            with contextlib.ExitStack() as taps:  # whatever was entered is exited, even if the next one fails
                if recorder is not None:  # sdpa for generation itself, plus each layer's last softmax row
                    taps.enter_context(attention_implementation(loaded.model, register_rows_implementation()))
                    taps.enter_context(recorder)
                with torch.inference_mode():
                    loaded.model.generate(**inputs, **settings.generate_kwargs(), streamer=_Collect(),
                                          stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop), timer]))
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(err)
            with lock:
                state.finished = True
                lock.notify_all()

    thread = threading.Thread(target=run, daemon=True, name="mmie-generate")
    thread.start()
    seen = 0
    completed = False
    try:
        while True:
            with lock:
                while seen == len(new_ids) and not state.finished:
                    lock.wait(timeout=0.5)
                fresh, seen = new_ids[seen:], len(new_ids)
                done = state.finished and seen == len(new_ids)
            for token in fresh:
                if token in special:
                    continue
                state.token_ids.append(token)
                state.text = tokenizer.decode(state.token_ids, skip_special_tokens=True).strip()
                yield state
            if done:
                completed = True
                break
    finally:  # also when the consumer stops early (a Stop button closing this generator)
        if not completed:
            stop.set()
        thread.join()
    if error:
        raise error[0]
    state.timed_out = timer.fired
    state.stopped = stop.is_set() or timer.fired
    state.finished = True
    state.generated_ids = list(new_ids)
    state.rows = recorder
    yield state


def greedy_answer_ids(loaded: LoadedModel, image: Image.Image, question: str, history: list[Turn] | None = None,
                      max_new_tokens: int = 48) -> list[int]:
    """Token ids of the greedy answer (what the chat shows), for analyses that need an answer."""
    state = None
    for state in stream_answer(loaded, image, question, history, GenerationSettings(max_new_tokens)):
        pass
    if state is None or not state.token_ids:
        raise ValueError("The model gave no answer to this question.")
    if state.timed_out:
        check_deadline()
    return list(state.token_ids)


@dataclass
class AnswerSequence:
    """Prompt + answer as one sequence, for analysis passes over a generated answer."""

    input_ids: torch.Tensor  # (1, prompt + answer); an encoder-decoder's: (1, prompt), the encoder's input
    pixel_values: torch.Tensor  # as the processor made them, on the model's device and dtype
    prompt_length: int  # position prompt_length + k of `target_ids` holds answer token k
    image_positions: torch.Tensor  # (image tokens,) their indices, in the layout's order
    layout: GridLayout | PatchGrid | TiledLayout  # which patch (or tile cell) each image token shows
    grid: PatchGrid  # the ViT patch grid of `pixel_values` (of each tile for Idefics3)
    extra: dict = field(default_factory=dict)  # other model inputs over the whole sequence (token_type_ids)
    image_extra: dict = field(default_factory=dict)  # other per-image inputs (pixel_attention_mask, image_grid_thw)
    position_ids: torch.Tensor | None = None  # Qwen2-VL's (3, 1, length) multimodal rotary positions
    # Qwen2-VL: `pixel_values` holds the resized image (1, 3, H, W), which this turns into the model's
    # flattened patches, so that gradient methods see an image
    to_model: Callable[[torch.Tensor], torch.Tensor] | None = None
    # an encoder-decoder language model (T5): (1, 1 + answer), the decoder's start token then the answer
    decoder_input_ids: torch.Tensor | None = None

    @property
    def target_ids(self) -> torch.Tensor:
        """The sequence that holds the answer: prompt + answer, or an encoder-decoder's decoder sequence."""
        return self.input_ids if self.decoder_input_ids is None else self.decoder_input_ids

    def model_inputs(self, batch: int = 1, pixel_values: torch.Tensor | None = None) -> dict:
        """Keyword arguments of a forward pass over prompt + answer, repeated `batch` times (per-image
        inputs are repeated, not expanded: Idefics3 views them as one batch of tiles). Explicit
        positions keep Qwen2-VL from computing them into state shared with a running generation."""
        pixels = self.pixel_values if pixel_values is None else pixel_values
        inputs = {"input_ids": self.input_ids.expand(batch, -1),
                  "pixel_values": pixels if self.to_model is None else self.to_model(pixels)}
        inputs.update({k: v.expand(batch, -1) for k, v in self.extra.items()})
        inputs.update({k: v.repeat(batch, *[1] * (v.dim() - 1)) for k, v in self.image_extra.items()})
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids.expand(-1, batch, -1)
        if self.decoder_input_ids is not None:
            inputs["decoder_input_ids"] = self.decoder_input_ids.expand(batch, -1)
        return inputs


def answer_sequence(loaded: LoadedModel, image: Image.Image, question: str, answer_ids: list[int],
                    history: list[Turn] | None = None) -> AnswerSequence:
    """Prompt + answer ids with the image-token positions (one per image cell, checked)."""
    if not loaded.adapter.describes:
        raise ValueError(f"{loaded.name} is a {loaded.family} model: it gives no answers to analyse "
                         "(answer-token analysis covers chat models and captioners).")
    return loaded.adapter.answer_sequence(loaded, chat_inputs(loaded, image, question, history), answer_ids)


def join_answer(inputs, answer_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids (L,), prompt + answer ids (1, L + answer))."""
    prompt_ids = inputs["input_ids"][0]
    answer = torch.tensor(answer_ids, device=prompt_ids.device, dtype=prompt_ids.dtype)
    return prompt_ids, torch.cat([prompt_ids, answer])[None]


def image_token_sequence(loaded: LoadedModel, inputs, answer_ids: list[int]) -> AnswerSequence:
    """Prompt + answer of a model whose language model reads image tokens placed in the prompt; the
    family adapter lays them out (one grid, or tiles)."""
    prompt_ids, ids = join_answer(inputs, answer_ids)
    layout, grid, image_positions = loaded.adapter.answer_layout(loaded, inputs, prompt_ids)
    if int((ids[0] == loaded.model.config.image_token_id).sum()) != int(
            (prompt_ids == loaded.model.config.image_token_id).sum()):
        raise ValueError("the answer holds image tokens")
    longer = loaded.adapter.extend_inputs(inputs, ids.shape[-1])  # PaliGemma: token types, answer = 1 (causal)
    extra = {k: longer[k] for k in loaded.adapter.answer_token_inputs if k in longer}
    image_extra = {k: inputs[k] for k in loaded.adapter.per_image_inputs if k in inputs}
    return AnswerSequence(ids, inputs["pixel_values"], len(prompt_ids), image_positions, layout, grid, extra,
                          image_extra)


def answer_layers(loaded: LoadedModel) -> list:
    """The decoder blocks whose attention the answer-token maps read: the language model's
    self-attention layers (image tokens in the sequence), or a captioner's cross-attention layers."""
    return loaded.adapter.answer_layers(loaded.model)


def language_model(loaded: LoadedModel):
    """The decoder stack of a chat VLM (has .layers and .norm)."""
    return loaded.adapter.language_model(loaded.model)


def tokenizer_bos(loaded: LoadedModel) -> int:
    bos = loaded.processor.tokenizer.bos_token_id
    return -1 if bos is None else bos


@dataclass
class TokenMaps:
    """Per-answer-token attention over the image, from one analysis pass."""

    tokens: list[str]  # decoded answer tokens
    heatmaps: list[PatchHeatmap]  # one per token, normalised to sum 1 over the image
    attention: np.ndarray  # (tokens, rows, cols): attention probability on each image patch, not normalised
    # share of each token's attention on image tokens (0..1); None for a captioner, whose decoder
    # attends to the image only through cross-attention (all of it is on the image)
    image_reliance: list[float | None]
    # (layers, heads): mean over answer tokens of the attention share on image tokens (a captioner:
    # the cross-attention share on patches rather than on the vision tower's CLS token)
    image_share: np.ndarray
    layers: list[int]  # language-model layers the maps were fused over
    seconds: float


def answer_token_maps(
    loaded: LoadedModel,
    image: Image.Image,
    question: str,
    answer_ids: list[int],
    history: list[Turn] | None = None,
    layers: list[int] | None = None,
    head_fusion: str = "mean",
    layer_fusion: str = "mean",
) -> TokenMaps:
    """Attention of every answer token over the image tokens, from one forward pass.

    The pass runs on sdpa; each layer also computes the softmax rows of the positions that
    predict answer tokens (and nothing else), so memory grows with (answer length x sequence),
    never (sequence^2), and the pass costs about one sdpa forward.
    """
    if not answer_ids:
        raise ValueError("There is no answer to explain yet.")
    t0 = time.perf_counter()
    seq = answer_sequence(loaded, image, question, answer_ids, history)
    ids, image_cols = seq.input_ids, seq.image_positions
    rows = list(range(seq.prompt_length - 1, seq.target_ids.shape[1] - 1))  # position t-1 predicts answer token t
    layout = seq.layout
    lm_layers = answer_layers(loaded)
    chosen = list(range(len(lm_layers))) if layers is None else sorted({l % len(lm_layers) for l in layers})
    modules = {i: lm_layers[i] for i in chosen}
    if loaded.adapter.captions:
        # cross-attention is always computed explicitly: record the answer rows of each layer
        with torch.inference_mode(), AttentionRecorder(modules, rows=rows) as rec:
            loaded.model(**seq.model_inputs())
        per_head = torch.stack([rec.maps[i][0] for i in chosen])  # (layers, heads, rows, 1 + patches)
        cols = torch.arange(layout.prefix_tokens, per_head.shape[-1], device=per_head.device)  # patches, not CLS
    else:
        # sdpa for the pass itself; each layer computes only the softmax rows of the answer positions
        with attention_implementation(loaded.model, register_rows_implementation()), torch.inference_mode(), \
                RowRecorder(modules, rows=rows) as rec:
            loaded.model(**seq.model_inputs(), attention_mask=torch.ones_like(ids))
        per_head = torch.stack([rec.maps[i][0] for i in chosen])  # (layers, heads, rows, seq)
        cols = image_cols.to(per_head.device)
    return _token_maps(loaded, image, question, seq, answer_ids, per_head, cols, chosen, head_fusion, layer_fusion,
                       time.perf_counter() - t0, "answer")


def generation_token_maps(loaded: LoadedModel, image: Image.Image, question: str, state: StreamState,
                          history: list[Turn] | None = None, layers: list[int] | None = None,
                          head_fusion: str = "mean", layer_fusion: str = "mean") -> TokenMaps | None:
    """The answer's TokenMaps from the rows `stream_answer(record_maps=True)` recorded during generation: no
    second pass. None when they cannot stand for the answer (nothing recorded, or a special token inside
    the answer, which the answer's ids leave out): then use `answer_token_maps`."""
    rows = state.rows
    if rows is None or not state.token_ids:
        return None
    kept = list(range(len(state.token_ids)))  # the answer's tokens are the first ones generated...
    if state.generated_ids[: len(kept)] != state.token_ids:
        return None  # ...unless a special token came before the end: the teacher-forced sequence is another one
    t0 = time.perf_counter()
    seq = answer_sequence(loaded, image, question, state.token_ids, history)
    lm_layers = answer_layers(loaded)
    chosen = list(range(len(lm_layers))) if layers is None else sorted({l % len(lm_layers) for l in layers})
    # one row per forward pass (the prefill, then each fed token), each over the keys of its step (an
    # encoder-decoder's cross-attention: always the encoder's tokens): anything else (a pass that did not run,
    # or one that was not this generation's) and the rows cannot be trusted
    def keys(t: int) -> int:
        return seq.input_ids.shape[1] if seq.decoder_input_ids is not None else seq.prompt_length + t

    if any(len(rows.steps[i]) != len(state.generated_ids) for i in chosen) or any(
            rows.steps[i][t].shape[-1] != keys(t) for i in chosen for t in kept):
        return None
    per_head = rows.per_head(chosen, kept, seq.input_ids.shape[1])  # (layers, heads, tokens, seq)
    return _token_maps(loaded, image, question, seq, state.token_ids, per_head, seq.image_positions.to(per_head.device),
                       chosen, head_fusion, layer_fusion, time.perf_counter() - t0, "generation")


def _token_maps(loaded: LoadedModel, image: Image.Image, question: str, seq: AnswerSequence, answer_ids: list[int],
                per_head: torch.Tensor, cols: torch.Tensor, chosen: list[int], head_fusion: str, layer_fusion: str,
                seconds: float, source: str) -> TokenMaps:
    """TokenMaps from the answer rows (layers, heads, tokens, keys) and the image columns of the keys."""
    ids, image_cols, layout = seq.input_ids, seq.image_positions, seq.layout
    reliance: list[float | None] = [None] * len(answer_ids)  # a captioner's attention is all on the image
    image_share = per_head[..., cols].float().sum(-1).mean(-1)  # (layers, heads)
    # heads fused one layer at a time, so that float16 rows are never all in float32 at once
    stacked = torch.stack([fuse(layer.float(), head_fusion, dim=0) for layer in per_head])  # (layers, rows, seq)
    attn = fuse(stacked, layer_fusion, dim=0)  # (rows, seq)
    on_image = attn[:, cols]  # (rows, patches)
    if not loaded.adapter.captions:
        text_mask = torch.ones(attn.shape[1], dtype=torch.bool)
        text_mask[image_cols.cpu()] = False
        text_mask[(ids[0] == tokenizer_bos(loaded)).cpu()] = False  # BOS: an attention sink, not text content
        text_mask[list(layout.marker_positions)] = False  # tile / vision markers: neither image nor text
        on_text = attn[:, text_mask.to(attn.device)].sum(-1)
        reliance = [float(r) for r in on_image.sum(-1) / (on_image.sum(-1) + on_text).clamp_min(1e-12)]
    view = processor_view(loaded, image)
    tokenizer = loaded.processor.tokenizer
    tokens = [tokenizer.decode([t]).strip() or tokenizer.convert_ids_to_tokens(t) for t in answer_ids]
    heatmaps = []
    for k, token in enumerate(tokens):
        values = on_image[k] / on_image[k].sum().clamp_min(1e-12)
        heatmaps.append(PatchHeatmap(
            layout.token_map(values), "attention",
            {"question": question, "token_index": k, "token": token}, view.box, view.original_size,
            {"layers": chosen, "head_fusion": head_fusion, "layer_fusion": layer_fusion, "pass": source},
            loaded.name, seconds / len(tokens),
        ))
    attention = np.stack([layout.token_map(row) for row in on_image])  # (tokens, rows, cols)
    return TokenMaps(tokens, heatmaps, attention, reliance, image_share.double().cpu().numpy(),
                     chosen, seconds)


def patch_to_words(maps: TokenMaps, row: int, col: int) -> list[tuple[str, float]]:
    """The reverse of the per-token heatmaps: how much attention each answer token paid to the
    image patch (row, col), as (token, attention probability)."""
    _, rows, cols = maps.attention.shape
    if not (0 <= row < rows and 0 <= col < cols):
        raise ValueError(f"Patch ({row}, {col}) is outside the {rows} x {cols} grid.")
    return [(tok, float(v)) for tok, v in zip(maps.tokens, maps.attention[:, row, col])]
