"""What the HTTP backend puts on the wire for real servers (vLLM): images as 8-bit PNG whatever
the file, the model id from /v1/models, closed answers constrained with structured outputs."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.http import HTTPBackend
from cxrtrek.data.cxrtrek import load_studies
from cxrtrek.errors import BackendError
from cxrtrek.graph.trace import QuestionRecord
from cxrtrek.protocol import VLMRequest
from cxrtrek.schema import ImageRef

PHANTOMS = (Path(__file__).parents[2] / "cxrtrek" / "data" / "studies" / "phantom_with_prior"
            / "phantoms.json")


def _completion(text: str, model: str = "served") -> dict[str, Any]:
    return {"model": model, "choices": [{"message": {"content": text},
                                         "finish_reason": "stop"}]}


def _halves(dark: int, bright: int, dtype: Any) -> np.ndarray:
    """A 32 x 32 image: the left half ``dark``, the right half ``bright`` (raw values)."""
    arr = np.full((32, 32), dark, dtype=dtype)
    arr[:, 16:] = bright
    return arr


def _dicom(arr: np.ndarray, photometric: str, window: tuple[float, float] | None) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr.astype("<u2").tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _png16(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16)).save(out, format="PNG")
    return out.getvalue()


def _sent_image(body: dict[str, Any]) -> Image.Image:
    parts = [p for m in body["messages"] if isinstance(m["content"], list)
             for p in m["content"] if p["type"] == "image_url"]
    assert len(parts) == 1
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def _send(backend: HTTPBackend, requests: list[VLMRequest]) -> Any:
    async def go() -> Any:
        async with backend:
            return await backend.generate(requests)
    return asyncio.run(go())


class Server:
    """A MockTransport handler: /v1/models lists ``models``; chat bodies are recorded."""

    def __init__(self, models: list[str] | None = None, answer: str = "ok",
                 models_status: int = 200) -> None:
        self.models = ["served"] if models is None else models
        self.answer = answer
        self.models_status = models_status
        self.bodies: list[dict[str, Any]] = []
        self.model_lists = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == "/v1/models":
            self.model_lists += 1
            if self.models_status != 200:
                return httpx.Response(self.models_status, json={"error": {"message": "nope"}})
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": m, "object": "model"} for m in self.models]})
        assert request.url.path == "/v1/chat/completions"
        body = json.loads(request.content)
        self.bodies.append(body)
        if "model" in body and body["model"] not in self.models and self.models_status == 200:
            return httpx.Response(404, json={"error": {"message": "not served here"}})
        choices = body.get("structured_outputs", {}).get("choice")
        return httpx.Response(200, json=_completion(choices[0] if choices and self.answer
                                                    == "obey" else self.answer))


def _backend(server: Server, **kw: Any) -> HTTPBackend:
    return HTTPBackend("http://vllm:8000/v1", transport=httpx.MockTransport(server), **kw)


@pytest.mark.parametrize(("kind", "data"), [
    ("DICOM MONOCHROME2, windowed", _dicom(_halves(1000, 3000, np.uint16), "MONOCHROME2",
                                           (2000.0, 2000.0))),
    ("DICOM MONOCHROME1 (inverted)", _dicom(_halves(3000, 1000, np.uint16), "MONOCHROME1",
                                            (2000.0, 2000.0))),
    ("DICOM without a window", _dicom(_halves(200, 3800, np.uint16), "MONOCHROME2", None)),
    ("16-bit PNG", _png16(_halves(2000, 60000, np.uint16))),
])
def test_every_image_reaches_the_wire_as_an_8bit_png_with_its_contrast(kind: str,
                                                                        data: bytes) -> None:
    server = Server()
    _send(_backend(server, model="served", dialect="cxrtrek-chat"), [VLMRequest(
        request_id="r", stage=1, question="View?", images=[ImageRef(data=data)])])
    image = _sent_image(server.bodies[0])
    assert (image.format, image.mode) == ("PNG", "L"), kind
    # what vLLM does with it: Pillow opens it and converts to RGB
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    left, right = rgb[:, :16].mean(), rgb[:, 16:].mean()
    assert left < 40 and right > 215, (kind, left, right)  # dark left, bright right


def test_a_16bit_png_sent_as_it_is_would_be_all_white() -> None:
    """Why the backend re-encodes: Pillow's RGB conversion of a 16-bit PNG clips to white."""
    raw = Image.open(io.BytesIO(_png16(_halves(2000, 60000, np.uint16)))).convert("RGB")
    assert np.asarray(raw).min() == 255


