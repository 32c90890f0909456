"""Chat tab: visual question answering, streamed, with a heatmap for every answer token."""

from __future__ import annotations

import math

import gradio as gr
import numpy as np

from mmie_core.chat import (
    GenerationSettings,
    Turn,
    answer_token_maps,
    generation_token_maps,
    stream_answer,
)
from mmie_core.explain import METHODS, NAMED_VARIANTS, explain
from mmie_core.images import load_image
from mmie_core.models import PRESETS, load_model, presets_for
from mmie_core.render import figure_to_image, heatmap_figure, matrix_figure, reliance_plot

from .gpu import duration_chat, duration_explain, gpu
from .common import AnswerJSON, TokenPicker, example_images, photo_examples, image_input, model_picker, save_json, save_png, user_errors
from .patches_tab import COLORMAPS

INTRO = """
### Ask about an image
The model reads your image as a row of image tokens followed by your words, then writes the
answer one token at a time. When it is done, every answer token becomes a chip: pick one to see
which image patches it drew on, and the plot shows how much of each token's attention went to
the image rather than to the text.
"""

DEFAULT_METHOD = "attention"
# The token heatmaps offer every method with its defaults, and the library's named variants.
TOKEN_METHODS: dict[str, tuple[str, dict]] = {m: (m, {}) for m in METHODS} | NAMED_VARIANTS


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    return " ".join(_text(c) for c in content or [])


def turns_from_messages(messages: list[dict] | None) -> list[Turn]:
    """Chatbot messages -> completed (user, assistant) turns."""
    turns: list[Turn] = []
    for message in messages or []:
        role, text = message.get("role"), _text(message.get("content"))
        if role == "user":
            turns.append(Turn(text))
        elif role == "assistant" and turns and not turns[-1].assistant:
            turns[-1].assistant = text
    return [t for t in turns if t.assistant]


def messages_from_turns(turns: list[Turn]) -> list[dict]:
    """Completed turns -> Chatbot messages."""
    messages = []
    for t in turns:
        messages += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant}]
    return messages


def _serves(adapter, task: str) -> bool:
    """Chat needs a chat model; alt text takes chat models and captioners."""
    return adapter.chat if task == "chat" else adapter.describes


def _not_a_chat_model(name: str, adapter, task: str) -> ValueError:
    supported = ", ".join(p.name for p in presets_for(task) if _serves(p.adapter, task))
    doing = "chat" if task == "chat" else "write alt text"
    if adapter.zero_shot:
        return ValueError(f"{name} is a {adapter.name} (zero-shot) model and cannot {doing}; pick one of: {supported}.")
    if adapter.captions:
        return ValueError(f"{name} is a {adapter.name} captioning model: it writes captions but cannot chat; "
                          f"use it in the Alt text tab, or pick one of: {supported}.")
    return ValueError(f"{name} is a {adapter.name} model, which cannot {doing}; pick one of: {supported}.")


def chat_model(model_name: str, task: str = "chat"):
    """The loaded chat VLM (task "chat") or describing model (task "alt_text": chat VLMs and
    captioners), or a clear error for a model of another family (checked from the preset before
    any download)."""
    preset = PRESETS.get(model_name)
    if preset is not None and not _serves(preset.adapter, task):
        raise _not_a_chat_model(preset.name, preset.adapter, task)
    loaded = load_model(model_name)
    if not _serves(loaded.adapter, task):
        raise _not_a_chat_model(loaded.name, loaded.adapter, task)
    return loaded


