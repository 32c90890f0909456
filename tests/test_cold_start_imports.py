"""Cold start: what `python app.py` does before the first request (bench/cold_start.py measures it).

One fresh interpreter imports app.py (it builds the whole studio) and reports what that pulled in;
then it pauses and resumes the garbage collector as `python app.py` does, and runs app.main() with the
server and the warm-up replaced by recorders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Imported on first use only: nothing the page needs, and the first /classify needs none but matplotlib and
# the model machinery, which the warm-up brings in once the server is listening.
NOT_AT_START = (
    "captum", "matplotlib", "scipy", "sklearn", "faiss", "ray",
    "torchvision", "transformers.image_utils", "transformers.modeling_utils", "transformers.models",
)

CODE = """
import json, sys, threading
import app
from mmie_core.models import MODEL_CACHE

report = {
    "loaded": sorted(m for m in %(names)r if m in sys.modules),
    "models": MODEL_CACHE.keys(),
    "threads": sorted(t.name for t in threading.enumerate()),
}

import gc, os
os.environ["MMIE_WARMUP"] = "0"
app._pause_gc()  # as `python app.py` does before building the studio
paused = not gc.isenabled()
app.warm_up()  # no warm-up: collection resumes at once
report["gc"] = [paused, gc.isenabled()]

calls = []

class Served:
    def launch(self, **kwargs):
        calls.append(["launch", kwargs.get("prevent_thread_lock", False), kwargs.get("mcp_server")])

    def block_thread(self):
        calls.append(["block_thread"])

served = Served()
app.configure_queue = lambda demo: served
app.demo = served
app.warm_up = lambda: calls.append(["warm_up"])
app.main(["--port", "0"])
report["main"] = calls
calls = []
app.main(["--port", "0", "--mcp"])  # the MCP server: --mcp, or MMIE_MCP=1 on a Space
os.environ["MMIE_MCP"] = "1"
app.main(["--port", "0"])
report["mcp"] = [c[2] for c in calls if c[0] == "launch"]
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def start_report() -> dict:
    out = subprocess.run([sys.executable, "-c", CODE % {"names": NOT_AT_START}], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "MMIE_WARMUP": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


def test_importing_app_builds_the_ui_without_heavy_libraries_or_models(start_report):
    assert start_report["loaded"] == [], f"imported at start-up: {start_report['loaded']}"
    assert start_report["models"] == []
    assert "warm-up" not in start_report["threads"]  # importing app (tests, Spaces) starts no background work


def test_garbage_collection_paused_for_the_start_resumes(start_report):
    assert start_report["gc"] == [True, True]


def test_main_starts_the_warm_up_once_the_server_listens(start_report):
    # launch() must not block (prevent_thread_lock) so that the warm-up starts after it, then main() blocks
    assert start_report["main"] == [["launch", True, False], ["warm_up"], ["block_thread"]]


def test_mcp_flag_and_variable_launch_the_mcp_server(start_report):
    assert start_report["mcp"] == [True, True]
