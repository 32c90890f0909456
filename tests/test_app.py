"""The studio launched in-process and driven through gradio_client, as a user script would."""

from __future__ import annotations

import json

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def client():
    from gradio_client import Client

    import app

    app.demo.queue(default_concurrency_limit=1, max_size=64)
    app.demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    try:
        yield Client(app.demo.local_url, verbose=False)
    finally:
        app.demo.close()


def example(i: int = 0) -> str:
    from studio.common import example_images

    return example_images()[i]


def test_patches_endpoint(client):
    from gradio_client import handle_file

    original, model_input, summary, info = client.predict(
        handle_file(example()), "shapes-clip", True, api_name="/patches"
    )
    info = info if isinstance(info, dict) else json.loads(info)
    assert info["grid"] == [8, 8] and info["patch_tokens"] == 64 and info["prefix_tokens"] == 1
    assert info["input_size"] == [64, 64] and info["original_size"] == [256, 256]
    assert "8 x 8 grid" in summary and "64 patch tokens" in summary
    assert Image.open(original).size == (512, 512)
    assert Image.open(model_input).size == (512, 512)


def test_patches_endpoint_vlm_and_siglip(client):
    from gradio_client import handle_file

    *_, info = client.predict(handle_file(example(1)), "shapes-vlm", False, api_name="/patches")
    assert info["language_model_image_tokens"] == 64
    *_, info = client.predict(handle_file(example(1)), "shapes-siglip", False, api_name="/patches")
    assert info["prefix_tokens"] == 0 and info["vision_tokens"] == 64


def test_patches_bad_input_is_a_clear_error_and_app_keeps_serving(client, tmp_path):
    from gradio_client import handle_file

    bogus = tmp_path / "notes.png"
    bogus.write_text("this is not an image")
    with pytest.raises(Exception) as err:
        client.predict(handle_file(str(bogus)), "shapes-clip", False, api_name="/patches")
    assert "Traceback" not in str(err.value)
    with pytest.raises(Exception) as err:
        client.predict(None, "shapes-clip", False, api_name="/patches")
    assert "No image" in str(err.value)
    *_, info = client.predict(handle_file(example()), "shapes-clip", False, api_name="/patches")
    assert info["grid"] == [8, 8]
