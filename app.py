"""MMIE Studio entry point (Hugging Face Spaces runs this file).

    python app.py [--host 0.0.0.0] [--port 7860] [--mcp]

PORT or GRADIO_SERVER_PORT set the port when --port is not given. `--mcp` (or MMIE_MCP=1, e.g. on a
Space) also serves the studio's endpoints as MCP tools at /gradio_api/mcp/ (streamable HTTP) and
/gradio_api/mcp/sse, for language-model agents.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading

import spaces  # noqa: F401 - first: ZeroGPU must be imported before torch touches CUDA

from studio.app import MAX_FILE_SIZE, build_demo, configure_queue
from studio.gpu import preload_for_zero_gpu

demo = build_demo()
preloaded = preload_for_zero_gpu()  # ZeroGPU only: models go to CUDA at start-up; elsewhere see warm_up()


def warm_up(model: str = "shapes-clip") -> threading.Thread | None:
    """Load the default model, and import what its first answer draws with, in the background while the
    server starts and the page is served (MMIE_WARMUP=0 turns it off; ZeroGPU preloads instead)."""
    if os.environ.get("MMIE_WARMUP", "1").strip() in ("0", "false", "no") or preloaded:
        return None

    def work():
        try:
            from mmie_core.models import load_model
            from mmie_core.render import _figure

            load_model(model)
            _figure()
        except Exception:  # noqa: BLE001 - a failed warm-up only means the first request loads it
            logging.getLogger("studio").exception("warm-up of %s failed; it loads on first use", model)

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
    warm_up()
    configure_queue(demo).launch(server_name=args.host, server_port=args.port, max_file_size=MAX_FILE_SIZE,
                                 mcp_server=args.mcp)


if __name__ == "__main__":
    main()
