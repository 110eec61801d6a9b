"""cxrtrek as an MCP server over stdio (``cxrtrek mcp``), on the ``mcp`` Python SDK (v2).

Tools:

``interpret_chest_xray(images, prior=[], indication=None, stages=None)``
    Reads a study (the arguments of :class:`~cxrtrek.agent.subagent.InterpretRequest`). The
    result's structured content is the run's :class:`~cxrtrek.agent.agent.RunReport` as JSON
    (its schema is the tool's output schema); its text content is a short summary.
``get_run_trace(run_id)``
    The trace records of a reading (question, prompt hash, context ids, raw and parsed answer,
    latency, ... per question), as written under the server's home.

Errors are MCP tool errors (``isError`` with the message): bad input (a missing file, a
non-image, a CT DICOM, a stage outside 1-8) is rejected before any run exists; a reading that
fails names its run. The server keeps serving after either. Only protocol messages go to
stdout: logging goes to stderr, and while the server runs the SDK points file descriptor 1 at
stderr, so a library that prints cannot corrupt the stream.

The backend loads lazily, on the first reading (in a worker thread, so the server keeps
answering): ``initialize`` and ``tools/list`` are instant even with the demo model, and input
that fails validation never waits for a model. Readings run one at a time.

A client's configuration (e.g. Claude Desktop's ``mcpServers``)::

    {"cxrtrek": {"command": "cxrtrek", "args": ["mcp", "--backend", "demo"]}}
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Annotated, Any

import anyio
import anyio.to_thread
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent, RunReport
from cxrtrek.agent.pgstore import open_store
from cxrtrek.agent.subagent import (
    TOOL_DESCRIPTION,
    TOOL_NAME,
    InterpretRequest,
    input_error_message,
    prepare_reading,
    run_error_message,
)
from cxrtrek.backends.registry import BACKEND_SPECS, DEFAULT_BACKEND, BackendOptions
from cxrtrek.errors import CXRTrekError, DataError

__all__ = ["RunTrace", "build_server", "run_mcp_stdio"]

log = logging.getLogger(__name__)

_FIELDS = InterpretRequest.model_fields
_StageNumber = Annotated[int, Field(ge=1, le=8)]

INSTRUCTIONS = (
    "cxrtrek reads chest X-ray studies in eight diagnostic stages with a vision-language "
    "model. Call interpret_chest_xray with the image files of a study; get_run_trace shows "
    "how a reading reached its answers. Readings are machine-generated decision aids, not "
    "diagnoses."
)


class RunTrace(BaseModel):
    """The result of ``get_run_trace``: a run's trace records, oldest first."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    records: list[dict[str, Any]] = Field(
        description="Trace records as JSON; 'kind' is run, question, stage, review, end or "
                    "followup.")


class _Reader:
    """The server's state: settings, the backend spec and, once loaded, the agent."""

    def __init__(self, backend: str, settings: AgentSettings,
                 options: BackendOptions | None = None) -> None:
        self.spec = backend
        self.options = options
        self.settings = settings
        self.store = open_store(settings)
        """The runs' checkpoints and traces (readable before the backend loads)."""
        self.agent: CXRTrekAgent | None = None
        self._lock: anyio.Lock | None = None

    async def _agent(self) -> CXRTrekAgent:
        if self.agent is None:
            from cxrtrek.backends.registry import load_backend

            log.info("loading backend %r (first reading)", self.spec)
            try:
                backend = await anyio.to_thread.run_sync(
                    functools.partial(load_backend, self.spec, options=self.options))
            except (CXRTrekError, OSError) as exc:
                raise ToolError(f"Cannot load the backend {self.spec!r}: {exc}. Expected "
                                f"{BACKEND_SPECS}.") from exc
            self.agent = CXRTrekAgent(backend, settings=self.settings, store=self.store,
                                      backend_spec=self.spec, backend_options=self.options)
            log.info("backend %r loaded (model %s)", self.spec, backend.model_id)
        return self.agent

    async def interpret(self, request: InterpretRequest) -> RunReport:
        """Check the input (no model needed), then read the study; one reading at a time."""
        try:
            study, settings = await anyio.to_thread.run_sync(
                prepare_reading, request, self.settings.run_settings())
        except CXRTrekError as exc:
            raise ToolError(input_error_message(exc)) from exc
        run_id = CXRTrekAgent.new_run_id(study)
        self._lock = self._lock or anyio.Lock()
        async with self._lock:
            agent = await self._agent()
            log.info("reading %s (%d image(s), stages %s)", run_id, len(study.images),
                     settings.stages or "all")
            try:
                report = await agent.arun(study, run_id=run_id, settings=settings)
            except CXRTrekError as exc:
                raise ToolError(run_error_message(run_id, exc)) from exc
        log.info("reading %s: %s", run_id, report.status)
        return report

    def trace(self, run_id: str) -> RunTrace:
        """The trace of a run (no backend needed)."""
        try:
            records = self.store.trace_records(run_id)
        except DataError as exc:
            raise ToolError(str(exc)) from exc
        if not records:
            where = self.settings.trace_path() if self.settings.trace else "memory"
            raise ToolError(f"No trace of run {run_id!r} in {where}; expected the run_id of a "
                            f"reading (as interpret_chest_xray returned it).")
        return RunTrace(run_id=run_id, records=[r.model_dump(mode="json") for r in records])


