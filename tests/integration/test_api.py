"""The agent's HTTP API, really served: uvicorn on a free 127.0.0.1 port in a thread, httpx
as the client, the scripted backend (the bundled demo model in one slow test). Uploads,
server-sent events (live and late), review, follow-ups, restarts, and bad input that must be
refused with a clear 4xx and leave nothing behind."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.registry import load_backend, plausible_backend
from cxrtrek.data import intake
from cxrtrek.data.images import example_images
from cxrtrek.errors import BackendError, ConfigError
from cxrtrek.interfaces import api as api_module
from cxrtrek.interfaces.api import ApiSettings, api_server, create_app
from cxrtrek.protocol import VLMBackend, VLMRequest, VLMResponse

from .conftest import REPO, RawResponse, free_port, stall

TOKEN = "api-test-token-7d2e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = {p.name: p for p in example_images()}
DCM = EXAMPLES["phantom_chest_pa.dcm"]
JPG = EXAMPLES["phantom_chest_pa.jpg"]
PNG = EXAMPLES["phantom_chest_pa.png"]
LIMITS = dict(max_image_bytes=200_000, max_request_bytes=600_000, max_images=3)
WAIT_S = 60.0

Files = list[tuple[str, tuple[str, bytes, str]]]


# --- the server and the client ---------------------------------------------------------------


class Api:
    """The API of ``agent`` on a uvicorn thread at a free loopback port (bounded start)."""

    def __init__(self, agent: CXRTrekAgent, **settings: Any) -> None:
        settings.setdefault("drain_timeout_s", 3.0)
        self.settings = ApiSettings(port=0, token=TOKEN, **settings)
        self.agent = agent
        self.server = api_server(create_app(agent, self.settings), self.settings,
                                 log_level="warning")
        self.thread = threading.Thread(target=self.server.run, name="cxrtrek-api", daemon=True)
        self.url = ""

    def __enter__(self) -> Api:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "the API server thread died while starting"
            assert time.monotonic() < deadline, "the API server did not start in 30 s"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the API server did not stop in 30 s"

    def get(self, path: str, **kw: Any) -> httpx.Response:
        kw.setdefault("headers", AUTH)
        return httpx.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        kw.setdefault("headers", AUTH)
        return httpx.post(self.url + path, timeout=30, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        kw.setdefault("headers", AUTH)
        return httpx.delete(self.url + path, timeout=30, **kw)


def _agent(home: Path, backend: VLMBackend | None = None) -> CXRTrekAgent:
    return CXRTrekAgent(backend or plausible_backend(), settings=AgentSettings(home=str(home)))


def _files(images: Sequence[Path | bytes], prior: Sequence[Path | bytes] = ()) -> Files:
    def part(field: str, i: int, source: Path | bytes) -> tuple[str, tuple[str, bytes, str]]:
        if isinstance(source, Path):
            return field, (source.name, source.read_bytes(), "application/octet-stream")
        return field, (f"{field}-{i}.bin", source, "application/octet-stream")

    return ([part("images", i, s) for i, s in enumerate(images)]
            + [part("prior", i, s) for i, s in enumerate(prior)])


def _start(api: Api, images: Sequence[Path | bytes] = (DCM,), prior: Sequence[Path | bytes] = (),
           **data: str) -> str:
    response = api.post("/v1/runs", files=_files(images, prior), data=data)
    assert response.status_code == 202, response.text
    return str(response.json()["run_id"])


def _wait(api: Api, run_id: str, *statuses: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        body: dict[str, Any] = api.get(f"/v1/runs/{run_id}").json()
        if body["status"] in statuses:
            return body
        assert body["status"] in ("queued", "running"), body  # ended otherwise
        assert time.monotonic() < deadline, f"run {run_id} still {body['status']}"
        time.sleep(0.05)


def _sse(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of a server-sent event stream."""
    name, data = "", ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif not line and name:
            yield name, json.loads(data)
            name, data = "", ""


