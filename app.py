"""MMIE Studio entry point (Hugging Face Spaces runs this file).

    python app.py [--host 0.0.0.0] [--port 7860] [--mcp]

PORT or GRADIO_SERVER_PORT set the port when --port is not given. `--mcp` (or MMIE_MCP=1, e.g. on a
Space) also serves the studio's endpoints as MCP tools at /gradio_api/mcp/ (streamable HTTP) and
/gradio_api/mcp/sse, for language-model agents.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import threading

import spaces  # noqa: F401 - first: ZeroGPU must be imported before torch touches CUDA

from studio.app import MAX_FILE_SIZE, build_demo, configure_queue
from studio.gpu import preload_for_zero_gpu

_gc_paused = False


def _pause_gc() -> None:
    """Pause the cyclic garbage collector for the studio's start (`python app.py` only).

    The start (UI, server, then the default model and what its first answer imports) allocates some 300k
    objects that live as long as the process, on top of the ~370k that importing torch and gradio leaves.
    Meanwhile every full collection re-scans all of them and frees next to nothing (a few dozen objects):
    close to 1 s of the start on a 2-core machine. Reference counting still frees everything else at once."""
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def _resume_gc() -> None:
    """Collect again once the start is done, first freezing what exists then (the libraries, the UI, the
    default model: they live as long as the process), so that later collections do not re-scan it."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


if __name__ == "__main__":
    _pause_gc()  # resumed when the warm-up is done, or right after launch() without one
demo = build_demo()
preloaded = preload_for_zero_gpu()  # ZeroGPU only: models go to CUDA at start-up; elsewhere see warm_up()


def warm_up(model: str = "shapes-clip") -> threading.Thread | None:
    """Load the default model, and import what its first answer draws with, in the background while the
    page is served (MMIE_WARMUP=0 turns it off; ZeroGPU preloads instead).

    main() starts it once the server is listening, not before: the process runs Python on one core at a
    time (the GIL), and a warm-up started before `launch()` competes with the server's start for it; the
    page came later, and so did the first answer. The garbage collector resumes when it is done."""
    if os.environ.get("MMIE_WARMUP", "1").strip() in ("0", "false", "no") or preloaded:
        _resume_gc()
        return None

    def work():
        try:
            from mmie_core.models import load_model
            from mmie_core.render import _figure

            load_model(model)
            _figure()
        except Exception:  # noqa: BLE001 - a failed warm-up only means the first request loads it
            logging.getLogger("studio").exception("warm-up of %s failed; it loads on first use", model)
        finally:
            _resume_gc()

    thread = threading.Thread(target=work, name="warm-up", daemon=True)
    thread.start()
    return thread


def mcp_from_env() -> bool:
    return os.environ.get("MMIE_MCP", "").strip().lower() in ("1", "true", "yes")


def _port(value: str | None) -> int | None:
    return int(value) if value else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Launch MMIE Studio.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument(
        "--port", type=int, default=_port(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT")),
    )
    parser.add_argument("--mcp", action="store_true", default=mcp_from_env(),
                        help="also serve the endpoints as MCP tools (default: MMIE_MCP=1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_queue(demo).launch(server_name=args.host, server_port=args.port, max_file_size=MAX_FILE_SIZE,
                                 mcp_server=args.mcp, prevent_thread_lock=True)
    warm_up()  # the page is served; the default model loads while it is read
    if not (hasattr(sys, "ps1") or sys.flags.interactive):  # as launch() itself does: keep serving until stopped
        demo.block_thread()


if __name__ == "__main__":
    main()
