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

import spaces  # noqa: F401 - first: ZeroGPU must be imported before torch touches CUDA

from studio.app import MAX_FILE_SIZE, build_demo, configure_queue
from studio.gpu import preload_for_zero_gpu

demo = build_demo()
preload_for_zero_gpu()  # ZeroGPU only: models go to CUDA at start-up; elsewhere they load on first use


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
                                 mcp_server=args.mcp)


if __name__ == "__main__":
    main()
