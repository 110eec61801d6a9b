"""The model server, really started on 127.0.0.1: our client and the OpenAI SDK, batching
and the vision cache under concurrency, limits and errors, shutdown, and a reading that
survives the server being SIGKILLed."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent, RunReport
from cxrtrek.backends.http import HTTPBackend
from cxrtrek.backends.inprocess import FREE_QUESTION_STAGE, InProcessBackend
from cxrtrek.errors import BackendError, ConfigError, DataError, TransientError
from cxrtrek.graph.trace import QuestionRecord, StageRecord, read_trace
from cxrtrek.interfaces.cli import EXIT_USAGE, main
from cxrtrek.protocol import ContextPair, VLMBackend, VLMRequest, VLMResponse
from cxrtrek.schema import ImageRef, ImageRole, Study
from cxrtrek.serve.app import BackgroundServer, ServerSettings, create_app

from .conftest import TOKEN, RawResponse, ServerProcess, Tiny, free_port, stall

SYSTEM = "You are a radiologist reading a chest X-ray."
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# --- helpers -----------------------------------------------------------------------------


def _data_url(ref: ImageRef) -> str:
    return "data:image/png;base64," + base64.b64encode(ref.read_bytes()).decode()


def _metrics(server: BackgroundServer) -> dict[str, float]:
    text = httpx.get(server.base_url.removesuffix("/v1") + "/metrics", headers=AUTH).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _same(got: Sequence[VLMResponse], expected: Sequence[VLMResponse]) -> None:
    assert [r.request_id for r in got] == [r.request_id for r in expected]
    assert [r.text for r in got] == [r.text for r in expected]
    assert [(r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in got] == [
        (r.prompt_tokens, r.completion_tokens, r.finish_reason) for r in expected]


QUESTIONS = [
    (1, "What is the view of this X-ray?"),
    (1, "Please evaluate the technical quality of the chest X-ray image."),
    (2, "Is there cardiomegaly in the X-ray?"),
    (2, "Is there a pleural effusion in the X-ray?"),
    (3, "On which side is the pleural effusion? A. Right. B. Left. C. Neither side."),
    (3, "Please locate the heart and give its bounding box."),
    (7, "What is the most likely diagnosis?"),
    (8, "Findings of this study: ______."),
]


@pytest.fixture(scope="module", autouse=True)
def _launch_early(server_process: ServerProcess) -> ServerProcess:
    """The kill test's subprocess server starts first; its cold start overlaps the tests."""
    return server_process


@pytest.fixture(scope="module")
def served(tiny: Tiny) -> InProcessBackend:
    return InProcessBackend(*tiny, model_id="tiny-trained", max_batch_size=8)