def _events(api: Api, run_id: str, **headers: str) -> list[tuple[str, dict[str, Any]]]:
    with httpx.stream("GET", f"{api.url}/v1/runs/{run_id}/events", headers={**AUTH, **headers},
                      timeout=WAIT_S) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(_sse(response))


def _tree(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")) if home.exists() else []


def _ct_dicom() -> bytes:
    ds = pydicom.dcmread(DCM)
    ds.Modality, ds.BodyPartExamined = "CT", "HEAD"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api-home")


@pytest.fixture(scope="module")
def api(home: Path) -> Iterator[Api]:
    with Api(_agent(home), **LIMITS) as served:
        yield served


@pytest.fixture(scope="module")
def done(api: Api) -> str:
    """A completed run: two current images and a prior."""
    run_id = _start(api, [DCM, JPG], [PNG], indication="Cough for 3 weeks.")
    _wait(api, run_id, "completed")
    return run_id


# --- the happy path --------------------------------------------------------------------------


def test_health_needs_no_token(api: Api) -> None:
    response = httpx.get(f"{api.url}/health", timeout=10)
    assert response.status_code == 200
    assert response.json()["status"] == "ok" and response.json()["model"] == "scripted"


def test_a_reading_streams_its_stages_then_the_report(api: Api, home: Path) -> None:
    response = api.post("/v1/runs", files=_files([DCM, JPG], [PNG]),
                        data={"indication": "Cough for 3 weeks."})
    assert response.status_code == 202, response.text
    body = response.json()
    run_id = body["run_id"]
    assert body["status"] in ("queued", "running", "completed")
    assert body["links"]["events"] == f"/v1/runs/{run_id}/events"
    assert response.headers["location"] == f"/v1/runs/{run_id}"

    events = _events(api, run_id)
    names = [name for name, _ in events]
    assert names == ["stage"] * (len(events) - 1) + ["report"]
    stages = [data["stage"] for _, data in events[:-1]]
    assert stages == list(range(1, 9))  # a prior: stage 5 runs too
    report = events[-1][1]["report"]
    assert report["status"] == "completed" and report["run_id"] == run_id
    assert [s["stage"] for s in report["stages"]] == stages

    run = _wait(api, run_id, "completed")
    assert run["error"] is None and run["report"]["impression"]
    assert run["report"]["stages"][4]["skipped"] is None  # the comparison with the prior

    trace = api.get(f"/v1/runs/{run_id}/trace")
    assert trace.status_code == 200
    records = trace.json()
    assert records[0]["kind"] == "run" and records[0]["run_id"] == run_id
    assert {r["kind"] for r in records} >= {"run", "question", "stage", "end"}
    lines = api.get(f"/v1/runs/{run_id}/trace", params={"format": "jsonl"})
    assert lines.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line) for line in lines.text.splitlines()] == records
    assert api.get(f"/v1/runs/{run_id}/trace", params={"format": "xml"}).status_code == 422

    uploads = home / "uploads"
    assert sorted(p.name for p in (uploads / run_id).iterdir()) == [
        "current-1.dcm", "current-2.jpg", "prior-1.png"]
    assert not [p for p in uploads.iterdir() if p.name.startswith(".")]  # no partial folder
    assert (uploads / run_id / "current-2.jpg").read_bytes() == JPG.read_bytes()


def test_stages_and_review_pauses_come_from_the_form(api: Api) -> None:
    run_id = _start(api, [PNG], stages="1, 2,8")
    events = _events(api, run_id)
    report = events[-1][1]["report"]
    ran = [s["stage"] for s in report["stages"] if not s["skipped"]]
    assert ran == [1, 2, 8]
    assert [d["stage"] for n, d in events if n == "stage" and not d["result"]["skipped"]] == ran


