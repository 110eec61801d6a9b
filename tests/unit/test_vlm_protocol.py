"""The VLM protocol types and the ScriptedBackend; importing them stays light."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from pydantic import ValidationError

from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.errors import BackendError, TransientError
from cxrtrek.protocol import ContextPair, VLMBackend, VLMRequest, VLMResponse
from cxrtrek.schema import ImageRef

IMG = ImageRef(data=b"not really a png")


def _req(rid: str, question: str = "What is the view?") -> VLMRequest:
    return VLMRequest(request_id=rid, stage=1, question=question, images=[IMG])


def test_protocol_import_is_light() -> None:
    code = ("import sys, cxrtrek.protocol, cxrtrek.backends.scripted, "
            "cxrtrek.backends.inprocess; "
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_request_defaults_and_context_tuples() -> None:
    r = VLMRequest(request_id="r", stage=5, question="q", images=[IMG],
                   context=[(2, "Effusion?", "Yes."), {"stage": 3, "question": "Where?",
                                                        "answer": "Left."}])
    assert r.context[0] == ContextPair(stage=2, question="Effusion?", answer="Yes.")
    assert r.decoding.greedy and r.max_new_tokens == 128
    assert VLMRequest.model_validate_json(r.model_dump_json()).context == r.context
    with pytest.raises(ValidationError):
        VLMRequest(request_id="r", stage=1, question="q", decoding={"top_p": 1.5})
    with pytest.raises(ValidationError):
        VLMResponse(request_id="r", text="t", model_id="m", finish_reason="eos")


def test_scripted_answers_by_id_then_question_then_default() -> None:
    backend = ScriptedBackend({"b": "by id", "What is the view?": "PA view."}, default="No.")
    assert isinstance(backend, VLMBackend)
    out = asyncio.run(backend.generate([_req("a"), _req("b"), _req("c", "Other?")]))
    assert [r.text for r in out] == ["PA view.", "by id", "No."]
    assert [r.request_id for r in out] == ["a", "b", "c"]
    assert all(r.model_id == "scripted" and r.finish_reason == "stop" for r in out)
    assert len(backend.calls) == 1 and [r.request_id for r in backend.requests] == ["a", "b", "c"]


def test_scripted_callable() -> None:
    backend = ScriptedBackend(lambda r: f"stage {r.stage}", model_id="fn")
    (out,) = asyncio.run(backend.generate([_req("a")]))
    assert out.text == "stage 1" and out.model_id == "fn"


def test_scripted_errors() -> None:
    backend = ScriptedBackend({"boom": ValueError("scripted"), "What is the view?": "PA."})
    backend.fail_next(TransientError("timeout"), times=2)
    for _ in range(2):
        with pytest.raises(TransientError):
            asyncio.run(backend.generate([_req("a")]))
    assert asyncio.run(backend.generate([_req("a")]))[0].text == "PA."
    with pytest.raises(ValueError, match="scripted"):
        asyncio.run(backend.generate([_req("boom", "x")]))
    with pytest.raises(BackendError, match="no answer for request 'z'"):
        asyncio.run(backend.generate([_req("z", "unknown")]))
    assert len(backend.calls) == 5