def test_model_id_from_v1_models_once() -> None:
    server = Server(models=["Qwen/Qwen2.5-VL-7B-Instruct", "other"])
    backend = _backend(server, dialect="instruct")

    async def go() -> Any:
        async with backend:
            first = await backend.generate([VLMRequest(
                request_id="a", stage=3, question="Where is the heart?", qtype="detection",
                images=[ImageRef(data=_png16(_halves(0, 9, np.uint16)))])])
            second = await backend.generate([VLMRequest(request_id=f"b{i}", stage=1,
                                                        question="View?") for i in range(3)])
            return first + second
    out = asyncio.run(go())
    assert server.model_lists == 1  # asked once, then cached
    assert [b["model"] for b in server.bodies] == ["Qwen/Qwen2.5-VL-7B-Instruct"] * 4
    assert backend.model_id == "Qwen/Qwen2.5-VL-7B-Instruct"
    # the family follows the model: boxes asked for in Qwen2.5-VL's own convention
    assert '"bbox_2d": [x1, y1, x2, y2]' in server.bodies[0]["messages"][-1]["content"][-1][
        "text"]
    assert [r.dialect for r in out] == ["instruct"] * 4


def test_a_server_that_changed_model_is_asked_again() -> None:
    server = Server(models=["first"])
    backend = _backend(server)

    async def go() -> list[str]:
        async with backend:
            first = await backend.generate([VLMRequest(request_id="a", stage=1, question="?")])
            server.models = ["second"]  # the server behind the URL was replaced
            second = await backend.generate([VLMRequest(request_id="b", stage=1,
                                                        question="?")])
            return [r.model_id for r in first + second]
    assert asyncio.run(go()) == ["served", "served"]  # as the completions say
    assert server.model_lists == 2
    # the stale id is refused (404), the server asked again, the request sent again
    assert [b["model"] for b in server.bodies] == ["first", "first", "second"]


def test_a_given_model_id_is_not_looked_up() -> None:
    server = Server()
    server.models = ["mine"]
    _send(_backend(server, model="mine"), [VLMRequest(request_id="r", stage=1,
                                                      question="View?")])
    assert server.model_lists == 0 and server.bodies[0]["model"] == "mine"


@pytest.mark.parametrize(("server", "message"), [
    (Server(models=[]), "lists no models; expected at least one"),
    (Server(models_status=404), "answered HTTP 404: nope"),
])
def test_no_model_to_take_is_a_clear_error(server: Server, message: str) -> None:
    with pytest.raises(BackendError, match=message):
        _send(_backend(server), [VLMRequest(request_id="r", stage=1, question="View?")])
    assert not server.bodies


@pytest.mark.parametrize(("answer", "constrained"), [("obey", True), ("Yes, it is.", False)])
def test_structured_outputs_sent_and_whether_applied_recorded(
        tmp_path: Path, answer: str, constrained: bool) -> None:
    [study] = load_studies(PHANTOMS)
    server = Server(answer=answer)
    backend = _backend(server, model="served", dialect="cxrtrek-chat", constrain_choices=True)
    agent = CXRTrekAgent(backend, settings=AgentSettings(home=str(tmp_path), backoff_s=0.0))
    report = agent.run(study, run_id="constrained")
    assert report.status == "completed"
    records = [r for r in agent.trace_records("constrained") if isinstance(r, QuestionRecord)]
    by_type = {r.qtype: r for r in records}
    assert {"yes_no", "single-choice", "captioning"} <= set(by_type)
    for record in records:
        if record.qtype in ("yes_no", "single-choice"):
            assert record.constrained is constrained
        else:
            assert record.constrained is None, record.qtype
    sent = [b.get("structured_outputs") for b in server.bodies]
    assert {"choice": ["Yes.", "No."]} in sent
    single = next(q for q in study.questions if q.qtype == "single-choice")
    assert {"choice": single.options} in sent
    assert sum(s is None for s in sent) == sum(
        1 for r in records if r.qtype not in ("yes_no", "single-choice"))


def test_structured_outputs_are_off_by_default() -> None:
    server = Server()
    [resp] = _send(_backend(server, model="served"), [VLMRequest(
        request_id="r", stage=2, question="Effusion?", qtype="yes_no")])
    assert "structured_outputs" not in server.bodies[0] and resp.constrained is None
