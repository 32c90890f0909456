"""ShapesWorld: deterministic procedural scenes of coloured shapes with ground truth.

A scene is defined in normalised coordinates (0..1) from a seed, so the same seed gives the
same scene at every rendering size. Every object knows its colour, shape, size, position name
(a cell of a 3x3 layout) and pixel box, which is what makes heatmaps checkable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (34, 150, 60),
    "blue": (40, 80, 220),
    "yellow": (232, 196, 20),
    "purple": (135, 55, 175),
    "orange": (245, 125, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, float] = {"small": 0.085, "large": 0.135}  # radius as a fraction of the image side
# 3x3 layout, reading order; cell k is (row k // 3, col k % 3).
POSITIONS: tuple[str, ...] = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
QA_TYPES: tuple[str, ...] = ("color", "shape", "count", "position", "existence")
MAX_OBJECTS = 3
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges at every size
JITTER = 0.035  # max offset of an object's centre from its cell centre (fraction of the side)


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene, in normalised coordinates."""

    color: str
    shape: str
    size: str
    position: str  # one of POSITIONS
    cx: float  # centre x in 0..1
    cy: float  # centre y in 0..1
    rgb: tuple[int, int, int]  # exact fill colour (a small jitter around COLORS[color])

    @property
    def phrase(self) -> str:
        """The plain label of the object, e.g. "red circle"."""
        return f"{self.color} {self.shape}"

    def box(self, size: int) -> list[int]:
        """Tight pixel box [x0, y0, x1, y1] (x1, y1 exclusive) of the drawn shape at `size` px."""
        x0, y0, x1, y1 = _extent(self)
        return [
            max(0, int(x0 * size)),
            max(0, int(y0 * size)),
            min(size, int(round(x1 * size + 0.4999))),
            min(size, int(round(y1 * size + 0.4999))),
        ]


@dataclass
class Scene:
    """A ShapesWorld scene: background, objects and the seed that made it."""

    seed: int
    background: tuple[int, int, int]
    objects: list[ShapeObject] = field(default_factory=list)

    def render(self, size: int = 64) -> Image.Image:
        """Render the scene as an RGB image of `size` x `size` pixels."""
        big = size * SUPERSAMPLE
        img = Image.new("RGB", (big, big), self.background)
        draw = ImageDraw.Draw(img)
        for obj in self.objects:
            _draw(draw, obj, big, obj.rgb)
        return img.resize((size, size), Image.Resampling.LANCZOS)

    def masks(self, size: int = 64) -> np.ndarray:
        """(size, size) int segment map: 0 = background, k + 1 = `sorted_objects()[k]` (a pixel belongs to an
        object when at least half of it is covered by the drawn shape)."""
        out = np.zeros((size, size), dtype=np.int64)
        for k, obj in enumerate(self.sorted_objects()):
            big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
            _draw(ImageDraw.Draw(big), obj, size * SUPERSAMPLE, 255)
            cover = np.asarray(big.resize((size, size), Image.Resampling.BOX))
            out[cover >= 128] = k + 1
        return out

    @property
    def caption(self) -> str:
        """Objects in reading order, e.g. "a large red circle at the top left and a ... ."."""
        parts = [f"a {o.size} {o.color} {o.shape} at the {o.position}" for o in self.sorted_objects()]
        return _join(parts) + "."

    @property
    def alt_text(self) -> str:
        """A concise alt text: what is there, without positions or sizes."""
        return _join([f"a {o.color} {o.shape}" for o in self.sorted_objects()]) + "."

    def sorted_objects(self) -> list[ShapeObject]:
        return sorted(self.objects, key=lambda o: POSITIONS.index(o.position))

    def qa(self) -> list[dict]:
        """Unambiguous question/answer pairs about the scene (see QA_TYPES)."""
        return make_qa(self)

    def to_json(self, size: int, file: str | None = None) -> dict:
        """The `scenes.json` record of this scene rendered at `size` px."""
        return {
            "file": file,
            "seed": self.seed,
            "size": size,
            "caption": self.caption,
            "objects": [
                {"color": o.color, "shape": o.shape, "size": o.size, "position": o.position, "box": o.box(size)}
                for o in self.sorted_objects()
            ],
            "qa": self.qa(),
        }


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, side: int, fill) -> None:
    if obj.shape == "circle":
        draw.ellipse(_ellipse_box(obj, side), fill=fill)
    else:
        draw.polygon(_outline(obj, side), fill=fill)


