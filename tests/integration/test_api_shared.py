"""The HTTP API on a PostgreSQL run store, in one process that serves and reads runs (its
in-process worker takes them from the queue): a review pause and edits, a failed run and its
resume, follow-ups, 409 while a run is going, the health counts from the registry."""

from __future__ import annotations

from pathlib import Path

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.agent.pgstore import PostgresStore
from cxrtrek.backends.registry import plausible_backend
from cxrtrek.protocol import VLMBackend

from .test_api import DCM, LIMITS, Api, GatedBackend, _events, _start, _wait


def _agent(url: str, backend: VLMBackend | None = None) -> CXRTrekAgent:
    agent = CXRTrekAgent(backend or plausible_backend(), settings=AgentSettings(store=url))
    assert isinstance(agent.store, PostgresStore)
    return agent


def test_review_follow_ups_and_delete_through_the_queue(pg_url: str, tmp_path: Path) -> None:
    with Api(_agent(pg_url), uploads_dir=str(tmp_path / "up"), lease_s=5.0, **LIMITS) as api:
        run_id = _start(api, [DCM], review_after="2")
        events = _events(api, run_id)  # the stream ends at the pause
        assert [n for n, _ in events] == ["stage", "stage", "review"]
        review = events[-1][1]["report"]["review"]
        run = _wait(api, run_id, "awaiting_review")
        assert run["report"]["status"] == "awaiting_review"
        bad = api.post(f"/v1/runs/{run_id}/review", json={"edits": {"no-such": "x"}})
        assert bad.status_code == 422
        qid = review["questions"][0]["id"]
        ok = api.post(f"/v1/runs/{run_id}/review", json={"edits": {qid: "Small effusion."}})
        assert ok.status_code == 202, ok.text
        rest = _events(api, run_id, **{"Last-Event-ID": "2"})
        assert [n for n, _ in rest] == ["stage"] * 6 + ["report"]
        assert [d["stage"] for _, d in rest[:-1]] == [3, 4, 5, 6, 7, 8]
        run = _wait(api, run_id, "completed")
        answers = {a["question_id"]: a["text"] for a in run["report"]["stages"][1]["answers"]}
        assert answers[qid] == "Small effusion."
        assert api.post(f"/v1/runs/{run_id}/review", json={}).status_code == 409
        assert api.post(f"/v1/runs/{run_id}/resume").status_code == 409

        asked = api.post(f"/v1/runs/{run_id}/followups", json={"question": "Any change?"})
        assert asked.status_code == 200 and asked.json()["turn"] == 1
        kinds = [r["kind"] for r in api.get(f"/v1/runs/{run_id}/trace").json()]
        assert kinds.count("followup") == 1 and kinds.count("review") == 1
        health = api.get("/health").json()
        assert health["runs"] == {"completed": 1}

        assert (tmp_path / "up" / run_id).is_dir()
        deleted = api.delete(f"/v1/runs/{run_id}")
        assert deleted.status_code == 200 and deleted.json()["uploads"]
        assert api.get(f"/v1/runs/{run_id}").status_code == 404


def test_a_failed_run_is_resumed_through_the_queue(pg_url: str, tmp_path: Path) -> None:
    backend = GatedBackend(gate=3)
    backend.failing = True
    backend.opened.set()
    with Api(_agent(pg_url, backend), uploads_dir=str(tmp_path), **LIMITS) as api:
        run_id = _start(api, [DCM])
        events = _events(api, run_id)
        assert [n for n, _ in events] == ["stage", "stage", "error"]
        assert events[-1][1]["error"]["type"] == "BackendError"
        assert _wait(api, run_id, "failed")["error"]["type"] == "BackendError"
        backend.failing = False
        backend.opened.clear()  # held at the gate: the run stays running
        assert api.post(f"/v1/runs/{run_id}/resume").status_code == 202
        assert backend.waiting.wait(30)
        assert api.delete(f"/v1/runs/{run_id}").status_code == 409
        backend.opened.set()
        assert _wait(api, run_id, "completed")["report"]["status"] == "completed"
        names = [n for n, _ in _events(api, run_id)]
        assert names == ["stage", "stage", "error"] + ["stage"] * 6 + ["report"]


def test_workers_and_api_processes_share_a_memory_server(tmp_path: Path) -> None:
    import pytest

    from cxrtrek.errors import ConfigError
    from cxrtrek.interfaces.api import ApiSettings
    from cxrtrek.interfaces.api.app import _agent_of
    from cxrtrek.memory import VectorMemory

    agent = _agent_of(ApiSettings.create(backend="scripted", home=str(tmp_path),
                                         memory_server="chroma.internal:8123"))
    assert isinstance(agent.memory, VectorMemory)  # (connected on first use)
    assert (agent.memory.settings.mode, agent.memory.settings.host,
            agent.memory.settings.port) == ("server", "chroma.internal", 8123)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        ApiSettings.create(backend="scripted", memory_server="chroma.internal")


def test_a_run_read_elsewhere_into_the_store_is_served(pg_url: str, tmp_path: Path) -> None:
    from cxrtrek.schema import ImageRef, Study

    reader = _agent(pg_url)  # e.g. cxrtrek run --store URL, on another machine
    study = Study(study_id="cli", images=[ImageRef(data=b"x" * 64)])
    reader.run(study, run_id="from-cli")
    with Api(_agent(pg_url), uploads_dir=str(tmp_path), read_runs=False, **LIMITS) as api:
        body = api.get("/v1/runs/from-cli").json()
        assert body["status"] == "completed" and body["report"]["run_id"] == "from-cli"
        names = [n for n, _ in _events(api, "from-cli")]
        assert names == ["stage"] * 8 + ["report"]
        assert api.get("/v1/runs/from-cli/trace").json()[0]["kind"] == "run"
        assert api.delete("/v1/runs/from-cli").status_code == 200
        assert api.get("/v1/runs/from-cli").status_code == 404


def test_a_failed_run_finished_elsewhere_shows_as_finished(pg_url: str, tmp_path: Path) -> None:
    backend = GatedBackend(gate=3)
    backend.failing = True
    backend.opened.set()
    with Api(_agent(pg_url, backend), uploads_dir=str(tmp_path), **LIMITS) as api:
        run_id = _start(api, [DCM])
        assert _wait(api, run_id, "failed")["error"]["type"] == "BackendError"
        # finished by hand on another machine: cxrtrek resume RUN_ID --store URL
        backend.failing = False
        assert _agent(pg_url, backend).resume(run_id).status == "completed"
        body = api.get(f"/v1/runs/{run_id}").json()
        assert body["status"] == "completed" and body["error"] is None
        assert api.post(f"/v1/runs/{run_id}/resume").status_code == 409
