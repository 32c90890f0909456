"""Semantic image search with a CLIP or SigLIP model, and why each hit matched.

An index is a folder:
- `index.json`: the model (name, revision or weights hash), the embedding width, and one entry per
  image `{"hash", "name", "path"}` (the SHA-256 of the file's bytes: the key of its embedding);
- `embeddings.npy`: (images, dim) float32, L2-normalised, in the entries' order.
Re-indexing a grown folder encodes only the files whose content hash is new for that model; an index
made by another model (or another revision of it) is rebuilt, never mixed.

Search: text -> images scores every image against the text as the model's own head does (CLIP: a
softmax over the collection; SigLIP: the sigmoid of each image-text logit, independent per image);
image -> images ranks by cosine similarity. Nearest neighbours come from one small interface,
`Neighbours`: exact (a matrix product), or faiss's flat inner-product index (exact too) from
`FAISS_FROM` vectors on, or when asked for.

Why a hit matched: for a text query, the heatmap of the query text on the hit by any method of the
explanation engine; for an image query, patch-to-patch similarity: for every patch of the hit, its best
cosine similarity to any patch of the query (the vision tower's last hidden states, after its final
norm), with the matching query patch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from .heatmap import PatchHeatmap
from .images import ImageInputError, load_image
from .models import LoadedModel
from .zero_shot import encode_images, encode_texts

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.npy"
# Vectors from which "auto" uses faiss (when installed) instead of the exact matrix product. Measured by
# bench/search.py on a 2-core CPU: one top-10 query among 100k 512-d vectors takes 12.6 ms by numpy's
# matrix product and 22 ms by faiss's flat index; an HNSW graph (faiss, M=32) answered in 1 ms but found
# only 22% of the exact top-10 on those vectors, so approximate search is not used.
FAISS_FROM = 1_000_000


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_MODEL_KEYS: dict[tuple[str, int], dict] = {}


def model_key(loaded: LoadedModel) -> dict:
    """What identifies the model's embeddings: its name and its Hub revision, or for a local folder the
    hash of its weight files (hashed once per loaded model)."""
    cache = (loaded.source, id(loaded.model))
    if cache not in _MODEL_KEYS:
        _MODEL_KEYS[cache] = _model_key(loaded)
    return _MODEL_KEYS[cache]


def _model_key(loaded: LoadedModel) -> dict:
    revision = loaded.preset.revision if loaded.preset else None
    if not revision:
        folder = Path(loaded.source)
        weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        digest = hashlib.sha256()
        for w in weights:
            digest.update(file_hash(w).encode())
        revision = "weights-" + digest.hexdigest()[:16] if weights else "unknown"
    return {"model": loaded.name, "revision": revision}


class Neighbours:
    """Top-k inner product over L2-normalised vectors: exact matrix product, or faiss for large sets."""

    def __init__(self, vectors: np.ndarray, engine: str = "auto"):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if engine == "auto":
            engine = "faiss" if len(vectors) >= FAISS_FROM and _has_faiss() else "exact"
        if engine not in ("exact", "faiss"):
            raise ValueError("engine must be auto, exact or faiss")
        self.engine = engine
        self._faiss = None
        if engine == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatIP(self.vectors.shape[1])
            self._faiss.add(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices), each (queries, k), best first."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, len(self.vectors))
        if self._faiss is not None:
            return self._faiss.search(queries, k)
        sims = queries @ self.vectors.T  # (Q, N)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sims, top, 1).argsort(1)[:, ::-1]
        top = np.take_along_axis(top, order, 1)
        return np.take_along_axis(sims, top, 1), top


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class ImageIndex:
    """Embeddings of a collection, keyed by content hash, for one model."""

    key: dict  # {"model", "revision"}
    entries: list[dict] = field(default_factory=list)  # {"hash", "name", "path"}
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))

    def __len__(self) -> int:
        return len(self.entries)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / EMBEDDINGS_FILE, self.embeddings.astype(np.float32))
        (folder / INDEX_FILE).write_text(json.dumps({**self.key, "dim": int(self.embeddings.shape[-1]),
                                                     "entries": self.entries}, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "ImageIndex":
        folder = Path(folder)
        if not (folder / INDEX_FILE).exists():
            raise ValueError(f"{folder} holds no index (no {INDEX_FILE}); build one with `python -m mmie_core index`")
        meta = json.loads((folder / INDEX_FILE).read_text())
        embeddings = np.load(folder / EMBEDDINGS_FILE)
        if len(embeddings) != len(meta["entries"]):
            raise ValueError(f"{folder}: {len(meta['entries'])} entries but {len(embeddings)} embeddings")
        return cls({"model": meta["model"], "revision": meta["revision"]}, meta["entries"], embeddings)

    def neighbours(self, engine: str = "auto") -> Neighbours:
        return Neighbours(self.embeddings, engine)


@dataclass
class IndexReport:
    """What one indexing run did."""

    encoded: int  # new images embedded now
    reused: int  # images whose embedding the index already had
    skipped: list[tuple[str, str]]  # (file, why) for files that could not be read
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0


def build_index(loaded: LoadedModel, files: Iterable[str | Path], out: str | Path | None = None,
                batch: int = 32, progress: Callable[[int, int], None] | None = None, engine: str = "local",
                workers: int = 2, address: str | None = None) -> tuple[ImageIndex, IndexReport]:
    """Index `files` with a CLIP or SigLIP model, reusing the embeddings of an index already in `out` (same
    model and revision) for files whose content it has seen. Unreadable files are listed and skipped. Writes
    the index to `out` when given. `engine="ray"` embeds the new files on Ray Data (`mmie_core.batch`)."""
    import time

    if not loaded.adapter.zero_shot:
        raise ValueError(f"{loaded.name} is a {loaded.family} model; search needs a CLIP or SigLIP model.")
    t0 = time.perf_counter()
    key = model_key(loaded)
    old = None
    if out is not None and (Path(out) / INDEX_FILE).exists():
        old = ImageIndex.load(out)
        if old.key != key:
            log.warning("%s was indexed with %s; rebuilding it for %s", out, old.key, key)
            old = None
    known = {e["hash"]: i for i, e in enumerate(old.entries)} if old else {}
    files = [Path(f) for f in files]
    found: list[tuple[Path, str]] = []  # (file, content hash) of every readable file, in order
    skipped: list[tuple[str, str]] = []
    for path in files:
        try:
            found.append((path, file_hash(path)))
        except OSError as err:
            skipped.append((str(path), str(err)))
    new = [(path, digest) for path, digest in found if digest not in known]
    vectors: dict[str, np.ndarray] = {digest: old.embeddings[known[digest]] for _, digest in found if digest in known}
    failed: dict[str, str] = {}
    if engine == "ray" and new:
        from .batch import EmbedWorker, ray_map_files

        worker_model = loaded.preset.name if loaded.preset else loaded.source
        for row in ray_map_files([p for p, _ in new], EmbedWorker, {"model": worker_model}, workers, batch,
                                 address):
            if row["error"]:
                failed[str(row["hash"])] = str(row["error"])
            else:
                vectors[str(row["hash"])] = np.asarray(row["embedding"], dtype=np.float32)
        if progress is not None:
            progress(len(files), len(files))
    elif engine in ("local", "ray"):  # (ray with nothing new: nothing to embed)
        for start in range(0, len(new), batch):
            chunk, images = [], []
            for path, digest in new[start:start + batch]:
                try:
                    images.append(load_image(path))
                    chunk.append(digest)
                except ImageInputError as err:
                    failed[digest] = str(err)
            if images:
                for digest, vec in zip(chunk, encode_images(loaded, images).cpu().numpy()):
                    vectors[digest] = vec
            if progress is not None:
                progress(min(len(found) - len(new) + start + batch, len(files)), len(files))
    else:
        raise ValueError(f"engine must be local or ray, not {engine!r}")
    entries, rows = [], []
    for path, digest in found:
        if digest in failed:
            skipped.append((str(path), failed[digest]))
            continue
        entries.append({"hash": digest, "name": path.name, "path": str(path)})
        rows.append(vectors[digest])
    reused = sum(digest in known for path, digest in found if digest not in failed)
    dim = len(rows[0]) if rows else 0
    index = ImageIndex(key, entries, np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32))
    if out is not None:
        index.save(out)
    order = {str(f): i for i, f in enumerate(files)}
    skipped.sort(key=lambda s: order.get(s[0], 0))
    return index, IndexReport(len(entries) - reused, reused, skipped, time.perf_counter() - t0)


@dataclass
class Hit:
    rank: int
    index: int  # position in the index's entries
    name: str
    path: str
    score: float  # probability (text query, CLIP softmax / SigLIP sigmoid) or cosine similarity (image query)
    similarity: float  # cosine similarity of the embeddings

    def to_json(self) -> dict:
        return {"rank": self.rank, "index": self.index, "name": self.name, "path": self.path,
                "score": round(self.score, 6), "similarity": round(self.similarity, 6)}


def _check(loaded: LoadedModel, index: ImageIndex) -> None:
    if not len(index):
        raise ValueError("The index is empty: index some images first.")
    if index.key != model_key(loaded):
        raise ValueError(f"This index was made with {index.key['model']} ({index.key['revision']}); search it with "
                         f"the same model, or index the images again with {loaded.name}.")


def score_label(loaded: LoadedModel) -> str:
    """What a text query's score means for this model, in words."""
    if loaded.adapter.label_activation == "sigmoid":
        return "sigmoid of the image-text logit (SigLIP: each image scored on its own)"
    return "softmax over the collection (CLIP: the scores of all images add up to 1)"


