"""The HTTP backend against httpx.MockTransport: wire format, retries, failover, errors."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from cxrtrek.backends.http import HTTPBackend
from cxrtrek.errors import BackendError, ConfigError, TransientError
from cxrtrek.protocol import DecodingSettings, VLMBackend, VLMRequest
from cxrtrek.schema import ImageRef


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


GRADIENT = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
PNG = _png(GRADIENT)
A, B = "http://replica-a:8000/v1", "http://replica-b:8000/v1"

Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def _request(rid: str = "r1", **kw: Any) -> VLMRequest:
    base: dict[str, Any] = dict(request_id=rid, stage=3, question="Where is the effusion?",
                                images=[ImageRef(data=PNG)], max_new_tokens=7)
    base.update(kw)
    return VLMRequest(**base)


def _completion(text: str, **extra: Any) -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "served-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
            **extra}


def _error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "x",
                                                  "code": "c"}})


class Recorder:
    """A MockTransport handler: records (host, body) and answers from a script."""

    def __init__(self, script: Callable[[httpx.Request, int], httpx.Response]) -> None:
        self.script = script
        self.seen: list[tuple[str, dict[str, Any], httpx.Headers]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.seen.append((request.url.host, body, request.headers))
        return self.script(request, len(self.seen))


def _backend(handler: Handler, urls: list[str] | None = None, **kw: Any) -> HTTPBackend:
    kw.setdefault("backoff_s", 0.001)
    kw.setdefault("backoff_max_s", 0.005)
    kw.setdefault("seed", 0)
    kw.setdefault("model", "served-model")
    return HTTPBackend(urls or [A], transport=httpx.MockTransport(handler), **kw)


def _run(backend: HTTPBackend, requests: list[VLMRequest]) -> Any:
    async def go() -> Any:
        async with backend:
            return await backend.generate(requests)
    return asyncio.run(go())


def test_wire_format_is_plain_openai_chat() -> None:
    rec = Recorder(lambda r, n: httpx.Response(200, json=_completion(" Left lower zone. ",
                                                                     cxrtrek={"cache_hits": 1})))
    backend = _backend(rec, token="s3cret", model="cxrtrek-net")
    assert isinstance(backend, VLMBackend)
    req = _request(system="You are a radiologist.", context=[(1, "View?", "PA."),
                                                             (2, "Effusion?", "Yes.")],
                   decoding=DecodingSettings(temperature=0.7, top_p=0.9, seed=5))
    [resp] = _run(backend, [req])
    _host, body, headers = rec.seen[0]
    assert headers["authorization"] == "Bearer s3cret"
    assert body["model"] == "cxrtrek-net" and body["max_tokens"] == 7
    assert (body["temperature"], body["top_p"], body["seed"]) == (0.7, 0.9, 5)
    msgs = body["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant",
                                        "user"]
    assert msgs[0]["content"] == "You are a radiologist."
    first = msgs[1]["content"]
    assert first[0]["type"] == "image_url"
    url = first[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert (sent.format, sent.mode) == ("PNG", "L")
    assert np.array_equal(np.asarray(sent), GRADIENT)  # an 8-bit PNG goes as it is
    assert first[1] == {"type": "text", "text": "<stage_1> View?"}
    assert msgs[2]["content"] == "PA." and msgs[4]["content"] == "Yes."
    assert msgs[3]["content"] == "<stage_2> Effusion?"  # no image: a plain string
    assert msgs[5]["content"] == "<stage_3> Where is the effusion?"
    assert (resp.request_id, resp.text, resp.model_id) == ("r1", "Left lower zone.",
                                                           "served-model")
    assert (resp.prompt_tokens, resp.completion_tokens, resp.cache_hits) == (11, 3, 1)


def test_greedy_sends_temperature_zero_and_no_sampling_settings() -> None:
    rec = Recorder(lambda r, n: httpx.Response(200, json=_completion("ok")))
    _run(_backend(rec), [_request()])
    body = rec.seen[0][1]
    assert body["temperature"] == 0.0 and "top_p" not in body and "seed" not in body
    assert "structured_outputs" not in body  # off by default
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert [p["type"] for p in body["messages"][0]["content"]] == ["image_url", "text"]


def test_all_requests_of_a_call_are_in_flight_together() -> None:
    n = 6
    arrived: list[str] = []
    gate = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        arrived.append(body["messages"][-1]["content"][-1]["text"])
        if len(arrived) == n:
            gate.set()
        await asyncio.wait_for(gate.wait(), 5)  # returns only once all n are waiting
        return httpx.Response(200, json=_completion(body["messages"][-1]["content"][-1]
                                                     ["text"]))

    reqs = [_request(f"r{i}", question=f"Question {i}?") for i in range(n)]
    out = _run(_backend(handler), reqs)
    assert [r.request_id for r in out] == [f"r{i}" for i in range(n)]
    assert [r.text for r in out] == [f"<stage_3> Question {i}?" for i in range(n)]


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_transient_statuses_are_retried(status: int) -> None:
    rec = Recorder(lambda r, n: _error(status, "busy") if n < 3 else
                   httpx.Response(200, json=_completion("done")))
    [resp] = _run(_backend(rec, max_retries=3), [_request()])
    assert resp.text == "done" and len(rec.seen) == 3


def test_connection_errors_are_retried_then_transient_error_names_server() -> None:
    calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(TransientError) as info:
        _run(_backend(handler, max_retries=2), [_request()])
    assert len(calls) == 3
    message = str(info.value)
    assert "failed 3 times" in message and A in message and "ConnectError" in message
    assert "'r1'" in message


def test_dropped_connection_mid_answer_is_retried() -> None:
    state = {"n": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        state["n"] += 1
        if state["n"] == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.",
                                            request=request)
        return httpx.Response(200, json=_completion("after reconnect"))

    [resp] = _run(_backend(handler), [_request()])
    assert resp.text == "after reconnect" and state["n"] == 2


def test_exhausted_5xx_raises_transient_error_with_status_and_message() -> None:
    rec = Recorder(lambda r, n: _error(503, "the request queue is full"))
    with pytest.raises(TransientError) as info:
        _run(_backend(rec, max_retries=1), [_request()])
    assert len(rec.seen) == 2
    assert "HTTP 503" in str(info.value) and "queue is full" in str(info.value)


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422])
def test_other_4xx_are_never_retried(status: int) -> None:
    rec = Recorder(lambda r, n: _error(status, "bad request body"))
    with pytest.raises(BackendError) as info:
        _run(_backend(rec, max_retries=5), [_request()])
    assert not isinstance(info.value, TransientError)
    assert len(rec.seen) == 1
    assert f"HTTP {status}" in str(info.value) and A in str(info.value)
    assert "bad request body" in str(info.value)


def test_read_timeout_is_transient_but_not_retried() -> None:
    calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(TransientError, match="no answer within"):
        _run(_backend(handler, max_retries=3), [_request()])
    assert len(calls) == 1


def test_failover_to_the_next_replica() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "replica-a":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json=_completion(request.url.host))

    out = _run(_backend(handler, urls=[A, B], max_retries=1),
               [_request(f"r{i}") for i in range(4)])
    assert [r.text for r in out] == ["replica-b"] * 4


def test_round_robin_spreads_requests_over_replicas() -> None:
    rec = Recorder(lambda r, n: httpx.Response(200, json=_completion("ok")))
    _run(_backend(rec, urls=[A, B]), [_request(f"r{i}") for i in range(6)])
    hosts = [h for h, _, _ in rec.seen]
    assert hosts.count("replica-a") == 3 and hosts.count("replica-b") == 3


def test_retry_after_is_honoured_within_the_cap() -> None:
    backend = _backend(Recorder(lambda r, n: httpx.Response(200)), backoff_s=0.01,
                       backoff_max_s=0.5)
    for attempt in range(6):
        assert 0.0 <= backend._delay(attempt, None) <= 0.5
    assert backend._delay(0, 0.3) >= 0.3
    assert backend._delay(0, 60.0) <= 0.5  # capped


def test_jitter_spreads_delays() -> None:
    backend = _backend(Recorder(lambda r, n: httpx.Response(200)), backoff_s=1.0,
                       backoff_max_s=100.0)
    delays = {round(backend._delay(3, None), 6) for _ in range(20)}
    assert len(delays) > 10 and all(4.0 <= d <= 8.0 for d in delays)


def test_malformed_completion_is_a_backend_error() -> None:
    rec = Recorder(lambda r, n: httpx.Response(200, json={"choices": []}))
    with pytest.raises(BackendError, match="malformed chat completion"):
        _run(_backend(rec, max_retries=3), [_request()])
    assert len(rec.seen) == 1


def test_one_bad_request_fails_the_call_and_says_how_many() -> None:
    def script(request: httpx.Request, n: int) -> httpx.Response:
        text = json.loads(request.content)["messages"][-1]["content"][-1]["text"]
        return _error(400, "stage must be 1-8") if "bad" in text else httpx.Response(
            200, json=_completion("ok"))

    with pytest.raises(BackendError, match=r"1 of 3|stage must be 1-8") as info:
        _run(_backend(Recorder(script)), [_request("a"), _request("b", question="bad"),
                                          _request("c")])
    assert "'b'" in str(info.value)


def test_a_new_event_loop_gets_a_fresh_pool() -> None:
    rec = Recorder(lambda r, n: httpx.Response(200, json=_completion("ok")))
    backend = _backend(rec)
    asyncio.run(backend.generate([_request()]))  # a first loop (closed afterwards)
    first = backend._client
    asyncio.run(backend.generate([_request()]))  # a second loop: no stale connections
    assert backend._client is not first and len(rec.seen) == 2
    asyncio.run(backend.aclose())


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="at least one base URL"):
        HTTPBackend([])
    with pytest.raises(ConfigError, match="expected base URLs"):
        HTTPBackend(["ftp://x"])
    assert HTTPBackend("http://127.0.0.1:8000").base_urls == ["http://127.0.0.1:8000/v1"]
    assert HTTPBackend("http://h:1/v1/").base_urls == ["http://h:1/v1"]
