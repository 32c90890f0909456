"""Command line of ShapesWorld: generate scenes, train and evaluate the embedded models.

    python -m mmie_core.shapes generate --seed S --n N --size PX [--objects K] --out DIR
    python -m mmie_core.shapes train {clip,siglip,vlm,blip2} --out DIR
    python -m mmie_core.shapes evaluate --model DIR --seed S --n N --json [--engine local|ray] [--workers 2]
    python -m mmie_core.shapes faithfulness --model DIR --method M --seed S --n N [--param K=V] --json
        [--engine local|ray] [--workers 2] [--address auto]
    python -m mmie_core.shapes lens --model DIR --seed S --n N [--plot PNG] [--json]
    python -m mmie_core.shapes causal --model M --seed S --n N [--compare METHOD ...] --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .world import MAX_OBJECTS, make_scene


def _generate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    width = len(str(args.seed + args.n - 1))
    for i in range(args.n):
        seed = args.seed + i
        scene = make_scene(seed, n_objects=args.objects)
        name = f"scene_{seed:0{width}d}.png"
        scene.render(args.size).save(out / name, format="PNG")
        records.append(scene.to_json(args.size, file=name))
    (out / "scenes.json").write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {args.n} scenes and scenes.json to {out}")
    return 0


def set_recipe_field(recipe, item: str) -> None:
    """Apply one `--set FIELD=VALUE` to a recipe dataclass, converting VALUE to the field's type."""
    import dataclasses

    name, sep, raw = item.partition("=")
    fields = {f.name: f for f in dataclasses.fields(recipe)}
    if not sep or name not in fields:
        raise SystemExit(f"--set wants FIELD=VALUE with FIELD one of: {', '.join(fields)}")
    kind = type(getattr(recipe, name))
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"--set {name} wants true or false, not {raw!r}")
        value = raw.lower() in ("true", "1")
    else:
        try:
            value = kind(raw)
        except ValueError:
            raise SystemExit(f"--set {name} wants a {kind.__name__}, not {raw!r}") from None
    setattr(recipe, name, value)


def _train(args: argparse.Namespace) -> int:
    from . import recipes

    out = Path(args.out)
    trainers = {  # kind -> (its recipe, its training loop)
        "clip": (lambda: recipes.ContrastiveRecipe(family="clip"), recipes.train_contrastive),
        "siglip": (lambda: recipes.ContrastiveRecipe(family="siglip"), recipes.train_contrastive),
        "vlm": (lambda: recipes.VLMRecipe(clip_dir=args.clip), recipes.train_vlm),
        "blip2": (lambda: recipes.QFormerRecipe(clip_dir=args.clip), recipes.train_blip2),
    }
    make_recipe, train = trainers[args.kind]
    recipe = make_recipe()
    if args.steps:
        recipe.steps = args.steps
    for item in args.set or []:
        set_recipe_field(recipe, item)
    train(recipe, out)
    if not args.no_card:
        from .evaluate import write_model_card

        write_model_card(out, kind=args.kind)
    return 0


