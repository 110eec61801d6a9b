"""cxrtrek as a sub-agent: the LangChain tool ``interpret_chest_xray``.

::

    tool = agent.as_tool()                      # == make_tool(agent)
    parent = create_react_agent(llm, [tool])    # or a StateGraph with a ToolNode
    tool.invoke({"images": ["cxr/frontal.dcm"], "prior": ["old/"],
                 "indication": "Cough for 3 weeks.", "stages": [1, 2, 8]})

The tool takes an :class:`InterpretRequest`: image files or folders of the current study,
optionally those of a prior study, the indication and the stages wanted. It builds the study
with :func:`~cxrtrek.data.intake.study_from_images` (every image decoded and checked first),
reads it with the agent (its settings, with ``stages`` when given) and returns the run's
:class:`~cxrtrek.agent.agent.RunReport` as JSON: ``study_id``, ``run_id``, ``status``,
``findings``, ``impression``, ``limitations`` and every stage's result (``skipped`` says why a
stage did not run, e.g. ``"not requested"``). A paused run (the agent's ``review_after``)
comes back with ``status="awaiting_review"`` and the pending review; a person continues it
with :meth:`~cxrtrek.agent.agent.CXRTrekAgent.review`.

Bad input (a missing file, a non-image, a CT DICOM, a stage outside 1-8) is a
:class:`~langchain_core.tools.ToolException` (or an argument validation error) that the tool
itself turns into an error ``ToolMessage`` (``status="error"``) with a message saying what was
wrong: the parent agent reads it and goes on. The input is checked before the run starts, so a
bad call leaves no checkpoint and no trace. A :class:`~cxrtrek.errors.CXRTrekError` during the
run (e.g. the backend failing) comes back the same way, naming the run (its checkpoints keep
the stages done; :meth:`~cxrtrek.agent.agent.CXRTrekAgent.resume` continues it).

:func:`prepare_reading` is the shared validation step (the MCP server uses it too).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

from langchain_core.tools import StructuredTool, ToolException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cxrtrek.errors import CXRTrekError, DataError
from cxrtrek.graph.state import RunSettings
from cxrtrek.schema import Study

if TYPE_CHECKING:
    from cxrtrek.agent.agent import CXRTrekAgent, RunReport

__all__ = ["TOOL_DESCRIPTION", "TOOL_NAME", "InterpretRequest", "input_error_message", "make_tool",
           "prepare_reading", "run_error_message"]

TOOL_NAME = "interpret_chest_xray"

TOOL_DESCRIPTION = (
    "Read a chest X-ray study the way a radiologist does, in eight ordered stages: 1 image "
    "quality and view, 2 findings, 3 attributes and location of the findings, 4 relationships "
    "among findings, 5 comparison with the prior study, 6 likely course, 7 diagnosis and "
    "advice, 8 the report. Pass file paths (PNG, JPEG or DICOM radiographs) or folders of the "
    "current study in `images`, the prior study's in `prior` (stage 5 needs one), the clinical "
    "question in `indication`, and `stages` to run only some stages (the others are reported "
    "as skipped: 'not requested'). Returns JSON: findings, impression, limitations, every "
    "stage's questions and answers (or why it was skipped), run_id and status ('completed'; "
    "'awaiting_review' when a person must approve a stage before the reading goes on). A bad "
    "input (missing file, not an image, not a chest radiograph, a stage outside 1-8) returns an "
    "error message and runs nothing. The reading is machine-generated: a decision aid for a "
    "clinician, not a diagnosis."
)

_StageNumber = Annotated[int, Field(ge=1, le=8)]


class InterpretRequest(BaseModel):
    """The arguments of ``interpret_chest_xray`` (the LangChain tool and the MCP tool)."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(
        min_length=1,
        description="Image files (PNG, JPEG or DICOM chest radiographs) or folders of them: "
                    "the current study, first image first. Absolute paths are safest "
                    "(relative ones are resolved where the reader runs).")
    prior: list[str] = Field(
        default_factory=list,
        description="Image files or folders of the patient's prior study, for the comparison "
                    "stage (5); empty when there is none.")
    indication: str | None = Field(
        default=None,
        description="Why the study was ordered (the clinical question), e.g. 'Cough for 3 "
                    "weeks.'")
    stages: list[_StageNumber] | None = Field(
        default=None,
        description="The stages to run (numbers 1-8); omit to run all of them. Stages left "
                    "out are reported as skipped ('not requested').")