@gpu(duration_chat)
@user_errors
def chat(image: str, message: str, history: list | None = None, model_name: str = "shapes-vlm",
         max_new_tokens: int = 48, temperature: float = 0.0, top_p: float = 1.0):
    """Ask a vision-language model a question about an image; the answer streams token by token.

    Args:
        image: the image (a file or URL).
        message: the question, e.g. "what color is the circle?".
        history: earlier turns as chat messages ([{"role": "user" | "assistant", "content": ...}]); [] to start.
        model_name: shapes-vlm, shapes-blip2, or a chat VLM Hub preset (LLaVA, SmolVLM, Qwen2-VL, PaliGemma, BLIP-2,
            InstructBLIP Vicuna or Flan-T5).
        max_new_tokens: the longest answer, in tokens.
        temperature: 0 for greedy decoding, above 0 to sample.
        top_p: nucleus sampling threshold when sampling.
    Returns:
        the chat messages, the cleared textbox, the answer tokens as chips, a plot of each token's reliance on
        the image (PNG), the answer JSON (question, history, token ids, per-token attention maps, image reliance:
        what explain_token takes), and the layer x head share of attention on the image (PNG).
    """
    if image is None:
        raise ValueError("Add an image first (upload, paste, draw, or pick an example).")
    img = load_image(image)
    loaded = chat_model(model_name)
    settings = GenerationSettings(int(max_new_tokens), float(temperature), float(top_p)).validate()
    turns = turns_from_messages(history)
    question = (message or "").strip()
    messages = messages_from_turns(turns) + [{"role": "user", "content": question},
                                             {"role": "assistant", "content": ""}]
    state = None
    for state in stream_answer(loaded, img, question, turns, settings, record_maps=True):
        messages[-1]["content"] = state.text + ("" if state.finished else " ▌")
        yield messages, "", gr.update(), None, None, None
    if state is None or not state.token_ids:
        messages[-1]["content"] = state.text if state and state.text else "(no answer)"
        yield messages, "", gr.update(choices=[], value=None), None, None, None
        return
    # the rows recorded during generation (no second pass), or the analysis pass where they cannot serve
    maps = (generation_token_maps(loaded, img, question, state, turns)
            or answer_token_maps(loaded, img, question, state.token_ids, turns))
    chips = [f"{k}: {tok}" for k, tok in enumerate(maps.tokens)]
    data = {
        "model": loaded.name,
        "question": question,
        "history": [{"user": t.user, "assistant": t.assistant} for t in turns],
        "answer": state.text,
        "stopped": state.stopped,
        "timed_out": state.timed_out,
        "token_ids": state.token_ids,
        "tokens": maps.tokens,
        "image_reliance": [round(r, 4) for r in maps.image_reliance],
        "heatmaps": [hm.to_json() for hm in maps.heatmaps],
        "image_share_layer_head": np.round(maps.image_share, 4).tolist(),
    }
    plot = save_png(figure_to_image(reliance_plot(maps.tokens, maps.image_reliance)), "reliance")
    share = save_png(figure_to_image(matrix_figure(maps.image_share, "mean attention to image tokens",
                                                   ylabel="language-model layer")), "image-share")
    messages[-1]["content"] = state.text + stop_note(state)
    yield messages, "", gr.update(choices=chips, value=chips[0]), plot, data, share


def stop_note(state) -> str:
    """What the chat shows after an answer that ended early."""
    if state.timed_out:
        return " *(stopped at the time limit)*"
    return " *(stopped)*" if state.stopped else ""


def token_index(choice) -> int:
    if choice is None or choice == "":
        raise ValueError("Pick an answer token.")
    if isinstance(choice, bool) or (isinstance(choice, float) and not (math.isfinite(choice) and choice.is_integer())):
        raise ValueError(f"Not an answer token: {choice!r} (give its index, 0 for the first, or its chip).")
    if isinstance(choice, (int, float)):
        if choice < 0:
            raise ValueError(f"Not an answer token: {choice!r} (indices start at 0).")
        return int(choice)
    head = str(choice).split(":", 1)[0].strip()
    if not head.isdigit():
        raise ValueError(f"Not an answer token: {choice!r}.")
    return int(head)


@gpu(duration_explain)
@user_errors
def explain_token(image: str, answer: dict | None, token: int | str, model_name: str = "shapes-vlm", method: str = DEFAULT_METHOD,
                  colormap: str = "inferno", opacity: float = 0.6, upsample: str = "blocks"):
    """Heatmap over the image patches of where one answer token came from.

    Args:
        image: the image the answer was about.
        answer: the answer JSON returned by chat or alt_text.
        token: the token to explain, as its index (0 = the first) or its chip "k: word".
        model_name: the model that gave the answer.
        method: attention, rollout, relevancy, integrated_gradients, saliency, occlusion, gradcam, or a named
            variant such as "integrated_gradients (white canvas, log-prob)".
        colormap: a matplotlib colormap name for the overlay.
        opacity: overlay opacity from 0 to 1.
        upsample: "blocks" (one colour per patch) or "smooth".
    Returns:
        the overlay (PNG), the heatmap as JSON, and the files to download.
    """
    if not answer and token in (None, ""):
        return None, None, None  # nothing to show (e.g. the chat was cleared)
    if not answer or not answer.get("token_ids"):
        raise ValueError("Ask a question (or generate alt text) first, then pick a token.")
    img = load_image(image)
    k = token_index(token)
    if not 0 <= k < len(answer["token_ids"]):
        raise ValueError(f"Token {k} is outside the answer's {len(answer['token_ids'])} tokens.")
    if method not in TOKEN_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(TOKEN_METHODS)}.")
    loaded = chat_model(model_name, task="alt_text")  # chat answers and alt text (captioners too)
    target = {"question": answer["question"], "answer_ids": answer["token_ids"], "token_index": k,
              "history": answer.get("history") or []}
    name, params = TOKEN_METHODS[method]
    params = {"layers": "all"} if name == "attention" else dict(params)
    heatmap = explain(loaded, img, target, name, **params)
    png = save_png(figure_to_image(heatmap_figure(img, heatmap, colormap, float(opacity), upsample)), "token-heatmap")
    data = heatmap.to_json()
    return png, data, [png, save_json(data, "token-heatmap")]


