"""Hostile and odd inputs through every endpoint: a clear message or a correct result, never a
traceback, and the studio keeps answering. Plus property-based fuzzing of the image door and the
label parser."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imagefiles import png_declaring

from mmie_core.images import ImageInputError, load_image
from mmie_core.zero_shot import parse_labels


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def hostile_images() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, "error" | "ok"): what the studio must do with it."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    png, jpg = _encode(noise, "PNG"), _encode(noise, "JPEG")
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 0, 255)]]
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
    return {
        "zero_bytes.png": (b"", "error"),
        "random_bytes.png": (rng.integers(0, 255, 4096, dtype=np.uint8).tobytes(), "error"),
        "truncated.png": (png[: len(png) // 2], "error"),
        "truncated.jpg": (jpg[: len(jpg) // 2], "error"),
        "text_renamed.png": (b"hello, this is a text file\n" * 10, "error"),
        "drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>', "error"),
        "page.html": (b"<!DOCTYPE html><html><body><img src=x></body></html>", "error"),
        "document.pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\n", "error"),
        "one_by_one.png": (_encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), "ok"),
        "one_by_100000.png": (_encode(Image.new("L", (1, 100_000)), "PNG"), "error"),
        "declares_50000x50000.png": (png_declaring(50_000, 50_000), "error"),
        "sixteen_bit.png": (_encode(Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)), "PNG"), "ok"),
        "cmyk.jpg": (_encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), "ok"),
        "palette_transparent.png": (_encode(palette, "PNG", transparency=1), "ok"),
        "la.png": (_encode(Image.new("LA", (32, 32), (80, 128)), "PNG"), "ok"),
        "animated.gif": (_encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0), "ok"),
        "animated.webp": (_encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], loop=0), "ok"),
        "exif_rotated.jpg": (_encode(Image.new("RGB", (40, 20), (0, 128, 0)), "JPEG", exif=exif.tobytes()), "ok"),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("hostile")
    out = {}
    for name, (data, expect) in hostile_images().items():
        path = folder / name
        path.write_bytes(data)
        out[name] = (path, expect)
    return out


def _call(client, *args, api_name):
    """(result, None) or (None, error message)."""
    try:
        return client.predict(*args, api_name=api_name), None
    except Exception as err:  # noqa: BLE001 - the message is what we check
        return None, str(err)


def _assert_clear(message: str) -> None:
    assert "Traceback" not in message and 'File "' not in message, message
    assert "verbose error reporting" not in message, f"unexplained failure: {message}"


def _check(error: str | None, expect: str, label: str) -> None:
    """An expected refusal must be a clear message; an expected success must not fail."""
    if expect == "error":
        assert error is not None, f"{label} was accepted"
        _assert_clear(error)
    else:
        assert error is None, f"{label} failed: {error}"


def _sanity(client) -> None:
    from gradio_client import handle_file

    from studio.common import example_images

    *_, info = client.predict(handle_file(example_images()[0]), "shapes-clip", False, api_name="/patches")
    assert info["grid"] == [8, 8]


IMAGE_CALLS = {
    "/patches": lambda f: (f, "shapes-clip", False),
    "/classify": lambda f: (f, "a red circle, a blue square", "shapes-clip", "preset", "", False),
    "/chat": lambda f: (f, "what color is the circle?", [], "shapes-vlm", 8, 0.0, 1.0),
    "/alt_text": lambda f: (f, "concise", "", 125, "shapes-vlm"),
}


@pytest.mark.parametrize("endpoint", list(IMAGE_CALLS))
def test_hostile_images_through_every_image_endpoint(client, corpus, endpoint):
    from gradio_client import handle_file

    for name, (path, expect) in corpus.items():
        _, error = _call(client, *IMAGE_CALLS[endpoint](handle_file(str(path))), api_name=endpoint)
        _check(error, expect, f"{endpoint} {name}")
    _sanity(client)


def test_hostile_text_inputs(client):
    from gradio_client import handle_file

    from studio.common import example_images

    img = handle_file(example_images()[0])
    huge = "what " * 20_000  # 100k characters
    cases = [
        ("/classify", (img, "", "shapes-clip", "preset", "", False), "error"),
        ("/classify", (img, "\n".join(f"label {i}" for i in range(5000)), "shapes-clip", "preset", "", False), "error"),
        ("/classify", (img, "un cercle rouge 🔴, דבר, \u202egnirts, \x00\x07bell", "shapes-clip", "preset", "", False), "ok"),
        ("/classify", (img, huge, "shapes-clip", "preset", "", False), "error"),
        ("/classify", (img, "a red circle", "shapes-clip", "single", "no placeholder", False), "error"),
        ("/classify", (img, "a red circle", "no-such-model", "preset", "", False), "error"),
        ("/classify", (img, "a red circle", "shapes-vlm", "preset", "", False), "error"),
        ("/chat", (img, huge, [], "shapes-vlm", 8, 0.0, 1.0), "error"),
        ("/chat", (img, "", [], "shapes-vlm", 8, 0.0, 1.0), "error"),
        ("/chat", (None, "what color is the circle?", [], "shapes-vlm", 8, 0.0, 1.0), "error"),
        ("/chat", (img, "what? 🟥 \u202e \x00\x1b[31m", [], "shapes-vlm", 8, 0.0, 1.0), "ok"),
        ("/chat", (img, "how many shapes are there?", [], "shapes-vlm", 0, 0.0, 1.0), "error"),
        ("/chat", (img, "how many shapes are there?", [], "shapes-vlm", 10**6, 0.0, 1.0), "error"),
        ("/chat", (img, "how many shapes are there?", [], "shapes-vlm", 8, -1.0, 1.0), "error"),
        ("/chat", (img, "how many shapes are there?", [], "shapes-clip", 8, 0.0, 1.0), "error"),
        ("/explain_token", (img, {"token_ids": [5], "question": "q"}, "7: x", "shapes-vlm", "attention",
                            "inferno", 0.6, "blocks"), "error"),
        ("/explain_token", (img, None, "0: x", "shapes-vlm", "attention", "inferno", 0.6, "blocks"), "error"),
        ("/explain_label", (img, "a red circle", "a red circle", "shapes-clip", "magic", "preset", "", "inferno",
                            0.6, "blocks"), "error"),
        ("/explain_label", (img, "a red circle", "a red circle", "shapes-clip", "relevancy", "preset", "", "nocmap",
                            0.6, "blocks"), "error"),
        ("/explain_label", (img, "a red circle", "a red circle", "shapes-clip", "relevancy", "preset", "", "inferno",
                            7.0, "blocks"), "error"),
        ("/alt_text", (img, "poetic", "", 125, "shapes-vlm"), "error"),
        ("/alt_text", (img, "functional", "x" * 5000, 125, "shapes-vlm"), "error"),
        ("/alt_text", (img, "concise", "", 3, "shapes-vlm"), "error"),
        ("/check_alt_text", ("", None, 125), "ok"),
        ("/check_alt_text", (huge, None, 125), "ok"),
        ("/inspect", (img, "shapes-clip", 99, 0.0, "inferno", 0.6, "blocks"), "error"),
        ("/inspect", (img, "shapes-clip", 1, 1.5, "inferno", 0.6, "blocks"), "error"),
    ]
    for endpoint, args, expect in cases:
        _, error = _call(client, *args, api_name=endpoint)
        _check(error, expect, f"{endpoint} {str(args[1])[:40]!r}")
    _sanity(client)


# --------------------------------------------------------------------------- property-based


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_image_door_never_fails_unclearly_on_bytes(data):
    try:
        img = load_image(data)
    except ImageInputError as err:
        assert str(err)
    else:
        assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 64), st.integers(1, 64),
    st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "F", "1"]),
    st.sampled_from(["PNG", "TIFF", "WEBP", "GIF", "BMP", "JPEG"]),
)
def test_image_door_converts_every_mode(width, height, mode, fmt):
    img = Image.new(mode, (width, height))
    try:
        data = _encode(img, fmt)
        Image.open(io.BytesIO(data)).load()
    except (OSError, ValueError, KeyError):
        return  # Pillow cannot store (or read back) this mode in this format: nothing to test
    try:
        out = load_image(data)
    except ImageInputError as err:  # only the aspect-ratio guard may refuse a valid image
        assert "aspect ratio" in str(err)
    else:
        assert out.mode == "RGB" and out.size == (width, height)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_label_parser_gives_labels_or_a_clear_error(text):
    try:
        labels = parse_labels(text)
    except ValueError as err:
        assert str(err)
    else:
        assert labels and len(labels) == len(set(labels))
        assert all(label == label.strip() and label for label in labels)
        assert all(ord(c) >= 32 or c in "\t" for label in labels for c in label)


# --------------------------------------------------------------------------- security


def _raw_call(url: str, endpoint: str, data: list) -> str:
    """Call an endpoint over plain HTTP (no client-side upload) and return the event stream text."""
    import json
    import urllib.request

    req = urllib.request.Request(f"{url}gradio_api/call/{endpoint}", data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        event_id = json.loads(resp.read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{endpoint}/{event_id}", timeout=60) as resp:
        return resp.read().decode("utf-8", "replace")


def test_no_endpoint_reads_a_server_path(studio_url):
    secret = Path(__file__).resolve().parent.parent / "app.py"
    for path in ["/etc/passwd", str(secret)]:
        stream = _raw_call(studio_url, "patches", [{"path": path, "meta": {"_type": "gradio.FileData"}},
                                                  "shapes-clip", False])
        assert "event: error" in stream and "root:" not in stream and "build_demo" not in stream


def test_file_route_serves_no_repository_or_system_file(studio_url):
    import urllib.error
    import urllib.request

    for path in ["/etc/passwd", str(Path(__file__).resolve().parent.parent / "app.py")]:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{studio_url}gradio_api/file={path}", timeout=10)
        assert err.value.code in (403, 404)
