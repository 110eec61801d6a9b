"""The nodes of the stage graph and its routing.

* :func:`intake`: checks the study, hashes its images, settles the settings, looks for a prior;
* :func:`make_stage_node`: the ONE factory of the eight stage nodes. A stage node plans its
  questions, builds each question's context, asks the backend all of them in one
  ``generate`` call (retrying transient errors with backoff), parses the answers, extracts
  findings and writes the trace;
* :func:`review`: pauses (LangGraph ``interrupt``) so a person approves or edits a stage;
* :func:`finalize`: assembles the :class:`~cxrtrek.schema.Report`;
* :func:`route_after_stage` / :func:`next_stage`: stage 5 only with a prior, the
  non-diagnostic ``stop`` policy, review pauses.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from langgraph.runtime import Runtime
from langgraph.types import interrupt
from pydantic import BaseModel, ConfigDict, Field

from cxrtrek import telemetry
from cxrtrek.errors import BackendError, CXRTrekError, DataError, TransientError
from cxrtrek.graph.context import ScoredContext, context_items, select_context
from cxrtrek.graph.planner import (
    enrich_findings,
    extract_findings,
    plan_questions,
    report_sections,
    resolve_mode,
)
from cxrtrek.graph.state import ReadState, RunContext, RunSettings, results_of
from cxrtrek.graph.trace import (
    ContextRef,
    EndRecord,
    QuestionRecord,
    ReviewRecord,
    RunRecord,
    StageRecord,
    TraceRecord,
    hash_patient,
)
from cxrtrek.parsing import parse_answer, parse_options
from cxrtrek.prompts import DESCRIBE_QUESTION, describe_question
from cxrtrek.prompts.render import image_labels
from cxrtrek.protocol import ContextPair, VLMRequest, VLMResponse, request_id
from cxrtrek.schema import (
    Answer,
    ImageRef,
    ParsedAnswer,
    QType,
    Question,
    Report,
    StageResult,
    Study,
    sha256_bytes,
)
from cxrtrek.stages import STAGES, StageSpec

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = [
    "ReviewDecision",
    "ReviewRequest",
    "apply_edits",
    "build_report",
    "edit_stage",
    "finalize",
    "image_tags_of",
    "images_for",
    "intake",
    "judge_quality",
    "make_stage_node",
    "next_stage",
    "request_images",
    "review",
    "route_after_stage",
    "stage_node_name",
]

log = logging.getLogger(__name__)

Update = dict[str, Any]


class StageNode(Protocol):
    """A node of the graph: the state and the runtime in, a state update out."""

    def __call__(self, state: ReadState, *, runtime: Runtime[RunContext]) -> Awaitable[Update]:
        ...


def stage_node_name(number: int) -> str:
    return f"stage_{number}"


# --- helpers ---------------------------------------------------------------------------------


def _run_id(runtime: Runtime[RunContext], state: ReadState) -> str:
    """The run id: the LangGraph thread id (the parent's, inside a parent graph)."""
    thread = runtime.execution_info.thread_id if runtime.execution_info else None
    if thread:
        return thread
    study = state["study"]
    sid = study.study_id if isinstance(study, Study) else dict(study).get("study_id", "study")
    return f"run-{sid}"


def _checkpoint_id(runtime: Runtime[RunContext]) -> str | None:
    return runtime.execution_info.checkpoint_id if runtime.execution_info else None


def _settings(state: ReadState) -> RunSettings:
    return RunSettings.model_validate(state.get("settings") or {})


def _trace(runtime: Runtime[RunContext], records: Sequence[TraceRecord]) -> None:
    if runtime.context.tracer is not None and records:
        runtime.context.tracer.write(records)


def images_for(study: Study, stage: int, cache: dict[str, bytes]) -> list[ImageRef]:
    """CXRTrek's inputs: the first current image, and from stage 5 on every image of the
    study and its prior (when there is a prior)."""
    prior = list(study.prior.images) if study.prior is not None else []
    refs = [*study.images, *prior] if stage >= 5 and study.has_prior else study.images[:1]
    return [r.model_copy(update={"data": cache[r.sha256]})
            if r.data is None and r.sha256 in cache else r for r in refs]


_IMAGE_TAG = "<image>"


def image_tags_of(study: Study) -> dict[str, list[int]]:
    """Dataset mode: for each question whose text writes ``<image>``, the images they show,
    as indices into the study's images then its prior's. The dataset numbers them over its
    whole conversation, in file order (the i-th ``<image>`` of a record is its i-th image).
    Empty when the placeholders outnumber the images (they then bind to none)."""
    n_images = len(study.images) + (len(study.prior.images) if study.prior else 0)
    tags: dict[str, list[int]] = {}
    seen = 0
    for q in study.questions:
        count = q.text.count(_IMAGE_TAG)
        if count:
            tags[q.id] = list(range(seen, seen + count))
            seen += count
    if seen > n_images:
        log.warning("study %s: its questions write %d <image> placeholders for %d images; "
                    "not binding them", study.study_id, seen, n_images)
        return {}
    return tags


def request_images(study: Study, stage: int, cache: dict[str, bytes], shown: Sequence[int],
                   ) -> tuple[list[ImageRef], list[int] | None]:
    """A question's images and the binding of its ``<image>`` placeholders
    (:attr:`~cxrtrek.protocol.VLMRequest.image_tags`): :func:`images_for`'s, plus those its
    chat's placeholders show (``shown``: study image indices, in the chat's order), in the
    study's order."""
    if not shown:
        return images_for(study, stage, cache), None
    everything = [*study.images, *(study.prior.images if study.prior else [])]
    default = (range(len(everything)) if stage >= 5 and study.has_prior
               else range(min(1, len(study.images))))
    indices = sorted({*default, *shown})
    position = {i: k for k, i in enumerate(indices)}
    refs = [everything[i] for i in indices]
    refs = [r.model_copy(update={"data": cache[r.sha256]})
            if r.data is None and r.sha256 in cache else r for r in refs]
    return refs, [position[i] for i in shown]


def _parse(question: Question, text: str) -> ParsedAnswer:
    options: Sequence[str] = question.options
    if not options and question.base_qtype in (QType.SINGLE_CHOICE, QType.MULTI_CHOICE,
                                               QType.YES_NO):
        options = parse_options(question.text)
    return parse_answer(text, qtype=question.qtype, task_type=question.task_type,
                        options=options)


_NONDIAGNOSTIC = re.compile(
    r"\b(?:non-?diagnostic|not diagnostic|not of diagnostic quality|uninterpretable|"
    r"unreadable|cannot be (?:interpreted|evaluated|assessed)|inadequate for "
    r"(?:diagnosis|interpretation))\b", re.IGNORECASE)


def judge_quality(result: StageResult) -> str | None:
    """The limitation when stage 1's quality answers judge the study non-diagnostic."""
    kinds = {q.id: q.task_type for q in result.questions}
    for answer in result.answers:
        if kinds.get(answer.question_id, "").startswith("Quality_Assessment") and \
                _NONDIAGNOSTIC.search(answer.text):
            return f"Stage 1 judged the study non-diagnostic: {answer.text.strip()}"
    return None


def _with_findings(number: int, result: StageResult,
                   results: dict[int, StageResult]) -> StageResult:
    if number == 2:
        return result.model_copy(update={"findings": extract_findings(result)})
    if number == 3 and 2 in results:
        return result.model_copy(update={"findings": enrich_findings(results[2].findings,
                                                                     result)})
    return result


def _quality_update(result: StageResult, settings: RunSettings) -> Update:
    limitation = judge_quality(result)
    return {"limitations": [limitation] if limitation else [],
            "stopped": limitation if limitation and settings.nondiagnostic == "stop" else None}


def _named(exc: CXRTrekError, spec: StageSpec) -> CXRTrekError:
    """The same kind of error, its message naming the stage."""
    message = f"stage {spec.number} ({spec.key}): {exc}"
    try:
        return type(exc)(message)
    except TypeError:  # pragma: no cover - every CXRTrekError takes one message
        return BackendError(message)


async def _generate(ctx: RunContext, requests: list[VLMRequest], spec: StageSpec,
                    settings: RunSettings, errors: list[str]) -> tuple[list[VLMResponse], int]:
    """One generate call for the stage's questions; transient errors retried with backoff."""
    backend = ctx.backend
    for attempt in range(settings.max_retries + 1):
        try:
            responses = await backend.generate(requests)
        except TransientError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            if attempt == settings.max_retries:
                raise TransientError(
                    f"stage {spec.number} ({spec.key}): backend {backend.model_id!r} failed "
                    f"{attempt + 1} times with transient errors; last: {exc}") from exc
            delay = min(settings.backoff_max_s, settings.backoff_s * 2 ** attempt)
            log.warning("stage %d: transient backend error (%s); retry %d in %.2f s",
                        spec.number, exc, attempt + 1, delay)
            await asyncio.sleep(delay)
            continue
        except CXRTrekError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            raise _named(exc, spec) from exc
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            raise BackendError(f"stage {spec.number} ({spec.key}): backend "
                               f"{backend.model_id!r} raised {type(exc).__name__}: {exc}") from exc
        got = [r.request_id for r in responses]
        if got != [r.request_id for r in requests]:
            errors.append("responses out of order")
            raise BackendError(f"stage {spec.number} ({spec.key}): expected responses to "
                               f"{len(requests)} requests in order; got ids {got[:5]}")
        return responses, attempt
    raise AssertionError("unreachable")  # pragma: no cover


# --- describe-then-answer --------------------------------------------------------------------

DESCRIPTION = "description"
"""Task type (and context id prefix) of an image's description in the trace."""


def describes_first(backend: object) -> bool:
    """Whether a backend asks to read by describe-then-answer (its ``describes_first``
    attribute, set by checkpoints trained for it); False when it says nothing."""
    return bool(getattr(backend, "describes_first", False))


def descriptions_of(results: dict[int, StageResult]) -> dict[str, str]:
    """The image descriptions written by the stages of ``results`` (SHA-256 -> text)."""
    out: dict[str, str] = {}
    for number in sorted(results):
        out.update(results[number].descriptions)
    return out


def with_descriptions(request: VLMRequest, described: dict[str, str]) -> VLMRequest:
    """The request with its images' descriptions first in its context (image order; the
    question names each image when there are several)."""
    texts = [described.get(r.sha256 or "") for r in request.images]
    if not texts or any(t is None for t in texts):
        return request
    labels: list[str | None] = ([None] if len(texts) == 1
                                else list(image_labels(len(texts))))
    pairs = [ContextPair(stage=2, question=describe_question(label), answer=text or "")
             for label, text in zip(labels, texts, strict=True)]
    return request.model_copy(update={"context": [*pairs, *request.context]})


async def _describe(spec: StageSpec, requests: Sequence[VLMRequest],
                    results: dict[int, StageResult], settings: RunSettings,
                    runtime: Runtime[RunContext], run_id: str, checkpoint: str | None,
                    errors: list[str]) -> dict[str, str]:
    """Describe each image the stage's requests show that no earlier stage described: one
    request per image, the image alone, in one generate call; traced as questions."""
    known = descriptions_of(results)
    todo: dict[str, ImageRef] = {}
    for req in requests:
        for ref in req.images:
            if ref.sha256 is not None and ref.sha256 not in known:
                todo.setdefault(ref.sha256, ref)
    if not todo:
        return {}
    ctx = runtime.context
    ids = [f"{DESCRIPTION}-{sha[:12]}" for sha in todo]
    asks = [VLMRequest(request_id=request_id(run_id, spec.number, qid),
                       stage=2, question=DESCRIBE_QUESTION, images=[ref],
                       system=settings.resolved_system(), max_new_tokens=DESCRIPTION_TOKENS,
                       decoding=settings.decoding, qtype=QType.CAPTIONING.value)
            for qid, ref in zip(ids, todo.values(), strict=True)]
    t0 = time.perf_counter()
    with telemetry.request_spans(run_id, asks, ctx.backend.model_id, ids) as asked:
        responses, retries = await _generate(ctx, asks, spec, settings, errors)
        asked.answered(responses, retries=retries, parse_ok=[True] * len(responses))
    latency = time.perf_counter() - t0
    if ctx.tracer is not None:
        _trace(runtime, [QuestionRecord(
            run_id=run_id, stage=spec.number, question_id=qid,
            request_id=ask.request_id, task_type=DESCRIPTION, qtype=QType.CAPTIONING.value,
            question=ask.question, prompt=resp.prompt, dialect=resp.dialect,
            vision_head=resp.vision_head,
            prompt_sha256=None if resp.prompt is None else sha256_bytes(resp.prompt.encode()),
            images=[sha], model_id=resp.model_id, decoding=ask.decoding,
            max_new_tokens=ask.max_new_tokens, raw_output=resp.text,
            parsed=parse_answer(resp.text, qtype=QType.CAPTIONING.value,
                                task_type="Report_Generation"),
            parse_status="ok", finish_reason=resp.finish_reason,
            prompt_tokens=resp.prompt_tokens, completion_tokens=resp.completion_tokens,
            latency_s=latency, retries=retries, checkpoint_id=checkpoint)
            for qid, sha, ask, resp in zip(ids, todo, asks, responses, strict=True)])
    return {sha: resp.text for sha, resp in zip(todo, responses, strict=True)}


DESCRIPTION_TOKENS = 320
"""Room for an image's description (CXRTrekNet's canonical ones are about 180 tokens)."""


# --- nodes -----------------------------------------------------------------------------------


async def intake(state: ReadState, runtime: Runtime[RunContext]) -> Update:
    """Check the study, hash its images, settle the settings, look for a prior."""
    ctx = runtime.context
    study = Study.model_validate(state["study"])
    if not study.images:
        raise DataError(f"study {study.study_id}: expected at least one image (the current "
                        "study first); got none")
    for ref in [*study.images, *(study.prior.images if study.prior else [])]:
        if ref.data is not None:
            ctx.image_bytes[sha256_bytes(ref.data)] = ref.data
        try:
            ref.digest()
        except OSError:
            log.debug("study %s: image %s cannot be read to hash it", study.study_id,
                      ref.path)
    if not study.has_prior and ctx.prior_lookup is not None:
        found = ctx.prior_lookup(study)
        if found is not None:
            study = study.model_copy(update={"prior": found})
    settings = (RunSettings.model_validate(state["settings"]) if state.get("settings")
                else ctx.settings)
    if settings.describe is None:
        settings = settings.model_copy(update={"describe": describes_first(ctx.backend)})
    mode = resolve_mode(settings.mode, study)
    run_id = _run_id(runtime, state)
    _trace(runtime, [RunRecord(
        run_id=run_id, study_id=study.study_id, patient_hash=hash_patient(study.patient_id),
        images=[r.sha256 for r in study.images],
        prior_images=[r.sha256 for r in study.prior.images] if study.prior else [],
        mode=mode, settings=settings.model_dump(mode="json"),
        model_id=ctx.backend.model_id, backend=ctx.backend_record().get("spec"),
        otel_trace_id=telemetry.trace_id_in(ctx.span_parent))])
    return {"study": study.model_dump(mode="json"), "settings": settings.model_dump(mode="json"),
            "results": {}, "limitations": [], "stopped": None, "last_stage": 0,
            "backend": ctx.backend_record()}


def make_stage_node(spec: StageSpec) -> StageNode:
    """The node of one stage (all eight come from here)."""

    async def stage_node(state: ReadState, runtime: Runtime[RunContext]) -> Update:
        run_id = _run_id(runtime, state)
        checkpoint = _checkpoint_id(runtime)
        with telemetry.stage_span(run_id, spec.number, spec.key,
                                  parent=runtime.context.span_parent,
                                  checkpoint_id=checkpoint) as span:
            return await _run_stage(spec, state, runtime, run_id, checkpoint, span)

    stage_node.__name__ = stage_node_name(spec.number)
    stage_node.__doc__ = f"Stage {spec.number}: {spec.title}."
    return stage_node


async def _run_stage(spec: StageSpec, state: ReadState, runtime: Runtime[RunContext],
                     run_id: str, checkpoint: str | None, span: Span) -> Update:
    ctx = runtime.context
    settings = _settings(state)
    study = Study.model_validate(state["study"])
    results = results_of(state)
    questions = plan_questions(study, spec.number, results, mode=settings.mode,
                               max_findings=settings.max_findings)
    base: Update = {"last_stage": spec.number}
    if not questions:
        result = StageResult(stage=spec.number, name=spec.title,
                             skipped="no questions for this stage")
        _trace(runtime, [StageRecord(run_id=run_id, stage=spec.number, name=spec.key,
                                     status="skipped", reason=result.skipped,
                                     checkpoint_id=checkpoint)])
        span.set_attributes({"cxrtrek.stage.status": "skipped", "cxrtrek.stage.questions": 0})
        return {**base, "results": {str(spec.number): result.model_dump(mode="json")}}
    tags = image_tags_of(study) if resolve_mode(settings.mode, study) == "dataset" else {}
    candidates = context_items(results, spec.number)
    retriever = ctx.retriever or (ctx.memory.retriever_for(run_id)
                                  if ctx.memory is not None else None)
    contexts: list[list[ScoredContext]] = [
        select_context(settings.context, q.text, candidates, top_k=settings.top_k,
                       retriever=retriever) for q in questions]
    system = settings.resolved_system()
    requests: list[VLMRequest] = []
    for q, chosen in zip(questions, contexts, strict=True):
        shown = [i for c in chosen for i in tags.get(c.item.id.split(":", 1)[1], [])]
        images, image_tags = request_images(study, spec.number, ctx.image_bytes,
                                            [*shown, *tags.get(q.id, [])])
        requests.append(VLMRequest(
            request_id=request_id(run_id, spec.number, q.id), stage=spec.number,
            question=q.text, images=images, system=system,
            context=[ContextPair(stage=c.item.stage, question=c.item.question,
                                 answer=c.item.answer) for c in chosen],
            max_new_tokens=settings.max_new_tokens, decoding=settings.decoding,
            qtype=q.qtype, options=q.options, image_tags=image_tags))
    errors: list[str] = []
    span.set_attribute("cxrtrek.stage.questions", len(questions))
    t0 = time.perf_counter()
    new_descriptions: dict[str, str] = {}
    if settings.describe:
        try:
            new_descriptions = await _describe(spec, requests, results, settings, runtime,
                                               run_id, checkpoint, errors)
        except CXRTrekError as exc:
            _stage_failed(runtime, spec, run_id, questions, errors, exc, t0, checkpoint, span)
            raise
        described = {**descriptions_of(results), **new_descriptions}
        requests = [with_descriptions(r, described) for r in requests]
        span.set_attribute("cxrtrek.stage.described_images", len(new_descriptions))
    try:
        with telemetry.request_spans(run_id, requests, ctx.backend.model_id,
                                     [q.id for q in questions]) as asked:
            responses, retries = await _generate(ctx, requests, spec, settings, errors)
            answers = [Answer(question_id=q.id, text=r.text, parsed=_parse(q, r.text))
                       for q, r in zip(questions, responses, strict=True)]
            asked.answered(responses, retries=retries, parse_ok=[a.ok for a in answers])
    except CXRTrekError as exc:
        _stage_failed(runtime, spec, run_id, questions, errors, exc, t0, checkpoint, span)
        raise
    latency = time.perf_counter() - t0
    span.set_attributes({"cxrtrek.stage.status": "ran", "cxrtrek.retries": retries,
                         "cxrtrek.stage.unparsed": sum(not a.ok for a in answers)})
    result = _with_findings(spec.number, StageResult(
        stage=spec.number, name=spec.title, questions=questions, answers=answers,
        descriptions=new_descriptions), results)
    if runtime.context.tracer is not None:
        _trace(runtime, _question_records(
            run_id, questions, requests, responses, answers, contexts,
            latency=latency, retries=retries, checkpoint=checkpoint))
        _trace(runtime, [StageRecord(
            run_id=run_id, stage=spec.number, name=spec.key, status="ran",
            question_ids=[q.id for q in questions], latency_s=latency, retries=retries,
            errors=errors, checkpoint_id=checkpoint)])
    if ctx.memory is not None:
        ctx.memory.record_stage(run_id, study, result)
    update = {**base, "results": {str(spec.number): result.model_dump(mode="json")},
              "backend": ctx.backend_record()}
    if spec.number == 1:
        update.update(_quality_update(result, settings))
    return update


def _stage_failed(runtime: Runtime[RunContext], spec: StageSpec, run_id: str,
                  questions: Sequence[Question], errors: list[str], exc: CXRTrekError,
                  t0: float, checkpoint: str | None, span: Span) -> None:
    """Trace and mark a stage whose backend call failed (the error is raised on)."""
    _trace(runtime, [StageRecord(
        run_id=run_id, stage=spec.number, name=spec.key, status="failed",
        question_ids=[q.id for q in questions], errors=[*errors, str(exc)],
        latency_s=time.perf_counter() - t0, checkpoint_id=checkpoint)])
    span.set_attributes({"cxrtrek.stage.status": "failed", "cxrtrek.retries": len(errors)})


def _question_records(run_id: str, questions: Sequence[Question],
                      requests: Sequence[VLMRequest], responses: Sequence[VLMResponse],
                      answers: Sequence[Answer], contexts: Sequence[Sequence[ScoredContext]],
                      *, latency: float, retries: int,
                      checkpoint: str | None) -> list[TraceRecord]:
    out: list[TraceRecord] = []
    for q, req, resp, ans, chosen in zip(questions, requests, responses, answers, contexts,
                                         strict=True):
        prompt = resp.prompt  # as the backend sent it (None: it renders none)
        described = len(req.context) - len(chosen)  # descriptions come first
        seen = [ContextRef(id=f"{DESCRIPTION}:{r.sha256}") for r in req.images][:described]
        out.append(QuestionRecord(
            run_id=run_id, stage=q.stage, question_id=q.id, request_id=req.request_id,
            task_type=q.task_type, qtype=q.qtype, question=q.text, options=q.options,
            target=q.target, prompt=prompt, dialect=resp.dialect,
            constrained=resp.constrained, quoted=resp.quoted, candidates=resp.candidates,
            held=resp.held, assembled=resp.assembled,
            prompt_sha256=None if prompt is None else sha256_bytes(prompt.encode()),
            images=[r.sha256 for r in req.images],
            context=[*seen, *(ContextRef(id=c.item.id, score=c.score) for c in chosen)],
            context_used=resp.context_used,
            model_id=resp.model_id, decoding=req.decoding, max_new_tokens=req.max_new_tokens,
            raw_output=resp.text, parsed=ans.parsed,
            parse_status="ok" if ans.ok else "unparsed", finish_reason=resp.finish_reason,
            prompt_tokens=resp.prompt_tokens, completion_tokens=resp.completion_tokens,
            latency_s=latency, retries=retries, checkpoint_id=checkpoint))
    return out


# --- review ----------------------------------------------------------------------------------


class ReviewRequest(BaseModel):
    """What a paused run shows a person: one stage's questions and answers."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    stage: int
    name: str
    questions: list[Question]
    answers: list[Answer]


class ReviewDecision(BaseModel):
    """A person's decision on a paused stage: approve (no edits) or corrected answer texts
    by question id."""

    model_config = ConfigDict(extra="forbid")

    edits: dict[str, str] = Field(default_factory=dict)


async def review(state: ReadState, runtime: Runtime[RunContext]) -> Update:
    """Pause for a person; apply their edits to the stage that just ran."""
    number = state["last_stage"]
    results = results_of(state)
    result = results[number]
    run_id = _run_id(runtime, state)
    request = ReviewRequest(run_id=run_id, stage=number, name=result.name,
                            questions=result.questions, answers=result.answers)
    raw = interrupt(request.model_dump(mode="json"))
    decision = (raw if isinstance(raw, ReviewDecision)
                else ReviewDecision.model_validate(raw or {}))
    if not decision.edits:
        return {}
    update, records = edit_stage(state, number, decision.edits, run_id=run_id)
    _trace(runtime, records)
    return update


def edit_stage(state: ReadState, number: int, edits: dict[str, str], *,
               run_id: str) -> tuple[Update, list[TraceRecord]]:
    """The state update that replaces answers of stage ``number`` by ``edits`` (re-parsed,
    findings and the quality judgement recomputed), and the review records."""
    results = results_of(state)
    if number not in results:
        raise DataError(f"stage {number} has no result to edit in run {run_id}; stages with "
                        f"results: {sorted(results)}")
    edited, records = apply_edits(results[number], edits, run_id=run_id)
    edited = _with_findings(number, edited, results)
    update: Update = {"results": {str(number): edited.model_dump(mode="json")}}
    if number == 1:
        update.update(_quality_update(edited, _settings(state)))
    return update, records


def apply_edits(result: StageResult, edits: dict[str, str], *,
                run_id: str) -> tuple[StageResult, list[TraceRecord]]:
    """The stage result with edited answer texts (re-parsed), and the review records."""
    questions = {q.id: q for q in result.questions}
    unknown = sorted(set(edits) - set(questions))
    if unknown:
        raise DataError(f"stage {result.stage}: no question {unknown[0]!r} to edit; the "
                        f"stage asked {sorted(questions)}")
    answers: list[Answer] = []
    records: list[TraceRecord] = []
    for answer in result.answers:
        new = edits.get(answer.question_id)
        if new is None or new == answer.text:
            answers.append(answer)
            continue
        q = questions[answer.question_id]
        answers.append(Answer(question_id=q.id, text=new, parsed=_parse(q, new)))
        records.append(ReviewRecord(run_id=run_id, stage=result.stage, question_id=q.id,
                                    before=answer.text, after=new))
    return result.model_copy(update={"answers": answers}), records


# --- the end ---------------------------------------------------------------------------------


def _why_not_run(spec: StageSpec, state: ReadState) -> str:
    if state.get("stopped"):
        return f"not run: the reading stopped ({state['stopped']})"
    if spec.needs_prior and not _has_prior(state):
        return "no prior study"
    if state.get("settings") and not _settings(state).wants(spec.number):
        return "not requested"
    return "not run"


def build_report(state: ReadState, run_id: str) -> Report:
    """The report of a state: every stage's result (or why it did not run) and the report
    sections of stage 8 (None until stage 8 ran)."""
    study = state["study"]
    study_id = study.study_id if isinstance(study, Study) else dict(study)["study_id"]
    results = results_of(state)
    stages = [results.get(spec.number) or StageResult(
        stage=spec.number, name=spec.title, skipped=_why_not_run(spec, state))
        for spec in STAGES]
    findings, impression = report_sections(results.get(8))
    return Report(study_id=study_id, run_id=run_id, findings=findings, impression=impression,
                  limitations=list(state.get("limitations") or []), stages=stages)


async def finalize(state: ReadState, runtime: Runtime[RunContext]) -> Update:
    """Assemble the report; write the trace's end record."""
    run_id = _run_id(runtime, state)
    report = build_report(state, run_id)
    memory = runtime.context.memory
    if memory is not None and not state.get("stopped"):
        study = Study.model_validate(state["study"])
        cache = runtime.context.image_bytes
        images = [r.model_copy(update={"data": cache[r.sha256]})
                  if r.data is None and r.sha256 in cache else r for r in study.images]
        memory.record_report(run_id, study.model_copy(update={"images": images}), report)
    _trace(runtime, [EndRecord(run_id=run_id,
                               status="stopped" if state.get("stopped") else "completed",
                               findings=report.findings, impression=report.impression,
                               limitations=report.limitations)])
    return {"report": report.model_dump(mode="json")}


# --- routing ---------------------------------------------------------------------------------


def _has_prior(state: ReadState) -> bool:
    study = state["study"]
    if isinstance(study, Study):
        return study.has_prior
    return bool(study.get("prior")) or any(i.get("role") == "prior"
                                           for i in study.get("images", []))


def next_stage(state: ReadState) -> str:
    """The node after the last stage: the next stage that applies, or ``finalize``."""
    if state.get("stopped"):
        return "finalize"
    has_prior = _has_prior(state)
    settings = _settings(state)
    for spec in STAGES:
        if spec.number <= state.get("last_stage", 0) or not settings.wants(spec.number):
            continue
        if spec.needs_prior and not has_prior:
            continue
        return stage_node_name(spec.number)
    return "finalize"


def passed_over(state: ReadState) -> list[StageResult]:
    """The stages after the state's last stage that the routing will go around (not
    requested, or a comparison without a prior), each as a skipped result with its reason:
    they have no node run, so no update of their own."""
    has_prior = _has_prior(state)
    settings = _settings(state)
    last = state.get("last_stage", 0)
    return [StageResult(stage=spec.number, name=spec.title, skipped=_why_not_run(spec, state))
            for spec in STAGES
            if spec.number > last and (not settings.wants(spec.number)
                                       or (spec.needs_prior and not has_prior))]


def route_after_stage(state: ReadState) -> str:
    """``review`` when the stage just run is to be reviewed, else :func:`next_stage`."""
    if state.get("last_stage") in _settings(state).review_after:
        return "review"
    return next_stage(state)
