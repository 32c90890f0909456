"""What training a BLIP-2-shaped ShapesWorld model (`shapes-blip2`) would cost on this machine.

    python -m bench.qformer_training_cost [--steps 3] [--batch 48] [--queries 32]

Builds the model BLIP-2's second stage trains: a frozen vision tower of shapes-vlm's size (a
Blip2VisionModel: 64 px, patch 8, width 128, 4 layers; shapes-vlm's CLIP tower cannot be copied into it,
as BLIP-2's tower has no pre-norm), a Q-Former (width 128, 4 layers, cross-attention every second layer,
`--queries` learned queries) and a projection, trained through a frozen Llama of shapes-vlm's size (4 x
192) on ShapesWorld chats, and times optimizer steps at shapes-vlm's batch size. Prints seconds per step
and the hours that shapes-vlm's step count (2,250 steps over two stages) would take, next to the same
measure for a shapes-vlm step (the LLaVA recipe, everything trained), in the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from .common import machine


def _blip2(queries: int):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from mmie_core.models import load_model

    vlm = load_model("shapes-vlm").model
    text = vlm.config.text_config.to_dict()
    vision = {"model_type": "blip_2_vision_model", "image_size": 64, "patch_size": 8, "hidden_size": 128,
              "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}
    qformer = {"model_type": "blip_2_qformer", "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
               "num_attention_heads": 4, "cross_attention_frequency": 2, "encoder_hidden_size": 128}
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=queries,
                         image_token_index=vlm.config.image_token_id)
    model = Blip2ForConditionalGeneration(config)
    model.language_model.model.load_state_dict(vlm.model.language_model.state_dict())
    model.language_model.lm_head.load_state_dict(vlm.lm_head.state_dict())
    model.vision_model.requires_grad_(False)
    model.language_model.requires_grad_(False)
    return model


def _batch(n_image_tokens: int, batch: int, seed: int):
    from mmie_core.models import load_model
    from mmie_core.shapes.recipes import _collate, chat_turns, encode_chat, render_pixels, training_scenes

    tok = load_model("shapes-vlm").processor.tokenizer
    rng = random.Random(seed)
    scenes = training_scenes(batch)
    encoded = [encode_chat(tok, chat_turns(s, rng, 7, True), n_image_tokens) for s, _ in scenes]
    input_ids, labels, weights, mask = _collate(encoded, tok.pad_token_id)
    return input_ids, labels, weights, mask, scenes


def _time_steps(model, inputs: dict, labels, weights, steps: int) -> float:
    from mmie_core.shapes.recipes import weighted_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t = time.perf_counter()
        loss = weighted_lm_loss(model(**inputs).logits, labels, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def run(steps: int = 3, batch: int = 48, queries: int = 32) -> dict:
    from transformers import BlipImageProcessor

    from mmie_core.models import load_model
    from mmie_core.shapes.recipes import render_pixels

    torch.manual_seed(0)
    blip2 = _blip2(queries).train()
    ids, labels, weights, mask, scenes = _batch(queries, batch, 0)
    ip = BlipImageProcessor(size={"height": 64, "width": 64})
    pixels = render_pixels(scenes, ip).float()
    blip2_step = _time_steps(blip2, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}, labels,
                             weights, steps)
    vlm = load_model("shapes-vlm")
    llava = type(vlm.model)(vlm.model.config)
    llava.load_state_dict(vlm.model.state_dict())
    llava.train().requires_grad_(True)
    ids2, labels2, weights2, mask2, scenes2 = _batch(vlm.model.config.image_seq_length, batch, 0)
    pixels2 = render_pixels(scenes2, vlm.processor.image_processor).float()
    llava_step = _time_steps(llava, {"input_ids": ids2, "attention_mask": mask2, "pixel_values": pixels2}, labels2,
                             weights2, steps)
    trained = sum(p.numel() for p in blip2.parameters() if p.requires_grad)
    return {"benchmark": "qformer_training_cost", "batch": batch, "queries": queries,
            "blip2_trained_parameters": trained, "blip2_step_s": round(blip2_step, 3),
            "shapes_vlm_step_s": round(llava_step, 3), "step_ratio": round(blip2_step / llava_step, 2),
            "hours_for_2250_steps": round(blip2_step * 2250 / 3600, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--queries", type=int, default=32)
    args = parser.parse_args(argv)
    print(json.dumps({"machine": machine(), **run(args.steps, args.batch, args.queries)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