def prepare_reading(request: InterpretRequest,
                    base: RunSettings | None = None) -> tuple[Study, RunSettings]:
    """The study of a request (every image decoded and checked) and its run settings (``base``
    with the request's ``stages`` when given). Raises :class:`~cxrtrek.errors.CXRTrekError`
    (a :class:`~cxrtrek.errors.DataError` subclass) on bad input, before any run exists."""
    from cxrtrek.data.intake import study_from_images

    base = base or RunSettings()
    settings = base
    if request.stages is not None:
        try:
            settings = RunSettings.model_validate(
                {**base.model_dump(mode="json"), "stages": request.stages})
        except ValidationError as exc:
            raise DataError(f"expected stage numbers 1-8; got {request.stages}") from exc
    study = study_from_images(request.images, prior=request.prior,
                              indication=request.indication)
    return study, settings


def input_error_message(exc: CXRTrekError | ValidationError) -> str:
    """What a caller is told about input :func:`prepare_reading` rejected."""
    return f"Cannot read this study: {exc}. Nothing was run; correct the input and call again."


def run_error_message(run_id: str, exc: CXRTrekError) -> str:
    """What a caller is told about a reading that failed after it started."""
    return (f"The reading {run_id} failed: {exc}. Its completed stages are checkpointed; the "
            "agent can resume it.")


def _bad_arguments(exc: Exception) -> str:
    """The tool message of arguments that fail :class:`InterpretRequest`."""
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']} "
            f"(got {err['input']!r})" for err in exc.errors())
    else:
        problems = str(exc)
    return (f"Invalid arguments for {TOOL_NAME}: {problems}. Nothing was run; correct the "
            "arguments and call again.")


def _report_json(report: RunReport) -> dict[str, Any]:
    return report.model_dump(mode="json")


def make_tool(agent: CXRTrekAgent) -> StructuredTool:
    """``interpret_chest_xray`` over ``agent``: sync (``agent.run``) and async
    (``agent.arun``) forms; errors come back as error tool messages (see the module)."""

    def prepare(images: list[str], prior: list[str] | None, indication: str | None,
                stages: list[int] | None) -> tuple[Study, RunSettings, str]:
        try:
            request = InterpretRequest(images=images, prior=prior or [], indication=indication,
                                       stages=stages)
            study, settings = prepare_reading(request, agent.settings.run_settings())
        except (CXRTrekError, ValidationError) as exc:
            raise ToolException(input_error_message(exc)) from exc
        return study, settings, agent.new_run_id(study)

    def interpret_chest_xray(images: list[str], prior: list[str] | None = None,
                             indication: str | None = None,
                             stages: list[int] | None = None) -> dict[str, Any]:
        study, settings, run_id = prepare(images, prior, indication, stages)
        try:
            return _report_json(agent.run(study, run_id=run_id, settings=settings))
        except CXRTrekError as exc:
            raise ToolException(run_error_message(run_id, exc)) from exc

    async def ainterpret_chest_xray(images: list[str], prior: list[str] | None = None,
                                    indication: str | None = None,
                                    stages: list[int] | None = None) -> dict[str, Any]:
        study, settings, run_id = await asyncio.to_thread(  # decoding images blocks
            prepare, images, prior, indication, stages)
        try:
            return _report_json(await agent.arun(study, run_id=run_id, settings=settings))
        except CXRTrekError as exc:
            raise ToolException(run_error_message(run_id, exc)) from exc

    return StructuredTool.from_function(
        func=interpret_chest_xray, coroutine=ainterpret_chest_xray, name=TOOL_NAME,
        description=TOOL_DESCRIPTION, args_schema=InterpretRequest,
        handle_tool_error=True, handle_validation_error=_bad_arguments)