@pytest.fixture(scope="module")
def server(served: InProcessBackend) -> Iterator[BackgroundServer]:
    settings = ServerSettings(port=0, token=TOKEN, max_batch_size=8, max_wait_ms=25,
                              max_request_bytes=1_000_000)
    with BackgroundServer(served, settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(tiny: Tiny) -> InProcessBackend:
    """The same model in process, one request at a time, no vision cache."""
    return InProcessBackend(*tiny, max_batch_size=1, cache_size=0)


# --- correct answers: our client and the OpenAI SDK ----------------------------------------


def test_our_client_gets_the_inprocess_greedy_answers(server: BackgroundServer,
                                                      reference: InProcessBackend,
                                                      images: list[ImageRef]) -> None:
    reqs = [
        VLMRequest(request_id="view", stage=1, question=QUESTIONS[0][1], images=images[:1],
                   system=SYSTEM, max_new_tokens=24),
        VLMRequest(request_id="cardio", stage=2, question=QUESTIONS[2][1], images=images[1:2],
                   context=[(1, QUESTIONS[0][1], "A X-ray taken in PA view.")],
                   max_new_tokens=24),
        VLMRequest(request_id="compare", stage=5, question="What changed since the prior?",
                   images=images[2:4], context=[(2, QUESTIONS[3][1], "Yes.")],
                   max_new_tokens=24),
    ]
    expected = reference.generate_sync(reqs)

    async def go() -> list[VLMResponse]:
        async with HTTPBackend([server.base_url], token=TOKEN) as backend:
            return await backend.generate(reqs)

    got = asyncio.run(go())
    _same(got, expected)
    assert all(r.text for r in got) and len({r.text for r in got}) > 1  # real, varied text
    assert {r.model_id for r in got} == {"tiny-trained"}


def test_the_openai_sdk_gets_the_same_answers(server: BackgroundServer,
                                              reference: InProcessBackend,
                                              images: list[ImageRef]) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=TOKEN, max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == ["tiny-trained"]
    image: Any = {"type": "image_url", "image_url": {"url": _data_url(images[0])}}
    # 1: the stage as a <stage_N> marker, context as user/assistant turns
    first = client.chat.completions.create(
        model="tiny-trained", max_tokens=24, temperature=0, messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [image, {"type": "text",
                                                 "text": f"<stage_1> {QUESTIONS[0][1]}"}]},
            {"role": "assistant", "content": "A X-ray taken in PA view."},
            {"role": "user", "content": f"<stage_2> {QUESTIONS[3][1]}"}])
    # 2: no markers; the stages in the cxrtrek extra body field
    second = client.chat.completions.create(
        model="tiny-trained", max_tokens=24, messages=[
            {"role": "user", "content": [image, {"type": "text", "text": QUESTIONS[0][1]}]},
            {"role": "assistant", "content": "A X-ray taken in PA view."},
            {"role": "user", "content": QUESTIONS[4][1]}],
        extra_body={"cxrtrek": {"stage": 3, "context_stages": [1]}})
    expected = reference.generate_sync([
        VLMRequest(request_id="1", stage=2, question=QUESTIONS[3][1], images=images[:1],
                   system=SYSTEM, context=[(1, QUESTIONS[0][1], "A X-ray taken in PA view.")],
                   max_new_tokens=24),
        VLMRequest(request_id="2", stage=3, question=QUESTIONS[4][1], images=images[:1],
                   context=[(1, QUESTIONS[0][1], "A X-ray taken in PA view.")],
                   max_new_tokens=24)])
    for completion, exp in zip((first, second), expected, strict=True):
        assert completion.choices[0].message.content == exp.text
        assert completion.choices[0].finish_reason == exp.finish_reason
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == exp.prompt_tokens
        assert completion.usage.completion_tokens == exp.completion_tokens
        assert completion.model == "tiny-trained"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.UnprocessableEntityError, match="stage must be 1-8"):
        client.chat.completions.create(model="tiny-trained", messages=[
            {"role": "user", "content": [image, {"type": "text", "text": "<stage_9> View?"}]}])


def test_structured_output_choices_are_answered_by_the_likeliest(
        server: BackgroundServer, reference: InProcessBackend, images: list[ImageRef]) -> None:
    side = VLMRequest(request_id="side", stage=3, question=QUESTIONS[4][1], images=images[:1],
                      qtype="single-choice", max_new_tokens=24,
                      options=["A. Right.", "B. Left.", "C. Neither side."])
    effusion = VLMRequest(request_id="effusion", stage=2, question=QUESTIONS[3][1],
                          images=images[1:2], qtype="yes_no", max_new_tokens=24)

    async def go() -> list[VLMResponse]:
        async with HTTPBackend([server.base_url], token=TOKEN,
                               constrain_choices=True) as backend:
            return await backend.generate([side, effusion])

    got = asyncio.run(go())
    # the server ranks exactly what the client's dialect sent, as the model in process does
    expected = reference.generate_sync([
        side.model_copy(update={"choices": side.options}),
        effusion.model_copy(update={"choices": ["Yes.", "No."]})])
    assert [r.text for r in got] == [r.text for r in expected]
    assert got[0].text in side.options and got[1].text in ("Yes.", "No.")
    assert [r.constrained for r in got] == [True, True]
    # a free decode of the same side question is not one of the options (a random model)
    [free] = reference.generate_sync([side])
    assert free.text not in side.options


# --- free questions: a plain OpenAI request, no stage ----------------------------------------


EFFUSION = "Is there any evidence of pleural effusion?"


