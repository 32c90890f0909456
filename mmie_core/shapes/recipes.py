"""Training recipes of the three embedded ShapesWorld models.

- shapes-clip:   CLIPModel, multi-positive softmax contrastive loss.
- shapes-siglip: SiglipModel, the same data with the pairwise sigmoid loss.
- shapes-vlm:    LlavaForConditionalGeneration whose CLIP vision tower starts from shapes-clip
                 (as LLaVA starts from a pre-trained CLIP), trained on multi-turn chats about
                 scenes: questions, captions and alt text.
- shapes-blip2:  Blip2ForConditionalGeneration: a BLIP-2 vision tower started from shapes-clip's, a
                 Q-Former with learned queries, and shapes-vlm's language model, trained on the same
                 chats (the image is the Q-Former's query tokens, not patches).

Every run is reproducible from its recipe's seed. Training scenes use seeds from
TRAIN_SEED_OFFSET upward; evaluation and examples use seeds below it, so they are never seen.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipProcessor,
)

from .vocab import ASSISTANT, CHAT_TEMPLATE, END, IMAGE, USER, build_tokenizer, chat_template
from .world import QA_TYPES, Scene, make_scene

log = logging.getLogger(__name__)

TRAIN_SEED_OFFSET = 1_000_000_000
# Render sizes of training scenes: mostly the model's own size, some larger so that the
# processor's downscaling (how the studio's 256 px examples arrive) is seen in training too.
TRAIN_RENDER_SIZES = (64, 64, 64, 96, 128, 256)

CAPTION_PROMPTS = ("describe the image.", "describe the scene.", "what is in the image?", "write a caption.")
ALT_TEXT_PROMPTS = ("write alt text for this image.", "write short alt text.")
DETAILED_ALT_PROMPTS = ("write detailed alt text for this image.",)


@dataclass
class ContrastiveRecipe:
    """Dual encoder (CLIP or SigLIP) on ShapesWorld."""

    family: str = "clip"  # "clip" (softmax loss) or "siglip" (sigmoid loss)
    image_size: int = 64  # model input side in pixels
    patch_size: int = 8  # ViT patch side: an (image_size / patch_size)^2 grid of patches
    hidden_size: int = 128  # width of both towers
    vision_layers: int = 4
    text_layers: int = 3
    heads: int = 4
    projection_dim: int = 128  # shared embedding space (CLIP; SigLIP uses hidden_size)
    text_max_length: int = 64  # SigLIP pads to this length, as its pipeline does
    n_scenes: int = 24_000  # distinct training scenes (rendered once)
    steps: int = 1_400
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    seed: int = 0


@dataclass
class VLMRecipe:
    """LLaVA (CLIP vision tower + projector + small Llama) on ShapesWorld chats."""

    clip_dir: str = "assets/models/shapes-clip"  # vision tower initialisation
    text_hidden: int = 192  # Llama width
    text_layers: int = 4
    text_heads: int = 4
    # 0 keeps Llama's initialisation (std 0.02, input embeddings tied to the LM head). A value > 0
    # unties them and draws the input embeddings with this std, so text tokens start with norms
    # comparable to the projected image features instead of about 30x smaller (with 0, the
    # question's words were drowned after the first layer and the model ignored which object a
    # question named).
    text_embedding_std: float = 0.3
    text_intermediate: int = 576
    # Each training chat has at most max_turns turns: up to max_turns - 1 questions, then sometimes
    # a description. (More questions per chat give the binding of question words to image patches
    # more supervision per image; see the model card's known issues for what that changed.)
    max_turns: int = 7
    distinct_questions: bool = True  # True: no question twice in one chat (False: drawn with replacement)
    # Relative chances of question types, e.g. "position=3" (types not named weigh 1); empty: every
    # type equally likely. A later stage can lean on the type a model still gets wrong.
    question_weights: str = ""
    n_scenes: int = 24_000
    steps: int = 3_000
    batch_size: int = 48
    lr: float = 1e-3
    vision_lr: float = 2e-4  # the pre-trained vision tower moves more slowly
    freeze_vision: bool = True  # True: the vision tower keeps shapes-clip's weights (as LLaVA keeps CLIP's)
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    # A model folder to continue training from (a second stage with its own warmup and cosine
    # schedule); empty: a fresh model. The first stage's recipe is kept in training.json.
    init_from: str = ""


@dataclass
class QFormerRecipe:
    """BLIP-2 on ShapesWorld chats: vision tower -> Q-Former (learned queries reading the vision tokens by
    cross-attention) -> projection -> language model. BLIP-2's vision tower has no pre-norm, so shapes-clip's
    tower is copied without it, then frozen as BLIP-2 freezes its ViT (`vision_lr` > 0 trains it, and each
    step costs more). The language model starts from shapes-vlm's (BLIP-2 freezes its LLM; here, with no
    stage-1 pretraining, it moves slowly at `language_lr`; 0 freezes it). The chat template writes the
    `queries` image tokens inside the first user turn, where shapes-vlm's language model learned to read
    an image."""

    clip_dir: str = "assets/models/shapes-clip"
    vlm_dir: str = "assets/models/shapes-vlm"
    queries: int = 32
    qformer_hidden: int = 128
    qformer_layers: int = 4
    qformer_heads: int = 4
    cross_attention_frequency: int = 2  # cross-attention in layers 0, 2, ...
    max_turns: int = 7
    distinct_questions: bool = True
    question_weights: str = ""
    n_scenes: int = 24_000
    steps: int = 1_200
    batch_size: int = 32
    lr: float = 1e-3  # Q-Former, queries, projection
    vision_lr: float = 0.0  # 0: frozen
    language_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    # A shapes-blip2 folder to continue training from (a second stage with its own warmup and cosine
    # schedule); empty: a fresh model. The first stage's recipe is kept in training.json.
    init_from: str = ""


# --------------------------------------------------------------------------- shared pieces


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def training_scenes(n: int) -> list[tuple[Scene, int]]:
    """`n` training scenes with the size each is rendered at (never evaluation seeds)."""
    out = []
    for i in range(n):
        seed = TRAIN_SEED_OFFSET + i
        out.append((make_scene(seed), TRAIN_RENDER_SIZES[seed % len(TRAIN_RENDER_SIZES)]))
    return out


def render_pixels(scenes: list[tuple[Scene, int]], image_processor, chunk: int = 512) -> torch.Tensor:
    """Render and preprocess scenes exactly as inference does. Returns (N, 3, H, W) float16."""
    parts = []
    for start in tqdm(range(0, len(scenes), chunk), desc="render", leave=False):
        imgs = [s.render(size) for s, size in scenes[start : start + chunk]]
        parts.append(image_processor(images=imgs, return_tensors="pt")["pixel_values"].to(torch.float16))
    return torch.cat(parts)


class _LossLog:
    """Progress bar plus a CSV loss log in the output folder."""

    def __init__(self, out: Path, total: int):
        self.file = (out / "training_log.csv").open("w")
        self.file.write("step,loss,lr,seconds\n")
        self.bar = tqdm(total=total, desc="train")
        self.t0 = time.time()
        self.ema: float | None = None

    def step(self, step: int, loss: float, lr: float) -> None:
        self.ema = loss if self.ema is None else 0.95 * self.ema + 0.05 * loss
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.ema:.3f}")
        if step % 10 == 0:
            self.file.write(f"{step},{loss:.5f},{lr:.6g},{time.time() - self.t0:.1f}\n")
            self.file.flush()

    def close(self) -> float:
        self.bar.close()
        self.file.close()
        return time.time() - self.t0


def _save_recipe(out: Path, recipe, seconds: float) -> None:
    info = {
        "recipe": asdict(recipe),
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    init = getattr(recipe, "init_from", "")
    if init and (Path(init) / "training.json").exists():  # a second stage: keep the first stage's record
        info["first_stage"] = json.loads((Path(init) / "training.json").read_text())
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- dual encoders


def build_contrastive(recipe: ContrastiveRecipe):
    """A fresh (model, processor) pair for the recipe's family."""
    tok = build_tokenizer(add_bos_eos=True, model_max_length=recipe.text_max_length)
    text = dict(
        vocab_size=len(tok),
        hidden_size=recipe.hidden_size,
        intermediate_size=4 * recipe.hidden_size,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.heads,
        max_position_embeddings=recipe.text_max_length,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = dict(
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=4 * recipe.hidden_size,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.heads,
    )
    try:
        build = _CONTRASTIVE_BUILDERS[recipe.family]
    except KeyError:
        raise ValueError(f"unknown contrastive family {recipe.family!r}; known: {', '.join(_CONTRASTIVE_BUILDERS)}") \
            from None
    return build(recipe, tok, text, vision)


def _build_clip(recipe: ContrastiveRecipe, tok, text: dict, vision: dict):
    side = {"height": recipe.image_size, "width": recipe.image_size}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=recipe.projection_dim))
    image_processor = CLIPImageProcessor(size={"shortest_edge": recipe.image_size}, crop_size=side)
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tok)


