"""Fixtures of the graph tests: studies, a context-aware scripted backend, agents on tmp."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.protocol import VLMBackend, VLMRequest
from cxrtrek.schema import Answer, ImageRef, ImageRole, Question, Study, TextParse, YesNoParse

STAGE2_ANSWER = "The findings include cardiomegaly and a left pleural effusion."


def clinical_answer(request: VLMRequest, *, quality: str = "The image quality is good.",
                    stage2: str = STAGE2_ANSWER) -> str:
    """Answers that depend on the question and, for stages 4+, on the context given."""
    q = request.question.lower()
    if request.stage == 1:
        return quality if "quality" in q else "PA view."
    if request.stage == 2:
        return stage2
    if "bounding box" in q:
        return "<|ref|> finding <|/ref|> <|box|>(10, 20), (30, 40)<|/box|>"
    if request.stage == 3:
        return "Left lower zone." if "location" in q else "Moderate."
    if request.stage == 8:
        return ("The heart is enlarged." if "findings" in q else "Cardiomegaly.")
    stage2_seen = [c.answer for c in request.context if c.stage == 2]
    return f"Stage {request.stage} given: {stage2_seen[0] if stage2_seen else 'nothing'}"


@pytest.fixture()
def scripted() -> Callable[..., ScriptedBackend]:
    def make(**kwargs: Any) -> ScriptedBackend:
        return ScriptedBackend(lambda r: clinical_answer(r, **kwargs))
    return make


def _image(name: str, role: ImageRole = ImageRole.CURRENT) -> ImageRef:
    return ImageRef(data=f"pixels of {name}".encode(), role=role)


@pytest.fixture()
def clinical_study() -> Study:
    return Study(study_id="c1", patient_id="Jane Doe 12345", images=[_image("c1")],
                 indication="dyspnoea")


@pytest.fixture()
def prior_study() -> Study:
    prior = Study(study_id="c0", images=[_image("c0", ImageRole.PRIOR)])
    return Study(study_id="c2", patient_id="Jane Doe 12345", images=[_image("c2")],
                 prior=prior)


@pytest.fixture()
def dataset_study() -> Study:
    """A small dataset-mode study: stages 1, 2, 3, 8 (file order mixed across stages)."""
    items = [
        ("q0", 2, "Findings_Identification", "yes_no", "Is there cardiomegaly?", "Yes.",
         YesNoParse(value=True)),
        ("q1", 1, "View_Information", "captioning", "What is the view?", "PA view.",
         TextParse(text="PA view.")),
        ("q2", 3, "Attributes_Description", "captioning", "Describe the cardiomegaly.",
         "Mild.", TextParse(text="Mild.")),
        ("q3", 2, "Findings_Identification", "yes_no", "Is there an effusion?", "No.",
         YesNoParse(value=False)),
        ("q4", 8, "Report_Generation[Findings]", "captioning", "Findings of this study: __.",
         "The heart is mildly enlarged.", TextParse(text="The heart is mildly enlarged.")),
    ]
    questions = [Question(id=i, stage=s, task_type=t, qtype=k, text=x)
                 for i, s, t, k, x, _, _ in items]
    refs = {i: Answer(question_id=i, text=a, parsed=p) for i, _, _, _, _, a, p in items}
    return Study(study_id="d1", images=[_image("d1")], questions=questions, references=refs)


@pytest.fixture()
def make_agent(tmp_path: Path) -> Callable[..., CXRTrekAgent]:
    def make(backend: VLMBackend, memory: object | None = None, **settings: Any) -> CXRTrekAgent:
        settings.setdefault("backoff_s", 0.0)
        return CXRTrekAgent(backend, memory=memory,
                            settings=AgentSettings(home=str(tmp_path / "home"), **settings))
    return make


def stages_asked(backend: ScriptedBackend) -> list[int]:
    """The stage of each generate call, in order (asserting one stage per call)."""
    out = []
    for call in backend.calls:
        stages = {r.stage for r in call}
        assert len(stages) == 1, f"one generate call mixed stages {stages}"
        out.append(stages.pop())
    return out