def test_a_review_pause_then_edits(api: Api) -> None:
    run_id = _start(api, [DCM], review_after="2")
    events = _events(api, run_id)  # the stream ends at the pause
    assert [n for n, _ in events] == ["stage", "stage", "review"]
    review = events[-1][1]["report"]["review"]
    assert review["stage"] == 2 and review["questions"]
    run = _wait(api, run_id, "awaiting_review")
    assert run["report"]["status"] == "awaiting_review"

    bad = api.post(f"/v1/runs/{run_id}/review", json={"edits": {"no-such-question": "x"}})
    assert bad.status_code == 422 and "no-such-question" in bad.json()["error"]["message"]
    assert api.post(f"/v1/runs/{run_id}/review", json={"edit": {}}).status_code == 422
    qid = review["questions"][0]["id"]
    response = api.post(f"/v1/runs/{run_id}/review",
                        json={"edits": {qid: "Small left pleural effusion."}})
    assert response.status_code == 202, response.text

    rest = _events(api, run_id, **{"Last-Event-ID": "2"})  # after the three seen
    assert [n for n, _ in rest] == ["stage"] * 6 + ["report"]
    assert [d["stage"] for _, d in rest[:-1]] == [3, 4, 5, 6, 7, 8]
    assert rest[2][1]["result"]["skipped"] == "no prior study"  # in its place, not run
    run = _wait(api, run_id, "completed")
    stage2 = run["report"]["stages"][1]
    assert {a["question_id"]: a["text"] for a in stage2["answers"]}[qid] == (
        "Small left pleural effusion.")
    again = api.post(f"/v1/runs/{run_id}/review", json={})
    assert again.status_code == 409 and again.json()["error"]["type"] == "Conflict"


def test_deleting_a_run_removes_its_uploads_checkpoints_and_trace(api: Api,
                                                                     home: Path) -> None:
    run_id = _start(api, [DCM], [PNG])
    _wait(api, run_id, "completed")
    assert (home / "uploads" / run_id).is_dir()
    assert api.get(f"/v1/runs/{run_id}/trace").json()
    response = api.delete(f"/v1/runs/{run_id}")
    assert response.status_code == 200, response.text
    assert response.json() == {"run_id": run_id, "checkpoints": True, "trace": True,
                               "memory_items": 0, "uploads": True}
    assert not (home / "uploads" / run_id).exists()
    assert api.get(f"/v1/runs/{run_id}").status_code == 404  # not in memory nor checkpoints
    assert api.get(f"/v1/runs/{run_id}/events").status_code == 404
    again = api.delete(f"/v1/runs/{run_id}")
    assert again.status_code == 404 and again.json()["error"]["type"] == "NotFound"
    assert httpx.delete(f"{api.url}/v1/runs/{run_id}").status_code == 401  # no token


def test_follow_up_questions(api: Api, done: str) -> None:
    first = api.post(f"/v1/runs/{done}/followups", json={"question": "Is the effusion larger?"})
    assert first.status_code == 200, first.text
    answer = first.json()
    assert answer["run_id"] == done and answer["turn"] == 1 and answer["answer"]
    assert answer["context"] > 0
    second = api.post(f"/v1/runs/{done}/followups", json={"question": "Any pneumothorax?"})
    assert second.json()["turn"] == 2
    kinds = [r["kind"] for r in api.get(f"/v1/runs/{done}/trace").json()]
    assert kinds.count("followup") == 2

    empty = api.post(f"/v1/runs/{done}/followups", json={"question": ""})
    assert empty.status_code == 422 and empty.json()["error"]["type"] == "InvalidRequest"
    broken = api.post(f"/v1/runs/{done}/followups", content=b"{not json",
                      headers={**AUTH, "Content-Type": "application/json"})
    assert broken.status_code == 400
    assert api.post(f"/v1/runs/{done}/followups", json={"q": "?"}).status_code == 422