def search_text(loaded: LoadedModel, index: ImageIndex, text: str, k: int = 10,
                neighbours: Neighbours | None = None) -> list[Hit]:
    """The top-k images for a text query, scored as the model's head scores an image-text pair."""
    _check(loaded, index)
    text = (text or "").strip()
    if not text:
        raise ValueError("Type what to search for.")
    query = encode_texts(loaded, [text]).cpu().numpy()[0]
    sims, top = (neighbours or index.neighbours()).search(query, k)
    scale = float(loaded.model.logit_scale.exp())
    if loaded.adapter.label_activation == "sigmoid":
        bias = float(loaded.model.logit_bias)
        scores = 1 / (1 + np.exp(-(sims[0] * scale + bias)))
    else:  # the softmax over the whole collection, not only the top k
        all_logits = index.embeddings @ query * scale
        log_z = float(np.logaddexp.reduce(all_logits))
        scores = np.exp(sims[0] * scale - log_z)
    return [Hit(r, int(i), index.entries[i]["name"], index.entries[i]["path"], float(s), float(c))
            for r, (i, s, c) in enumerate(zip(top[0], scores, sims[0]))]


def search_image(loaded: LoadedModel, index: ImageIndex, image: Image.Image, k: int = 10,
                 neighbours: Neighbours | None = None) -> list[Hit]:
    """The top-k images most similar to `image` (cosine similarity of the embeddings)."""
    _check(loaded, index)
    query = encode_images(loaded, [image]).cpu().numpy()[0]
    sims, top = (neighbours or index.neighbours()).search(query, k)
    return [Hit(r, int(i), index.entries[i]["name"], index.entries[i]["path"], float(c), float(c))
            for r, (i, c) in enumerate(zip(top[0], sims[0]))]