def test_a_free_question_renders_at_the_documented_stage(reference: InProcessBackend,
                                                         images: list[ImageRef]) -> None:
    free, at_8, at_2 = reference.generate_sync([
        VLMRequest(request_id=rid, stage=stage, question=EFFUSION, images=images[:1],
                   context=[ContextPair(stage=None if stage is None else 1,
                                        question=QUESTIONS[0][1], answer="PA view.")],
                   max_new_tokens=16)
        for rid, stage in (("free", None), ("at-8", FREE_QUESTION_STAGE), ("at-2", 2))])
    assert FREE_QUESTION_STAGE == 8
    assert free.prompt is not None and at_8.prompt is not None
    assert "<stage_8> " + EFFUSION in free.prompt and "<stage_2>" not in free.prompt
    assert free.prompt.replace("<stage_8> " + QUESTIONS[0][1], "<stage_1> "
                               + QUESTIONS[0][1]) == at_8.prompt  # context at its own stage
    assert at_2.prompt is not None and "<stage_2> " + EFFUSION in at_2.prompt


def test_cxrtrek_serve_answers_a_plain_openai_request(model_dir: Path, tmp_path: Path,
                                                      reference: InProcessBackend,
                                                      images: list[ImageRef]) -> None:
    """``cxrtrek serve`` (a subprocess on 127.0.0.1) answers what any OpenAI client sends:
    an image as a data: URL and a question, no <stage_N> marker, no cxrtrek field."""
    proc = ServerProcess(model_dir, free_port(), tmp_path / "serve.log").start()
    try:
        image: Any = {"type": "image_url", "image_url": {"url": _data_url(images[0])}}
        client = openai.OpenAI(base_url=proc.base_url, api_key="none", max_retries=0,
                               timeout=60)
        plain = client.chat.completions.create(model=Path(model_dir).name, max_tokens=24,
                                               messages=[{"role": "user", "content": [
                                                   image, {"type": "text", "text": EFFUSION}]}])
        # earlier turns without stages are context, not refused
        chat = client.chat.completions.create(model=Path(model_dir).name, max_tokens=24,
                                              messages=[
            {"role": "user", "content": [image, {"type": "text", "text": QUESTIONS[0][1]}]},
            {"role": "assistant", "content": "A X-ray taken in PA view."},
            {"role": "user", "content": EFFUSION}])
        expected = reference.generate_sync([
            VLMRequest(request_id="plain", question=EFFUSION, images=images[:1],
                       max_new_tokens=24),
            VLMRequest(request_id="chat", question=EFFUSION, images=images[:1],
                       context=[ContextPair(question=QUESTIONS[0][1],
                                            answer="A X-ray taken in PA view.")],
                       max_new_tokens=24)])
        for completion, exp in zip((plain, chat), expected, strict=True):
            assert completion.choices[0].message.content == exp.text
            assert exp.text.strip()  # an answer, not an empty string
            assert completion.usage is not None
            assert completion.usage.prompt_tokens == exp.prompt_tokens
        raw = httpx.post(f"{proc.base_url}/chat/completions", timeout=60, json={
            "max_tokens": 8, "messages": [{"role": "user", "content": [
                image, {"type": "text", "text": EFFUSION}]}]})
        assert raw.status_code == 200, raw.text
        assert raw.json()["cxrtrek"]["stage"] is None  # a free question, said so

        async def ours() -> list[VLMResponse]:
            async with HTTPBackend([proc.base_url], max_retries=0) as backend:
                return await backend.generate([VLMRequest(
                    request_id="ours", question=EFFUSION, images=images[:1],
                    max_new_tokens=24)])

        [answer] = asyncio.run(ours())
        assert answer.text.strip() and answer.model_id == Path(model_dir).name
    finally:
        proc.kill()


# --- batching and the cache under concurrency ---------------------------------------------