def test_runs_of_an_earlier_process_are_found(api: Api, home: Path, done: str) -> None:
    before = api.get(f"/v1/runs/{done}").json()["report"]
    with Api(_agent(home), **LIMITS) as restarted:  # a new agent and app on the same home
        run = restarted.get(f"/v1/runs/{done}").json()
        assert run["status"] == "completed" and run["report"] == before
        events = _events(restarted, done)
        assert [n for n, _ in events] == ["stage"] * 8 + ["report"]
        assert events[-1][1]["report"] == before
        follow = restarted.post(f"/v1/runs/{done}/followups", json={"question": "Heart size?"})
        assert follow.status_code == 200, follow.text  # the images come from the uploads
        assert restarted.get(f"/v1/runs/{done}/trace").json()[0]["run_id"] == done
        conflict = restarted.post(f"/v1/runs/{done}/resume")
        assert conflict.status_code == 409


def test_unknown_runs_and_routes(api: Api) -> None:
    for method, path in [("GET", "/v1/runs/nope-123"), ("GET", "/v1/runs/nope-123/events"),
                         ("GET", "/v1/runs/nope-123/trace"),
                         ("POST", "/v1/runs/nope-123/followups"),
                         ("POST", "/v1/runs/nope-123/review"), ("GET", "/v1/runs/..%2F..%2Fx"),
                         ("GET", "/v1/nothing")]:
        response = httpx.request(method, api.url + path, headers=AUTH, timeout=10,
                                 json={"question": "?"} if method == "POST" else None)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["type"] == "NotFound"
    wrong = httpx.delete(f"{api.url}/v1/runs", headers=AUTH, timeout=10)
    assert wrong.status_code == 405 and set(wrong.json()["error"]) == {"type", "message"}


# --- scheduling, live events, failures -------------------------------------------------------


class GatedBackend:
    """Plausible answers; questions of stage ``gate`` and later wait for the gate to open,
    and fail (not transiently) while ``failing`` is set."""

    def __init__(self, gate: int) -> None:
        self.inner = plausible_backend()
        self.model_id = "gated"
        self.gate = gate
        self.opened = threading.Event()
        self.waiting = threading.Event()
        self.failing = False

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        if any(r.stage >= self.gate for r in requests):
            if self.failing:
                raise BackendError("scripted failure at the gate")
            self.waiting.set()
            deadline = time.monotonic() + WAIT_S
            while not self.opened.is_set():
                if time.monotonic() > deadline:
                    raise BackendError("the test never opened the gate")
                await asyncio.sleep(0.01)
        return await self.inner.generate(requests)


def test_late_subscribers_get_past_events_then_live_ones_and_runs_queue(
        tmp_path: Path) -> None:
    backend = GatedBackend(gate=3)
    with Api(_agent(tmp_path, backend), max_concurrent_runs=1, **LIMITS) as api:
        first = _start(api, [DCM])
        assert backend.waiting.wait(WAIT_S)  # stages 1 and 2 done, stage 3 held
        second = _start(api, [JPG])
        assert api.get(f"/v1/runs/{second}").json()["status"] == "queued"
        running = api.get(f"/v1/runs/{first}").json()
        assert running["status"] == "running"
        for active in (first, second):  # running or queued: not deletable
            refused = api.delete(f"/v1/runs/{active}")
            assert refused.status_code == 409 and "when it has ended" in refused.text
        assert [s["stage"] for s in running["report"]["stages"] if s["answers"]] == [1, 2]
        assert httpx.get(f"{api.url}/health").json()["runs"] == {"running": 1, "queued": 1}

        with httpx.stream("GET", f"{api.url}/v1/runs/{first}/events", headers=AUTH,
                          timeout=WAIT_S) as response:
            stream = _sse(response)
            past = [next(stream), next(stream)]
            assert [(n, d["stage"]) for n, d in past] == [("stage", 1), ("stage", 2)]
            backend.opened.set()
            live = list(stream)
        assert [(n, d["stage"]) for n, d in live[:-1]] == [("stage", s) for s in range(3, 9)]
        assert [d["stage"] for _, d in live[:-1] if d["result"]["skipped"]] == [5]  # no prior
        assert live[-1][0] == "report"
        assert _wait(api, second, "completed")["report"]["status"] == "completed"