def explain_text_match(loaded: LoadedModel, image: Image.Image, text: str, method: str = "relevancy",
                       **params) -> PatchHeatmap:
    """Why `image` matched `text`: the heatmap of the text's score on the image (any explanation method)."""
    from .explain import explain

    return explain(loaded, image, {"label": text, "labels": [text]}, method, **params)


@torch.no_grad()
def patch_features(loaded: LoadedModel, image: Image.Image) -> tuple[torch.Tensor, "object"]:
    """(patches, D) L2-normalised last-layer patch features of the vision tower (after its final norm), and
    the processor view of the image."""
    from .patches import processor_view, vision_grid

    if not loaded.adapter.fixed_grid:
        raise ValueError(f"{loaded.name} has no fixed patch grid")
    grid = vision_grid(loaded)
    pixels = loaded.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    vision = loaded.adapter.vision_tower(loaded.model)
    out = vision(pixel_values=pixels.to(loaded.device, loaded.dtype))
    hidden = out.last_hidden_state[0, grid.prefix_tokens:]
    norm = getattr(vision, "post_layernorm", None)
    if norm is not None and not loaded.adapter.patch_states_normed:
        hidden = norm(hidden)  # CLIP's tower normalises only the pooled CLS token: its patches get the same norm
    return torch.nn.functional.normalize(hidden.float(), dim=-1), processor_view(loaded, image)


