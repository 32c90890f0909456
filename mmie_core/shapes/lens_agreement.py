"""Does the logit lens read an object's words off its patches? Measured on ShapesWorld.

For every object of every scene, the patches whose centre lies in the object's box are decoded
by the logit lens at each depth of the language model. Per depth:
- `color` / `shape`: share of those patches whose top word is the object's colour / shape;
- `either`: share naming the object's colour or shape;
- `other_object_word`: share naming a colour or shape word that is not this object's (a word
  of the scene's vocabulary, read off the wrong patch);
- `background_object_word`: share of patches outside every object whose top word is a colour or
  shape word (how often the lens names an object where there is none).
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from ..lens import DEFAULT_QUESTION, logit_lens
from ..models import load_model
from ..patches import patches_in_box, vision_grid
from .evaluate import EVAL_RENDER_SIZE, _check_seeds
from .world import COLORS, SHAPES, make_scene

OBJECT_WORDS = set(COLORS) | set(SHAPES)


def logit_lens_agreement(model: str, seed: int, n: int, size: int = EVAL_RENDER_SIZE,
                         question: str = DEFAULT_QUESTION) -> dict:
    """Per-depth rates (see the module docstring) over `n` scenes from `seed`."""
    _check_seeds(seed, n)
    loaded = load_model(str(model))
    grid = vision_grid(loaded)
    color = shape = either = other = background = None
    n_obj = n_bg = 0
    layers: list[int] = []
    for i in tqdm(range(n), desc="logit lens", leave=False):
        scene = make_scene(seed + i)
        image = scene.render(size)
        lens = logit_lens(loaded, image, question, top_k=1)
        layers = lens.layers
        words = np.array([[[cell[0].lower() for cell in row] for row in depth] for depth in lens.words])  # (D, R, C)
        if color is None:
            color, shape, either, other, background = (np.zeros(len(layers)) for _ in range(5))
        inside = np.zeros((grid.rows, grid.cols), dtype=bool)
        for obj in scene.objects:
            cells = patches_in_box(lens.box, grid, tuple(obj.box(size)))  # the lens knows its grid's box
            for r, c in cells:
                inside[r, c] = True
                w = words[:, r, c]  # (D,)
                is_color, is_shape = w == obj.color, w == obj.shape
                color += is_color
                shape += is_shape
                either += is_color | is_shape
                other += np.isin(w, list(OBJECT_WORDS)) & ~(is_color | is_shape)
            n_obj += len(cells)
        bg = words[:, ~inside]  # (D, background patches)
        background += np.isin(bg, list(OBJECT_WORDS)).sum(-1)
        n_bg += bg.shape[1]

    def rates(x):
        return [round(float(v), 4) for v in x / max(1, n_obj)]

    return {
        "model": str(model), "seed": seed, "n": n, "question": question, "layers": layers,
        "object_patches": n_obj, "background_patches": n_bg,
        "color": rates(color), "shape": rates(shape), "either": rates(either),
        "other_object_word": rates(other),
        "background_object_word": [round(float(v), 4) for v in background / max(1, n_bg)],
    }