def test_32_concurrent_requests_from_4_readings(server: BackgroundServer,
                                                 served: InProcessBackend,
                                                 reference: InProcessBackend,
                                                 images: list[ImageRef]) -> None:
    readings = {
        k: [VLMRequest(request_id=f"reading{k}/q{i}", stage=stage, question=question,
                       images=[images[k]], max_new_tokens=8 + i + k, system=SYSTEM)
            for i, (stage, question) in enumerate(QUESTIONS)]
        for k in range(4)}
    expected = {k: reference.generate_sync(reqs) for k, reqs in readings.items()}
    before = _metrics(server)

    async def reading(k: int) -> list[VLMResponse]:
        async with HTTPBackend([server.base_url], token=TOKEN) as backend:  # one per reader
            return await backend.generate(readings[k])

    async def all_readings() -> list[list[VLMResponse]]:
        return list(await asyncio.gather(*(reading(k) for k in range(4))))

    results = asyncio.run(all_readings())
    for k, got in enumerate(results):  # every answer came back to its own caller
        _same(got, expected[k])
    after = _metrics(server)
    batches = after["cxrtrek_batch_size_count"] - before["cxrtrek_batch_size_count"]
    singles = (after['cxrtrek_batch_size_bucket{le="1"}']
               - before['cxrtrek_batch_size_bucket{le="1"}'])
    answered = after["cxrtrek_batch_size_sum"] - before["cxrtrek_batch_size_sum"]
    assert answered == 32
    assert batches < 32 and batches - singles >= 1, "expected batches larger than 1"
    assert (after["cxrtrek_vision_cache_hits_total"]
            > before["cxrtrek_vision_cache_hits_total"]), "expected vision-cache hits"
    assert after['cxrtrek_requests_total{code="200"}'] - before.get(
        'cxrtrek_requests_total{code="200"}', 0) == 32
    assert after["cxrtrek_requests_in_flight"] == 0


# --- malformed, oversized, unauthorised ----------------------------------------------------


def _post(server: BackgroundServer, body: Any = None, *, content: bytes | None = None,
          headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{server.base_url}/chat/completions", json=body, content=content,
                      headers=AUTH if headers is None else headers, timeout=30)


def _user(text: str, image_url: str | None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image_url is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"role": "user", "content": parts}


@pytest.fixture(scope="module")
def good_url(images: list[ImageRef]) -> str:
    return _data_url(images[0])


BAD_BODIES: list[tuple[str, Any, int, str]] = [
    ("no messages", {"messages": []}, 422, "messages"),
    ("no image", {"messages": [_user("<stage_1> View?", None)]}, 422, "at least one image"),
    ("remote image", {"messages": [_user("<stage_1> View?", "https://x.org/a.png")]}, 422,
     "data: URLs"),
    ("bad base64", {"messages": [_user("<stage_1> View?", "data:image/png;base64,@@@")]}, 422,
     "not valid base64"),
    ("stage 9", {"messages": [_user("<stage_9> View?", "GOOD")]}, 422, "stage must be 1-8"),
    ("stage 0 in the body", {"messages": [_user("View?", "GOOD")], "cxrtrek": {"stage": 0}},
     422, "stage must be 1-8"),
    ("marker and body disagree", {"messages": [_user("<stage_2> View?", "GOOD")],
                                  "cxrtrek": {"stage": 3}}, 422, "disagree"),
    ("ends with assistant", {"messages": [_user("<stage_1> View?", "GOOD"),
                                          {"role": "assistant", "content": "PA."}]}, 422,
     "alternating"),
    ("stream", {"stream": True, "messages": [_user("<stage_1> View?", "GOOD")]}, 422,
     "streaming is not supported"),
    ("n=2", {"n": 2, "messages": [_user("<stage_1> View?", "GOOD")]}, 422, "n: expected 1"),
    ("audio part", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {}}]}]}, 422, "invalid chat completion"),
    ("negative max_tokens", {"max_tokens": -1, "messages": [_user("<stage_1> V?", "GOOD")]},
     422, "max_tokens"),
    ("unknown model", {"model": "gpt-9", "messages": [_user("<stage_1> V?", "GOOD")]}, 404,
     "not served here"),
    ("not an image", {"messages": [_user("<stage_1> View?", "data:image/png;base64,"
                                         + base64.b64encode(b"hello").decode())]}, 415,
     "image"),
]


@pytest.mark.parametrize(("name", "body", "status", "snippet"), BAD_BODIES,
                         ids=[b[0] for b in BAD_BODIES])
def test_malformed_requests_get_a_clear_4xx(server: BackgroundServer, good_url: str, name: str,
                                           body: Any, status: int, snippet: str) -> None:
    body = _with_image(body, good_url)
    response = _post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert snippet in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"]


def _with_image(body: Any, good_url: str) -> Any:
    """The body with the placeholder image URL "GOOD" replaced by a real data: URL."""
    if isinstance(body, dict):
        return {k: _with_image(v, good_url) for k, v in body.items()}
    if isinstance(body, list):
        return [_with_image(v, good_url) for v in body]
    return good_url if body == "GOOD" else body


