"""Trace records: lines written in the schema-1 format read back, and records write them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrtrek.errors import DataError
from cxrtrek.graph.trace import (
    EndRecord,
    FollowupRecord,
    JsonlTracer,
    QuestionRecord,
    ReviewRecord,
    RunRecord,
    StageRecord,
    read_trace,
)

_AT = "2025-01-02T03:04:05.678+00:00"
# One line of each kind, as a trace of schema version 1 holds them (key order included).
LINES = [
    '{"kind":"run","schema_version":1,"run_id":"r1","study_id":"s1","patient_hash":"ab",'
    '"images":["' + "f" * 64 + '"],"prior_images":[],"mode":"full","settings":{"k":1},'
    '"model_id":"m","backend":null,"forked_from":null,"otel_trace_id":null,'
    '"created_at":"' + _AT + '"}',
    '{"kind":"question","schema_version":1,"run_id":"r1","stage":2,"question_id":"q1",'
    '"request_id":"r1/2/q1","task_type":"Findings_Identification","qtype":"yes_no",'
    '"question":"Any?","options":[],"target":null,"prompt":"P","prompt_sha256":"' + "0" * 64
    + '","dialect":"cxrtrek","constrained":null,"vision_head":null,"quoted":null,'
    '"candidates":null,"held":null,"assembled":null,"images":[],'
    '"context":[{"id":"1:q0","score":0.5}],'
    '"context_used":null,"model_id":"m","decoding":{"temperature":null,"top_p":null,'
    '"seed":null},"max_new_tokens":8,"raw_output":"Yes.","parsed":{"kind":"unparsed",'
    '"reason":"empty"},"parse_status":"unparsed","finish_reason":"stop","prompt_tokens":0,'
    '"completion_tokens":0,"latency_s":0.0,"retries":0,"checkpoint_id":null,'
    '"created_at":"' + _AT + '"}',
    '{"kind":"stage","schema_version":1,"run_id":"r1","stage":2,"name":"findings",'
    '"status":"ran","reason":null,"question_ids":["q1"],"latency_s":0.0,"retries":0,'
    '"errors":[],"checkpoint_id":null,"created_at":"' + _AT + '"}',
    '{"kind":"review","schema_version":1,"run_id":"r1","stage":2,"question_id":"q1",'
    '"before":"a","after":"b","created_at":"' + _AT + '"}',
    '{"kind":"end","schema_version":1,"run_id":"r1","status":"completed","findings":"F",'
    '"impression":null,"limitations":[],"created_at":"' + _AT + '"}',
    '{"kind":"followup","schema_version":1,"run_id":"r1","turn":1,"question_id":"followup-1",'
    '"question":"?","answer":"!","context":[],"context_used":null,"images":[],"model_id":"m",'
    '"finish_reason":"stop","error":null,"latency_s":0.0,"created_at":"' + _AT + '"}',
]
KINDS = [RunRecord, QuestionRecord, StageRecord, ReviewRecord, EndRecord, FollowupRecord]


def test_a_schema_1_trace_reads_and_writes_back_the_same_lines(tmp_path: Path) -> None:
    path = tmp_path / "r1.jsonl"
    path.write_text("".join(f"{x}\n" for x in LINES), encoding="utf-8")
    records = read_trace(path)
    assert [type(r) for r in records] == KINDS
    assert all(r.run_id == "r1" and r.schema_version == 1 and r.created_at == _AT
               for r in records)
    assert [r.model_dump_json() for r in records] == LINES
    question = records[1]
    assert isinstance(question, QuestionRecord)
    assert question.context[0].score == 0.5 and question.parsed.kind == "unparsed"


def test_a_question_line_from_before_the_newer_fields_still_reads(tmp_path: Path) -> None:
    # traces written before records gained ``backend``, ``dialect``, ``constrained`` and
    # ``vision_head``, ``quoted`` and ``candidates``
    old = [LINES[0].replace(',"backend":null', "").replace(',"otel_trace_id":null', ""),
           LINES[1].replace(',"dialect":"cxrtrek","constrained":null,"vision_head":null,'
                            '"quoted":null,"candidates":null', "")]
    path = tmp_path / "old.jsonl"
    path.write_text("".join(f"{x}\n" for x in old), encoding="utf-8")
    run, question = read_trace(path)
    assert isinstance(run, RunRecord) and run.backend is None
    assert isinstance(question, QuestionRecord)
    assert question.dialect is None and question.constrained is None
    assert question.vision_head is None and question.quoted is None
    assert question.candidates is None


def test_a_run_line_from_before_the_newer_fields_still_reads(tmp_path: Path) -> None:
    # traces written before a run record gained ``backend`` and ``otel_trace_id``
    old = LINES[0].replace('"backend":null,', "").replace('"otel_trace_id":null,', "")
    path = tmp_path / "old.jsonl"
    path.write_text(old + "\n", encoding="utf-8")
    [run] = read_trace(path)
    assert isinstance(run, RunRecord)
    assert run.backend is None and run.otel_trace_id is None


def test_rewriting_a_read_trace_leaves_the_file_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "r1.jsonl"
    before = "".join(f"{x}\n" for x in LINES)
    path.write_text(before, encoding="utf-8")
    JsonlTracer(tmp_path).write(read_trace(path))
    assert path.read_text(encoding="utf-8") == before


def test_every_record_has_the_common_fields_with_defaults() -> None:
    end = EndRecord(run_id="r2", status="stopped")
    dumped = json.loads(end.model_dump_json())
    assert list(dumped)[:3] == ["kind", "schema_version", "run_id"]
    assert list(dumped)[-1] == "created_at" and dumped["created_at"].endswith("+00:00")
    assert dumped["kind"] == "end" and dumped["schema_version"] == 1


@pytest.mark.parametrize(("change", "message"), [
    ({"schema_version": 2}, "trace schema version 2; this cxrtrek reads version 1"),
    ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
    ({"kind": "nope"}, "does not match any of the expected tags"),
    ({"run_id": None}, "run_id: Input should be a valid string"),
])
def test_a_bad_line_is_named(tmp_path: Path, change: dict[str, object], message: str) -> None:
    bad = {**json.loads(LINES[4]), **change}
    path = tmp_path / "r1.jsonl"
    path.write_text(f"{LINES[0]}\n{json.dumps(bad)}\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"r1\.jsonl:2: .*{message}"):
        read_trace(path)


def test_answer_sources_say_how_each_answer_was_made() -> None:
    from cxrtrek.graph.trace import answer_source, answer_sources

    base = QuestionRecord.model_validate_json(LINES[1])
    plain = base.model_copy(update={"question_id": "q2"})
    held = base.model_copy(update={"held": True})
    ranked = base.model_copy(update={"stage": 3, "question_id": "q3", "constrained": True})
    chosen = base.model_copy(update={"stage": 8, "question_id": "q4", "candidates": 7})
    agreed = chosen.model_copy(update={"question_id": "q5", "candidates": 1})
    pieced = chosen.model_copy(update={"question_id": "q7", "assembled": 2})
    boxed = base.model_copy(update={"stage": 3, "question_id": "q6",
                                    "quoted": ["pulmonary nodule"],
                                    "vision_head": ["pulmonary nodule"]})
    described = base.model_copy(update={"stage": 1, "question_id": "d", "task_type":
                                        "description", "vision_head": ["nodule", "mass"]})
    assert answer_source(plain) is None
    assert answer_source(held) == "read from the image descriptions"
    assert answer_source(boxed) == ("boxes quoted from the description: pulmonary nodule; "
                                    "dense head's box: pulmonary nodule")
    assert answer_source(described) == "dense head wrote: nodule, mass"
    other_run = chosen.model_copy(update={"run_id": "r2", "candidates": 2})
    sources = answer_sources([held, plain, ranked, chosen, agreed, pieced, boxed, described,
                              other_run], "r1")
    assert sources == {
        1: {"d": "dense head wrote: nodule, mass"},
        2: {"q1": "read from the image descriptions"},
        3: {"q3": "likeliest option",
            "q6": "boxes quoted from the description: pulmonary nodule; dense head's box: "
                  "pulmonary nodule"},
        8: {"q4": "best of 7 candidates by agreement with the description",
            "q5": "agrees with the description",
            "q7": "assembled from the candidates' sentences that agree with the description (2 "
                  "added); best of 7 candidates by agreement with the description"}}
    # a question asked again keeps its last answer's source (none: forgotten)
    assert answer_sources([held, base], "r1") == {2: {}}
