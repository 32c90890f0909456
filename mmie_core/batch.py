"""Batch jobs on one process or on Ray Data.

`--engine local` (the default) runs a job in this process. `--engine ray` runs the same core function
in Ray Data: the files are read by `ray.data.read_binary_files`, each batch goes through
`map_batches` over a callable class that loads the model once per actor (an actor pool of up to
`workers` actors, one GPU each when CUDA is there), and the rows come back in the files' order.
`address` joins an existing cluster ("auto", or "ray://host:10001"); without it a local Ray starts.
Jobs that are not a list of files (the ShapesWorld evaluation and faithfulness) draw everything random in
a plan first, then map numbered work units over actors that rebuild the same plan (`ray_map_indices`).

Ray is optional: it is in requirements-dev.txt (the tests run every job on a local Ray of 2 CPUs and
compare the rows with the local engine's), not in requirements.txt; `--engine ray` without it says how
to install it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

ENGINES = ("local", "ray")
log = logging.getLogger(__name__)


def require_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--engine ray needs Ray Data: pip install 'ray[data]' (or use --engine local)") from None
    return ray


def _start(address: str | None, workers: int):
    """Ray, joined to the cluster at `address`, or started locally with `workers` CPUs; a Ray that this process
    already runs is used as it is (Ray joins one cluster per process)."""
    ray = require_ray()
    if ray.is_initialized():
        if address:
            log.warning("Ray already runs in this process; the job runs there, not at --address %s", address)
        return ray
    # a local Ray gets a CPU per actor and one more for the tasks that read the files: with only as many CPUs as
    # actors, the actors hold them all and the reading never starts (one worker hung)
    kwargs = {"address": address} if address else {"num_cpus": max(int(workers), 1) + 1}
    ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True, **kwargs)
    return ray


def _mapped_files(paths: list[str], worker, constructor_kwargs: dict, workers: int, batch_size: int,
                  address: str | None):
    """The Ray dataset of `worker`'s rows over the files (read by Ray Data, mapped by an actor pool); lazy."""
    import torch

    ray = _start(address, workers)
    from ray.data import ActorPoolStrategy

    ds = ray.data.read_binary_files(paths, include_paths=True)
    return ds.map_batches(worker, fn_constructor_kwargs=constructor_kwargs, batch_size=batch_size,
                          batch_format="numpy", compute=ActorPoolStrategy(min_size=1, max_size=max(int(workers), 1)),
                          num_gpus=1 if torch.cuda.is_available() else 0)


def ray_map_files(paths: list[str | Path], worker, constructor_kwargs: dict, workers: int = 2, batch_size: int = 8,
                  address: str | None = None) -> list[dict]:
    """Rows of `worker` (a callable class: `__init__(**constructor_kwargs)` loads the model, `__call__(batch)` maps
    a batch {"bytes": [...], "path": [...]} to a batch of rows, each row keeping its "path") over the files, read
    and mapped by Ray Data: one row per distinct file, in the order of `paths`."""
    paths = list(dict.fromkeys(str(Path(p).resolve()) for p in paths))  # each file once
    rows = _mapped_files(paths, worker, constructor_kwargs, workers, batch_size, address).take_all()
    order = {p: i for i, p in enumerate(paths)}
    return sorted(rows, key=lambda r: order[_path(r["path"])])


def ray_map_indices(count: int, worker, constructor_kwargs: dict, workers: int = 2, address: str | None = None,
                    batch_size: int = 1) -> list:
    """Work units 0..count-1 mapped by `worker` (a callable class: `__init__(**constructor_kwargs)` loads the
    model and rebuilds the job's plan, `__call__({"index": [...]})` returns {"index": [...], "result": [JSON
    text, ...]}) on Ray Data: the decoded results, in index order. Units are independent (everything random
    about a job is drawn in its plan), so any split over actors gives the local engine's results."""
    import json

    import torch

    ray = _start(address, workers)
    from ray.data import ActorPoolStrategy

    ds = ray.data.range(count).map_batches(lambda b: {"index": b["id"]}, batch_format="numpy")
    mapped = ds.map_batches(worker, fn_constructor_kwargs=constructor_kwargs, batch_size=batch_size,
                            batch_format="numpy", compute=ActorPoolStrategy(min_size=1, max_size=max(int(workers), 1)),
                            num_gpus=1 if torch.cuda.is_available() else 0)
    rows = sorted(mapped.take_all(), key=lambda r: int(r["index"]))
    if [int(r["index"]) for r in rows] != list(range(count)):
        raise RuntimeError(f"Ray returned {len(rows)} of {count} work units")
    return [json.loads(str(r["result"])) for r in rows]


