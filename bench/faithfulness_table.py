"""Faithfulness of every explanation method on the embedded models, as a Markdown table.

    python -m bench.faithfulness_table [--n 300] [--seed 50000] [--models shapes-clip shapes-vlm]

Writes bench/FAITHFULNESS.md and bench/faithfulness.json (one evaluate_faithfulness result per
model and method) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmie_core.explain import METHODS
from mmie_core.shapes.faithfulness import evaluate_faithfulness

HERE = Path(__file__).resolve().parent


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
            f"| {r['model']} | {r['method']} | {m['pointing_game']:.3f} | {m['deletion_auc']:.4f} | "
            f"{m['deletion_auc_random']:.4f} | {ratio:.2f} | {m['sanity_rank_corr']:.3f}{flag} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=50_000)
    parser.add_argument("--models", nargs="+", default=["shapes-clip", "shapes-siglip", "shapes-vlm"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args(argv)
    out_json = HERE / "faithfulness.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else []
    done = {(r["model"], r["method"], r["n"], r["seed"]) for r in results}
    for model in args.models:
        for method in args.methods:
            if (model, method, args.n, args.seed) in done:
                continue
            t0 = time.time()
            result = evaluate_faithfulness(model, method, seed=args.seed, n=args.n)
            result["seconds"] = round(time.time() - t0, 1)
            results = [r for r in results if (r["model"], r["method"]) != (model, method)] + [result]
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
