"""`--engine ray` without Ray, and how a job joins a cluster: runs whether Ray is installed or not
(tests/test_batch.py runs every job on a real local Ray)."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from imagefiles import scene_folder

INSTALL = "pip install 'ray[data]'"


def test_every_batch_command_without_ray_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    from mmie_core.__main__ import main
    from mmie_core.shapes.__main__ import main as shapes_main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    folder = scene_folder(tmp_path, 50_300, 1)
    assert main(["alt-text", str(folder), "--out", str(tmp_path / "alt.csv"), "--engine", "ray"]) == 2
    assert INSTALL in capsys.readouterr().err and not (tmp_path / "alt.csv").exists()
    assert main(["index", str(folder), "--out", str(tmp_path / "index"), "--engine", "ray"]) == 2
    assert INSTALL in capsys.readouterr().err
    for command in (["evaluate", "--model", "shapes-clip", "--n", "2"],
                    ["faithfulness", "--model", "shapes-clip", "--method", "gradcam", "--n", "2"]):
        with pytest.raises(SystemExit) as stopped:
            shapes_main(command + ["--engine", "ray"])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.startswith("error: ") and INSTALL in err, command
        assert "Traceback" not in err


class FakeRay(types.ModuleType):
    """Records how the batch engine starts Ray."""

    def __init__(self, running: bool = False):
        super().__init__("ray")
        self.running, self.calls = running, []

    def is_initialized(self):
        return self.running

    def init(self, **kwargs):
        self.calls.append(kwargs)
        self.running = True


def test_address_joins_a_cluster_and_a_local_ray_gets_the_workers_cpus(monkeypatch, caplog):
    from mmie_core import batch

    joined = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", joined)
    assert batch._start("ray://head:10001", 4) is joined
    assert joined.calls[0]["address"] == "ray://head:10001" and "num_cpus" not in joined.calls[0]
    local = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", local)
    batch._start(None, 3)
    assert local.calls[0]["num_cpus"] == 4 and "address" not in local.calls[0]  # an actor each, one more to read
    running = FakeRay(running=True)  # Ray joins one cluster per process: the one already there is used
    monkeypatch.setitem(sys.modules, "ray", running)
    with caplog.at_level(logging.WARNING, logger="mmie_core.batch"):
        batch._start("ray://other:10001", 2)
    assert running.calls == [] and "not at --address ray://other:10001" in caplog.text
