"""Schema and stage specs: validation rules and their messages."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from cxrtrek.schema import (
    Answer,
    BBox,
    ImageRef,
    ParsedAnswer,
    QType,
    Question,
    Study,
    base_qtype,
    sha256_bytes,
)
from cxrtrek.stages import STAGES, stage, stage_of_task_type, task_type_allowed_in


def test_bbox_validates_range_and_order() -> None:
    box = BBox(x1=10, y1=20, x2=30, y2=60, label="heart")
    assert box.as_list() == [10, 20, 30, 60]
    assert box.iou(box) == pytest.approx(1.0)
    assert box.iou(BBox(x1=30, y1=60, x2=40, y2=70)) == 0.0
    assert BBox(x1=0, y1=0, x2=10, y2=10).iou(BBox(x1=5, y1=0, x2=15, y2=10)) == (
        pytest.approx(50 / 150))
    with pytest.raises(ValidationError, match="less than or equal to 100"):
        BBox(x1=0, y1=0, x2=101, y2=10)
    with pytest.raises(ValidationError, match="must be ordered"):
        BBox(x1=50, y1=0, x2=10, y2=10)


def test_image_ref_hashes_bytes_and_never_serializes_them() -> None:
    ref = ImageRef(data=b"pixels")
    assert ref.sha256 == sha256_bytes(b"pixels")
    dumped = ref.model_dump(mode="json")
    assert dumped["data"] is None and dumped["sha256"] == ref.sha256
    with pytest.raises(ValidationError, match="does not match"):
        ImageRef(data=b"pixels", sha256="0" * 64)
    with pytest.raises(ValidationError, match="needs a path, bytes or a sha256"):
        ImageRef()


def test_image_ref_digest_reads_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "a.png"
    f.write_bytes(b"abc")
    ref = ImageRef(path=str(f))
    assert ref.digest() == sha256_bytes(b"abc") and ref.read_bytes() == b"abc"


def test_qtypes() -> None:
    assert base_qtype("multi-choice-4") is QType.MULTI_CHOICE
    assert base_qtype("yes_no") is QType.YES_NO
    with pytest.raises(ValueError, match="unknown question type 'boolean'"):
        base_qtype("boolean")


def test_question_checks_stage_of_task_type() -> None:
    q = Question(id="q1", stage=8, task_type="Report_Generation[Findings]", qtype="captioning",
                 text="Write the findings.")
    assert q.base_qtype is QType.CAPTIONING
    with pytest.raises(ValidationError, match="belongs to stage 8, not 2"):
        Question(id="q", stage=2, task_type="Report_Generation", qtype="captioning", text="t")
    with pytest.raises(ValidationError, match="unknown task type"):
        Question(id="q", stage=2, task_type="Guessing", qtype="captioning", text="t")
    # the sample re-checks findings while describing them in stage 3
    assert task_type_allowed_in("Findings_Identification", 3)
    assert not task_type_allowed_in("Findings_Identification", 4)


def test_parsed_answer_is_a_discriminated_union() -> None:
    adapter: TypeAdapter[ParsedAnswer] = TypeAdapter(ParsedAnswer)
    parsed = adapter.validate_python({"kind": "choice", "labels": ["A"], "selected": ["A. Yes."]})
    assert parsed.kind == "choice"
    ans = Answer(question_id="q", text="?", parsed={"kind": "unparsed", "reason": "empty"})
    assert not ans.ok
    round_tripped = Answer.model_validate_json(ans.model_dump_json())
    assert round_tripped == ans
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "maybe"})


def test_study_prior() -> None:
    prior = Study(study_id="s0")
    assert Study(study_id="s1", prior=prior).has_prior
    assert not Study(study_id="s1").has_prior


def test_stage_specs_cover_the_eight_stages() -> None:
    assert [s.number for s in STAGES] == list(range(1, 9))
    assert stage(5).needs_prior and not any(s.needs_prior for s in STAGES if s.number != 5)
    assert stage("report").number == 8
    assert stage_of_task_type("Differences_Comparison[Choice]") == 5
    assert stage_of_task_type("Phrase_Grounding") == 3
    assert QType.DETECTION in stage(3).question_types
    with pytest.raises(KeyError, match="unknown stage 9"):
        stage(9)
    keys = [s.key for s in STAGES]
    assert len(set(keys)) == 8