def test_a_failed_run_reports_why_and_can_be_resumed(tmp_path: Path) -> None:
    backend = GatedBackend(gate=3)
    backend.failing = True
    backend.opened.set()
    with Api(_agent(tmp_path, backend), **LIMITS) as api:
        run_id = _start(api, [DCM])
        events = _events(api, run_id)
        assert [n for n, _ in events] == ["stage", "stage", "error"]
        error = events[-1][1]["error"]
        assert error["type"] == "BackendError"
        assert error["message"].endswith("scripted failure at the gate")
        run = _wait(api, run_id, "failed")
        assert run["error"]["type"] == "BackendError"
        assert [s["stage"] for s in run["report"]["stages"] if s["answers"]] == [1, 2]

        backend.failing = False
        assert api.post(f"/v1/runs/{run_id}/resume").status_code == 202
        assert _wait(api, run_id, "completed")["report"]["status"] == "completed"
        names = [n for n, _ in _events(api, run_id)]
        assert names == ["stage", "stage", "error"] + ["stage"] * 6 + ["report"]


def test_shutdown_ends_streams_and_a_restarted_server_resumes_the_run(tmp_path: Path) -> None:
    held = GatedBackend(gate=3)  # never opened: the run is in flight at shutdown
    with Api(_agent(tmp_path, held), drain_timeout_s=0.5) as api:
        run_id = _start(api, [DCM])
        assert held.waiting.wait(WAIT_S)
        with httpx.stream("GET", f"{api.url}/v1/runs/{run_id}/events", headers=AUTH,
                          timeout=WAIT_S) as response:
            stream = _sse(response)
            assert [next(stream)[0], next(stream)[0]] == ["stage", "stage"]
            api.server.should_exit = True  # what SIGTERM does
            assert list(stream) == []  # the stream ends; the run does not
    backend = GatedBackend(gate=3)
    backend.opened.set()
    with Api(_agent(tmp_path, backend)) as restarted:
        assert restarted.get(f"/v1/runs/{run_id}").json()["status"] == "incomplete"
        assert restarted.post(f"/v1/runs/{run_id}/resume").status_code == 202
        run = _wait(restarted, run_id, "completed")
        assert [s["stage"] for s in run["report"]["stages"] if s["answers"]] == [1, 2, 3, 4,
                                                                                 6, 7, 8]


# --- bad input: a clear 4xx, and nothing left behind -----------------------------------------