def explain_image_match(loaded: LoadedModel, query: Image.Image, hit: Image.Image) -> tuple[PatchHeatmap, list]:
    """Why `hit` matched the query image: per patch of the hit, its best cosine similarity to any patch of
    the query, and for each hit patch the (row, col) of that best query patch."""
    from .patches import vision_grid

    grid = vision_grid(loaded)
    q, _ = patch_features(loaded, query)
    h, view = patch_features(loaded, hit)
    sims = h @ q.T  # (hit patches, query patches)
    best, which = sims.max(1)
    best, which = best.cpu(), which.cpu()
    values = best.reshape(grid.rows, grid.cols).double().numpy()
    pairs = [[divmod(int(w), grid.cols) for w in which.reshape(grid.rows, grid.cols)[r]] for r in range(grid.rows)]
    return PatchHeatmap(values, "patch_match", {"query": "image"}, view.box, view.original_size,
                        {"rule": "max cosine similarity to a query patch"}, loaded.name), pairs


def retrieval_metrics(ranks: list[int], ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """recall@k and mean reciprocal rank from each query's 0-based rank of its right answer."""
    r = np.asarray(ranks)
    out = {f"recall@{k}": float(np.mean(r < k)) for k in ks}
    out["mrr"] = float(np.mean(1.0 / (r + 1)))
    return out


def shapes_retrieval(model: str, seed: int, n: int = 1000, size: int = 64, batch: int = 100) -> dict:
    """recall@1/5/10 and MRR on ShapesWorld: `n` fresh scenes are the collection, each scene's caption
    is a query whose right answer is that scene. Chance: recall@k = k / n."""
    from .models import load_model
    from .shapes.evaluate import _check_seeds
    from .shapes.world import make_scene

    _check_seeds(seed, n)
    loaded = load_model(model)
    scenes = [make_scene(seed + i) for i in range(n)]
    images = np.concatenate([encode_images(loaded, [s.render(size) for s in scenes[i:i + batch]]).cpu().numpy()
                             for i in range(0, n, batch)])
    texts = np.concatenate([encode_texts(loaded, [s.caption for s in scenes[i:i + batch]]).cpu().numpy()
                            for i in range(0, n, batch)])
    sims = texts @ images.T  # (queries, images)
    ranks = [int((row > row[i]).sum()) for i, row in enumerate(sims)]  # ties count in the query's favour
    result = {"model": model, "seed": seed, "n": n, "metrics": retrieval_metrics(ranks)}
    result["chance"] = {f"recall@{k}": k / n for k in (1, 5, 10)} | {"mrr": float(np.mean(1 / np.arange(1, n + 1)))}
    return result
