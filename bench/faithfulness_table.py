"""Faithfulness of every explanation method on the embedded models, next to chance, as Markdown tables.

    python -m bench.faithfulness_table [--n 300] [--seed 50000] [--models shapes-clip shapes-vlm]
        [--methods saliency --param smooth=true]   # a variant: its own row next to the defaults
        [--no-curves]                              # pointing, energy, discrimination only

By default every method, the named variants of answer-token maps (VLMs) and the chance baselines
(random, center, random_object, and object_prior for VLMs) run on each model. Writes
bench/FAITHFULNESS.md and bench/faithfulness.json (one evaluate_faithfulness result per model and
method) and prints the tables; a row already in the JSON for the same model, n and seed is kept.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmie_core.explain import METHODS, NAMED_VARIANTS
from mmie_core.shapes.__main__ import parse_method_params
from mmie_core.shapes.faithfulness import BASELINES, FAITHFULNESS_METHODS, evaluate_faithfulness

HERE = Path(__file__).resolve().parent


def variant(result: dict) -> str:
    """The method's name with its non-default parameters, e.g. "saliency (smooth=true)"."""
    params = result.get("params") or {}
    if not params:
        return result["method"]
    return f"{result['method']} ({', '.join(f'{k}={json.dumps(v)}' for k, v in sorted(params.items()))})"


COLUMNS = [  # (metric, header, higher is better)
    ("pointing_game", "pointing ±1 patch", True),
    ("pointing_game_strict", "pointing strict", True),
    ("energy_on_object", "energy on object", True),
    ("object_discrimination", "object discrimination", True),
    ("deletion_auc", "deletion AUC (mean colour)", False),
    ("deletion_auc_road", "deletion AUC (ROAD)", False),
    ("insertion_auc", "insertion AUC", True),
]


def _cell(m: dict, key: str) -> str:
    value = m.get(key)
    if value is None:
        return "-"
    low, high = m.get("ci95", {}).get(key, [None, None])
    text = f"{value:.3f}" if low is None else f"{value:.3f} ({low:.2f}-{high:.2f})"
    random_key = f"{key}_random"
    if random_key in m and m[random_key] is not None:
        text += f" / {m[random_key]:.3f}"
    return text


def table(results: list[dict]) -> str:
    """One table: a row per model and method (chance baselines in italics), each figure with its 95%
    bootstrap interval; the curves' figures are `heatmap order / random order`."""
    heads = [h for _, h, _ in COLUMNS]
    lines = ["| model | method | scenes | " + " | ".join(heads) + " | sanity rank corr | seconds |",
             "|---|---|---|" + "---|" * (len(heads) + 2)]
    for r in results:
        m = r["metrics"]
        name = f"*{variant(r)} (chance)*" if r["method"] in BASELINES else variant(r)
        corr = m.get("sanity_rank_corr")
        sanity = "-" if corr is None else f"{corr:.3f}" + (" (flagged)" if corr > 0.5 else "")
        cells = [_cell(m, key) for key, _, _ in COLUMNS]
        lines.append(f"| {r['model']} | {name} | {r['n']} | " + " | ".join(cells) + f" | {sanity} | {r.get('seconds', 0):.0f} |")
    return "\n".join(lines)