def _path(value) -> str:
    """Ray Data's file path of a row ("local://..." stripped), absolute."""
    text = str(value)
    for prefix in ("local://", "file://"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return str(Path(text).resolve())


class AltTextWorker:
    """Ray Data actor: alt text for a batch of image files (bad files become rows with their error)."""

    def __init__(self, model: str, style: str, context: str, max_chars: int):
        from .models import load_model

        self.loaded = load_model(model)
        self.style, self.context, self.max_chars = style, context, max_chars

    def __call__(self, batch: dict) -> dict:
        from .alt_text import alt_text_batch
        from .images import ImageInputError, load_image

        items = []
        for data, path in zip(batch["bytes"], batch["path"]):
            try:
                items.append((_path(path), load_image(bytes(data))))
            except ImageInputError as err:
                items.append((_path(path), err))
        rows = alt_text_batch(self.loaded, items, self.style, self.context, self.max_chars)
        return {"path": np.array([r.file for r in rows]), "alt_text": np.array([r.alt_text for r in rows]),
                "chars": np.array([r.chars for r in rows]), "error": np.array([r.error for r in rows])}


class EmbedWorker:
    """Ray Data actor: content hashes and normalised image embeddings of a batch of files (None for a file
    that cannot be read, with the reason)."""

    def __init__(self, model: str):
        from .models import load_model

        self.loaded = load_model(model)

    def __call__(self, batch: dict) -> dict:
        from .images import ImageInputError, load_image
        from .zero_shot import encode_images

        hashes, images, errors, keep = [], [], [], []
        for data, path in zip(batch["bytes"], batch["path"]):
            hashes.append(hashlib.sha256(bytes(data)).hexdigest())
            try:
                images.append(load_image(bytes(data)))
                errors.append("")
                keep.append(True)
            except ImageInputError as err:
                errors.append(str(err))
                keep.append(False)
        feats = encode_images(self.loaded, images).cpu().numpy() if images else np.zeros((0, 1), np.float32)
        dim = feats.shape[1] if len(feats) else 1
        out, k = [], 0
        for ok in keep:
            out.append(feats[k] if ok else np.zeros(dim, np.float32))
            k += ok
        return {"path": np.array([_path(p) for p in batch["path"]]), "hash": np.array(hashes),
                "embedding": np.stack(out) if out else np.zeros((0, dim), np.float32), "error": np.array(errors)}


def write_alt_text_shards(files: list[Path], model: str, style: str, context: str, max_chars: int, out_dir: str,
                          workers: int = 2, address: str | None = None, batch_size: int = 4) -> None:
    """Alt text for image files on Ray Data, written by Ray Data as CSV shards into `out_dir` (a folder; on a
    cluster, one every node can write to): the actors' rows go straight to the files, none through this process.
    The columns are those of the one-file CSV (file, alt_text, chars, error), each file by its absolute path, each
    once; the shards hold the rows in no fixed order. A folder that already holds files is refused: Ray Data adds
    its shards beside them, so a second run would list every file twice."""
    out = out_dir if "://" in out_dir else str(Path(out_dir).resolve())  # a URI (s3://...) as given
    if "://" not in out and Path(out).is_dir() and any(Path(out).iterdir()):
        raise ValueError(f"{out_dir} already holds files; the shards go into an empty or new folder (Ray Data adds "
                         "its files beside what is there, so an earlier run's rows would be counted twice)")
    paths = list(dict.fromkeys(str(Path(f).resolve()) for f in files))
    mapped = _mapped_files(paths, AltTextWorker, {"model": model, "style": style, "context": context,
                                                  "max_chars": max_chars}, workers, batch_size, address)
    mapped.map_batches(_shard_rows, batch_format="pandas").write_csv(str(out))


def _shard_rows(batch):
    """A mapped batch as the CSV's rows: "file" (the absolute path) first, as in the one-file CSV."""
    batch = batch.rename(columns={"path": "file"})
    batch["file"] = [_path(p) for p in batch["file"]]
    return batch[["file", "alt_text", "chars", "error"]]


def alt_text_rows(files: list[Path], model: str, style: str, context: str, max_chars: int, workers: int = 2,
                  address: str | None = None, batch_size: int = 4) -> list:
    """`alt_text.alt_text_batch`'s rows for image files, computed on Ray Data (same rows, same order, each
    named as given)."""
    from .alt_text import BatchRow

    rows = ray_map_files(files, AltTextWorker, {"model": model, "style": style, "context": context,
                                                "max_chars": max_chars}, workers, batch_size, address)
    by_path = {_path(r["path"]): r for r in rows}
    out = []
    for f in files:  # each file named as given, duplicates included, from its own row
        r = by_path[str(Path(f).resolve())]
        out.append(BatchRow(str(f), str(r["alt_text"]), int(r["chars"]), str(r["error"])))
    return out
