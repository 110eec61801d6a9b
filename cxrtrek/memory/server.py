"""A ``chroma run`` server on loopback for as long as a block runs (tests, benchmarks, demos).

::

    from cxrtrek.memory import VectorMemory
    from cxrtrek.memory.server import chroma_server

    with chroma_server("chroma-db/") as settings:      # MemorySettings(mode="server", ...)
        memory = VectorMemory(settings, embedder=...)

The server listens on 127.0.0.1 on a free port, writes its database under the folder given
and its output to ``server.log`` there; the block starts once the server answers its
heartbeat, and the server is stopped when the block ends. Waiting is bounded both ways: a
server that exits or does not answer in time raises :class:`~cxrtrek.errors.ConfigError`
with the end of its log.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cxrtrek.errors import ConfigError
from cxrtrek.memory.settings import MemorySettings

__all__ = ["chroma_executable", "chroma_server", "free_port"]

HOST = "127.0.0.1"


def chroma_executable() -> Path | None:
    """chromadb's ``chroma`` command: beside this Python's executable, else on ``PATH``."""
    beside = Path(sys.executable).with_name("chroma")
    if beside.is_file():
        return beside
    found = shutil.which("chroma")
    return Path(found) if found else None


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/api/v2/heartbeat", timeout=1.0) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(log: Path) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
    return f"; the end of its log:\n{text[-2000:]}" if text else ""


def _stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


@contextmanager
def chroma_server(folder: str | Path, *, port: int | None = None, start_timeout_s: float = 60.0,
                  stop_timeout_s: float = 10.0,
                  prefix: str = "cxrtrek") -> Iterator[MemorySettings]:
    """Run ``chroma run`` on 127.0.0.1 with its database in ``<folder>/db``; yields the
    :class:`MemorySettings` that reach it.

    ``port`` defaults to a free one. Raises :class:`ConfigError` when there is no ``chroma``
    command, or the server exits or does not answer within ``start_timeout_s``. On leaving,
    the server is asked to stop, then killed after ``stop_timeout_s``.
    """
    chroma = chroma_executable()
    if chroma is None:
        raise ConfigError(f"a chroma server needs chromadb's 'chroma' command beside "
                          f"{sys.executable} or on PATH; found neither")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port() if port is None else port
    settings = MemorySettings(mode="server", host=HOST, port=port, prefix=prefix)
    log = folder / "server.log"
    with log.open("ab") as out:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen([str(chroma), "run", "--path", str(folder / "db"), "--host",
                                 HOST, "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise ConfigError(f"chroma run on port {port} exited with {proc.returncode} "
                                  f"before answering{_tail(log)}")
            if _answers(port):
                break
            if time.monotonic() > deadline:
                raise ConfigError(f"chroma run on port {port} did not answer its heartbeat "
                                  f"within {start_timeout_s:g} s{_tail(log)}")
            time.sleep(0.2)
        yield settings
    finally:
        _stop(proc, stop_timeout_s)