def retry(history: list | None):
    """Drop the last exchange and put its question back in the textbox."""
    turns = turns_from_messages(history)
    if not turns:
        raise gr.Error("Nothing to retry yet.")
    last = turns.pop()
    return messages_from_turns(turns), last.user


def build_chat_tab() -> None:
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input("chat-image")
            model = model_picker("chat", "shapes-vlm")
            with gr.Accordion("Sampling", open=False):
                max_new = gr.Slider(1, 256, value=48, step=1, label="Max new tokens")
                temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
            gr.Examples(examples=[[p] for p in example_images()[:4]], inputs=[image], label="ShapesWorld examples")
            photo_examples([image])
        with gr.Column(scale=2):
            chatbot = gr.Chatbot(label="Chat", height=320)
            message = gr.Textbox(placeholder="e.g. what color is the circle?", label="Your question", lines=1,
                                 elem_id="chat-message")
            with gr.Row():
                send = gr.Button("Send", variant="primary")
                stop = gr.Button("Stop")
                again = gr.Button("Retry")
                clear = gr.Button("Clear")
            gr.Examples(examples=[["what color is the circle?"], ["how many shapes are there?"],
                                  ["where is the red square?"], ["describe the image."]],
                        inputs=[message], label="Questions")
            tokens = TokenPicker([], label="Answer tokens: pick one to see where it looked", elem_id="chat-tokens")
            with gr.Row():
                method = gr.Dropdown(list(TOKEN_METHODS), value=DEFAULT_METHOD, label="Method")
                colormap = gr.Dropdown(COLORMAPS, value="inferno", label="Colormap")
                opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Opacity")
                upsample = gr.Radio(["blocks", "smooth"], value="blocks", label="Upsampling")
            overlay = gr.Image(label="Where this token looked", format="png", interactive=False,
                               elem_id="chat-overlay", height=420)
            reliance = gr.Image(label="Image reliance: share of each token's attention on the image", format="png",
                                interactive=False)
            with gr.Accordion("Which layers and heads look at the image", open=False):
                share = gr.Image(label="Mean attention to image tokens per layer and head (this answer)",
                                 format="png", interactive=False)
            with gr.Accordion("JSON and downloads", open=False):
                answer = AnswerJSON(label="Answer (JSON)")
                heat_json = gr.JSON(label="Heatmap (JSON)")
                files = gr.File(label="Download (PNG, JSON)", file_count="multiple", interactive=False)
    chat_inputs = [image, message, chatbot, model, max_new, temperature, top_p]
    chat_outputs = [chatbot, message, tokens, reliance, answer, share]
    sent = send.click(chat, chat_inputs, chat_outputs, api_name="chat", concurrency_id="model")
    submitted = message.submit(chat, chat_inputs, chat_outputs, api_name=False, concurrency_id="model")
    stop.click(None, cancels=[sent, submitted], api_name=False)
    again.click(retry, chatbot, [chatbot, message], api_name=False).then(
        chat, chat_inputs, chat_outputs, api_name=False, concurrency_id="model")
    clear.click(lambda: ([], "", gr.update(choices=[], value=None), None, None, None, None, None), None,
                [chatbot, message, tokens, reliance, answer, overlay, heat_json, share], api_name=False)
    explain_inputs = [image, answer, tokens, model, method, colormap, opacity, upsample]
    explain_outputs = [overlay, heat_json, files]
    tokens.change(explain_token, explain_inputs, explain_outputs, api_name="explain_token", concurrency_id="model")
