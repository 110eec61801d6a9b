"""CXRTrek format: loss-free round trip on the real sample, both forms, studies, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrtrek.data.cxrtrek import (
    build_messages,
    dump_record,
    load_studies,
    read_records,
    record_to_study,
    study_to_record,
    write_records,
)
from cxrtrek.errors import FormatError, MissingImageError
from cxrtrek.schema import BoxesParse, ChoiceParse, ImageRole, TextParse


def test_round_trip_is_loss_free_on_every_sample_item(sample_path: Path, tmp_path: Path) -> None:
    original = json.loads(sample_path.read_text())
    records = read_records(sample_path)
    assert len(records) == 20
    assert sum(len(r.data.content) for r in records if r.data) == 614
    for suffix in (".json", ".jsonl"):
        out = write_records(records, tmp_path / f"copy{suffix}")
        again = read_records(out)
        assert [dump_record(r) for r in again] == original
    # extra fields survive (e.g. the generator's flags) and absent fields stay absent
    first_item = dump_record(records[0])["data_dict"]["cxrtrek_data"]["content"][0]
    assert first_item == original[0]["data_dict"]["cxrtrek_data"]["content"][0]
    assert "polish_flag" in json.dumps(dump_record(records[0]))


def test_json_written_keeps_ints_and_floats(tmp_path: Path) -> None:
    rec = {"data_dict": {"cxrtrek_data": {"study_id": "s1", "image": ["a.png"], "content": [
        {"stage": 3, "task_type": "Findings_Detection", "qtype": "detection",
         "question": "Where?", "answer": "<|box|>(0, 75.0), (82.14, 99.55)<|/box|>",
         "bbox_list": [[0, 75.0, 82.14, 99.55]]}]}}}
    src = tmp_path / "one.json"
    src.write_text(json.dumps([rec]))
    out = write_records(read_records(src), tmp_path / "out.json")
    written = json.loads(out.read_text())
    assert written == [rec]
    box = written[0]["data_dict"]["cxrtrek_data"]["content"][0]["bbox_list"][0]
    assert type(box[0]) is int and type(box[1]) is float


def test_messages_form_matches_the_items(sample_path: Path) -> None:
    for record in read_records(sample_path):
        assert record.data is not None and record.messages is not None
        assert build_messages(record.data) == record.messages


def test_studies_from_sample(sample_path: Path) -> None:
    with pytest.raises(MissingImageError, match="not found under image root"):
        load_studies(sample_path)
    studies = load_studies(sample_path, allow_missing_images=True)
    assert len(studies) == 20
    first = studies[0]
    assert first.study_id == "study4" and first.patient_id == "cheXpert_patient38505"
    assert first.prior is not None and first.prior.study_id == "study3"
    assert [i.role for i in first.images] == [ImageRole.CURRENT]
    assert [i.role for i in first.prior.images] == [ImageRole.PRIOR]
    assert len(first.questions) == 37
    assert [q.stage for q in first.questions] == sorted(q.stage for q in first.questions)
    # studies without a prior
    assert any(s.prior is None for s in studies)
    # reference truths come from the structured fields
    kinds = {r.parsed.kind for s in studies for r in s.references.values()}
    assert {"choice", "boxes", "yes_no", "text", "report"} <= kinds
    for s in studies:
        for q in s.questions:
            ref = s.references[q.id]
            if q.qtype == "detection":
                assert isinstance(ref.parsed, BoxesParse)
            if q.options:
                assert isinstance(ref.parsed, ChoiceParse)
                assert set(ref.parsed.selected) <= set(q.options)


def test_images_resolved_under_root(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "p1" / "s2").mkdir(parents=True)
    (tmp_path / "imgs" / "p1" / "s1").mkdir(parents=True)
    (tmp_path / "imgs" / "p1" / "s2" / "a.png").write_bytes(b"x")
    (tmp_path / "imgs" / "p1" / "s1" / "b.png").write_bytes(b"y")
    rec = {"data_dict": {"cxrtrek_data": {
        "study_id": "s2", "ref_study_id": "s1", "pat_id": "p1",
        "image": ["p1/s2/a.png", "p1/s1/b.png"], "content": [
            {"stage": 1, "task_type": "View_Information", "qtype": "captioning",
             "question": "View?", "answer": "PA view."}]}}}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(rec) + "\n")
    [study] = load_studies(data, image_root=tmp_path / "imgs")
    assert Path(study.images[0].path or "").read_bytes() == b"x"
    assert study.prior is not None
    assert Path(study.prior.images[0].path or "").read_bytes() == b"y"
    assert isinstance(study.references["q000"].parsed, TextParse)
    # and back: a study written as a record reads back as the same study
    back = record_to_study(study_to_record(study, image_root=tmp_path / "imgs"),
                           image_root=tmp_path / "imgs")
    assert back == study


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"foo": 1}', "'data_dict' and/or 'messages'"),
        ('[{"data_dict": {"cxrtrek_data": {"study_id": "s", "content": [{"stage": 9}]}}}]',
         "record 0"),
    ],
)
def test_bad_files_raise_format_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(FormatError, match=message):
        read_records(path)


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\n\n{oops\n')
    with pytest.raises(FormatError, match=r"bad.jsonl:3"):
        read_records(path)


def test_missing_file_and_messages_only(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="no such CXRTrek file"):
        read_records(tmp_path / "nope.json")
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    [record] = read_records(path)
    with pytest.raises(FormatError, match="only the 'messages' form"):
        record_to_study(record)


def test_unknown_task_type_is_a_format_error(tmp_path: Path) -> None:
    rec = {"data_dict": {"cxrtrek_data": {"study_id": "s", "content": [
        {"stage": 2, "task_type": "Report_Generation", "qtype": "captioning",
         "question": "q", "answer": "a"}]}}}
    path = tmp_path / "x.json"
    path.write_text(json.dumps(rec))
    with pytest.raises(FormatError, match="belongs to stage 8"):
        load_studies(path, allow_missing_images=True)
