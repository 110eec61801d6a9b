"""The HTTP API goes on with a run only on the backend the run was read with."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.registry import plausible_backend
from cxrtrek.backends.scripted import ScriptedBackend
from cxrtrek.data.images import example_images
from cxrtrek.data.intake import study_from_images
from cxrtrek.interfaces.api import ApiSettings, api_server, create_app

PNG = next(p for p in example_images() if p.suffix == ".png")


@contextmanager
def _served(agent: CXRTrekAgent) -> Iterator[str]:
    """The API of ``agent`` on a free loopback port (bounded start and stop); its URL."""
    settings = ApiSettings(port=0, drain_timeout_s=3.0)
    server = api_server(create_app(agent, settings), settings, log_level="warning")
    thread = threading.Thread(target=server.run, name="cxrtrek-api", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive(), "the API did not stop in 30 s"


def _wait(url: str, run_id: str, status: str) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/v1/runs/{run_id}", timeout=10).json()["status"] != status:
        assert time.monotonic() < deadline, f"run {run_id} never {status}"
        time.sleep(0.05)


def test_a_review_or_resume_on_another_backend_is_a_conflict(tmp_path: Path) -> None:
    settings = AgentSettings(home=str(tmp_path), review_after=(2,))
    first = CXRTrekAgent(plausible_backend(), settings=settings, backend_spec="scripted")
    assert first.run(study_from_images([PNG]), run_id="p1").status == "awaiting_review"

    other = CXRTrekAgent(ScriptedBackend(plausible_backend()._lookup, model_id="other"),
                         settings=AgentSettings(home=str(tmp_path)), backend_spec="other")
    with _served(other) as url:
        response = httpx.post(f"{url}/v1/runs/p1/review", json={}, timeout=10)
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["type"] == "BackendMismatchError"
        assert "was read with backend 'scripted'" in error["message"]
        assert httpx.get(f"{url}/v1/runs/p1", timeout=10).json()["status"] == "awaiting_review"

    same = CXRTrekAgent(plausible_backend(), settings=AgentSettings(home=str(tmp_path)),
                        backend_spec="scripted")
    with _served(same) as url:
        assert httpx.post(f"{url}/v1/runs/p1/review", json={}, timeout=10).status_code == 202
        _wait(url, "p1", "completed")