def _print_result(result: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result))
    else:
        for name, value in result["metrics"].items():
            print(f"{name:32s} {'n/a' if value is None else f'{value:.4f}'}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_model

    return _print_result(evaluate_model(args.model, seed=args.seed, n=args.n, **_engine(args)), args.json)


def _engine(args: argparse.Namespace) -> dict:
    if args.engine == "ray":
        from ..batch import require_ray

        try:
            require_ray()
        except ValueError as err:  # Ray is optional: say how to install it, as the other batch commands do
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    return {"engine": args.engine, "workers": args.workers, "address": args.address}


def parse_method_params(items: list[str] | None) -> dict:
    """`--param KEY=VALUE` items -> keyword arguments of an explanation method. VALUE is read as
    JSON where it parses (true, 16, 0.15, [2, 3]) and kept as text otherwise."""
    params = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--param wants KEY=VALUE, not {item!r}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def _faithfulness(args: argparse.Namespace) -> int:
    from .faithfulness import evaluate_faithfulness

    params = parse_method_params(args.param)
    return _print_result(evaluate_faithfulness(args.model, args.method, seed=args.seed, n=args.n, **_engine(args),
                                               **params), args.json)


def _lens(args: argparse.Namespace) -> int:
    from .lens_agreement import logit_lens_agreement

    result = logit_lens_agreement(args.model, seed=args.seed, n=args.n)
    if args.plot:
        from ..render import curves_figure

        keys = ("either", "color", "shape", "other_object_word", "background_object_word")
        fig = curves_figure(result["layers"], {k.replace("_", " "): result[k] for k in keys},
                            "language-model depth (0 = input)", "share of patches",
                            f"logit lens on {Path(str(args.model)).name}: top word of a patch ({args.n} scenes)",
                            xticks=True)
        fig.savefig(args.plot)
    if args.json:
        print(json.dumps(result))
        return 0
    keys = ("color", "shape", "either", "other_object_word", "background_object_word")
    print("depth " + " ".join(f"{k:>22s}" for k in keys))
    for d, layer in enumerate(result["layers"]):
        print(f"{layer:5d} " + " ".join(f"{result[k][d]:22.4f}" for k in keys))
    return 0


def _causal(args: argparse.Namespace) -> int:
    from .causal import evaluate_causal

    result = evaluate_causal(args.model, seed=args.seed, n=args.n, compare=tuple(args.compare or ()))
    if args.json:
        print(json.dumps(result))
        return 0
    _print_result({"metrics": {k: v for k, v in result["metrics"].items() if k != "ci95"}}, False)
    for method, m in result.get("correlational", {}).items():
        print(f"{method + ' pointing (±1 / strict)':32s} {m['pointing_game']:.4f} / {m['pointing_game_strict']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmie_core.shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    from ..__main__ import _engine_args  # --engine, --workers, --address, as the other batch jobs take them


    gen = sub.add_parser("generate", help="write scene PNGs and scenes.json")
    gen.add_argument("--seed", type=int, required=True, help="seed of the first scene; scene i uses seed + i")
    gen.add_argument("--n", type=int, required=True, help="number of scenes")
    gen.add_argument("--size", type=int, default=256, help="image side in pixels")
    gen.add_argument("--objects", type=int, choices=range(1, MAX_OBJECTS + 1), help="fix the object count")
    gen.add_argument("--out", required=True, help="output folder")
    gen.set_defaults(func=_generate)

    train = sub.add_parser("train", help="train an embedded model from its recipe")
    train.add_argument("kind", choices=["clip", "siglip", "vlm", "blip2"])
    train.add_argument("--out", required=True, help="output model folder")
    train.add_argument("--clip", default="assets/models/shapes-clip", help="(vlm, blip2) CLIP folder for the vision tower")
    train.add_argument("--steps", type=int, default=0, help="override the recipe's step count")
    train.add_argument("--set", action="append", metavar="FIELD=VALUE",
                       help="override a recipe field, e.g. --set text_embedding_std=0.3 (repeatable)")
    train.add_argument("--no-card", action="store_true", help="skip the evaluation and model card")
    train.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", help="metrics of a model on fresh scenes")
    ev.add_argument("--model", required=True, help="model folder")
    ev.add_argument("--seed", type=int, default=0, help="seed of the first evaluation scene")
    ev.add_argument("--n", type=int, default=500, help="number of scenes")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    _engine_args(ev)
    ev.set_defaults(func=_evaluate)

    from .faithfulness import FAITHFULNESS_METHODS

    faith = sub.add_parser("faithfulness", help="pointing game, energy, discrimination, deletion / insertion AUC "
                                                "and sanity check of a method or a chance baseline")
    faith.add_argument("--model", required=True, help="model folder or preset")
    faith.add_argument("--method", required=True, choices=FAITHFULNESS_METHODS,
                       help="an explanation method, or a chance-level baseline (random, center, random_object, "
                            "object_prior for VLMs: --param of=METHOD, relevancy by default)")
    faith.add_argument("--seed", type=int, default=0, help="seed of the first scene")
    faith.add_argument("--n", type=int, default=300, help="number of scenes")
    faith.add_argument("--param", action="append", metavar="KEY=VALUE",
                       help="a parameter of the method, e.g. --param smooth=true (repeatable)")
    faith.add_argument("--json", action="store_true", help="print one JSON object")
    _engine_args(faith)
    faith.set_defaults(func=_faithfulness)

    lens = sub.add_parser("lens", help="logit lens: how often object patches read as the object's colour or shape")
    lens.add_argument("--model", default="shapes-vlm", help="VLM folder or preset")
    lens.add_argument("--seed", type=int, default=10000, help="seed of the first scene")
    lens.add_argument("--n", type=int, default=200, help="number of scenes")
    lens.add_argument("--json", action="store_true", help="print one JSON object")
    lens.add_argument("--plot", help="also write the per-depth curves to this PNG")
    lens.set_defaults(func=_lens)

    from ..explain import METHODS

    causal = sub.add_parser("causal", help="attention knockout, activation patching and segment ablation scored on "
                                           "the object a question names")
    causal.add_argument("--model", default="shapes-vlm", help="chat model folder or preset")
    causal.add_argument("--seed", type=int, default=0, help="seed of the first scene")
    causal.add_argument("--n", type=int, default=300, help="number of scenes (two questions each)")
    causal.add_argument("--compare", nargs="*", choices=METHODS, metavar="METHOD",
                        help="also score these explanation methods' pointing game on the same cases")
    causal.add_argument("--json", action="store_true", help="print one JSON object")
    causal.set_defaults(func=_causal)

    args = parser.parse_args(argv)
    if args.command == "generate" and args.n < 1:
        parser.error("--n must be at least 1")
    if args.command == "generate" and not 8 <= args.size <= 4096:
        parser.error("--size must be between 8 and 4096")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
