"""Semantic search: retrieval quality on ShapesWorld, index build throughput, query latency.

    python -m bench.search [--quick]

- Retrieval: 1,000 fresh ShapesWorld scenes (seeds from 50000) are the collection, each scene's caption
  a query whose right answer is that scene: recall@1/5/10 and MRR for shapes-clip and shapes-siglip,
  next to chance (recall@k = k / 1000).
- Index build: `build_index` over PNG files on disk (reading, hashing, decoding, embedding, writing)
  against embedding the same images already in memory (the model's own cost), in the same run.
- Query latency: top-10 of one normalised query among 1k and 100k vectors (512 dims), exact matrix
  product vs faiss (flat inner-product index), median over 50 queries; the same top-10 either way.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mmie_core.models import load_model
from mmie_core.search import Neighbours, build_index, shapes_retrieval
from mmie_core.shapes.world import make_scene
from mmie_core.zero_shot import encode_images

from .common import machine, ratio, timed


def _latency(n: int, dim: int = 512, queries: int = 50) -> dict:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    qs = vectors[rng.integers(0, n, queries)] + 0.05 * rng.normal(size=(queries, dim)).astype(np.float32)
    out = {}
    for engine in ("exact", "faiss"):
        nn = Neighbours(vectors, engine)
        times, tops = [], []
        for q in qs:
            t0 = time.perf_counter()
            tops.append(nn.search(q, 10)[1][0])
            times.append(time.perf_counter() - t0)
        out[engine] = (float(np.median(times)), np.stack(tops))
    assert (out["exact"][1] == out["faiss"][1]).all(), "exact and faiss disagree"
    return {"vectors": n, "exact ms": round(1e3 * out["exact"][0], 3), "faiss ms": round(1e3 * out["faiss"][0], 3),
            "exact / faiss": round(ratio(out["exact"][0], out["faiss"][0]), 2)}


def run(quick: bool = False) -> dict:
    rows = []
    n = 200 if quick else 1000
    for model in ("shapes-clip", "shapes-siglip"):
        r = shapes_retrieval(model, 50_000, n)
        m, c = r["metrics"], r["chance"]
        rows.append({"measure": f"retrieval, {model}, {n} scenes (caption -> scene)",
                     "value": " / ".join(f"{m[k]:.3f}" for k in ("recall@1", "recall@5", "recall@10", "mrr")),
                     "chance": " / ".join(f"{c[k]:.4f}" for k in ("recall@1", "recall@5", "recall@10", "mrr")),
                     "unit": "recall@1 / @5 / @10 / MRR"})
    loaded = load_model("shapes-clip")
    with tempfile.TemporaryDirectory() as tmp:
        scenes = [make_scene(70_000 + i).render(128) for i in range(100 if quick else 400)]
        files = []
        for i, img in enumerate(scenes):
            files.append(Path(tmp) / f"scene_{i}.png")
            img.save(files[-1])
        encode_images(loaded, scenes[:4])  # warm up
        build_s, (index, report) = timed(lambda: build_index(loaded, files, Path(tmp) / "idx"))
        embed_s, _ = timed(lambda: [encode_images(loaded, scenes[i:i + 32]) for i in range(0, len(scenes), 32)])
        again_s, (_, again) = timed(lambda: build_index(loaded, files, Path(tmp) / "idx"))
    rows.append({"measure": f"index build, shapes-clip, {len(files)} PNG files", "value": f"{len(files) / build_s:.1f}",
                 "chance": "-", "unit": f"images/s ({ratio(build_s, embed_s):.2f}x the time of embedding the same "
                                         f"images from memory, {len(files) / embed_s:.1f} images/s)"})
    rows.append({"measure": "index rebuild, nothing new", "value": f"{again_s:.2f}", "chance": "-",
                 "unit": f"s ({again.encoded} encoded, {again.reused} reused; {ratio(build_s, again_s):.1f}x faster than "
                         "the first build)"})
    for size in (1_000, 100_000):
        lat = _latency(size)
        rows.append({"measure": f"query latency, top-10 of {size:,} vectors", "value": f"{lat['exact ms']} / {lat['faiss ms']}",
                     "chance": "-", "unit": f"ms exact / faiss (exact takes {lat['exact / faiss']}x faiss's time)"})
    return {"target": "recall above chance; exact and faiss return the same top-10", "met": None, "rows": rows,
            "notes": ["", "Retrieval measured by `mmie_core.search.shapes_retrieval`; a test checks recall@10 > 5x chance."]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps({"machine": machine()} | run(quick=args.quick), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
