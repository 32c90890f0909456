"""The studio as an MCP server (`python app.py --mcp`): tools listed and called through the endpoint."""

from __future__ import annotations

import asyncio

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
                return tools, result

    try:
        tools, result = asyncio.run(session())
    finally:
        demo.close()
    assert set(AGENT_TOOLS) <= set(tools)
    for name in AGENT_TOOLS:  # a description of what it does, and every parameter described
        tool = tools[name]
        assert len(tool.description) > 60 and "Returns" in tool.description
        props = tool.inputSchema["properties"]
        assert props and all(p.get("description") for p in props.values()), name
    assert tools["classify"].inputSchema["properties"]["labels_text"]["type"] == "string"
    text = " ".join(getattr(c, "text", "") for c in result.content)
    assert "file name" in text and not result.isError
