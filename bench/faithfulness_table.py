"""Faithfulness of every explanation method on the embedded models, as a Markdown table.

    python -m bench.faithfulness_table [--n 300] [--seed 50000] [--models shapes-clip shapes-vlm]
        [--methods saliency --param smooth=true]   # a variant: its own row next to the defaults

Writes bench/FAITHFULNESS.md and bench/faithfulness.json (one evaluate_faithfulness result per
model and method) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmie_core.explain import METHODS
from mmie_core.shapes.__main__ import parse_method_params
from mmie_core.shapes.faithfulness import evaluate_faithfulness

HERE = Path(__file__).resolve().parent


def variant(result: dict) -> str:
    """The method's name with its non-default parameters, e.g. "saliency (smooth=true)"."""
    params = result.get("params") or {}
    if not params:
        return result["method"]
    return f"{result['method']} ({', '.join(f'{k}={json.dumps(v)}' for k, v in sorted(params.items()))})"


def table(results: list[dict]) -> str:
    lines = [
        "| model | method | pointing game | deletion AUC | random-order AUC | ratio | sanity rank corr | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["metrics"]
        ratio = m["deletion_auc"] / m["deletion_auc_random"] if m["deletion_auc_random"] else float("nan")
        flag = " (flagged)" if m["sanity_rank_corr"] > 0.5 else ""
        lines.append(
            f"| {r['model']} | {variant(r)} | {m['pointing_game']:.3f} | {m['deletion_auc']:.4f} | "
            f"{m['deletion_auc_random']:.4f} | {ratio:.2f} | {m['sanity_rank_corr']:.3f}{flag} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=50_000)
    parser.add_argument("--models", nargs="+", default=["shapes-clip", "shapes-siglip", "shapes-vlm"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--param", action="append", metavar="KEY=VALUE",
                        help="run a variant of the methods with this parameter (repeatable)")
    args = parser.parse_args(argv)
    params = parse_method_params(args.param)
    out_json = HERE / "faithfulness.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else []
    done = {(r["model"], variant(r), r["n"], r["seed"]) for r in results}
    for model in args.models:
        for method in args.methods:
            name = variant({"method": method, "params": params})
            if (model, name, args.n, args.seed) in done:
                continue
            t0 = time.time()
            result = evaluate_faithfulness(model, method, seed=args.seed, n=args.n, **params)
            result["seconds"] = round(time.time() - t0, 1)
            results = [r for r in results if (r["model"], variant(r)) != (model, name)] + [result]
            out_json.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps(result), flush=True)
    text = table(results)
    command = f"python -m bench.faithfulness_table --n {args.n} --seed {args.seed}"
    (HERE / "FAITHFULNESS.md").write_text(
        f"# Faithfulness of the explanation methods\n\n{args.n} fresh ShapesWorld scenes per model "
        f"(seeds from {args.seed}), made by `{command}`.\n\n{text}\n"
    )
    print(text)


if __name__ == "__main__":
    main()