def legacy_table(results: list[dict]) -> str:
    """Rows measured before the chance levels and the newer metrics (pointing, deletion, sanity only)."""
    lines = ["| model | method | n | pointing game | deletion AUC | random-order AUC | sanity rank corr |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["metrics"]
        lines.append(f"| {r['model']} | {variant(r)} | {r['n']} | {m['pointing_game']:.3f} | {m['deletion_auc']:.4f} | "
                     f"{m['deletion_auc_random']:.4f} | {m['sanity_rank_corr']:.3f} |")
    return "\n".join(lines)


def verdicts(results: list[dict]) -> str:
    """One sentence per model: which method wins each metric, and by how much over the best chance row."""
    out = []
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        methods = [r for r in rows if r["method"] not in BASELINES]
        chance = [r for r in rows if r["method"] in BASELINES]
        if not methods or not chance:
            continue
        parts = []
        for key, head, higher in COLUMNS:
            pick = max if higher else min
            scored = [r for r in methods if r["metrics"].get(key) is not None]
            refs = [r for r in chance if r["metrics"].get(key) is not None]
            if not scored or not refs:  # rows measured without the curves (--no-curves)
                continue
            best = pick(scored, key=lambda r: r["metrics"][key])
            ref = pick(refs, key=lambda r: r["metrics"][key])
            gain = best["metrics"][key] - ref["metrics"][key]
            parts.append(f"{head}: {variant(best)} {best['metrics'][key]:.3f} vs best chance "
                         f"{ref['metrics'][key]:.3f} ({variant(ref)}; {'+' if gain >= 0 else ''}{gain:.3f})")
        out.append(f"- **{model}**: " + "; ".join(parts) + ".")
    return "\n".join(out)


def default_runs(model: str) -> list[tuple[str, dict]]:
    """Every method with its defaults, the named variants (answer-token maps: VLMs), the chance rows."""
    from mmie_core.models import get_preset

    vlm = "chat" in get_preset(model).tasks
    runs = [(m, {}) for m in METHODS]
    if vlm:
        runs += list(NAMED_VARIANTS.values())
    return runs + [(b, {}) for b in BASELINES if vlm or b != "object_prior"]


MODEL_ORDER = ("shapes-vlm", "shapes-blip2", "shapes-clip", "shapes-siglip")


def _row_order(r: dict) -> tuple:
    """Models in MODEL_ORDER, then each model's rows in `default_runs` order (methods, variants, chance)."""
    model = MODEL_ORDER.index(r["model"]) if r["model"] in MODEL_ORDER else len(MODEL_ORDER)
    try:
        names = [variant({"method": m, "params": p}) for m, p in default_runs(r["model"])]
    except Exception:  # noqa: BLE001 - a model without a preset sorts last
        names = []
    name = variant(r)
    return model, r["model"], names.index(name) if name in names else len(names), name


def save_row(out_json: Path, result: dict) -> list[dict]:
    """Put one row into the JSON file (replacing that model and variant's earlier row) and return every
    row. The file is re-read under a lock, so several runs (e.g. one per model) can fill it at once."""
    import fcntl
    import os

    with open(out_json.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(out_json.read_text()) if out_json.exists() else []
        key = (result["model"], variant(result))
        rows = [r for r in rows if (r["model"], variant(r)) != key] + [result]
        tmp = out_json.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        os.replace(tmp, out_json)
    return rows


def report(results: list[dict], n: int, seed: int) -> str:
    """Write bench/FAITHFULNESS.md from the measured rows and return its tables."""
    results = sorted(results, key=_row_order)
    current = [r for r in results if "ci95" in r["metrics"]]
    legacy = [r for r in results if "ci95" not in r["metrics"]]
    text = table(current) + "\n\n" + verdicts(current)
    if legacy:
        text += ("\n\nNot re-run yet with the chance levels and the metrics above (measured before them; the dual "
                 "encoders' ground truth was not affected by the VLM question binding fixed since):\n\n"
                 + legacy_table(legacy))
    command = f"python -m bench.faithfulness_table --n {n} --seed {seed}"
    counts = sorted({r["n"] for r in current})
    scenes = (f"{counts[0]} fresh ShapesWorld scenes per model" if len(counts) == 1 else
              f"Fresh ShapesWorld scenes ({' or '.join(map(str, counts))} per row: the `scenes` column; the "
              f"re-run at {n} is not finished)")
    (HERE / "FAITHFULNESS.md").write_text(
        f"# Faithfulness of the explanation methods\n\n{scenes} "
        f"(seeds from {seed}), made by `{command}`. Each figure has its 95% bootstrap interval over the "
        "cases; curve figures are `heatmap order / random order`. Rows in italics are chance levels computed on "
        "the same cases. `seconds` is a row's wall time on the CPU; a model's random-order curves are "
        "measured once and shared by its rows, so its first row carries them.\n\n"
        f"{text}\n"
    )
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=50_000)
    parser.add_argument("--models", nargs="+", default=["shapes-clip", "shapes-siglip", "shapes-vlm"])
    parser.add_argument("--methods", nargs="+", choices=FAITHFULNESS_METHODS,
                        help="default: every method, the named variants and the chance baselines")
    parser.add_argument("--param", action="append", metavar="KEY=VALUE",
                        help="run a variant of the methods with this parameter (repeatable)")
    parser.add_argument("--no-curves", action="store_true", help="skip the deletion and insertion curves (their "
                        "columns show -): pointing, energy and discrimination only, several times faster")
    args = parser.parse_args(argv)
    params = parse_method_params(args.param)
    out_json = HERE / "faithfulness.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else []
    # rows measured with every current metric (earlier rows lack the intervals) for this n and seed
    done = {(r["model"], variant(r), r["n"], r["seed"]) for r in results if "ci95" in r["metrics"]}
    for model in args.models:
        runs = [(m, params) for m in args.methods] if args.methods else default_runs(model)
        for method, run_params in runs:
            params = run_params
            name = variant({"method": method, "params": params})
            if (model, name, args.n, args.seed) in done:
                continue
            t0 = time.time()
            result = evaluate_faithfulness(model, method, seed=args.seed, n=args.n, curves=not args.no_curves,
                                           **params)
            result["seconds"] = round(time.time() - t0, 1)
            results = save_row(out_json, result)
            print(json.dumps(result), flush=True)
            report(results, args.n, args.seed)  # the tables so far, after every row
    print(report(results, args.n, args.seed))


if __name__ == "__main__":
    main()
