"""Fixtures of the server tests: a briefly trained tiny CXRTrekNet (so answers are text that
differs by question), its phantom images, and a real server on a loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from cxrtrek.memory import MemorySettings
from cxrtrek.memory.server import chroma_executable, free_port
from cxrtrek.memory.server import chroma_server as run_chroma
from cxrtrek.model.build import load_pretrained
from cxrtrek.model.modeling import CXRTrekNetForConditionalGeneration
from cxrtrek.model.processing import CXRTrekNetProcessor
from cxrtrek.model.synthetic import phantom_studies
from cxrtrek.model.train import TrainConfig, train
from cxrtrek.schema import ImageRef, Study

# Tiny matrices gain nothing from threads, and a busy 2-core machine loses a lot to them.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-5f1c"

Tiny = tuple[CXRTrekNetForConditionalGeneration, CXRTrekNetProcessor]


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[Study]:
    return phantom_studies(tmp_path_factory.mktemp("phantoms"), 16, seed=0, size=32)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, phantoms: list[Study]) -> Path:
    """Tiny CXRTrekNet after 80 LoRA steps on the phantoms (about 7 s on one core)."""
    cfg = TrainConfig.model_validate(dict(
        output_dir=tmp_path_factory.mktemp("model"), model="tiny", steps=80, batch_size=4,
        lr=3e-3, warmup_steps=2, pack_questions=6, checkpoint_every=0, progress=False))
    return train(cfg, studies=phantoms, eval_studies=phantoms[:2])


@pytest.fixture(scope="session")
def tiny(model_dir: Path) -> Tiny:
    model, processor = load_pretrained(model_dir, device="cpu", dtype="float32")
    return model, processor


@pytest.fixture(scope="session")
def images(phantoms: list[Study]) -> list[ImageRef]:
    """Four different phantom radiographs (PNG files)."""
    return [s.images[0] for s in phantoms[:4]]


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemorySettings]:
    """``chroma run`` on a free loopback port for the module's tests."""
    if chroma_executable() is None:
        pytest.skip(f"no chroma command beside {sys.executable} or on PATH")
    with run_chroma(tmp_path_factory.mktemp("chroma"), start_timeout_s=30.0) as settings:
        yield settings


class ServerProcess:
    """``cxrtrek serve`` in a subprocess on 127.0.0.1 (started, waited for, killed)."""

    def __init__(self, model: Path, port: int, log: Path, *extra: str) -> None:
        self.port, self.model, self.log = port, model, log
        self.args = [sys.executable, "-m", "cxrtrek.interfaces.cli", "serve", "--model", str(model),
                     "--device", "cpu", "--port", str(port), "--threads", "1", *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def launch(self) -> ServerProcess:
        """Start the process (without waiting for it to listen)."""
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}
        with self.log.open("ab") as log:  # a file, not a pipe: a full pipe blocks the server
            self.proc = subprocess.Popen(self.args, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout_s: float = 90.0) -> ServerProcess:
        """Wait until ``/health`` answers (the process must not exit meanwhile)."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                out = self.log.read_text(errors="replace")[-3000:]
                raise AssertionError(f"the server exited with {self.proc.returncode}: {out}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).is_success:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in time"
            time.sleep(0.1)

    def start(self) -> ServerProcess:
        return self.launch().wait_ready()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server_process(model_dir: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``cxrtrek serve`` of the trained model, launched (not waited for): a test module
    that launches it early overlaps its cold start (seconds of imports) with other tests."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = ServerProcess(model_dir, free_port(), log).launch()
    try:
        yield server
    finally:
        server.kill()


# --- raw HTTP: requests that stall after their headers ----------------------------------------


def stall(port: int, path: str, headers: dict[str, str]) -> socket.socket:
    """A connection to 127.0.0.1:``port`` that sends a POST's headers (with a
    ``Content-Length`` of 1000) and then nothing: a stalled upload."""
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "127.0.0.1", "Content-Length": "1000",
                                                 **headers}.items())
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())
    return sock


class RawResponse:
    """A response read off a raw socket: status, headers (lower-case names), body, and
    whether the server closed the connection after it."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        sock.settimeout(timeout_s)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"the connection closed before a response: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, v in
                        (line.split(":", 1) for line in lines[1:])}
        while len(body) < int(self.headers.get("content-length", "0")):
            chunk = sock.recv(65536)
            assert chunk, "the connection closed inside the response body"
            body += chunk
        self.body = body
        sock.settimeout(2.0)
        try:
            self.closed = sock.recv(1) == b""
        except (TimeoutError, ConnectionResetError):
            self.closed = False
        sock.close()

    def json(self) -> Any:
        import json

        return json.loads(self.body)
