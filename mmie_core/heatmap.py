"""PatchHeatmap: the one data type that carries a heatmap everywhere (renderers, metrics, API)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PatchHeatmap:
    """Values over a model's patch grid, with what produced them and where they sit in the image."""

    values: np.ndarray  # (rows, cols) float; larger = more important
    method: str  # e.g. "attention", "rollout", "relevancy", "integrated_gradients"
    target: dict  # {"label": ...} or {"token_index": i, "token": "red", "question": ...}
    box: tuple[float, float, float, float]  # region of the original image the grid covers (x0, y0, x1, y1)
    image_size: tuple[int, int]  # original (width, height)
    params: dict = field(default_factory=dict)  # the method's parameters
    model: str = ""
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.ndim != 2:
            raise ValueError(f"PatchHeatmap values must be (rows, cols), got shape {self.values.shape}")
        if not np.all(np.isfinite(self.values)):
            raise ValueError(f"{self.method} produced non-finite values")

    @property
    def grid(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]

    def normalized(self) -> np.ndarray:
        """Values scaled to 0..1 (a constant map gives zeros)."""
        lo, hi = float(self.values.min()), float(self.values.max())
        if hi - lo < 1e-12:
            return np.zeros_like(self.values)
        return (self.values - lo) / (hi - lo)

    def argmax(self) -> tuple[int, int]:
        """(row, col) of the largest value."""
        r, c = np.unravel_index(int(np.argmax(self.values)), self.values.shape)
        return int(r), int(c)

    def patch_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Pixel box of patch (row, col) in the original image."""
        return cell_box(self.box, *self.grid, row, col)

    def to_json(self) -> dict:
        """Plain JSON: grid values and metadata."""
        return {
            "method": self.method,
            "model": self.model,
            "target": self.target,
            "params": {k: _jsonable(v) for k, v in self.params.items()},
            "grid": list(self.grid),
            "values": np.round(self.values, 6).tolist(),
            "box": [round(float(v), 2) for v in self.box],
            "image_size": list(self.image_size),
            "seconds": round(self.seconds, 4),
        }

    @classmethod
    def from_json(cls, data: dict) -> "PatchHeatmap":
        return cls(
            values=np.asarray(data["values"], dtype=np.float64),
            method=data["method"],
            target=data.get("target", {}),
            box=tuple(data["box"]),  # type: ignore[arg-type]
            image_size=tuple(data["image_size"]),  # type: ignore[arg-type]
            params=data.get("params", {}),
            model=data.get("model", ""),
            seconds=data.get("seconds", 0.0),
        )


def cell_box(box: tuple[float, float, float, float], rows: int, cols: int, row: int,
             col: int) -> tuple[float, float, float, float]:
    """Box of cell (row, col) when `box` (x0, y0, x1, y1) is cut into a rows x cols grid: the one
    place that turns a patch index into pixels of the original image."""
    x0, y0, x1, y1 = box
    w, h = (x1 - x0) / cols, (y1 - y0) / rows
    return (x0 + col * w, y0 + row * h, x0 + (col + 1) * w, y0 + (row + 1) * h)


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
