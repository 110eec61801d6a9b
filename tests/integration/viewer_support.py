"""What the viewer's tests share: a backend that boxes each finding somewhere of its own, and
the API (``create_app``) under uvicorn on a free loopback port, on a thread."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.registry import plausible_backend
from cxrtrek.data.images import example_images
from cxrtrek.interfaces.api import ApiSettings, api_server, create_app
from cxrtrek.protocol import VLMRequest, VLMResponse

TOKEN = "viewer-test-token-3b9a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PNG = next(p for p in example_images() if p.name == "phantom_chest_pa.png")
JPG = next(p for p in example_images() if p.name == "phantom_chest_pa.jpg")
STUDY_FILE = (Path(__file__).resolve().parents[2] / "cxrtrek" / "data" / "studies"
              / "phantom_with_prior" / "phantoms.json")
WAIT_S = 20.0
BOXES = {"cardiomegaly": (30.0, 45.0, 70.0, 75.0)}
OTHER_BOX = (55.0, 18.0, 85.0, 60.0)
_LOCATE = re.compile(r"locate the (.+?) in", re.IGNORECASE)


class BoxBackend:
    """Plausible answers of the right form; each finding's box somewhere of its own; a
    prompt reported, as a real backend does."""

    model_id = "scripted-boxes"

    def __init__(self) -> None:
        self.inner = plausible_backend()

    async def generate(self, requests: Sequence[VLMRequest]) -> list[VLMResponse]:
        out = await self.inner.generate(requests)
        answers = []
        for request, response in zip(requests, out, strict=True):
            update: dict[str, Any] = {"prompt": f"<image>\n{request.question}",
                                      "dialect": "test", "model_id": self.model_id}
            found = _LOCATE.search(request.question)
            if found:
                name = found.group(1)
                x1, y1, x2, y2 = BOXES.get(name.lower(), OTHER_BOX)
                update["text"] = (f"<|ref|> {name} <|/ref|> "
                                  f"<|box|>({x1}, {y1}), ({x2}, {y2})<|/box|>")
            answers.append(response.model_copy(update=update))
        return answers


class Api:
    """``create_app`` under uvicorn on a free loopback port, on a thread (bounded start/stop)."""

    def __init__(self, home: Path) -> None:
        self.agent = CXRTrekAgent(BoxBackend(), settings=AgentSettings(home=str(home)))
        self.settings = ApiSettings(port=0, token=TOKEN, drain_timeout_s=2.0)
        self.server = api_server(create_app(self.agent, self.settings), self.settings,
                                 log_level="warning")
        self.thread = threading.Thread(target=self.server.run, name="viewer-api", daemon=True)
        self.url = ""

    def __enter__(self) -> Api:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "no API server"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def start(self, **form: str) -> str:
        files = [("images", (PNG.name, PNG.read_bytes(), "image/png"))]
        response = httpx.post(f"{self.url}/v1/runs", files=files, data=form, headers=AUTH,
                              timeout=30)
        assert response.status_code == 202, response.text
        return str(response.json()["run_id"])

    def wait(self, run_id: str, *statuses: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while True:
            body: dict[str, Any] = httpx.get(f"{self.url}/v1/runs/{run_id}", headers=AUTH,
                                             timeout=30).json()
            if body["status"] in statuses:
                return body
            assert body["status"] in ("queued", "running"), body
            assert time.monotonic() < deadline, f"run {run_id} still {body['status']}"
            time.sleep(0.05)
