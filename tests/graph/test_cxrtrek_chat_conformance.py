"""The ``cxrtrek-chat`` dialect against the CXRTrek dataset's own chats.

Every study of the shared sample is read through the graph in dataset mode by the HTTP backend
(``dialect="cxrtrek-chat"``), over ``httpx.MockTransport``, the answers being the study's
reference answers (so each stage sees the dataset's own earlier answers). Each request body
that goes over the wire is captured and rendered with the Qwen2-VL chat template (the
template CXRTrekReasoner was trained with); so is the dataset's ``messages``, each user turn
split at ``<image>`` into text and image parts, spaces kept.

What "stage by stage" compares. The dataset writes one conversation per study; the graph asks
a stage's questions concurrently, each with the earlier stages' pairs as context and without
its own stage's earlier pairs (and a record may list its items out of stage order). So the
conversation a question is asked in is the dataset's conversation restricted to the items the
graph gives it: the system message, the pairs of the earlier stages in reading order (stage,
then file order), then the question, each message verbatim. The test builds that from the
dataset's ``messages`` and compares it byte for byte with what was sent, for every question of
every stage, and checks that the i-th image sent is the image the dataset's numbering gives
(the i-th ``<image>`` of the whole record is its i-th image).

Where the restricted conversation no longer contains the message that shows an image the
question is asked with (a stage-1 question asked beside the one that shows the current study;
a stage-5 question beside the one that introduces the prior), there is no dataset text to
match; the dialect introduces that image in the dataset's own words, and the expected chat
here applies the documented rule: current-study images at the head of the first user turn
(``Current X-ray image is shown below: <image> . ``), prior images at the head of the first
user turn of stage 5 or later (``Reference X-ray: <image> . ``).

And the plainest claim: in every record whose items are in stage order, the first question of
each stage is sent with exactly the dataset's conversation up to that question, byte for byte,
with no introduction added.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import jinja2
import numpy as np
import pytest
from PIL import Image

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.http import HTTPBackend
from cxrtrek.backends.oracle import OracleBackend
from cxrtrek.data.cxrtrek import load_studies
from cxrtrek.graph.trace import QuestionRecord
from cxrtrek.protocol import VLMRequest, VLMResponse, split_request_id

TEMPLATE = Path(__file__).parents[1] / "fixtures" / "qwen2_vl_chat_template.jinja"
CURRENT = "Current X-ray image is shown below: "
REFERENCE = "Reference X-ray: "


def _render(messages: Sequence[dict[str, Any]]) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    template = env.from_string(TEMPLATE.read_text(encoding="utf-8"))
    return template.render(messages=list(messages), add_generation_prompt=True,
                           add_vision_id=False)


def _grey(index: int) -> int:
    return 30 + 50 * index  # the i-th image of a record: a flat image of this grey


def _write_images(record: dict[str, Any], root: Path) -> None:
    for i, rel in enumerate(record["data_dict"]["cxrtrek_data"]["image"]):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.full((24, 20), _grey(i), dtype=np.uint8)
        pixels[0, 0] = 0  # not flat, so that no decoder stretches it
        pixels[0, 1] = 255
        Image.fromarray(pixels).save(path, format="PNG")


def _image_index(url: str) -> int:
    assert url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert (image.format, image.mode) == ("PNG", "L")
    grey = int(np.asarray(image)[5, 5])
    assert (grey - 30) % 50 == 0, grey
    return (grey - 30) // 50


def _user_content(text: str, images: list[int]) -> Any:
    """A dataset user turn split at <image> (spaces kept); images as markers of their index."""
    pieces = text.split("<image>")
    if len(pieces) == 1:
        return text
    content: list[dict[str, Any]] = []
    for k, piece in enumerate(pieces):
        if piece:
            content.append({"type": "text", "text": piece})
        if k < len(pieces) - 1:
            content.append({"type": "image_url", "image_url": {"url": images.pop(0)}})
    return content


class Capturing:
    """Sends every request over HTTP (captured), answers with the reference answers."""

    def __init__(self, study: Any, dialect: str = "cxrtrek-chat") -> None:
        self.bodies: dict[str, dict[str, Any]] = {}
        self.requests: dict[str, VLMRequest] = {}
        self._seen: list[dict[str, Any]] = []
        self.oracle = OracleBackend(study)

        async def handler(request: httpx.Request) -> httpx.Response:
            self._seen.append(json.loads(request.content))
            return httpx.Response(200, json={
                "model": "m", "choices": [{"message": {"content": f"#{len(self._seen) - 1}"},
                                           "finish_reason": "stop"}]})

        self.http = HTTPBackend("http://vlm:8000/v1", model="cxrtrek-reasoner",
                                dialect=dialect, transport=httpx.MockTransport(handler))
        self.model_id = self.http.model_id

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        sent = await self.http.generate(requests)
        truth = await self.oracle.generate(requests)
        out = []
        for request, s, t in zip(requests, sent, truth, strict=True):
            self.bodies[request.request_id] = self._seen[int(s.text.lstrip("#"))]
            self.requests[request.request_id] = request
            out.append(s.model_copy(update={"text": t.text}))
        await self.http.aclose()
        return out


def _expected(record: dict[str, Any], question_index: int, ran: set[int],
              sent_images: int) -> tuple[list[dict[str, Any]], list[int], bool]:
    """The dataset's messages for one question (see the module's docstring), the image
    index each image part shows, and whether an introduction had to be added."""
    data = record["data_dict"]["cxrtrek_data"]
    items = data["content"]
    messages = record["messages"]
    n_all = len(data["image"])
    # the dataset numbers <image> over the whole record, in file order
    numbering: list[list[int]] = []
    seen = 0
    for item in items:
        count = item["question"].count("<image>")
        numbering.append(list(range(seen, seen + count)))
        seen += count
    stage = items[question_index]["stage"]
    chosen = sorted((k for k, it in enumerate(items) if it["stage"] < stage and it["stage"] in ran),
                    key=lambda k: (items[k]["stage"], k))
    users = [*chosen, question_index]
    shown = [i for k in users for i in numbering[k]]
    has_prior = bool(data.get("ref_study_id"))
    n_current = n_all if not has_prior else sum(
        1 for rel in data["image"] if data["ref_study_id"] not in Path(rel).parts)
    default = set(range(n_all)) if stage >= 5 and has_prior else {0}
    carried = sorted(default | set(shown))
    assert len(carried) == sent_images
    left = [i for i in carried if i not in shown]
    left_current = [i for i in left if i < n_current]
    left_prior = [i for i in left if i >= n_current]
    out: list[dict[str, Any]] = [{"role": "system", "content": messages[0]["content"]}]
    order: list[int] = []
    for n, k in enumerate(users):
        text = messages[1 + 2 * k]["content"]
        assert text == items[k]["question"]
        head = ""
        head_images: list[int] = []
        if n == 0 and left_current:
            head += CURRENT + " ".join(["<image>"] * len(left_current)) + " . "
            head_images += left_current
        first_late = next((m for m, kk in enumerate(users) if items[kk]["stage"] >= 5),
                          len(users) - 1)
        if n == first_late and left_prior:
            head += REFERENCE + " ".join(["<image>"] * len(left_prior)) + " . "
            head_images += left_prior
        images = head_images + numbering[k]
        order += images
        out.append({"role": "user", "content": _user_content(head + text, list(images))})
        if k != question_index:
            assert messages[2 + 2 * k]["content"] == items[k]["answer"]
            out.append({"role": "assistant", "content": messages[2 + 2 * k]["content"]})
    return out, order, bool(left)


def test_cxrtrek_chat_matches_the_dataset_messages(sample_path: Path, tmp_path: Path) -> None:
    records = json.loads(sample_path.read_text(encoding="utf-8"))
    assert len(records) == 20
    for record in records:
        _write_images(record, tmp_path / "images")
    studies = load_studies(sample_path, image_root=tmp_path / "images")
    settings = AgentSettings(home=str(tmp_path / "home"), backoff_s=0.0)
    compared = exact = prefixes = 0
    for record, study in zip(records, studies, strict=True):
        items = record["data_dict"]["cxrtrek_data"]["content"]
        backend = Capturing(study)
        agent = CXRTrekAgent(backend, settings=settings)
        report = agent.run(study, run_id=f"chat-{study.study_id}")
        assert report.status == "completed", study.study_id
        ran = {s.stage for s in report.stages if not s.skipped}
        assert len(backend.bodies) == sum(1 for it in items if it["stage"] in ran)
        in_order = [it["stage"] for it in items] == sorted(it["stage"] for it in items)
        firsts = {}
        for k, it in enumerate(items):
            firsts.setdefault(it["stage"], k)
        for rid, body in backend.bodies.items():
            k = int(split_request_id(rid)[2].lstrip("q"))
            request = backend.requests[rid]
            expected, order, introduced = _expected(record, k, ran, len(request.images))
            where = (study.study_id, items[k]["stage"], f"item {k}")
            assert _render(body["messages"]) == _render(expected), where
            sent = [_image_index(part["image_url"]["url"]) for m in body["messages"]
                    if isinstance(m["content"], list) for part in m["content"]
                    if part["type"] == "image_url"]
            assert sent == order, where
            compared += 1
            exact += not introduced
            if in_order and firsts[items[k]["stage"]] == k:
                # the first question of a stage: the dataset's conversation up to it
                assert not introduced, where
                prefix = record["messages"][:2 + 2 * k]
                shown = list(range(sum(m["content"].count("<image>") for m in prefix)))
                dataset = [m if m["role"] != "user" else
                           {"role": "user", "content": _user_content(m["content"], shown)}
                           for m in prefix]
                assert _render(body["messages"]) == _render(dataset), where
                prefixes += 1
        # the trace records the dialect and the chat that was sent
        records_ = [r for r in agent.trace_records(report.run_id or "")
                    if isinstance(r, QuestionRecord)]
        assert records_ and all(r.dialect == "cxrtrek-chat" and r.prompt for r in records_)
        assert all("<stage_" not in (r.prompt or "") for r in records_)
    assert compared == 614 - sum(1 for r in records for it in r["data_dict"]["cxrtrek_data"][
        "content"] if it["stage"] == 5 and not r["data_dict"]["cxrtrek_data"]["ref_study_id"])
    # 421 of the 614 questions are sent in the dataset's words alone; 71 first questions of
    # a stage are sent with exactly the dataset's conversation up to them
    assert (exact, prefixes) == (421, 71)


@pytest.mark.parametrize("dialect", ["cxrtrek-chat", "instruct"])
def test_every_image_sent_is_placed_once(sample_path: Path, tmp_path: Path,
                                         dialect: str) -> None:
    """Each request carries its images exactly once each, wherever the dialect puts them."""
    records = json.loads(sample_path.read_text(encoding="utf-8"))
    for record in records:
        _write_images(record, tmp_path / "images")
    studies = load_studies(sample_path, image_root=tmp_path / "images")[:3]
    for study in studies:
        backend = Capturing(study, dialect=dialect)
        asyncio.run(CXRTrekAgent(backend, settings=AgentSettings(
            home=str(tmp_path / "home"), backoff_s=0.0)).arun(study, run_id=f"p-{dialect}"
                                                               f"-{study.study_id}"))
        for rid, body in backend.bodies.items():
            sent = sorted(_image_index(part["image_url"]["url"]) for m in body["messages"]
                          if isinstance(m["content"], list) for part in m["content"]
                          if part["type"] == "image_url")
            request = backend.requests[rid]
            assert len(sent) == len(request.images) == len(set(sent)), rid
