"""Qwen2-VL: the image resized to whole merged cells (its grid follows the image), 14-px patches in
merge-window order, 2 x 2 patches merged into one language-model token, 3-D rotary positions."""

from __future__ import annotations

import torch

from ..patches import PatchGrid, native_view, qwen_canvas, qwen_grid, qwen_layout, qwen_patchify
from .base import Family


class Qwen2VLFamily(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    chat = True
    fixed_grid = False  # the grid follows each image's size

    answer_token_inputs = {"mm_token_type_ids": 0}  # 0 = text, 1 = image

    def vision_tower(self, model):
        return model.model.visual

    def vision_blocks(self, vision):
        return vision.blocks

    def patch_embedding(self, vision):
        return None  # the forward patchifies the resized image (`qwen_patchify`): integrated gradients on pixels

    def vision_grid(self, loaded) -> PatchGrid:
        raise ValueError(f"{loaded.name}'s patch grid follows each image's size: read processor_view(...).grid")

    def processor_view(self, loaded, image):
        return native_view(loaded, image)

    def grid_view(self, grid, layout):
        """(B * patches, D) in merge-window order (block row, block col, i, j) <-> (B, D, rows, cols)."""
        m = layout.merge

        def to_grid(tokens):
            b = tokens.shape[0] // grid.n_patches
            windows = tokens.reshape(b, grid.rows // m, grid.cols // m, m, m, -1)
            return windows.permute(0, 5, 1, 3, 2, 4).reshape(b, -1, grid.rows, grid.cols)

        def from_grid(x, tokens):
            b, d = x.shape[:2]
            return x.reshape(b, d, grid.rows // m, m, grid.cols // m, m).permute(0, 2, 4, 3, 5, 1).reshape(-1, d)

        return to_grid, from_grid

    def answer_sequence(self, loaded, inputs, answer_ids):
        """The resized image as the pixel input (turned into patches on every pass, so that Captum perturbs
        an image), and the multimodal rotary positions of prompt + answer computed once (analysis passes
        never touch the `rope_deltas` a running generation shares)."""
        from ..chat import AnswerSequence, join_answer

        prompt_ids, ids = join_answer(inputs, answer_ids)
        grid_thw = inputs["image_grid_thw"]
        layout = qwen_layout(loaded, prompt_ids, grid_thw)
        image_positions = (ids[0] == loaded.model.config.image_token_id).nonzero().flatten()
        if image_positions.tolist() != list(layout.positions):
            raise ValueError("the answer holds image tokens")
        ip = loaded.processor.image_processor
        p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        canvas = qwen_canvas(inputs["pixel_values"], grid_thw[0], p, m, t)
        types = torch.zeros_like(ids)
        types[0, : len(prompt_ids)] = inputs["mm_token_type_ids"][0]
        position_ids, _ = loaded.model.model.get_rope_index(ids, types, image_grid_thw=grid_thw,
                                                            attention_mask=torch.ones_like(ids))
        return AnswerSequence(ids, canvas, len(prompt_ids), image_positions, layout, qwen_grid(grid_thw[0], p),
                              image_extra={"image_grid_thw": grid_thw}, position_ids=position_ids,
                              to_model=lambda x: qwen_patchify(x, p, m, t))

    def language_tokens_note(self, loaded, grid, n_image_tokens: int) -> str:
        m = loaded.model.config.vision_config.spatial_merge_size
        return (f"The grid follows your image: the processor resized it to whole {grid.patch_size * m} px cells instead "
                f"of one fixed size. Before the language model, the merger joins {m} x {m} neighbouring patches into "
                f"one token: the image is **{n_image_tokens} tokens** ({grid.rows // m} x {grid.cols // m}) between "
                "`<|vision_start|>` and `<|vision_end|>`.")


FAMILY = Qwen2VLFamily()