def _build_siglip(recipe: ContrastiveRecipe, tok, text: dict, vision: dict):
    # SigLIP has no vision projection: the text tower projects to the vision width.
    text = text | {"projection_size": recipe.hidden_size}
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():
        # t' = log 10 as in Zhai et al. (2023); their b = -10 suits a 32k batch with one
        # positive per row. Here the prior odds of a pair matching are about 1 : batch, so
        # b = -log(batch) starts the sigmoids calibrated.
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-math.log(recipe.batch_size))
    image_processor = SiglipImageProcessor(size={"height": recipe.image_size, "width": recipe.image_size})
    return model, SiglipProcessor(image_processor=image_processor, tokenizer=tok)


_CONTRASTIVE_BUILDERS = {"clip": _build_clip, "siglip": _build_siglip}  # the recipe's architecture


def _phrase_text(scene: Scene, rng: random.Random) -> tuple[str, tuple[str, str]]:
    obj = rng.choice(scene.objects)
    style = rng.random()
    if style < 0.5:
        text = f"a {obj.color} {obj.shape}"
    elif style < 0.75:
        text = f"{obj.color} {obj.shape}"
    else:
        text = f"a {obj.size} {obj.color} {obj.shape}"
    return text, (obj.color, obj.shape)


def _contrastive_batch(scenes: list[Scene], rng: random.Random) -> tuple[list[str], torch.Tensor]:
    """Texts for a batch of scenes and the (B, B) matrix of which text describes which image.

    A phrase ("a red circle") matches every scene that has that object, a caption only its
    own scene; so two scenes sharing a red circle are not pushed apart (no false negatives).
    """
    texts, keys = [], []
    for scene in scenes:
        if len(scene.objects) > 1 and rng.random() < 0.5:
            texts.append(scene.caption)
            keys.append(("caption", scene.caption))
        else:
            text, key = _phrase_text(scene, rng)
            texts.append(text)
            keys.append(("phrase", key))
    match = torch.zeros(len(scenes), len(texts))  # (B images, B texts)
    for i, scene in enumerate(scenes):
        present = {(o.color, o.shape) for o in scene.objects}
        for j, (kind, key) in enumerate(keys):
            match[i, j] = float(key in present) if kind == "phrase" else float(key == scene.caption)
    return texts, match


