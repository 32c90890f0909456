"""Load test: concurrent gradio_client clients mixing every endpoint against a local studio.

    python -m bench.load [--clients 16] [--seconds 60] [--url http://127.0.0.1:7860]

Without --url it launches the studio in-process on a free local port. Prints requests served,
errors (queue-full rejections counted apart; they must come back as a clean message), and
p50/p95 latency per endpoint, and exits non-zero on any other error.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from collections import defaultdict

QUEUE_FULL = "queue is full"


def _calls(example: str):
    from gradio_client import handle_file

    img = handle_file(example)
    return {
        "/patches": (img, "shapes-clip", False),
        "/inspect": (img, "shapes-clip", 2, 0.0, "inferno", 0.6, "blocks"),
        "/classify": (img, "a red square, a yellow circle, a green square", "shapes-clip", "preset", "", False),
        "/explain_label": (img, "a red square, a yellow circle", "a red square", "shapes-clip", "relevancy", "preset",
                           "", "inferno", 0.6, "blocks"),
        "/chat": (img, "how many shapes are there?", [], "shapes-vlm", 8, 0.0, 1.0),
        "/alt_text": (img, "concise", "", 125, "shapes-vlm"),
        "/check_alt_text": ("A red square and a yellow circle.", None, 125),
    }


def run_load(url: str, clients: int, seconds: float, seed: int = 0) -> dict:
    """Run `clients` threads for `seconds`; returns counts and latencies per endpoint."""
    from gradio_client import Client

    from studio.common import example_images

    examples = example_images()
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    rejected = [0]
    lock = threading.Lock()
    deadline = time.time() + seconds

    def worker(k: int) -> None:
        rng = random.Random(seed + k)
        client = Client(url, verbose=False)
        while time.time() < deadline:
            calls = _calls(rng.choice(examples))
            endpoint = rng.choice(list(calls))
            t0 = time.perf_counter()
            try:
                client.predict(*calls[endpoint], api_name=endpoint)
            except Exception as err:  # noqa: BLE001 - counted and reported
                with lock:
                    if QUEUE_FULL in str(err).lower():
                        rejected[0] += 1
                    else:
                        errors.append(f"{endpoint}: {str(err)[:200]}")
                continue
            with lock:
                latencies[endpoint].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 300)
    all_lat = [v for vals in latencies.values() for v in vals]
    return {
        "clients": clients,
        "seconds": seconds,
        "served": len(all_lat),
        "errors": errors,
        "queue_full_rejections": rejected[0],
        "p50": statistics.median(all_lat) if all_lat else float("nan"),
        "p95": statistics.quantiles(all_lat, n=20)[-1] if len(all_lat) >= 20 else max(all_lat, default=float("nan")),
        "per_endpoint": {k: (len(v), statistics.median(v)) for k, v in sorted(latencies.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--url", default=None)
    args = parser.parse_args(argv)
    demo = None
    url = args.url
    if url is None:
        import app

        from studio.app import MAX_FILE_SIZE, configure_queue

        demo = app.demo
        configure_queue(demo).launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                                     max_file_size=MAX_FILE_SIZE)
        url = demo.local_url
    try:
        result = run_load(url, args.clients, args.seconds)
    finally:
        if demo is not None:
            demo.close()
    print(f"{result['clients']} clients for {result['seconds']:.0f} s: {result['served']} requests served, "
          f"{len(result['errors'])} errors, {result['queue_full_rejections']} queue-full rejections")
    print(f"latency p50 {result['p50']:.2f} s, p95 {result['p95']:.2f} s")
    for endpoint, (count, median) in result["per_endpoint"].items():
        print(f"  {endpoint:16s} {count:5d} requests, median {median:.2f} s")
    for err in result["errors"][:10]:
        print("  error:", err)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
