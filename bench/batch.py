"""Batch jobs: throughput of the local engine against Ray Data on this machine.

    python -m bench.batch [--images 48] [--workers 2]

Alt text (shapes-vlm) and index embeddings (shapes-clip) for the same ShapesWorld PNG files, local engine vs
`--engine ray` (a local Ray, the model loaded once per actor), images per second each, rows compared; and
the ShapesWorld evaluation (shapes-vlm, scenes/s) and faithfulness (shapes-vlm relevancy, cases/s), the
JSON compared.
On a machine with few cores, Ray's actors share the cores that one local process already keeps busy
(torch uses every core), so the figure shows Ray's overhead (start-up, actor start, serialisation)
rather than a speed-up; the gain comes with more machines or GPUs (`--address` to join a cluster).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import machine, ratio


def run(images: int = 48, workers: int = 2) -> dict:
    import ray

    from mmie_core.alt_text import alt_text_batch
    from mmie_core.batch import alt_text_rows
    from mmie_core.images import load_image
    from mmie_core.models import load_model
    from mmie_core.search import build_index
    from mmie_core.shapes.world import make_scene

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(images):
            files.append(Path(tmp) / f"scene_{i:03d}.png")
            make_scene(71_000 + i).render(128).save(files[-1])
        vlm = load_model("shapes-vlm")
        t0 = time.perf_counter()
        local = alt_text_batch(vlm, [(str(f), load_image(f)) for f in files])
        local_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        on_ray = alt_text_rows(files, "shapes-vlm", "concise", "", 125, workers=workers)
        ray_s = time.perf_counter() - t0
        same = [r.alt_text for r in local] == [r.alt_text for r in on_ray]
        rows.append({"job": f"alt text, shapes-vlm, {images} images", "local images/s": round(images / local_s, 2),
                     f"ray ({workers} actors) images/s": round(images / ray_s, 2),
                     "ray / local time": round(ratio(ray_s, local_s), 2), "same rows": same})
        clip = load_model("shapes-clip")
        t0 = time.perf_counter()
        a, _ = build_index(clip, files)
        local_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        b, _ = build_index(clip, files, engine="ray", workers=workers)
        ray_s = time.perf_counter() - t0
        rows.append({"job": f"index, shapes-clip, {images} images", "local images/s": round(images / local_s, 2),
                     f"ray ({workers} actors) images/s": round(images / ray_s, 2),
                     "ray / local time": round(ratio(ray_s, local_s), 2),
                     "same rows": bool(np.allclose(a.embeddings, b.embeddings, atol=1e-6))})
        from mmie_core.shapes.evaluate import evaluate_model
        from mmie_core.shapes.faithfulness import evaluate_faithfulness

        scenes = max(images // 4, 4)
        t0 = time.perf_counter()
        a = evaluate_model("shapes-vlm", seed=10_000, n=scenes)
        local_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        b = evaluate_model("shapes-vlm", seed=10_000, n=scenes, engine="ray", workers=workers)
        ray_s = time.perf_counter() - t0
        rows.append({"job": f"evaluate, shapes-vlm, {scenes} scenes", "local images/s": round(scenes / local_s, 2),
                     f"ray ({workers} actors) images/s": round(scenes / ray_s, 2),
                     "ray / local time": round(ratio(ray_s, local_s), 2), "same rows": a == b})
        cases = max(images // 12, 2)  # scenes; two cases (a colour and a shape question) each
        kwargs = dict(seed=50_000, n=cases, sanity_cases=cases, deletion_steps=8)
        t0 = time.perf_counter()
        a = evaluate_faithfulness("shapes-vlm", "relevancy", **kwargs)
        local_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        b = evaluate_faithfulness("shapes-vlm", "relevancy", engine="ray", workers=workers, **kwargs)
        ray_s = time.perf_counter() - t0
        rows.append({"job": f"faithfulness, shapes-vlm relevancy, {2 * cases} cases",
                     "local images/s": round(2 * cases / local_s, 2),
                     f"ray ({workers} actors) images/s": round(2 * cases / ray_s, 2),
                     "ray / local time": round(ratio(ray_s, local_s), 2), "same rows": a == b})
    ray.shutdown()
    return {"target": "the same rows on Ray as locally", "met": all(r["same rows"] for r in rows), "rows": rows,
            "notes": ["", "On 2 cores Ray cannot be faster than one process that already uses both: the ratio is "
                          "Ray's overhead here (start-up, actors, serialisation), not what a cluster gives."]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps({"machine": machine()} | run(args.images, args.workers), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
