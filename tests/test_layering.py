"""The direction of imports: mmie_core never depends on gradio or studio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mmie_core_does_not_import_gradio_or_studio():
    modules = sorted(
        "mmie_core." + ".".join(p.relative_to(ROOT / "mmie_core").with_suffix("").parts)
        for p in (ROOT / "mmie_core").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'studio', 'gradio_client'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"mmie_core pulled in: {out.stdout.strip()}"


def test_no_import_of_ui_in_library_sources():
    for path in (ROOT / "mmie_core").rglob("*.py"):
        text = path.read_text()
        for needle in ("import gradio", "from gradio", "import studio", "from studio"):
            assert needle not in text, f"{path} contains {needle!r}"


def test_app_builds_without_loading_models():
    code = (
        "import app\n"
        "from mmie_core.models import MODEL_CACHE\n"
        "assert MODEL_CACHE.keys() == [], MODEL_CACHE.keys()\n"
        "assert type(app.demo).__name__ == 'Blocks'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
