"""The MCP server (``cxrtrek.interfaces.mcp``) over stdio, driven by the MCP SDK's own client:
tool listing, a reading on the bundled example images (``scripted`` backend), tool errors
that leave the server serving, and the lazy backend. Every wait is bounded."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.types import CallToolResult, TextContent

from cxrtrek.agent.agent import RunReport
from cxrtrek.agent.subagent import TOOL_NAME, InterpretRequest
from cxrtrek.data.images import example_images
from cxrtrek.schema import Report

REPO = Path(__file__).resolve().parents[2]
SERVER = ["-m", "cxrtrek", "mcp"]
"""``cxrtrek mcp``."""
CLI = ["-m", "cxrtrek", "-v", "mcp"]
"""``cxrtrek -v mcp`` (-v: the INFO log lines on stderr)."""
SESSION_TIMEOUT_S = 90.0
"""The whole session: server start (imports), the calls, the shutdown."""
CALL_TIMEOUT_S = 30.0

T = TypeVar("T")


def params(*args: str, env: dict[str, str] | None = None,
           entry: list[str] = SERVER) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=[*entry, *args], cwd=str(REPO),
        env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             **(env or {})})


def session(server: StdioServerParameters, log: Path,
            body: Callable[[ClientSession], Awaitable[T]]) -> T:
    """Start the server, run ``body`` in an initialized session, stop the server. Fails on a
    line of server stdout that is not a protocol message."""
    faults: list[Exception] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, Exception):
            faults.append(message)

    async def main() -> T:
        with anyio.fail_after(SESSION_TIMEOUT_S), log.open("a") as errlog:
            async with stdio_client(server, errlog=errlog) as (read, write), ClientSession(
                    read, write, read_timeout_seconds=CALL_TIMEOUT_S,
                    message_handler=on_message) as client:
                await client.initialize()
                return await body(client)

    result = anyio.run(main)
    assert not faults, f"the server wrote non-protocol output to stdout: {faults}"
    return result


def text_of(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


def threads(home: Path) -> set[str]:
    db = home / "checkpoints.sqlite"
    if not db.is_file():
        return set()
    with sqlite3.connect(db) as con:
        return {r[0] for r in con.execute("SELECT DISTINCT thread_id FROM checkpoints")}


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """The bundled example radiographs by suffix (.dcm, .png, .jpg)."""
    return {p.suffix: str(p) for p in example_images()}


def test_lists_the_tool_and_reads_a_study(tmp_path: Path, images: dict[str, str]) -> None:
    home = tmp_path / "home"

    async def body(client: ClientSession) -> tuple[Any, ...]:
        listed = await client.list_tools()
        read = await client.call_tool(TOOL_NAME, {
            "images": [images[".dcm"]], "prior": [images[".png"]],
            "indication": "Cough for 3 weeks.", "stages": [1, 2, 8]})
        run_id = (read.structured_content or {}).get("run_id", "")
        trace = await client.call_tool("get_run_trace", {"run_id": run_id})
        return listed, read, trace

    listed, read, trace = session(params("--backend", "scripted",
                                         env={"CXRTREK_HOME": str(home)}),
                                  tmp_path / "server.log", body)
    tools = {t.name: t for t in listed.tools}
    assert set(tools) == {TOOL_NAME, "get_run_trace"}
    schema = tools[TOOL_NAME].input_schema
    expected = InterpretRequest.model_json_schema()
    assert schema["properties"] == expected["properties"]
    assert schema["required"] == expected["required"] == ["images"]
    assert tools[TOOL_NAME].output_schema is not None
    assert "eight" in (tools[TOOL_NAME].description or "")

    assert not read.is_error, text_of(read)
    report = RunReport.model_validate(read.structured_content)
    data = read.structured_content or {}
    Report.model_validate({k: v for k, v in data.items() if k in Report.model_fields})
    assert report.status == "completed" and report.run_id
    assert [s.stage for s in report.stages if s.skipped is None] == [1, 2, 8]
    assert {s.skipped for s in report.stages if s.skipped} == {"not requested"}
    assert report.findings and report.impression
    summary = text_of(read)
    assert report.run_id in summary and "stages run: 1, 2, 8" in summary
    assert f"Impression: {report.impression}" in summary
    assert (home / "traces" / f"{report.run_id}.jsonl").is_file()
    assert threads(home) == {report.run_id}

    assert not trace.is_error, text_of(trace)
    records = (trace.structured_content or {})["records"]
    assert records[0]["kind"] == "run" and records[-1]["kind"] == "end"
    assert {r["stage"] for r in records if r["kind"] == "question"} == {1, 2, 8}


def test_bad_input_is_a_tool_error_and_the_server_goes_on(
        tmp_path: Path, images: dict[str, str], ct_dicom: Path, not_an_image: Path) -> None:
    home = tmp_path / "home"
    missing = tmp_path / "nowhere.png"

    async def body(client: ClientSession) -> list[CallToolResult]:
        return [
            await client.call_tool(TOOL_NAME, {"images": [str(missing)]}),
            await client.call_tool(TOOL_NAME, {"images": [str(not_an_image)]}),
            await client.call_tool(TOOL_NAME, {"images": [images[".png"]],
                                               "prior": [str(ct_dicom)]}),
            await client.call_tool(TOOL_NAME, {"images": [images[".png"]], "stages": [9]}),
            await client.call_tool("get_run_trace", {"run_id": "no-such-run"}),
            await client.call_tool(TOOL_NAME, {"images": [images[".jpg"]], "stages": [1]}),
        ]

    gone, not_image, ct, bad_stage, no_trace, ok = session(
        params("--backend", "scripted", "--home", str(home), "--context", "none"),
        tmp_path / "server.log", body)
    for result in (gone, not_image, ct, bad_stage, no_trace):
        assert result.is_error and result.structured_content is None
    assert f"{missing}: no such file or folder" in text_of(gone)
    assert "Nothing was run" in text_of(gone)
    assert str(not_an_image) in text_of(not_image)
    assert "PNG, JPEG or DICOM" in text_of(not_image)
    assert str(ct_dicom) in text_of(ct) and "Modality 'CT'" in text_of(ct)
    assert "stages.0" in text_of(bad_stage) and "less than or equal to 8" in text_of(bad_stage)
    assert "no-such-run" in text_of(no_trace)
    assert not ok.is_error, text_of(ok)
    report = RunReport.model_validate(ok.structured_content)
    assert [s.stage for s in report.stages if s.skipped is None] == [1]
    # only the good call left a run behind
    assert threads(home) == {report.run_id}
    assert [p.name for p in (home / "traces").iterdir()] == [f"{report.run_id}.jsonl"]


def test_the_backend_loads_on_the_first_reading(tmp_path: Path) -> None:
    """With the demo model (served by ``cxrtrek mcp``): listing tools and rejecting bad
    input need no model."""
    log = tmp_path / "server.log"

    async def body(client: ClientSession) -> tuple[Any, CallToolResult]:
        listed = await client.list_tools()
        return listed, await client.call_tool(TOOL_NAME, {"images": [str(tmp_path / "x.png")]})

    listed, result = session(params("--backend", "demo", "--home", str(tmp_path), entry=CLI),
                             log, body)
    assert TOOL_NAME in {t.name for t in listed.tools}
    assert result.is_error and "no such file or folder" in text_of(result)
    text = log.read_text()
    assert "backend 'demo' (loads on the first reading)" in text
    assert "loading backend" not in text