def summary(report: RunReport) -> str:
    """A few lines about a report: status, stages run and skipped, findings, impression."""
    ran = [s.stage for s in report.stages if s.skipped is None]
    lines = [f"Run {report.run_id} ({report.status}); stages run: "
             f"{', '.join(map(str, ran)) or 'none'}."]
    skipped = [f"{s.stage} ({s.skipped})" for s in report.stages if s.skipped]
    if skipped:
        lines.append(f"Skipped: {', '.join(skipped)}.")
    if report.review:
        lines.append(f"Paused for a person to review stage {report.review.get('stage')}.")
    for label, text in (("Findings", report.findings), ("Impression", report.impression)):
        if text:
            lines.append(f"{label}: {text}")
    lines.extend(f"Limitation: {limitation}" for limitation in report.limitations)
    return "\n".join(lines)


def build_server(backend: str = DEFAULT_BACKEND, settings: AgentSettings | None = None,
                 options: BackendOptions | None = None) -> MCPServer[Any]:
    """The MCP server (not yet running) with the tools ``interpret_chest_xray`` and
    ``get_run_trace``; the backend loads on the first reading."""
    from cxrtrek import __version__

    reader = _Reader(backend, settings or AgentSettings(), options)
    server: MCPServer[Any] = MCPServer("cxrtrek", instructions=INSTRUCTIONS,
                                       version=__version__)

    async def interpret_chest_xray(
        images: Annotated[list[str], Field(min_length=1,
                                           description=_FIELDS["images"].description)],
        prior: Annotated[list[str], Field(default_factory=list,
                                          description=_FIELDS["prior"].description)],
        indication: Annotated[str | None, Field(default=None,
                                                description=_FIELDS["indication"].description)],
        stages: Annotated[list[_StageNumber] | None,
                          Field(default=None, description=_FIELDS["stages"].description)],
    ) -> Annotated[CallToolResult, RunReport]:
        request = InterpretRequest(images=images, prior=prior, indication=indication,
                                   stages=stages)
        report = await reader.interpret(request)
        return CallToolResult(content=[TextContent(type="text", text=summary(report))],
                              structured_content=report.model_dump(mode="json"))

    def get_run_trace(
        run_id: Annotated[str, Field(description="The run_id of a reading, as "
                                                 "interpret_chest_xray returned it.")],
    ) -> RunTrace:
        return reader.trace(run_id)

    server.add_tool(interpret_chest_xray, name=TOOL_NAME, title="Interpret a chest X-ray",
                    description=TOOL_DESCRIPTION,
                    annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                                idempotent_hint=False, open_world_hint=False))
    server.add_tool(get_run_trace, name="get_run_trace", title="Trace of a reading",
                    description="The trace of a reading by run_id: for every question the "
                                "stage, prompt hash, context given, raw and parsed answer and "
                                "latency; review edits and follow-ups.",
                    annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
    return server


def _log_to_stderr() -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                               "%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def run_mcp_stdio(backend: str = DEFAULT_BACKEND, settings: AgentSettings | None = None,
                  options: BackendOptions | None = None) -> None:
    """Serve cxrtrek over MCP on stdin/stdout until the client closes the stream. The backend
    (a spec of :func:`~cxrtrek.backends.registry.load_backend`) loads on the first reading."""
    _log_to_stderr()
    settings = settings or AgentSettings()
    server = build_server(backend, settings, options)
    log.info("cxrtrek MCP server on stdio: backend %r (loads on the first reading), home %s",
             backend, settings.home_dir())
    server.run("stdio")
