"""The studio as an MCP server (`python app.py --mcp`): tools listed and called through the endpoint."""

from __future__ import annotations

import ast
import asyncio
import base64
import inspect

import pytest

AGENT_TOOLS = ("patches", "classify", "explain_label", "chat", "explain_token", "alt_text", "check_alt_text",
               "sequence", "logit_lens")


def test_mcp_from_env(monkeypatch):
    import app

    monkeypatch.setenv("MMIE_MCP", "1")
    assert app.mcp_from_env()
    monkeypatch.setenv("MMIE_MCP", "0")
    assert not app.mcp_from_env()


def test_tools_are_listed_with_descriptions_and_one_is_called():
    pytest.importorskip("mcp")
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    from studio.app import MAX_FILE_SIZE, build_demo, configure_queue
    from studio.common import EXAMPLES_DIR

    demo = configure_queue(build_demo())
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, max_file_size=MAX_FILE_SIZE,
                mcp_server=True)
    url = demo.local_url.rstrip("/") + "/gradio_api/mcp/"

    async def session():
        async with streamable_http_client(url) as (read, write, _):
            async with ClientSession(read, write) as s:
                await s.initialize()
                tools = {t.name: t for t in (await s.list_tools()).tools}
                result = await s.call_tool("check_alt_text", {"text": "IMG_0001.jpg", "max_chars": 125})
                # an agent's round trip: ask, then explain the answer's first token (a new session each call)
                said = await s.call_tool("chat", {"image": image, "message": "what color is the circle?",
                                                  "history": [], "model_name": "shapes-vlm", "max_new_tokens": 3})
                assert not said.isError, said.content
                answer = next(v for v in ast.literal_eval(said.content[0].text)
                              if isinstance(v, dict) and "token_ids" in v)
                explained = [await s.call_tool("explain_token", {"image": image, "answer": answer, "token": token,
                                                                 "model_name": "shapes-vlm", "method": "attention"})
                             for token in ("0", f"0: {answer['tokens'][0]}", "9")]
                described = await s.call_tool("alt_text", {"image": image})  # the optional parameters left out
                assert not described.isError, described.content
                return tools, result, answer, explained

    image = "data:image/png;base64," + base64.b64encode((EXAMPLES_DIR / "scene_20.png").read_bytes()).decode()
    try:
        tools, result, answer, explained = asyncio.run(session())
    finally:
        demo.close()
    assert set(AGENT_TOOLS) <= set(tools)
    for name in AGENT_TOOLS:  # a description of what it does, and every parameter described
        tool = tools[name]
        assert len(tool.description) > 60 and "Returns" in tool.description
        props = tool.inputSchema["properties"]
        assert props and all(p.get("description") for p in props.values()), name
        fn = inspect.unwrap(next(d.fn for d in demo.fns.values() if d.api_name == name))
        optional = {n for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}
        assert not optional & set(tool.inputSchema.get("required", [])), name  # required only what must be given
        for param, schema in props.items():  # a JSON type an agent can fill; no list of choices left empty
            assert schema.get("type") in ("string", "number", "integer", "boolean", "array", "object"), (name, param)
            assert schema.get("enum", ["any"]), (name, param)
    assert tools["classify"].inputSchema["properties"]["labels_text"]["type"] == "string"
    assert set(tools["classify"].inputSchema["properties"]["template_mode"]["enum"]) == {"preset", "none", "single",
                                                                                          "ensemble"}
    assert answer["model"] == "shapes-vlm" and answer["token_ids"]
    first, by_chip, outside = explained
    for got in (first, by_chip):
        assert not got.isError and "token-heatmap" in got.content[0].text, got.content
    assert outside.isError and "outside the answer" in outside.content[0].text
    text = " ".join(getattr(c, "text", "") for c in result.content)
    assert "file name" in text and not result.isError