def _radius(obj: ShapeObject) -> float:
    return SIZES[obj.size]


def _outline(obj: ShapeObject, side: int) -> list[tuple[float, float]]:
    """Polygon vertices in pixels for square, triangle and diamond."""
    r = _radius(obj)
    cx, cy = obj.cx, obj.cy
    if obj.shape == "square":
        h = r * 0.82  # similar area to the circle of the same size
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif obj.shape == "triangle":
        pts = [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    elif obj.shape == "diamond":
        pts = [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    else:
        raise ValueError(f"unknown polygon shape {obj.shape!r}")
    return [(x * side, y * side) for x, y in pts]


def _ellipse_box(obj: ShapeObject, side: int) -> list[float]:
    r = _radius(obj) * 0.92
    return [(obj.cx - r) * side, (obj.cy - r) * side, (obj.cx + r) * side, (obj.cy + r) * side]


def _extent(obj: ShapeObject) -> tuple[float, float, float, float]:
    """Normalised bounds of the drawn shape."""
    if obj.shape == "circle":
        x0, y0, x1, y1 = _ellipse_box(obj, 1)
        return x0, y0, x1, y1
    pts = _outline(obj, 1)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def make_scene(seed: int, n_objects: int | None = None) -> Scene:
    """The scene of `seed`: 1 to 3 objects (or exactly `n_objects`), each a distinct colour+shape."""
    if n_objects is not None and not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be between 1 and {MAX_OBJECTS}, got {n_objects}")
    rng = random.Random(f"shapesworld-{seed}")
    n = n_objects if n_objects is not None else rng.randint(1, MAX_OBJECTS)
    background = tuple(rng.randint(222, 255) for _ in range(3))
    cells = rng.sample(range(len(POSITIONS)), n)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    objects = []
    for cell, (color, shape) in zip(cells, kinds):
        row, col = divmod(cell, 3)
        base = COLORS[color]
        rgb = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in base)
        objects.append(
            ShapeObject(
                color=color,
                shape=shape,
                size=rng.choice(list(SIZES)),
                position=POSITIONS[cell],
                cx=(col + 0.5) / 3 + rng.uniform(-JITTER, JITTER),
                cy=(row + 0.5) / 3 + rng.uniform(-JITTER, JITTER),
                rgb=rgb,  # type: ignore[arg-type]
            )
        )
    return Scene(seed=seed, background=background, objects=objects)  # type: ignore[arg-type]


def make_qa(scene: Scene) -> list[dict]:
    """Question/answer pairs whose answer is fixed by the ground truth.

    Objects are referred to by a property that is unique in the scene (falling back to the
    position, always unique), so that no question has two right answers. A question about one
    object names it: `object` is its index in `scene.sorted_objects()` (colour, shape and position
    questions), so the object is known from the question, never guessed from the answer word.
    """
    rng = random.Random(f"qa-{scene.seed}")
    objs = scene.sorted_objects()
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    color_counts = {c: sum(o.color == c for o in objs) for c in COLORS}
    qa: list[dict] = []
    for k, o in enumerate(objs):
        if shape_counts[o.shape] == 1:
            q = f"what color is the {o.shape}?"
        else:
            q = f"what color is the {o.shape} at the {o.position}?"
        qa.append({"type": "color", "question": q, "answer": o.color, "object": k})
        if color_counts[o.color] == 1:
            q = f"what shape is the {o.color} object?"
        else:
            q = f"what shape is at the {o.position}?"
        qa.append({"type": "shape", "question": q, "answer": o.shape, "object": k})
        qa.append({"type": "position", "question": f"where is the {o.color} {o.shape}?", "answer": o.position,
                   "object": k})
    qa.append({"type": "count", "question": "how many shapes are there?", "answer": NUMBER_WORDS[len(objs)]})
    if rng.random() < 0.5:
        s = rng.choice(SHAPES)
        qa.append({"type": "count", "question": f"how many {s}s are there?", "answer": NUMBER_WORDS[shape_counts[s]]})
    else:
        c = rng.choice(list(COLORS))
        qa.append(
            {"type": "count", "question": f"how many {c} shapes are there?", "answer": NUMBER_WORDS[color_counts[c]]}
        )
    present = rng.choice(objs)
    qa.append({"type": "existence", "question": f"is there a {present.phrase}?", "answer": "yes"})
    qa.append({"type": "existence", "question": f"is there a {_absent_phrase(scene, rng)}?", "answer": "no"})
    return qa


def _absent_phrase(scene: Scene, rng: random.Random) -> str:
    """A colour+shape absent from the scene, sharing the colour or shape of a present one."""
    present = {(o.color, o.shape) for o in scene.objects}
    anchor = rng.choice(scene.objects)
    near = [(anchor.color, s) for s in SHAPES] + [(c, anchor.shape) for c in COLORS]
    candidates = [k for k in near if k not in present]
    color, shape = rng.choice(candidates)
    return f"{color} {shape}"


def all_labels() -> list[str]:
    """Every colour x shape phrase, e.g. "red circle", in a fixed order."""
    return [f"{c} {s}" for c in COLORS for s in SHAPES]



CHANGES: tuple[str, ...] = ("color", "shape", "position")


def counterfactual(scene: Scene, index: int, change: str, seed: int = 0) -> Scene:
    """The same scene with one object (`scene.sorted_objects()[index]`) changed and everything else
    identical (background, the other objects, and this object's size, jitter and colour offset):
    - "color": another colour (its fill keeps the same offset from the palette colour);
    - "shape": another shape;
    - "position": another free cell of the 3x3 layout (the same offset from the cell centre).
    The new colour+shape is one no other object has; the choice among the allowed values is fixed by
    `seed`. A question that names an object by its colour (or shape) alone can become ambiguous when
    another object already has the new colour (or shape): change the property the question asks about
    (as the causal evaluation does) to keep it unambiguous."""
    if change not in CHANGES:
        raise ValueError(f"change must be one of {', '.join(CHANGES)}, not {change!r}")
    objects = scene.sorted_objects()
    if not 0 <= index < len(objects):
        raise ValueError(f"object {index} is not in the scene (it has {len(objects)})")
    obj = objects[index]
    others = [o for k, o in enumerate(objects) if k != index]
    taken = {(o.color, o.shape) for o in others}
    rng = random.Random(f"counterfactual-{scene.seed}-{index}-{change}-{seed}")
    if change == "color":
        color = rng.choice([c for c in COLORS if c != obj.color and (c, obj.shape) not in taken])
        offset = [v - b for v, b in zip(obj.rgb, COLORS[obj.color])]
        rgb = tuple(min(255, max(0, b + d)) for b, d in zip(COLORS[color], offset))
        new = ShapeObject(color, obj.shape, obj.size, obj.position, obj.cx, obj.cy, rgb)  # type: ignore[arg-type]
    elif change == "shape":
        shape = rng.choice([s for s in SHAPES if s != obj.shape and (obj.color, s) not in taken])
        new = ShapeObject(obj.color, shape, obj.size, obj.position, obj.cx, obj.cy, obj.rgb)
    else:
        used = {o.position for o in others} | {obj.position}
        cell = rng.choice([k for k, p in enumerate(POSITIONS) if p not in used])
        old_row, old_col = divmod(POSITIONS.index(obj.position), 3)
        row, col = divmod(cell, 3)
        new = ShapeObject(obj.color, obj.shape, obj.size, POSITIONS[cell], obj.cx + (col - old_col) / 3,
                          obj.cy + (row - old_row) / 3, obj.rgb)
    changed = [new if o is obj else o for o in scene.objects]
    return Scene(seed=scene.seed, background=scene.background, objects=changed)