def _sigmoid_family(family: str) -> bool:
    from ..families import adapter_named

    return adapter_named(family).label_activation == "sigmoid"


def contrastive_loss(family: str, logits_per_image: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """Softmax (CLIP) or sigmoid (SigLIP) loss with possibly several positives per row, as the
    family's adapter scores labels.

    logits_per_image: (B images, B texts); match: same shape, 1 where the text fits the image.
    """
    if _sigmoid_family(family):
        # Pairwise binary classification: labels +1 / -1 (Zhai et al. 2023).
        return -F.logsigmoid((2 * match - 1) * logits_per_image).sum() / logits_per_image.shape[0]
    i2t = match / match.sum(1, keepdim=True)
    t2i = match.t() / match.t().sum(1, keepdim=True)
    loss_i = -(i2t * F.log_softmax(logits_per_image, dim=1)).sum(1).mean()
    loss_t = -(t2i * F.log_softmax(logits_per_image.t(), dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def _setup(recipe, build: Callable, out: Path):
    """Seed everything, build the model on the training device, render the training scenes."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    model, processor = build(recipe)
    device = _device()
    model.to(device).train()
    scenes = training_scenes(recipe.n_scenes)
    pixels = render_pixels(scenes, processor.image_processor)
    return rng, model, processor, device, scenes, pixels


def _finish(model, processor, out: Path, recipe, logger: "_LossLog"):
    seconds = logger.close()
    model.eval().to("cpu")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _save_recipe(out, recipe, seconds)
    return model, processor


def train_contrastive(recipe: ContrastiveRecipe, out: Path) -> tuple[torch.nn.Module, object]:
    rng, model, processor, device, scenes, pixels = _setup(recipe, build_contrastive, out)
    tok_kwargs = (
        dict(padding="max_length", max_length=recipe.text_max_length, truncation=True)
        if _sigmoid_family(recipe.family)  # SigLIP trains on text padded to a fixed length
        else dict(padding=True)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    logger = _LossLog(out, recipe.steps)
    for step in range(recipe.steps):
        idx = rng.sample(range(len(scenes)), recipe.batch_size)
        texts, match = _contrastive_batch([scenes[i][0] for i in idx], rng)
        enc = processor.tokenizer(texts, return_tensors="pt", **tok_kwargs).to(device)
        lr = recipe.lr * _cosine_lr(step, recipe.steps, recipe.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        output = model(pixel_values=pixels[idx].float().to(device), **enc)
        loss = contrastive_loss(recipe.family, output.logits_per_image, match.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        logger.step(step, loss.item(), lr)
    return _finish(model, processor, out, recipe, logger)


# --------------------------------------------------------------------------- VLM


def build_vlm(recipe: VLMRecipe):
    """A fresh LLaVA whose vision tower and image processor come from shapes-clip (or, with
    `init_from`, the model and processor of that folder, to train further)."""
    if recipe.init_from:
        model = LlavaForConditionalGeneration.from_pretrained(recipe.init_from, local_files_only=True,
                                                              use_safetensors=True, dtype=torch.float32)
        return model, LlavaProcessor.from_pretrained(recipe.init_from, local_files_only=True)
    clip = CLIPModel.from_pretrained(recipe.clip_dir, local_files_only=True, use_safetensors=True)
    clip_proc = CLIPProcessor.from_pretrained(recipe.clip_dir, local_files_only=True)
    vcfg = clip.config.vision_config
    tok = build_tokenizer(add_bos_eos=False, model_max_length=512)
    tok.chat_template = CHAT_TEMPLATE
    grid = vcfg.image_size // vcfg.patch_size
    text_config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=recipe.text_hidden,
        intermediate_size=recipe.text_intermediate,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.text_heads,
        num_key_value_heads=recipe.text_heads,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids(END),
        tie_word_embeddings=recipe.text_embedding_std <= 0,
    )
    config = LlavaConfig(
        vision_config=vcfg.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",  # drop CLS: one image token per patch
        image_seq_length=grid * grid,
        tie_word_embeddings=recipe.text_embedding_std <= 0,
    )
    config.vision_config.model_type = "clip_vision_model"
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    if recipe.text_embedding_std > 0:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, recipe.text_embedding_std)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.convert_tokens_to_ids(END), tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        max_new_tokens=48,
        do_sample=False,
    )
    processor = LlavaProcessor(
        image_processor=clip_proc.image_processor,
        tokenizer=tok,
        patch_size=vcfg.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
    )
    return model, processor


def parse_question_weights(spec: str) -> dict[str, float] | None:
    """"position=3,count=0.5" -> a weight per question type (unnamed types 1); "" -> None (uniform)."""
    if not spec.strip():
        return None
    weights = dict.fromkeys(QA_TYPES, 1.0)
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise ValueError(f"question_weights wants TYPE=WEIGHT items with TYPE one of {', '.join(QA_TYPES)}, "
                             f"not {item!r}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"question_weights: {value!r} is not a number") from None
        if weights[name] < 0:
            raise ValueError(f"question_weights: {name} has a negative weight")
    if not any(weights.values()):
        raise ValueError("question_weights: at least one type needs a positive weight")
    return weights


def chat_turns(scene: Scene, rng: random.Random, max_turns: int, distinct: bool = False,
               weights: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """A random chat about a scene: 0..max_turns - 1 questions (of types drawn uniformly, or by
    `weights`), then sometimes one description (caption or alt text), always at least one turn.

    Descriptions only ever come last: an answer that follows a caption in the same chat could be
    copied from the caption instead of read from the image, a shortcut that fails on a fresh
    question.
    """
    qa = scene.qa()
    by_type = {t: [p for p in qa if p["type"] == t] for t in QA_TYPES}
    turns = []
    def draw(types):  # uniform draws keep the random stream of recipes without weights
        if weights is None:
            return rng.choice(types)
        w = [weights[t] for t in types]
        return rng.choices(types, w)[0] if any(w) else None

    for _ in range(rng.randint(0, max_turns - 1)):
        if not distinct:
            pair = rng.choice(by_type[draw(QA_TYPES)])
        else:  # a question never repeats within a chat: its answer could be copied from the history
            types = [t for t in QA_TYPES if by_type[t]]
            kind = draw(types) if types else None
            if kind is None:  # every question asked (or only zero-weight types left)
                break
            pairs = by_type[kind]
            pair = pairs.pop(rng.randrange(len(pairs)))
        turns.append((pair["question"], pair["answer"]))
    if not turns or rng.random() < 0.4:
        r = rng.random()
        if r < 0.6:
            turns.append((rng.choice(CAPTION_PROMPTS), scene.caption))
        elif r < 0.75:
            turns.append((rng.choice(DETAILED_ALT_PROMPTS), scene.caption))
        else:
            turns.append((rng.choice(ALT_TEXT_PROMPTS), scene.alt_text))
    return turns


def encode_chat(
    tokenizer, turns: list[tuple[str, str]], n_image_tokens: int
) -> tuple[list[int], list[int], list[float]]:
    """Token ids, labels (-100 outside answers) and loss weights of a chat, as CHAT_TEMPLATE
    renders it.

    The image comes first in the first user turn. Each answer token weighs 1/sqrt(answer
    length), so a 30-token caption counts about 4x a one-word answer instead of 15x.
    tests/ checks the ids against the processor's own apply_chat_template + tokenisation.
    """
    ids_of = tokenizer.convert_tokens_to_ids
    user, assistant, end, image = ids_of(USER), ids_of(ASSISTANT), ids_of(END), ids_of(IMAGE)
    ids, labels, weights = [tokenizer.bos_token_id], [-100], [0.0]
    for k, (question, answer) in enumerate(turns):
        q = tokenizer(" " + question, add_special_tokens=False)["input_ids"]
        a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [end]
        prompt = [user] + ([image] * n_image_tokens if k == 0 else []) + q + [end, assistant]
        ids += prompt + a
        labels += [-100] * len(prompt) + a
        weights += [0.0] * len(prompt) + [1.0 / math.sqrt(len(a))] * len(a)
    return ids, labels, weights


def _collate(batch: list[tuple[list[int], list[int], list[float]]], pad_id: int):
    width = max(len(ids) for ids, _, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    weights = torch.zeros((len(batch), width))
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab, w) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        weights[i, : len(w)] = torch.tensor(w)
        mask[i, : len(ids)] = 1
    return input_ids, labels, weights, mask


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy with per-token weights. logits (B, T, V); labels, weights (B, T)."""
    logp = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), reduction="none",
        ignore_index=-100,
    )
    w = weights[:, 1:].reshape(-1)
    return (logp * w).sum() / w.sum().clamp_min(1e-8)


def train_vlm(recipe: VLMRecipe, out: Path):
    rng, model, processor, device, scenes, pixels = _setup(recipe, build_vlm, out)
    n_image_tokens = model.config.image_seq_length
    vision = [p for n, p in model.named_parameters() if ".vision_tower." in f".{n}"]
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    groups = [{"params": rest, "lr": recipe.lr, "base": recipe.lr}]
    if recipe.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    else:
        groups.append({"params": vision, "lr": recipe.vision_lr, "base": recipe.vision_lr})
    return _train_on_chats(recipe, model, processor, device, scenes, pixels, rng, groups, n_image_tokens, out)


def _train_on_chats(recipe, model, processor, device, scenes, pixels, rng, groups: list[dict], n_image_tokens: int,
                    out: Path):
    """The chat models' loop (shapes-vlm, shapes-blip2): AdamW over `groups` (each with its base learning
    rate, under one warmup and cosine schedule), batches of multi-turn chats with `n_image_tokens` image
    tokens in the first user turn, the weighted answer loss, gradients clipped to norm 1."""
    tok = processor.tokenizer
    opt = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
    question_weights = parse_question_weights(recipe.question_weights)
    logger = _LossLog(out, recipe.steps)
    for step in range(recipe.steps):
        idx = rng.sample(range(len(scenes)), recipe.batch_size)
        batch = [encode_chat(tok, chat_turns(scenes[i][0], rng, recipe.max_turns, recipe.distinct_questions,
                                             question_weights), n_image_tokens) for i in idx]
        input_ids, labels, weights, mask = _collate(batch, tok.pad_token_id)
        factor = _cosine_lr(step, recipe.steps, recipe.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = group["base"] * factor
        output = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                       pixel_values=pixels[idx].float().to(device))
        loss = weighted_lm_loss(output.logits, labels.to(device), weights.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)  # model order
        opt.step()
        logger.step(step, loss.item(), recipe.lr * factor)
    return _finish(model, processor, out, recipe, logger)



# --------------------------------------------------------------------------- BLIP-2 (Q-Former)


def build_blip2(recipe: QFormerRecipe):
    """A fresh BLIP-2: shapes-clip's vision tower (without its pre-norm) and image preprocessing, a new
    Q-Former, shapes-vlm's language model and tokenizer, a chat template that writes the query tokens (or,
    with `init_from`, the model and processor of that folder, to train further)."""
    if recipe.init_from:
        model = Blip2ForConditionalGeneration.from_pretrained(recipe.init_from, local_files_only=True,
                                                              use_safetensors=True, dtype=torch.float32)
        processor = Blip2Processor.from_pretrained(recipe.init_from, local_files_only=True)
        processor.chat_template = processor.tokenizer.chat_template
        return model, processor
    clip = CLIPModel.from_pretrained(recipe.clip_dir, local_files_only=True, use_safetensors=True)
    clip_ip = CLIPProcessor.from_pretrained(recipe.clip_dir, local_files_only=True).image_processor
    vlm = LlavaForConditionalGeneration.from_pretrained(recipe.vlm_dir, local_files_only=True, use_safetensors=True,
                                                        dtype=torch.float32)
    tok = LlavaProcessor.from_pretrained(recipe.vlm_dir, local_files_only=True).tokenizer
    template = chat_template(recipe.queries)
    tok.chat_template = template
    vcfg = clip.config.vision_config
    vision = dict(model_type="blip_2_vision_model", image_size=vcfg.image_size, patch_size=vcfg.patch_size,
                  hidden_size=vcfg.hidden_size, intermediate_size=vcfg.intermediate_size,
                  num_hidden_layers=vcfg.num_hidden_layers, num_attention_heads=vcfg.num_attention_heads,
                  hidden_act=vcfg.hidden_act, layer_norm_eps=vcfg.layer_norm_eps)
    qformer = dict(model_type="blip_2_qformer", hidden_size=recipe.qformer_hidden,
                   intermediate_size=4 * recipe.qformer_hidden, num_hidden_layers=recipe.qformer_layers,
                   num_attention_heads=recipe.qformer_heads, cross_attention_frequency=recipe.cross_attention_frequency,
                   encoder_hidden_size=vcfg.hidden_size)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=vlm.config.text_config.to_dict(),
                         num_query_tokens=recipe.queries, image_token_index=tok.convert_tokens_to_ids(IMAGE),
                         tie_word_embeddings=vlm.config.text_config.tie_word_embeddings)
    model = Blip2ForConditionalGeneration(config)
    _copy_clip_tower(clip.vision_model, model.vision_model)
    model.language_model.model.load_state_dict(vlm.model.language_model.state_dict())
    model.language_model.lm_head.load_state_dict(vlm.lm_head.state_dict())
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                                               eos_token_id=[tok.convert_tokens_to_ids(END), tok.eos_token_id],
                                               max_new_tokens=48, do_sample=False)
    size = {"height": vcfg.image_size, "width": vcfg.image_size}
    image_processor = BlipImageProcessor(size=size, image_mean=clip_ip.image_mean, image_std=clip_ip.image_std,
                                         resample=clip_ip.resample, do_convert_rgb=True)
    # num_query_tokens=None: the chat template writes the query tokens itself, inside the user turn
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=None)
    processor.chat_template = template  # (Blip2Processor's constructor takes no chat template)
    return model, processor