def test_invalid_json_and_unknown_routes(server: BackgroundServer) -> None:
    response = _post(server, content=b"{not json", headers={**AUTH,
                                                            "content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    response = httpx.get(f"{server.base_url}/embeddings", headers=AUTH)
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "no route GET /v1/embeddings"


def test_a_bad_request_in_a_batch_fails_alone(server: BackgroundServer, good_url: str,
                                              reference: InProcessBackend,
                                              images: list[ImageRef]) -> None:
    bad = "data:image/png;base64," + base64.b64encode(b"\x89PNG truncated").decode()

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=AUTH, timeout=30) as client:
            bodies = [{"max_tokens": 16, "messages": [_user(f"<stage_2> {q}", url)]}
                      for q, url in ((QUESTIONS[2][1], good_url), (QUESTIONS[3][1], bad),
                                     (QUESTIONS[3][1], good_url))]
            return list(await asyncio.gather(*(
                client.post(f"{server.base_url}/chat/completions", json=b) for b in bodies)))

    first, broken, third = asyncio.run(go())
    assert broken.status_code == 415 and "image" in broken.json()["error"]["message"].lower()
    expected = reference.generate_sync([
        VLMRequest(request_id=str(i), stage=2, question=QUESTIONS[i][1], images=images[:1],
                   max_new_tokens=16) for i in (2, 3)])
    assert [first.status_code, third.status_code] == [200, 200]
    assert [r.json()["choices"][0]["message"]["content"] for r in (first, third)] == [
        e.text for e in expected]


def test_oversized_requests_are_refused(server: BackgroundServer, good_url: str) -> None:
    big = "x" * 1_100_000
    response = _post(server, {"messages": [_user(f"<stage_1> {big}", good_url)]})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        for _ in range(40):
            yield b" " * 50_000

    response = httpx.post(f"{server.base_url}/chat/completions", content=chunks(),
                          headers=AUTH, timeout=30)
    assert response.status_code == 413


def test_tokens_are_checked(server: BackgroundServer, good_url: str) -> None:
    body = {"messages": [_user("<stage_1> View?", good_url)], "max_tokens": 4}
    missing = _post(server, body, headers={})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_token"
    wrong = _post(server, body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_token"
    assert wrong.json()["error"]["type"] == "authentication_error"
    root = server.base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/metrics").status_code == 401
    assert httpx.get(f"{server.base_url}/models").status_code == 401
    health = httpx.get(f"{root}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert _post(server, body).status_code == 200

    async def client_error() -> None:
        async with HTTPBackend([server.base_url], token="nope", max_retries=3) as backend:
            await backend.generate([VLMRequest(request_id="r", stage=1, question="View?",
                                               images=[ImageRef(data=b"x")])])

    with pytest.raises(BackendError, match="HTTP 401") as info:
        asyncio.run(client_error())
    assert not isinstance(info.value, TransientError)


def test_other_bind_addresses_need_a_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert ServerSettings().host == "127.0.0.1"
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.org"):
        with pytest.raises(ConfigError, match="expected a bearer token"):
            ServerSettings.create(host=host)
    assert ServerSettings.create(host="0.0.0.0", token="t").token == "t"
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert ServerSettings.create(host=host).is_loopback()
    with pytest.raises(ConfigError, match="expected a bearer token"):
        create_app(SlowBackend(0.0), ServerSettings(host="0.0.0.0"))
    with pytest.raises(ConfigError, match="max_batch_size"):
        ServerSettings.create(max_batch_size=0)
    assert main(["serve", "--host", "0.0.0.0", "--model", "tiny"]) == EXIT_USAGE
    assert "expected a bearer token" in capsys.readouterr().err


def test_serve_passes_the_reading_settings_to_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from cxrtrek.serve import app

    served: list[Any] = []
    monkeypatch.setattr(app, "serve", lambda backend, settings: served.append(backend))
    assert main(["serve", "--model", "tiny", "--no-dense-head", "--quote-boxes",
                 "--free-text-samples", "3"]) == 0
    assert main(["serve", "--model", "tiny"]) == 0
    [given, default] = served
    assert isinstance(given, InProcessBackend) and isinstance(default, InProcessBackend)
    assert (given.dense_head, given.quote_boxes, given.free_text_samples) == (False, True, 3)
    assert (default.quote_boxes, default.free_text_samples) == (False, 0)  # the model's own


# --- queue, timeouts, shutdown (a slow fake backend behind the real server) ----------------


class SlowBackend:
    """Answers after ``delay`` seconds; counts batches; flags when a batch starts."""

    def __init__(self, delay: float, error: Exception | None = None) -> None:
        self.delay, self.error = delay, error
        self.model_id = "slow"
        self.batches: list[int] = []
        self.started = threading.Event()

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        self.batches.append(len(requests))
        self.started.set()
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return [VLMResponse(request_id=r.request_id, text=f"answer to {r.question}",
                            model_id=self.model_id) for r in requests]


def _slow_body(question: str) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(b"pixels").decode()
    return {"messages": [_user(f"<stage_2> {question}", url)]}


async def _burst(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return list(await asyncio.gather(*(
            client.post(f"{url}/chat/completions", json=_slow_body(f"q{i}"))
            for i in range(n))))


def test_a_full_queue_gets_429() -> None:
    backend = SlowBackend(0.3)
    settings = ServerSettings(port=0, max_batch_size=1, max_queue=2, max_wait_ms=0)
    with BackgroundServer(backend, settings) as srv:
        responses = asyncio.run(_burst(srv.base_url, 8))
    codes = Counter(r.status_code for r in responses)
    assert codes[429] >= 1 and codes[200] >= 2 and set(codes) == {200, 429}
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.headers["retry-after"] == "1"
    for r in responses:  # the answered ones went to their own callers
        if r.status_code == 200:
            assert r.json()["choices"][0]["message"]["content"].startswith("answer to q")


def test_stalled_bodies_get_408_and_too_many_get_503() -> None:
    settings = ServerSettings(port=0, body_timeout_s=1.0, max_concurrent_bodies=1)
    with BackgroundServer(SlowBackend(0.0), settings) as srv:
        t0 = time.monotonic()
        first = stall(srv.port, "/v1/chat/completions", {"Content-Type": "application/json"})
        time.sleep(0.3)  # the first one holds the only slot
        second = RawResponse(stall(srv.port, "/v1/chat/completions", {}), timeout_s=5)
        assert second.status == 503 and time.monotonic() - t0 < 1.0
        assert second.headers["retry-after"] == "1" and second.closed
        assert second.json()["error"]["code"] == "too_many_bodies"
        timed_out = RawResponse(first, timeout_s=10)
        assert timed_out.status == 408 and 1.0 <= time.monotonic() - t0 < 6.0
        assert timed_out.closed
        assert timed_out.json()["error"] == {
            "message": timed_out.json()["error"]["message"], "type": "invalid_request_error",
            "code": "request_timeout"}
        [answer] = asyncio.run(_burst(srv.base_url, 1))  # the slot is free again
        assert answer.status_code == 200


def test_slow_requests_get_504_and_backend_failures_map_to_5xx() -> None:
    with BackgroundServer(SlowBackend(1.0), ServerSettings(port=0, request_timeout_s=0.2)) \
            as srv:
        t0 = time.monotonic()
        [response] = asyncio.run(_burst(srv.base_url, 1))
        assert response.status_code == 504 and time.monotonic() - t0 < 0.9
        assert response.json()["error"]["code"] == "timeout"
    for error, status in ((TransientError("GPU busy"), 503), (BackendError("broken"), 502),
                          (DataError("prompt too long"), 422)):
        with BackgroundServer(SlowBackend(0.0, error), ServerSettings(port=0)) as srv:
            [response] = asyncio.run(_burst(srv.base_url, 1))
        assert response.status_code == status
        assert str(error) in response.json()["error"]["message"]


def test_graceful_shutdown_drains_requests_in_flight() -> None:
    backend = SlowBackend(0.6)
    srv = BackgroundServer(backend, ServerSettings(port=0, max_wait_ms=0)).start()
    answers: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: answers.extend(asyncio.run(
        _burst(srv.base_url, 3))))
    caller.start()
    assert backend.started.wait(10)
    srv.stop()  # what SIGTERM does: stop accepting, finish what is in flight, exit
    caller.join(10)
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert srv._thread is not None and not srv._thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.base_url.removesuffix("/v1") + "/health", timeout=2)


# --- a reading survives the server being SIGKILLed -----------------------------------------


class KillAt:
    """Delegates to ``backend``; SIGKILLs the server when ``stage`` is first asked."""

    def __init__(self, backend: VLMBackend, stage: int, server: ServerProcess) -> None:
        self.backend, self.stage, self.server = backend, stage, server
        self.model_id = backend.model_id
        self.calls: list[int] = []
        self.killed = False

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        self.calls.append(requests[0].stage)
        if requests[0].stage == self.stage and not self.killed:
            self.killed = True
            self.server.kill()
        return await self.backend.generate(requests)


def _answers(report: RunReport) -> dict[tuple[int, str], str]:
    return {(s.stage, a.question_id): a.text for s in report.stages for a in s.answers}


def test_server_killed_mid_reading_then_the_reading_resumes(
        server_process: ServerProcess, tiny: Tiny, phantoms: list[Study],
        tmp_path: Path) -> None:
    server_process.wait_ready()
    prior = Study(study_id="k0", images=[phantoms[1].images[0].model_copy(
        update={"role": ImageRole.PRIOR})])
    study = Study(study_id="k1", images=[phantoms[0].images[0]], prior=prior)
    settings = AgentSettings(home=str(tmp_path / "home"), mode="clinical", max_new_tokens=24,
                             max_retries=0, backoff_s=0.0)
    http = HTTPBackend([server_process.base_url], max_retries=2, backoff_s=0.01,
                       backoff_max_s=0.05, timeout=30)
    killer = KillAt(http, stage=4, server=server_process)
    agent = CXRTrekAgent(killer, settings=settings)
    with pytest.raises(TransientError) as info:
        agent.run(study, run_id="reading-1")
    message = str(info.value)
    assert "stage 4" in message and server_process.base_url in message
    assert "failed 3 times" in message and "ConnectError" in message
    assert killer.calls == [1, 2, 3, 4]
    assert agent.report("reading-1").status == "incomplete"

    # a server is back on the same port (in this process: one cold start per test is enough)
    back = BackgroundServer(InProcessBackend(*tiny, model_id="back"),
                            ServerSettings(port=server_process.port))
    killer.calls.clear()
    with back:
        report = CXRTrekAgent(killer, settings=settings).resume("reading-1")
    assert report.status == "completed"
    assert killer.calls == [4, 5, 6, 7, 8]  # no completed stage asked again, none skipped

    reference = CXRTrekAgent(InProcessBackend(*tiny), settings=AgentSettings(
        home=str(tmp_path / "ref"), checkpoint_db=":memory:", trace=False, mode="clinical",
        max_new_tokens=24)).run(study, run_id="reference")
    assert _answers(report) == _answers(reference)
    assert [s.stage for s in report.stages if s.answers] == list(range(1, 9))

    records = read_trace(tmp_path / "home" / "traces" / "reading-1.jsonl")
    asked = Counter((r.stage, r.question_id) for r in records if isinstance(r, QuestionRecord))
    assert set(asked.values()) == {1} and {s for s, _ in asked} == set(range(1, 9))
    ran = Counter(r.stage for r in records if isinstance(r, StageRecord) and r.status == "ran")
    assert ran == dict.fromkeys(range(1, 9), 1)
    models = {r.stage: r.model_id for r in records if isinstance(r, QuestionRecord)}
    assert models[3] == Path(server_process.model).name and models[4] == "back"


def test_cli_read_through_the_server(server: BackgroundServer, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`cxrtrek read --backend http:URL` reads a study through the server (token from env)."""
    import json

    from cxrtrek.data.phantoms import generate

    data = generate(1, 11, tmp_path / "ph", size=128)
    monkeypatch.setenv("CXRTREK_SERVER_TOKEN", TOKEN)
    ok = 'cxrtrek_requests_total{code="200"}'
    before = _metrics(server).get(ok, 0.0)
    code = main(["read", str(data), "--backend", f"http:{server.base_url}", "--json",
                 "--trace-dir", str(tmp_path / "traces"),
                 "--checkpoint-db", str(tmp_path / "ck.sqlite")])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["status"] == "completed"
    asked = sum(len(s["answers"]) for s in report["stages"])
    assert asked > 0
    assert _metrics(server).get(ok, 0.0) - before >= asked
    monkeypatch.delenv("CXRTREK_SERVER_TOKEN")
    assert main(["read", str(data), "--backend", f"http:{server.base_url}",
                 "--checkpoint-db", str(tmp_path / "ck2.sqlite")]) != 0  # no token: refused
