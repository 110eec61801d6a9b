"""The evaluation runner: read a CXRTrek-format dataset under one or more context policies and
score every answer.

::

    config = EvalConfig(data="data.json", backend="inprocess:model/",
                        contexts=("full", "retrieved", "none"), workers=2)
    outcome = run_eval(config, out_dir="eval/")      # results.json, questions.jsonl, plots

Three ways to run, the same rows from each:

* in this process: an asyncio pool of ``concurrency`` readings at a time, over one agent
  (rebuilt every :data:`RUNS_PER_AGENT` runs so that in-memory checkpoints stay bounded);
* ``workers`` > 1: the studies sharded round-robin over spawned processes, each running its
  shard the same way; the parent merges the rows;
* ``ray``: shards as Ray tasks on a local (``"local"``) or existing (an address) cluster.

Runs are in dataset mode (each study's own questions), checkpointed in memory and traced to
an in-memory collector; each run's trace is scored right away (:mod:`cxrtrek.evals.metrics`)
and judged by the graph's error attribution (:func:`cxrtrek.graph.replay.attribute_errors`).
Run ids are deterministic (``eval-<policy>-<index>-<study>``), so rows do not depend on how
the work was split.

Backends (``backend``): any spec of :func:`cxrtrek.backends.registry.load_backend` (``demo``,
``inprocess:PATH``, ``http:URL``, ``scripted``); ``scripted-oracle`` (each study's reference
answers: everything but the model is measured; it needs no images) is routed here, one oracle
per run. A model backend needs the images: with ``allow_missing_images``
the questions of studies whose images are missing are skipped and counted, otherwise loading
the dataset raises :class:`~cxrtrek.errors.MissingImageError`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue as queue_mod
import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cxrtrek import errors as _errors
from cxrtrek.errors import BackendError, ConfigError, CXRTrekError
from cxrtrek.evals.benchmark_metrics import apply_benchmark, summarize_benchmark
from cxrtrek.evals.metrics import score_answer
from cxrtrek.evals.results import EvalResults, QuestionRow, context_effects, summarize, write_rows
from cxrtrek.schema import Study

if TYPE_CHECKING:
    from cxrtrek.agent.agent import CXRTrekAgent
    from cxrtrek.evals.datasets import BenchmarkSet
    from cxrtrek.graph.trace import TraceRecord
    from cxrtrek.protocol import VLMBackend, VLMRequest, VLMResponse

__all__ = [
    "RUNS_PER_AGENT",
    "EvalConfig",
    "EvalOutcome",
    "ShardResult",
    "evaluate",
    "evaluate_shard",
    "load_eval_dataset",
    "load_eval_studies",
    "missing_images",
    "rows_of_run",
    "run_eval",
]

log = logging.getLogger(__name__)

Policy = Literal["full", "retrieved", "none"]
Progress = Callable[[int], None]
"""Called with the number of (study, policy) runs just finished."""

RUNS_PER_AGENT = 256
"""Runs served by one agent (and its in-memory checkpointer) before a fresh one is built."""

ORACLE = "scripted-oracle"
PLANNED_ORACLE_ANSWER = "Not assessed: the oracle knows only the dataset's reference answers."
"""What the oracle answers to a question the graph planned (the stages a staged reading runs
before a benchmark's question)."""


class EvalConfig(BaseModel):
    """What to evaluate and how to split the work."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str
    """A CXRTrek-format file or a public benchmark's file (JSON or JSONL)."""
    format: str = "auto"
    """``auto`` (recognised from the file), ``cxrtrek`` or a benchmark
    (:data:`cxrtrek.evals.datasets.BENCHMARK_FORMATS`)."""
    organ: str | None = None
    """VQA-RAD: keep the questions on this ``image_organ`` (e.g. ``CHEST``)."""
    split: str | None = None
    """VQA-RAD, MIMIC-CXR-VQA: keep the questions of this split (e.g. ``test``)."""
    image_root: str | None = None
    """Folder the image paths are relative to (default: the file's folder, or the
    benchmark's usual image folder beside it)."""
    backend: str = ORACLE
    """A spec of :func:`cxrtrek.backends.registry.load_backend` (checked here)."""
    contexts: tuple[Policy, ...] = ("full",)
    allow_missing_images: bool = False
    workers: int = Field(default=1, ge=1)
    concurrency: int = Field(default=4, ge=1)
    """Readings in flight at a time, in each process."""
    limit: int | None = Field(default=None, ge=1)
    """Only the first N studies."""
    ray: str | None = None
    """``local`` (start a local Ray cluster) or a cluster address; None: no Ray."""
    bertscore_model: str | None = None
    """A local BERT-like model folder for BERTScore; None skips BERTScore."""
    memory: str | None = None
    """A chromadb folder for the agent's vector memory (``retrieved`` context)."""
    max_new_tokens: int | None = Field(default=None, ge=1)
    device: str | None = None
    """An in-process model's device (``cpu``, ``cuda[:N]``, None or ``auto``)."""
    dtype: str | None = None
    """An in-process model's dtype (``float32``, ``bfloat16``, ``float16``, None or ``auto``)."""
    dialect: str | None = None
    """How requests become chats (:mod:`cxrtrek.prompts.dialects`); None: the backend's own."""
    describe: bool | None = None
    """Describe-then-answer (:attr:`~cxrtrek.graph.state.RunSettings.describe`); None: as
    the backend prefers."""
    constrain_choices: bool | None = None
    """Answer choice questions with one of their options
    (:attr:`~cxrtrek.backends.registry.BackendOptions.constrain_choices`); None: as the
    backend prefers."""
    dense_head: bool | None = None
    """An in-process model's dense head writes its kinds of each image description
    (:attr:`~cxrtrek.backends.registry.BackendOptions.dense_head`); None: whenever the model
    has one."""
    quote_boxes: bool | None = None
    """An in-process model's answers that locate a target quote their boxes from its image
    description (:attr:`~cxrtrek.backends.registry.BackendOptions.quote_boxes`); None: as the
    model prefers."""
    free_text_samples: int | None = Field(default=None, ge=0)
    """An in-process model chooses each free-text answer among the greedy one and this many
    samples by agreement with its image description
    (:attr:`~cxrtrek.backends.registry.BackendOptions.free_text_samples`); None: as the model
    prefers."""
    hold_closed: bool | None = None
    """An in-process model answers a closed question that its own image descriptions decide
    from them (:attr:`~cxrtrek.backends.registry.BackendOptions.hold_closed`); None: as the
    model prefers."""
    assemble_reports: bool | None = None
    """An in-process model assembles a report that no candidate agrees with its image
    description from their sentences that do
    (:attr:`~cxrtrek.backends.registry.BackendOptions.assemble_reports`); None: as the model
    prefers."""
    top_k: int | None = Field(default=None, ge=1)
    """Context items of the ``retrieved`` policy (default: the run settings' own)."""

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        from cxrtrek.evals.datasets import FORMATS

        if value not in FORMATS:
            raise ValueError(f"unknown format {value!r}; expected one of {', '.join(FORMATS)}")
        return value

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        from cxrtrek.backends.registry import check_spec

        try:
            return check_spec(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("contexts")
    @classmethod
    def _contexts(cls, value: tuple[Policy, ...]) -> tuple[Policy, ...]:
        if not value:
            raise ValueError("expected at least one context policy (full, retrieved, none)")
        if len(set(value)) != len(value):
            raise ValueError(f"context policies repeat: {', '.join(value)}")
        return value

    @property
    def is_oracle(self) -> bool:
        return self.backend == ORACLE

    @property
    def is_benchmark(self) -> bool:
        """A public benchmark (single questions): ``full`` and ``retrieved`` read the stages
        before each question first (staged mode), ``none`` asks the question alone."""
        return self.format not in ("auto", "cxrtrek")


# --- studies -------------------------------------------------------------------------------


@dataclass
class EvalDataset:
    """What an evaluation reads: the studies, the configuration with its format resolved,
    and for a public benchmark the questions' tags and what was skipped."""

    config: EvalConfig
    studies: list[Study]
    benchmark: BenchmarkSet | None = None


def load_eval_dataset(config: EvalConfig) -> EvalDataset:
    """The dataset of ``config`` (the first ``limit`` studies), its format resolved."""
    from cxrtrek.evals.datasets import load_benchmark, recognise

    fmt = recognise(config.data) if config.format == "auto" else config.format
    if fmt == "cxrtrek" and (config.organ is not None or config.split is not None):
        raise ConfigError("--organ and --split apply to the public benchmarks' files, not to "
                          "a CXRTrek-format file")
    config = config.model_copy(update={"format": fmt})
    if fmt == "cxrtrek":
        return EvalDataset(config, load_eval_studies(config))
    bench = load_benchmark(config.data, fmt, image_root=config.image_root,
                           organ=config.organ, split=config.split,
                           allow_missing_images=config.allow_missing_images).limit(config.limit)
    if not bench.studies:
        raise _errors.DataError(f"{config.data}: no question left to evaluate ({bench.report()})")
    return EvalDataset(config, bench.studies, bench)


def load_eval_studies(config: EvalConfig) -> list[Study]:
    """The studies of the dataset (the first ``limit``), images checked unless allowed."""
    from cxrtrek.data.cxrtrek import load_studies

    if config.is_benchmark or config.format == "auto":
        return load_eval_dataset(config).studies
    studies = load_studies(config.data, image_root=config.image_root,
                           allow_missing_images=config.allow_missing_images)
    if config.limit is not None:
        studies = studies[: config.limit]
    without = [s.study_id for s in studies if not s.questions]
    if without:
        raise _errors.DataError(f"{config.data}: studies without questions cannot be "
                                f"evaluated: {', '.join(without[:5])}")
    return studies


def missing_images(study: Study) -> list[str]:
    """Paths of the study's (and its prior's) images that are not files."""
    refs = [*study.images, *(study.prior.images if study.prior else [])]
    return [r.path for r in refs
            if r.data is None and r.path is not None and not Path(r.path).is_file()]


# --- backends --------------------------------------------------------------------------------


def make_backend(spec: str, config: EvalConfig | None = None) -> VLMBackend:
    """The shared model backend of an evaluation: a spec of the one registry
    (:func:`cxrtrek.backends.registry.load_backend`), with the config's device, dtype,
    dialect, choice constraint, dense head, box quoting and free-text samples."""
    from cxrtrek.backends.registry import BackendOptions, load_backend

    options = BackendOptions() if config is None else BackendOptions(
        device=config.device, dtype=config.dtype, dialect=config.dialect,
        constrain_choices=config.constrain_choices, dense_head=config.dense_head,
        quote_boxes=config.quote_boxes, free_text_samples=config.free_text_samples,
        hold_closed=config.hold_closed, assemble_reports=config.assemble_reports)
    return load_backend(spec, None, options=options)


class _OracleRouter:
    """One backend for many studies: each request goes to its run's study oracle."""

    model_id = "oracle"

    def __init__(self) -> None:
        self._by_run: dict[str, VLMBackend] = {}

    def add(self, run_id: str, study: Study, planned: str | None = None) -> None:
        from cxrtrek.backends.oracle import OracleBackend

        self._by_run[run_id] = OracleBackend(study, planned=planned)

    def remove(self, run_id: str) -> None:
        self._by_run.pop(run_id, None)

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        from cxrtrek.protocol import split_request_id

        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(split_request_id(r.request_id)[0], []).append(i)
        out: list[VLMResponse | None] = [None] * len(requests)
        for run_id, idx in groups.items():
            backend = self._by_run.get(run_id)
            if backend is None:
                raise BackendError(f"oracle: no study registered for run {run_id!r}")
            for i, resp in zip(idx, await backend.generate([requests[i] for i in idx]),
                               strict=True):
                out[i] = resp
        return [r for r in out if r is not None]


class _Collector:
    """A tracer that keeps each run's records until the run is scored (then drops them)."""

    def __init__(self) -> None:
        self._runs: dict[str, dict[tuple[str, str, int, str], TraceRecord]] = {}

    def write(self, records: Sequence[TraceRecord]) -> None:
        from cxrtrek.graph.trace import record_key

        for r in records:
            self._runs.setdefault(r.run_id, {})[record_key(r)] = r

    def pop(self, run_id: str) -> list[TraceRecord]:
        return list(self._runs.pop(run_id, {}).values())


# --- rows ----------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _run_id(policy: str, index: int, study: Study) -> str:
    return f"eval-{policy}-{index:06d}-{_UNSAFE.sub('_', study.study_id)[:48]}"


def rows_of_run(study: Study, index: int, policy: str, run_id: str | None,
                records: Sequence[TraceRecord], *, skipped: str | None = None,
                failure: str | None = None) -> list[QuestionRow]:
    """The scored rows of one run of ``study`` from its trace ``records``.

    ``skipped``: the run did not happen (the reason; rows are ``skipped_missing_image``).
    ``failure``: the run failed (questions it did not answer are ``not_answered``).
    """
    from cxrtrek.graph.replay import attribute_errors
    from cxrtrek.graph.trace import QuestionRecord

    answered = {r.question_id: r for r in records if isinstance(r, QuestionRecord)}
    verdicts = {}
    if answered:
        verdicts = {v.question_id: v
                    for v in attribute_errors(records, study.references).verdicts}
    rows: list[QuestionRow] = []
    for qi, q in enumerate(study.questions):
        ref = study.references.get(q.id)
        if ref is None:
            continue
        base = q.base_qtype
        common: dict[str, Any] = dict(
            run=policy, run_id=run_id, study_id=study.study_id, study_index=index,
            question_index=qi, question_id=q.id, stage=q.stage, task_type=q.task_type,
            qtype=q.qtype, question_type=base.value, question=q.text, reference=ref.text)
        if skipped is not None:
            rows.append(QuestionRow(**common, prediction=None,
                                    parse_status="skipped_missing_image", parse_reason=skipped))
            continue
        rec = answered.get(q.id)
        if rec is None:
            score = score_answer(base, None, None, ref)
            rows.append(QuestionRow(
                **common, prediction=None, parse_status="not_answered",
                parse_reason=failure or "the run did not ask this question",
                scores=score.scores, reference_text=score.reference_text,
                prediction_text=score.prediction_text, findings=score.findings))
            continue
        score = score_answer(base, rec.parsed, rec.raw_output, ref)
        verdict = verdicts.get(q.id)
        rows.append(QuestionRow(
            **common, prediction=rec.raw_output, parse_status=rec.parse_status,
            parse_reason=getattr(rec.parsed, "reason", None), scores=score.scores,
            reference_text=score.reference_text, prediction_text=score.prediction_text,
            findings=score.findings, correct=verdict.correct if verdict else None,
            wrong_context=list(verdict.wrong_context) if verdict else []))
    return rows


# --- one shard, in this process ------------------------------------------------------------


class ShardResult(BaseModel):
    """What a shard gives back: its rows, the model id, and the runs that failed."""

    model_config = ConfigDict(extra="forbid")

    rows: list[QuestionRow]
    model_id: str | None = None
    failures: list[str] = Field(default_factory=list)


@dataclass
class _Runner:
    config: EvalConfig
    collector: _Collector = field(default_factory=_Collector)
    router: _OracleRouter = field(default_factory=_OracleRouter)
    backend: VLMBackend | None = None
    memory: object | None = None
    agents: dict[int, CXRTrekAgent] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def agent(self, slot: int) -> CXRTrekAgent:
        from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent

        key = slot // RUNS_PER_AGENT
        if key not in self.agents:
            for old in [k for k in self.agents if k < key - 1]:
                del self.agents[old]  # no run of an older generation is still in flight
            backend = self.router if self.config.is_oracle else self.shared_backend()
            self.agents[key] = CXRTrekAgent(
                backend, memory=self.memory,
                settings=AgentSettings(checkpoint_db=":memory:", trace=False),
                tracer=self.collector)
        return self.agents[key]

    def shared_backend(self) -> VLMBackend:
        """The model backend, made on first use (a run whose images are all missing never
        loads a model)."""
        if self.backend is None:
            self.backend = make_backend(self.config.backend, self.config)
        return self.backend

    def settings(self, policy: Policy) -> Any:
        from cxrtrek.graph.state import RunSettings

        staged = self.config.is_benchmark and policy != "none"
        fields: dict[str, Any] = {"mode": "staged" if staged else "dataset", "context": policy}
        if self.config.max_new_tokens is not None:
            fields["max_new_tokens"] = self.config.max_new_tokens
        if self.config.top_k is not None:
            fields["top_k"] = self.config.top_k
        if self.config.describe is not None:
            fields["describe"] = self.config.describe
        return RunSettings.model_validate(fields)

    async def one(self, slot: int, index: int, study: Study, policy: Policy) -> list[QuestionRow]:
        run_id = _run_id(policy, index, study)
        if not self.config.is_oracle:
            missing = missing_images(study)
            if missing:
                reason = (f"{len(missing)} image(s) missing (e.g. {missing[0]}); backend "
                          f"{self.config.backend} needs them")
                return rows_of_run(study, index, policy, None, [], skipped=reason)
        else:
            staged = self.config.is_benchmark and policy != "none"
            self.router.add(run_id, study, planned=PLANNED_ORACLE_ANSWER if staged else None)
        failure = None
        try:
            report = await self.agent(slot).arun(study, run_id=run_id,
                                                 settings=self.settings(policy))
            if report.status != "completed":
                failure = f"run ended {report.status}"
        except CXRTrekError as exc:
            failure = f"{type(exc).__name__}: {exc}"
            log.warning("study %s (%s context): %s", study.study_id, policy, failure)
        finally:
            self.router.remove(run_id)
        if failure is not None:
            self.failures.append(f"{study.study_id} ({policy}): {failure}")
        return rows_of_run(study, index, policy, run_id, self.collector.pop(run_id),
                           failure=failure)


async def evaluate_shard(items: Sequence[tuple[int, Study]], config: EvalConfig,
                         progress: Progress | None = None) -> ShardResult:
    """Run ``items`` (dataset index, study) under every policy of ``config`` in this process,
    ``config.concurrency`` readings at a time; rows in (index, question) order per policy."""
    runner = _Runner(config)
    if config.memory is not None:
        from cxrtrek.memory import MemorySettings, VectorMemory

        runner.memory = VectorMemory(MemorySettings(path=config.memory))
    units = [(index, study, policy) for policy in config.contexts for index, study in items]
    queue: asyncio.Queue[tuple[int, int, Study, Policy]] = asyncio.Queue()
    for slot, (index, study, policy) in enumerate(units):
        queue.put_nowait((slot, index, study, policy))
    results: dict[int, list[QuestionRow]] = {}

    async def work() -> None:
        while True:
            try:
                slot, index, study, policy = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results[slot] = await runner.one(slot, index, study, policy)
            if progress is not None:
                progress(1)

    try:
        await asyncio.gather(*(work() for _ in range(min(config.concurrency,
                                                          max(1, len(units))))))
    finally:
        close = getattr(runner.backend, "aclose", None)
        if close is not None:
            await close()
    rows = [r for slot in sorted(results) for r in results[slot]]
    model_id = "oracle" if config.is_oracle else getattr(runner.backend, "model_id",
                                                         config.backend)
    return ShardResult(rows=rows, model_id=model_id, failures=runner.failures)


# --- processes -------------------------------------------------------------------------------


def _error_class(name: str) -> type[CXRTrekError]:
    cls = getattr(_errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, CXRTrekError) else CXRTrekError


def _process_main(config_json: str, items: list[tuple[int, Study]], out: Any,
                  verbosity: int) -> None:
    """A spawned worker: run its shard, report progress and the result on ``out``."""
    logging.basicConfig(level=verbosity, format="%(levelname)s %(name)s: %(message)s")
    config = EvalConfig.model_validate_json(config_json)
    try:
        result = asyncio.run(evaluate_shard(items, config,
                                            progress=lambda k: out.put(("progress", k))))
        out.put(("done", result.model_dump_json()))
    except CXRTrekError as exc:
        out.put(("error", type(exc).__name__, str(exc), ""))
    except BaseException as exc:  # reported to the parent, which raises it as its own
        out.put(("crash", type(exc).__name__, str(exc), traceback.format_exc()))


def _shards(items: Sequence[tuple[int, Study]], n: int) -> list[list[tuple[int, Study]]]:
    shards = [list(items[i::n]) for i in range(n)]
    return [s for s in shards if s]


def _evaluate_processes(items: Sequence[tuple[int, Study]], config: EvalConfig,
                        progress: Progress | None) -> list[ShardResult]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    shards = _shards(items, config.workers)
    procs = [ctx.Process(target=_process_main, name=f"cxrtrek-eval-{i}",
                         args=(config.model_dump_json(), shard, out,
                               logging.getLogger().getEffectiveLevel()))
             for i, shard in enumerate(shards)]
    for p in procs:
        p.start()
    results: list[ShardResult] = []
    try:
        while len(results) < len(procs):
            try:
                msg = out.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise BackendError(f"eval worker {dead[0].name} exited with code "
                                       f"{dead[0].exitcode} before returning its shard") from None
                continue
            if msg[0] == "progress":
                if progress is not None:
                    progress(int(msg[1]))
            elif msg[0] == "done":
                results.append(ShardResult.model_validate_json(msg[1]))
            elif msg[0] == "error":
                raise _error_class(msg[1])(f"eval worker: {msg[2]}")
            else:
                raise RuntimeError(f"eval worker crashed: {msg[1]}: {msg[2]}\n{msg[3]}")
    finally:
        for p in procs:
            if p.is_alive() and len(results) < len(procs):
                p.terminate()
        for p in procs:
            p.join(timeout=10)
    return results


# --- Ray -------------------------------------------------------------------------------------


def _ray_shard(config_json: str, items: list[tuple[int, Study]]) -> tuple[str, str, str]:
    """A Ray task: one shard; CXRTrek errors come back as values, not as task failures."""
    config = EvalConfig.model_validate_json(config_json)
    try:
        return "done", asyncio.run(evaluate_shard(items, config)).model_dump_json(), ""
    except CXRTrekError as exc:
        return "error", type(exc).__name__, str(exc)


def _evaluate_ray(items: Sequence[tuple[int, Study]], config: EvalConfig,
                  progress: Progress | None) -> list[ShardResult]:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--ray needs the ray package (pip install ray); it is not "
                          "installed here") from exc
    local = config.ray == "local"
    started = False
    if not ray.is_initialized():
        try:
            if local:
                ray.init(num_cpus=config.workers, include_dashboard=False,
                         log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(address=config.ray, log_to_driver=False,
                         logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot start or reach the Ray cluster {config.ray!r}: "
                              f"{exc}") from exc
        started = True
    try:
        task = ray.remote(_ray_shard)
        n = max(1, min(len(items), config.workers * 4))
        shards = _shards(items, n)
        cfg = config.model_dump_json()
        pending = {task.remote(cfg, shard): len(shard) for shard in shards}
        results: list[ShardResult] = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                size = pending.pop(ref)
                status, a, b = ray.get(ref)
                if status == "error":
                    raise _error_class(a)(f"ray task: {b}")
                results.append(ShardResult.model_validate_json(a))
                if progress is not None:
                    progress(size * len(config.contexts))
        return results
    finally:
        if started:
            ray.shutdown()


# --- the whole evaluation ----------------------------------------------------------------------


def evaluate(studies: Sequence[Study], config: EvalConfig,
             progress: Progress | None = None) -> ShardResult:
    """All rows of ``studies`` under ``config``: in this process, in worker processes, or on
    Ray; merged in (policy, study, question) order."""
    items = list(enumerate(studies))
    if config.memory is not None and (config.ray is not None or config.workers > 1):
        raise ConfigError("--memory (an embedded chromadb folder) cannot be shared by worker "
                          "processes or Ray tasks; use --workers 1 without --ray")
    if config.ray is not None:
        results = _evaluate_ray(items, config, progress)
    elif config.workers > 1 and len(items) > 1:
        results = _evaluate_processes(items, config, progress)
    else:
        results = [asyncio.run(evaluate_shard(items, config, progress))]
    order: dict[str, int] = {p: i for i, p in enumerate(config.contexts)}
    rows = sorted((r for res in results for r in res.rows),
                  key=lambda r: (order[r.run], r.study_index, r.question_index))
    model_ids = {res.model_id for res in results if res.model_id}
    return ShardResult(rows=rows, model_id=", ".join(sorted(model_ids)) or None,
                       failures=[f for res in results for f in res.failures])


@dataclass
class EvalOutcome:
    """What :func:`run_eval` wrote."""

    results: EvalResults
    rows: list[QuestionRow]
    out_dir: Path
    files: dict[str, Path]


def _bertscore(rows: list[QuestionRow], model: str) -> str:
    """Score the open answers with BERTScore (in place); a note for the results."""
    from cxrtrek.evals.bertscore import BERTScorer

    open_rows = [r for r in rows if r.reference_text is not None and r.scored]
    scorer = BERTScorer(model)
    f1 = scorer.f1([r.prediction_text or "" for r in open_rows],
                   [r.reference_text or "" for r in open_rows])
    for r, v in zip(open_rows, f1, strict=True):
        r.scores["bertscore_f1"] = v
    return f"bertscore_f1: {scorer.describe()}"


def run_eval(config: EvalConfig, out_dir: str | Path, *,
             progress_factory: Callable[[int], Progress] | None = None) -> EvalOutcome:
    """Evaluate and write ``results.json``, ``questions.jsonl`` and the plots to ``out_dir``.

    ``progress_factory(total)`` gives the progress callback (total: study x policy runs).
    """
    from cxrtrek.evals.plots import plot_ablation, plot_per_stage

    started = time.perf_counter()
    dataset = load_eval_dataset(config)
    config, studies = dataset.config, dataset.studies
    progress = progress_factory(len(studies) * len(config.contexts)) \
        if progress_factory is not None else None
    merged = evaluate(studies, config, progress)
    run_s = time.perf_counter() - started
    notes: list[str] = []
    if config.bertscore_model is not None:
        notes.append(_bertscore(merged.rows, config.bertscore_model))
    else:
        notes.append("bertscore_f1 not computed: no --bertscore-model PATH given (BERTScore "
                     "needs a local model; nothing is downloaded)")
    skipped = [r for r in merged.rows if r.parse_status == "skipped_missing_image"]
    if skipped:
        n_studies = len({(r.run, r.study_index) for r in skipped})
        notes.append(f"{len(skipped)} question row(s) of {n_studies} (study, policy) run(s) "
                     f"skipped: images missing, and backend {config.backend} needs them")
    if config.is_oracle and any(missing_images(s) for s in studies):
        notes.append("images missing: the oracle answered from the references without them")
    notes.extend(f"run failed: {f}" for f in merged.failures)
    if dataset.benchmark is not None:
        notes.append(dataset.benchmark.report())
        apply_benchmark(merged.rows, dataset.benchmark.tags)
    policies = summarize(merged.rows, config.contexts)
    if dataset.benchmark is not None:
        for name, summary in policies.items():
            summary.benchmark = summarize_benchmark(r for r in merged.rows if r.run == name)
    results = EvalResults(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        config=config.model_dump(mode="json"),
        dataset={"path": config.data, "format": config.format, "studies": len(studies),
                 "questions": sum(len(s.questions) for s in studies),
                 **(dataset.benchmark.describe() if dataset.benchmark is not None else {})},
        model_id=merged.model_id, policies=policies, notes=notes,
        context_effects=context_effects(merged.rows, config.contexts),
        timing={"run_s": round(run_s, 3),
                "studies_per_s": round(len(studies) * len(config.contexts) / run_s, 3)
                if run_s > 0 else 0.0})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": out / "results.json", "questions": out / "questions.jsonl",
             "per_stage": out / "per_stage.png"}
    tmp = files["results"].with_name("results.json.tmp")
    tmp.write_text(results.model_dump_json(indent=1) + "\n", encoding="utf-8")
    tmp.replace(files["results"])
    write_rows(merged.rows, files["questions"])
    plot_per_stage(results, files["per_stage"])
    if len(config.contexts) > 1:
        files["ablation"] = plot_ablation(results, out / "ablation.png")
    log.info("eval: %d studies x %d policies in %.1f s -> %s", len(studies),
             len(config.contexts), run_s, out)
    return EvalOutcome(results=results, rows=merged.rows, out_dir=out, files=files)