def _copy_clip_tower(clip_vision, blip_vision) -> None:
    """CLIP's vision transformer into BLIP-2's: the same embeddings, layers and post-norm, with q, k, v fused
    into BLIP-2's `qkv`. CLIP's pre-norm has no counterpart, so the copied tower sees its embeddings
    un-normalised (features at mean cosine about 0.75 to CLIP's); a stage with `vision_lr` > 0 adapts it, as
    shapes-blip2's second stage does."""
    with torch.no_grad():
        emb = blip_vision.embeddings
        emb.patch_embedding.weight.copy_(clip_vision.embeddings.patch_embedding.weight)
        emb.patch_embedding.bias.zero_()  # CLIP's patch embedding has no bias
        emb.class_embedding.copy_(clip_vision.embeddings.class_embedding.view_as(emb.class_embedding))
        emb.position_embedding.copy_(clip_vision.embeddings.position_embedding.weight.view_as(emb.position_embedding))
        for theirs, ours in zip(clip_vision.encoder.layers, blip_vision.encoder.layers):
            a = theirs.self_attn
            ours.self_attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            ours.self_attn.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            ours.self_attn.projection.load_state_dict(a.out_proj.state_dict())
            ours.layer_norm1.load_state_dict(theirs.layer_norm1.state_dict())
            ours.layer_norm2.load_state_dict(theirs.layer_norm2.state_dict())
            ours.mlp.load_state_dict(theirs.mlp.state_dict())
        blip_vision.post_layernorm.load_state_dict(clip_vision.post_layernorm.state_dict())


def train_blip2(recipe: QFormerRecipe, out: Path):
    rng, model, processor, device, scenes, pixels = _setup(recipe, build_blip2, out)
    vision = list(model.vision_model.parameters())
    language = list(model.language_model.parameters())
    taken = {id(p) for p in vision + language}
    rest = [p for p in model.parameters() if id(p) not in taken]  # Q-Former, queries, projection
    groups = [{"params": rest, "lr": recipe.lr, "base": recipe.lr}]
    if recipe.vision_lr > 0:
        groups.append({"params": vision, "lr": recipe.vision_lr, "base": recipe.vision_lr})
    else:
        model.vision_model.requires_grad_(False)
    if recipe.language_lr > 0:
        groups.append({"params": language, "lr": recipe.language_lr, "base": recipe.language_lr})
    else:
        model.language_model.requires_grad_(False)
    return _train_on_chats(recipe, model, processor, device, scenes, pixels, rng, groups, recipe.queries, out)
