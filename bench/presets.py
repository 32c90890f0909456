"""What each method costs on every Hub preset at its true geometry (random weights, shrunk widths).

    python -m bench.presets [--image PATH] [--out bench/PRESETS.md]

For every preset fixture in tests/fixtures/presets (the checkpoint's config and processor with
widths, depths and vocabulary shrunk, random weights), on one photo:
- CPU seconds of each check of `python -m mmie_core check-presets` (its cheap settings: 4 integrated
  gradient steps, occlusion windows of half the grid, 4 answer tokens);
- the work of each method at its default parameters as `mmie_core.cost` estimates it (forward passes x
  tokens per pass, in millions of token-passes; a backward pass counts as two), and whether the default
  limit refuses it.

The seconds come from shrunk models, so they measure the geometry (tokens, tiles, passes), not the
real widths: a real checkpoint is slower by about its width and depth ratio. Token-passes do not
depend on widths.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(image: str) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from preset_fixtures import build_preset, fixture_names

    from mmie_core.check_presets import CheckSettings, check_model
    from mmie_core.cost import DEFAULT_MAX_WORK, estimate
    from mmie_core.explain import METHODS, make_subject
    from mmie_core.images import load_image
    from mmie_core.models import MODEL_CACHE, load_model

    photo = load_image(Path(image))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in fixture_names():
            if name.endswith("-variant"):
                continue
            folder = build_preset(name, Path(tmp) / name)
            t0 = time.perf_counter()
            report = check_model(folder, image, CheckSettings())
            loaded = load_model(folder)
            target = ({"label": "a photo of a person", "labels": ["a photo of a person", "a photo of a cat"]}
                      if loaded.adapter.zero_shot else
                      {"question": "What is in the image?", "answer_ids": _some_answer(loaded), "token_index": 0})
            subject = make_subject(loaded, photo, target)
            work = {}
            for method in METHODS:
                cost = estimate(subject, method, {})
                work[method] = {"passes": cost.passes, "tokens": cost.tokens, "mega_token_passes": cost.work / 1e6,
                                "refused": cost.work > DEFAULT_MAX_WORK}
            seconds = {c["name"].removeprefix("explain: "): c["seconds"] for c in report["checks"]}
            failed = [c["name"] for c in report["checks"] if not c["ok"]]
            rows.append({"preset": name, "family": report["family"], "vision_tokens": report["vision_tokens"],
                         "image_tokens": report["image_tokens"], "grid": report["grid"], "seconds": seconds,
                         "default_work": work, "failed": failed, "total_seconds": time.perf_counter() - t0})
            MODEL_CACHE.clear()
    return {"image": str(image), "size": list(photo.size), "rows": rows}


def _some_answer(loaded) -> list[int]:
    return loaded.processor.tokenizer("image", add_special_tokens=False)["input_ids"][:1]


def markdown(result: dict, machine: str) -> str:
    from mmie_core.explain import METHODS

    out = [f"Photo {Path(result['image']).name} ({result['size'][0]}x{result['size'][1]}); {machine}.", "",
           "CPU seconds per method (cheap settings of `check-presets`; shrunk widths, random weights):", "",
           "| preset | vision tokens | image tokens | map | " + " | ".join(METHODS) + " |",
           "|---|---:|---:|---|" + "---:|" * len(METHODS)]
    for r in result["rows"]:
        cells = [f"{r['seconds'].get(m, float('nan')):.2f}" for m in METHODS]
        out.append(f"| {r['preset']} | {r['vision_tokens']:,} | {r['image_tokens']:,} | "
                   f"{r['grid'][0]}x{r['grid'][1]} | " + " | ".join(cells) + " |")
    out += ["", "Work at each method's default parameters, in millions of token-passes (forward passes x tokens; "
                "**bold**: over the default limit, refused with advice):", "",
            "| preset | " + " | ".join(METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
    for r in result["rows"]:
        cells = []
        for m in METHODS:
            w = r["default_work"][m]
            text = f"{w['mega_token_passes']:.2f} ({w['passes']} x {w['tokens']:,})"
            cells.append(f"**{text}**" if w["refused"] else text)
        out.append(f"| {r['preset']} | " + " | ".join(cells) + " |")
    failed = [f"{r['preset']}: {', '.join(r['failed'])}" for r in result["rows"] if r["failed"]]
    out += ["", "Failed checks: " + ("; ".join(failed) if failed else "none.")]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    from .common import machine

    parser = argparse.ArgumentParser(prog="python -m bench.presets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg")
    parser.add_argument("--out", default=str(HERE / "PRESETS.md"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    result = run(args.image)
    info = machine()
    where = f"{info.get('gpu') or info['cpu']}, {info['cores']} cores, torch {info['torch']}"
    text = markdown(result, where)
    header = (f"# Cost per method on every Hub preset (true geometry)\n\nMade by `python -m bench.presets` in "
              f"{time.perf_counter() - t0:.0f} s.\n\n")
    Path(args.out).write_text(header + text + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