def _body(files: Files, data: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart body as httpx encodes it, and its Content-Type."""
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.read(), request.headers["content-type"]


BIG = PNG.read_bytes() + b"\0" * 160_000  # each file under 200 kB, four over 600 kB
BAD: list[tuple[str, dict[str, Any], int, str]] = [
    ("missing token", dict(files=_files([DCM]), headers={}), 401, "Unauthorized"),
    ("wrong token", dict(files=_files([DCM]), headers={"Authorization": "Bearer nope"}), 401,
     "Unauthorized"),
    ("no images", dict(files=_files([], [PNG])), 422, "InvalidRequest"),
    ("no form at all", dict(files=None, data={"indication": "x"}), 415,
     "UnsupportedMediaType"),
    ("a JSON body", dict(json={"images": []}), 415, "UnsupportedMediaType"),
    ("a malformed form", dict(content=b"--b\r\nno headers", headers={
        **AUTH, "Content-Type": "multipart/form-data; boundary=b"}), 400, "InvalidRequest"),
    ("not an image", dict(files=_files([b"hello, this is a note"])), 415, "NotAnImageError"),
    ("a PDF prior", dict(files=_files([DCM], [b"%PDF-1.4 a letter"])), 415,
     "NotAnImageError"),
    ("an empty file", dict(files=_files([b""])), 422, "EmptyFileError"),
    ("a truncated PNG", dict(files=_files([PNG.read_bytes()[:2000]])), 422,
     "TruncatedImageError"),
    ("a CT DICOM", dict(files=_files([DCM, _ct_dicom()])), 422, "NotARadiographError"),
    ("a file over the limit", dict(files=_files([PNG.read_bytes() + b"\0" * 200_000])), 413,
     "PayloadTooLarge"),
    ("a body over the limit", dict(files=_files([BIG, BIG, BIG], [BIG])), 413,
     "PayloadTooLarge"),
    ("too many images", dict(files=_files([JPG] * 4)), 422, "InvalidRequest"),
    ("too many priors", dict(files=_files([JPG], [JPG] * 4)), 422, "InvalidRequest"),
    ("bad stages", dict(files=_files([DCM]), data={"stages": "1,9"}), 422, "InvalidRequest"),
    ("stages as words", dict(files=_files([DCM]), data={"stages": "one,two"}), 422,
     "InvalidRequest"),
    ("a bad review stage", dict(files=_files([DCM]), data={"review_after": "0"}), 422,
     "InvalidRequest"),
    ("an unknown field", dict(files=_files([DCM]), data={"colour": "blue"}), 422,
     "InvalidRequest"),
]


@pytest.fixture(scope="module")
def untouched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, Path]]:
    """A server whose home only ever sees refused requests."""
    home = tmp_path_factory.mktemp("untouched") / "home"
    with Api(_agent(home), **LIMITS) as served:
        yield served, home


@pytest.mark.parametrize(("case", "request_kw", "status", "kind"), BAD,
                         ids=[case for case, *_ in BAD])
def test_bad_input_is_refused_and_leaves_nothing(untouched: tuple[Api, Path], case: str,
                                                 request_kw: dict[str, Any], status: int,
                                                 kind: str) -> None:
    api, home = untouched
    response = api.post("/v1/runs", **request_kw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["message"] and set(error) == {"type", "message"}
    assert "Traceback" not in response.text
    assert _tree(home) == []  # no uploads, no checkpoint, no trace


def test_a_streamed_body_over_the_limit_is_cut_off(untouched: tuple[Api, Path]) -> None:
    api, home = untouched
    content, content_type = _body(_files([BIG, BIG, BIG], [BIG]))

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for i in range(0, len(content), 65536):
            yield content[i:i + 65536]

    response = api.post("/v1/runs", content=chunks(),
                        headers={**AUTH, "Content-Type": content_type})
    assert response.status_code == 413 and response.json()["error"]["type"] == "PayloadTooLarge"
    assert "600000" in response.json()["error"]["message"]
    assert _tree(home) == []


def test_stalled_uploads_time_out_and_are_bounded(tmp_path: Path) -> None:
    """20 connections that declare a body and send nothing: the first few are read until
    the body timeout (408), the rest get 503 at once; none is held longer, every connection
    is closed, and the API takes uploads again afterwards."""
    timeout_s, slots = 1.5, 4
    with Api(_agent(tmp_path / "home"), body_timeout_s=timeout_s,
             max_concurrent_bodies=slots) as api:
        port = int(api.url.rsplit(":", 1)[1])
        t0 = time.monotonic()
        socks = [stall(port, "/v1/runs", {**AUTH, "Content-Type":
                                          "multipart/form-data; boundary=b"})
                 for _ in range(20)]
        answers = [RawResponse(s, timeout_s=timeout_s + 10) for s in socks]
        elapsed = time.monotonic() - t0
        by_status = Counter(a.status for a in answers)
        assert by_status == {408: slots, 503: 20 - slots}, by_status
        assert timeout_s <= elapsed < timeout_s + 8, elapsed
        for answer in answers:
            assert answer.closed, answer.status  # the stalled connection is not kept
            error = answer.json()["error"]
            if answer.status == 408:
                assert error["type"] == "RequestTimeout"
                assert f"within {timeout_s:g} s" in error["message"]
            else:
                assert error["type"] == "ServiceUnavailable"
                assert answer.headers["retry-after"] == "1"
                assert "being received already" in error["message"]
        run_id = _start(api, [DCM])  # the slots are free again
        assert _wait(api, run_id, "completed")["status"] == "completed"
    assert not (tmp_path / "home" / "uploads").exists() or [
        p.name for p in (tmp_path / "home" / "uploads").iterdir()] == [run_id]


def test_messages_name_the_file_that_fails(untouched: tuple[Api, Path]) -> None:
    api, _ = untouched
    files = [*_files([DCM]), ("images", ("scan.dcm", _ct_dicom(), "application/dicom"))]
    message = api.post("/v1/runs", files=files).json()["error"]["message"]
    assert message.startswith("images ('scan.dcm'): ") and "Modality 'CT'" in message


def test_tokens_guard_every_v1_route(api: Api, done: str) -> None:
    for path in [f"/v1/runs/{done}", f"/v1/runs/{done}/events", f"/v1/runs/{done}/trace"]:
        response = httpx.get(api.url + path, timeout=10)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    asked = httpx.post(f"{api.url}/v1/runs/{done}/followups", json={"question": "?"},
                       headers={"Authorization": "Bearer nope"}, timeout=10)
    assert asked.status_code == 401


# --- settings and the process ----------------------------------------------------------------


def test_settings_refuse_an_open_bind_without_a_token() -> None:
    with pytest.raises(ConfigError, match="non-loopback"):
        ApiSettings(host="0.0.0.0")
    with pytest.raises(ConfigError, match="non-loopback"):
        ApiSettings.create(host="10.1.2.3", token="")
    assert ApiSettings(host="0.0.0.0", token="t").token == "t"
    assert ApiSettings.create(host="::1", port=None).port == 8080
    with pytest.raises(ConfigError, match="max_images"):
        ApiSettings.create(max_images=9)
    assert api_module.MAX_IMAGES == intake.MAX_IMAGES


def test_importing_the_api_loads_no_model_code() -> None:
    code = ("import sys, cxrtrek.interfaces.api\n"
            "heavy = [m for m in ('torch', 'transformers', 'langgraph', 'chromadb', 'uvicorn') "
            "if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(REPO)})


def test_cxrtrek_api_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "cxrtrek", "-v", "api", "--port", str(port),
               "--backend", "scripted", "--home", str(tmp_path / "home")]
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API did not come up"
            time.sleep(0.1)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/runs", files=_files([DCM]),
                              timeout=30)
        assert response.status_code == 202, response.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert "cxrtrek API stopped" in log.read_text()


# --- the bundled model, end to end -----------------------------------------------------------


@pytest.mark.slow
def test_the_demo_model_reads_an_upload_end_to_end(tmp_path: Path) -> None:
    agent = CXRTrekAgent(load_backend("demo"), settings=AgentSettings(home=str(tmp_path)))
    with Api(agent) as api:
        run_id = _start(api, [DCM], indication="Shortness of breath.")
        events = _events(api, run_id)
        assert [n for n, _ in events][-1] == "report", events[-1]
        report = events[-1][1]["report"]
        assert report["status"] == "completed" and report["findings"]
        answered = [a for s in report["stages"] for a in s["answers"]]
        assert answered and all(a["text"].strip() for a in answered)
        assert api.get(f"/v1/runs/{run_id}").json()["status"] == "completed"
        follow = api.post(f"/v1/runs/{run_id}/followups", json={"question": "Is there an "
                                                                 "effusion?"})
        assert follow.status_code == 200 and follow.json()["model_id"] == "cxrtreknet-demo"
