"""Command line of the MMIE Studio library.

    python -m mmie_core alt-text DIR_OR_FILES... --out alt.csv [--model shapes-vlm] [--style concise]
        [--engine local|ray] [--workers 2] [--address auto]   (--engine ray --out FOLDER/: CSV shards by Ray Data)
    python -m mmie_core check-presets [--model NAME_OR_DIR]... [--image PATH]... [--json]
    python -m mmie_core index DIR_OR_FILES... --model NAME --out INDEX_DIR [--engine local|ray] [--workers 2]
    python -m mmie_core search INDEX_DIR --model NAME (--text TEXT | --image PATH) [--k 10] [--json]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm


def _files_and_model(args: argparse.Namespace, load: bool = True):
    """(image files of args.paths, the loaded args.model or None), or None after printing what is wrong."""
    from .images import collect_image_files
    from .models import ModelLoadError, load_model

    try:
        return collect_image_files(args.paths), load_model(args.model) if load else None
    except (ValueError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def _alt_text(args: argparse.Namespace) -> int:
    from .alt_text import STYLES, alt_text_batch
    from .images import ImageInputError, load_image

    if args.style not in STYLES:
        raise SystemExit(f"--style must be one of {', '.join(STYLES)}")
    if args.engine == "local" and _is_folder(args.out):
        print(f"error: --out {args.out} is a folder; the local engine writes one CSV file (shards need --engine ray)",
              file=sys.stderr)
        return 2
    found = _files_and_model(args, load=args.engine == "local")  # Ray's actors load the model themselves
    if found is None:
        return 2
    files, loaded = found

    def items():
        for path in files:
            try:
                yield str(path), load_image(path)
            except ImageInputError as err:
                yield str(path), err

    if args.engine == "ray":
        from .batch import alt_text_rows, write_alt_text_shards

        try:
            if _is_folder(args.out):  # Ray Data writes the shards: for a collection too big for one process
                write_alt_text_shards(files, args.model, args.style, args.context, args.max_chars, args.out,
                                      args.workers, args.address)
                print(f"wrote the alt text of {len(set(files))} files as CSV shards into {args.out}")
                return 0
            rows = alt_text_rows(files, args.model, args.style, args.context, args.max_chars, args.workers, args.address)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return _write_alt_text(rows, args.out)
    bar = tqdm(total=len(files), desc="alt text", unit="image")

    def progress(k, total, name):
        bar.update(1 if k else 0)
        bar.set_postfix_str(Path(name).name)

    rows = alt_text_batch(loaded, items(), style=args.style, context=args.context, max_chars=args.max_chars,
                          progress=progress)
    bar.update(1)
    bar.close()
    return _write_alt_text(rows, args.out)


def _is_folder(out: str) -> bool:
    """--out names a folder: it ends with a slash or is one already."""
    return out.endswith(("/", "\\")) or Path(out).is_dir()


def _write_alt_text(rows, out: str) -> int:
    from .alt_text import rows_to_csv

    Path(out).write_text(rows_to_csv(rows))
    errors = sum(bool(r.error) for r in rows)
    print(f"wrote {len(rows)} rows to {out}" + (f" ({errors} files could not be read)" if errors else ""))
    return 0


def _check_presets(args: argparse.Namespace) -> int:
    import json

    from .check_presets import CheckSettings, check_presets, example_photos, format_table
    from .models import PRESETS

    models = args.model or [p.name for p in PRESETS.values() if not p.embedded]
    images = args.image or [str(p) for p in example_photos()]
    missing = [i for i in images if not Path(i).is_file()]
    if missing:
        print(f"error: no such image: {', '.join(missing)}", file=sys.stderr)
        return 2
    settings = CheckSettings(ig_steps=args.ig_steps, max_new_tokens=args.max_new_tokens,
                             robustness=not args.no_robustness)
    bar = tqdm(total=len(models) * len(images), desc="check-presets", unit="run", disable=args.quiet)

    def progress(k, total, name):
        bar.n = k
        bar.set_postfix_str(name)
        bar.refresh()

    report = check_presets(models, images, settings, progress)
    bar.n = bar.total
    bar.close()
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 0 if all(c["ok"] for r in report["models"] for c in r["checks"]) else 1


def _index(args: argparse.Namespace) -> int:
    from .search import build_index

    found = _files_and_model(args)
    if found is None:
        return 2
    files, loaded = found
    bar = tqdm(total=len(files), desc="index", unit="image")

    def progress(k, total):
        bar.n = k
        bar.refresh()

    try:
        index, report = build_index(loaded, files, args.out, batch=args.batch, progress=progress, engine=args.engine,
                                    workers=args.workers, address=args.address)
    except ValueError as err:
        bar.close()
        print(f"error: {err}", file=sys.stderr)
        return 2
    bar.close()
    for path, why in report.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    print(f"indexed {len(index)} images in {args.out}: {report.encoded} encoded ({report.images_per_second:.1f} "
          f"images/s), {report.reused} reused, {len(report.skipped)} skipped")
    return 0


def _search(args: argparse.Namespace) -> int:
    import json

    from .images import ImageInputError, load_image
    from .models import ModelLoadError, load_model
    from .search import ImageIndex, score_label, search_image, search_text

    if bool(args.text) == bool(args.image):
        print("error: give --text or --image", file=sys.stderr)
        return 2
    try:
        index = ImageIndex.load(args.index)
        loaded = load_model(args.model)
        hits = (search_text(loaded, index, args.text, args.k) if args.text
                else search_image(loaded, index, load_image(args.image), args.k))
    except (ValueError, ModelLoadError, ImageInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": loaded.name, "score": score_label(loaded) if args.text else "cosine similarity",
                          "hits": [h.to_json() for h in hits]}))
        return 0
    print(f"score: {score_label(loaded) if args.text else 'cosine similarity'}")
    for h in hits:
        print(f"{h.rank + 1:3d}  {h.score:.4f}  {h.path}")
    return 0


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: this process; ray: Ray Data, the model loaded once per actor")
    parser.add_argument("--workers", type=int, default=2, help="(ray) actors, one GPU each when CUDA is there")
    parser.add_argument("--address", help="(ray) join this cluster (e.g. auto); default: start a local Ray")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmie_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    alt = sub.add_parser("alt-text", help="write alt text for images into a CSV file")
    alt.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    alt.add_argument("--out", required=True, help="CSV file to write; with --engine ray, a folder (ending in /) "
                                                  "receives CSV shards written by Ray Data")
    alt.add_argument("--model", default="shapes-vlm", help="model preset or folder")
    alt.add_argument("--style", default="concise", help="concise, detailed or functional")
    alt.add_argument("--context", default="", help="page context for the functional style")
    alt.add_argument("--max-chars", type=int, default=125, help="length limit")
    _engine_args(alt)
    alt.set_defaults(func=_alt_text)
    chk = sub.add_parser("check-presets", help="run every view and method of each model on photos",
                         description="Run every view and explanation method the model's family supports on each "
                                     "image, at the model's true geometry; exit 1 if any check fails.")
    chk.add_argument("--model", action="append", help="preset name or model folder (repeatable; default: every "
                                                      "Hub preset)")
    chk.add_argument("--image", action="append", help="image file (repeatable; default: the example photos)")
    chk.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    chk.add_argument("--ig-steps", type=int, default=4, help="integrated gradients' steps (default 4)")
    chk.add_argument("--max-new-tokens", type=int, default=4, help="answer length (default 4)")
    chk.add_argument("--no-robustness", action="store_true", help="skip the robustness panel")
    chk.add_argument("--quiet", action="store_true", help="no progress bar")
    chk.set_defaults(func=_check_presets)
    idx = sub.add_parser("index", help="embed images with a CLIP or SigLIP model for search",
                         description="Embed image files (folders searched recursively) into INDEX_DIR; files already "
                                     "in the index (same content, same model) are not encoded again, unreadable files "
                                     "are listed and skipped.")
    idx.add_argument("paths", nargs="+", help="image files and/or folders")
    idx.add_argument("--model", default="shapes-clip", help="CLIP or SigLIP preset or folder")
    idx.add_argument("--out", required=True, help="index folder (created or updated)")
    idx.add_argument("--batch", type=int, default=32, help="images per forward pass")
    _engine_args(idx)
    idx.set_defaults(func=_index)
    srch = sub.add_parser("search", help="search an index by text or by image")
    srch.add_argument("index", help="index folder")
    srch.add_argument("--model", default="shapes-clip", help="the model the index was made with")
    srch.add_argument("--text", help="text query")
    srch.add_argument("--image", help="image query (a file)")
    srch.add_argument("--k", type=int, default=10, help="hits to show")
    srch.add_argument("--json", action="store_true", help="print one JSON object")
    srch.set_defaults(func=_search)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
