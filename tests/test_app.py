"""The studio launched in-process and driven through gradio_client, as a user script would."""

from __future__ import annotations

import json

import pytest
from PIL import Image


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


@pytest.mark.parametrize("how", ["flag", "env"])
def test_python_app_py_serves_on_the_requested_port(how, tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    cmd = [sys.executable, "app.py"]
    if how == "flag":
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
    else:
        env["PORT"] = str(port)
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                    assert resp.status == 200
                    assert "MMIE Studio" in resp.read().decode("utf-8", "replace")
                    return
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(proc.stderr.read().decode()[-2000:])
                time.sleep(0.5)
        pytest.fail("the app did not answer within 90 s")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_inspect_endpoint_returns_heatmaps_as_json(client):
    from gradio_client import handle_file

    gallery, focus, rollout_png, pca, data, files = client.predict(
        handle_file(example(2)), "shapes-clip", 1, 0.5, "viridis", 0.5, "smooth", api_name="/inspect")
    assert data["layer"] == 1 and data["rollout"]["grid"] == [8, 8]
    assert len(data["heads"]) == 4 and data["heads"][0]["params"]["heads"] == [0]
    assert len(data["focus"]) == 4
    assert Image.open(pca).size[0] >= 64
    assert sorted(p.rsplit(".", 1)[-1] for p in files) == ["json", "json", "png"]


def test_classify_and_explain_label(client):
    from gradio_client import handle_file

    labels = "a red square, a yellow circle, a green square, a blue diamond"
    chart, scores, notes, label = client.predict(handle_file(example(0)), labels, "shapes-clip", "preset", "", False,
                                                 api_name="/classify")
    result = scores["results"][0]
    assert result["activation"] == "softmax" and abs(result["sum"] - 1) < 1e-3
    assert "sum to" in notes
    png, heat, files = client.predict(handle_file(example(0)), labels, result["ranking"][0], "shapes-clip",
                                      "relevancy", "preset", "", "inferno", 0.6, "blocks", api_name="/explain_label")
    assert heat["method"] == "relevancy" and heat["grid"] == [8, 8] and heat["target"]["label"] == result["ranking"][0]
    _, both, notes, _ = client.predict(handle_file(example(0)), labels, "shapes-clip", "preset", "", True,
                                       api_name="/classify")
    assert [r["activation"] for r in both["results"]] == ["softmax", "sigmoid"]
    assert "not 1" in notes


def test_chat_then_explain_token(client):
    from gradio_client import handle_file

    messages, _, chips, plot, answer, share = client.predict(
        handle_file(example(0)), "how many shapes are there?", [], "shapes-vlm", 16, 0.0, 1.0, api_name="/chat")
    assert answer["answer"].strip(" .") == "three"
    assert messages[-1]["role"] == "assistant"
    assert len(answer["heatmaps"]) == len(answer["token_ids"]) == len(answer["image_reliance"])
    assert len(answer["image_share_layer_head"]) == 4 and share.endswith(".png")
    png, heat, files = client.predict(handle_file(example(0)), answer, "0: three", "shapes-vlm", "relevancy",
                                      "inferno", 0.6, "blocks", api_name="/explain_token")
    assert heat["target"]["token"] == "three" and heat["grid"] == [8, 8]
    # the named variant (the best pointer on shapes-vlm) runs with its parameters
    _, heat, _ = client.predict(handle_file(example(0)), answer, "0: three", "shapes-vlm",
                                "integrated_gradients (white canvas, log-prob)", "inferno", 0.6, "blocks",
                                api_name="/explain_token")
    assert heat["method"] == "integrated_gradients"
    assert heat["params"]["baseline"] == "white" and heat["params"]["objective"] == "log_prob"
    # a second turn keeps the history
    messages2, _, _, _, answer2, _ = client.predict(handle_file(example(0)), "is there a red circle?", messages,
                                            "shapes-vlm", 8, 0.0, 1.0, api_name="/chat")
    assert len(answer2["history"]) == 1 and answer2["history"][0]["assistant"].strip(" .") == "three"
    assert len(messages2) == 4


def test_alt_text_endpoints(client, tmp_path):
    from gradio_client import handle_file

    text, summary, words, answer = client.predict(handle_file(example(3)), "concise", "", 125, "shapes-vlm",
                                                  api_name="/alt_text")
    assert text.endswith(".") and len(text) <= 125 and answer["alt_text"] == text
    md, findings = client.predict("IMG_0001.jpg", None, 125, api_name="/check_alt_text")
    assert not findings["ok"] and "file_name" in {f["kind"] for f in findings["findings"]}
    md, findings = client.predict(text, handle_file(example(3)), 125, api_name="/check_alt_text")
    assert findings["match"] is not None
    bogus = tmp_path / "x.png"
    bogus.write_bytes(b"nope")
    table, csv_path = client.predict([handle_file(example(0)), handle_file(str(bogus))], "concise", "", 125,
                                     "shapes-vlm", api_name="/alt_text_batch")
    rows = table["data"] if isinstance(table, dict) else table
    assert len(rows) == 2 and rows[1][3]  # the bad file reports an error, the batch goes on
    assert open(csv_path).read().startswith("file,alt_text,chars,error")


def test_interventions_endpoints(client):
    """The four intervention views and the counterfactual picker through the API, as a script would call them."""
    from gradio_client import handle_file

    clean, corrupted, note, seed = client.predict(50003, 0, "color", api_name="/counterfactual")
    assert "green circle" in note and seed == 50003
    q = "what color is the circle?"
    summary, bars, sweep, kmap, data = client.predict(
        handle_file(clean), "shapes-vlm", q, 0, "every text token", "the box", "0, 80, 90, 170", "[]", 1, True,
        api_name="/knockout")
    result = json.loads(open(data).read())
    assert "green" in summary and result["all_layers"]["blocked"]["probability"] < 0.05
    assert result["map"]["grid"] == [8, 8] and Image.open(kmap).size[0] > 300
    summary, chart, data = client.predict(handle_file(clean), "shapes-vlm", q, 0, 1, api_name="/information_flow")
    flow = json.loads(open(data).read())
    assert set(flow["flows"]) == {"image → question", "image → answer", "question → answer"} and summary.count("- ") == 3
    summary, maps, curve, data = client.predict(handle_file(clean), handle_file(corrupted), "shapes-vlm", q, 0, "",
                                                "", 0, api_name="/patching")
    patched = json.loads(open(data).read())
    assert patched["corrupted"]["top_token"] != "green" and patched["best"]["cells"][0] in [[3, 0], [3, 1], [4, 0], [4, 1]]
    summary, overlay, seg_bars, data = client.predict(
        handle_file(clean), "shapes-vlm", q, 0, "ShapesWorld objects", 4, 50003, None, "feature_ablation", "mean", 8,
        api_name="/segment_ablation")
    assert "green circle" in summary and len(json.loads(open(data).read())["segments"]) == 4


def test_interventions_refuse_bad_input_and_keep_serving(client):
    from gradio_client import handle_file

    with pytest.raises(Exception, match="Add an image"):
        client.predict(None, "shapes-vlm", "how many shapes are there?", 0, "every text token", "every image token", "", "[]", 1, False,
                       api_name="/knockout")
    with pytest.raises(Exception, match="not in the list of choices"):
        client.predict(handle_file(example(0)), "shapes-clip", "how many shapes are there?", 0, 1, api_name="/information_flow")
    with pytest.raises(Exception, match="box is four numbers"):
        client.predict(handle_file(example(0)), "shapes-vlm", "how many shapes are there?", 0, "every text token", "the box", "1, 2",
                       "[]", 1, False, api_name="/knockout")
    with pytest.raises(Exception, match="corrupted image"):
        client.predict(handle_file(example(0)), None, "shapes-vlm", "how many shapes are there?", 0, "", "", 0, api_name="/patching")
    with pytest.raises(Exception, match="token from 0"):
        client.predict(handle_file(example(0)), "shapes-vlm", "how many shapes are there?", 99, 1, api_name="/information_flow")
    summary, *_ = client.predict(handle_file(example(0)), "shapes-vlm", "how many shapes are there?", 0, 1,
                                 api_name="/information_flow")
    assert "Answer:" in summary


def test_search_endpoints(client):
    """Index the examples, search by text and by image, and explain a hit, through the API."""
    from gradio_client import handle_file

    summary, index_id = client.predict("200 ShapesWorld scenes", None, "shapes-clip", api_name="/index")
    assert "Indexed **200 images**" in summary and len(index_id) == 16
    summary, index_id = client.predict("the example images and photos", None, "shapes-clip", api_name="/index")
    assert "Indexed" in summary and len(index_id) == 16
    summary, gallery, hits = client.predict(index_id, "shapes-clip", "a red circle", None, 4, api_name="/search")
    assert len(gallery) == 4 and "softmax" in summary and hits["hits"][0]["rank"] == 0
    png, about, data = client.predict(index_id, "shapes-clip", 0, "a red circle", None, 4, "relevancy",
                                      api_name="/explain_match")
    assert "a red circle" in about and json.loads(open(data).read())["method"] == "relevancy"
    summary, gallery, hits = client.predict(index_id, "shapes-clip", "", handle_file(example(2)), 3, api_name="/search")
    assert hits["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # the image itself is in the index
    png, about, data = client.predict(index_id, "shapes-clip", 0, "", handle_file(example(2)), 3, "relevancy",
                                      api_name="/explain_match")
    assert "patch" in about and json.loads(open(data).read())["method"] == "patch_match"
    with pytest.raises(Exception, match="Build an index first"):
        client.predict("../../etc", "shapes-clip", "a red circle", None, 4, api_name="/search")
    with pytest.raises(Exception, match="text or by image, not both"):
        client.predict(index_id, "shapes-clip", "a red circle", handle_file(example(2)), 4, api_name="/search")
    with pytest.raises(Exception, match="Upload some images"):
        client.predict("my uploads", None, "shapes-clip", api_name="/index")
