"""Image files crafted byte by byte for the tests."""

from __future__ import annotations

import struct
import zlib


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb's calling card)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def scene_folder(folder, first_seed: int, n: int, size: int = 96):
    """`folder` holding n ShapesWorld scenes (scene_00.png, ...) and one unreadable broken.png."""
    from mmie_core.shapes.world import make_scene

    for i in range(n):
        make_scene(first_seed + i).render(size).save(folder / f"scene_{i:02d}.png")
    (folder / "broken.png").write_text("not an image")
    return folder
