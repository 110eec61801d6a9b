"""The ``chroma run`` launcher: it starts a server that answers, stops it on leaving the block
(also when the block raises), and says why when the server cannot start."""

from __future__ import annotations

import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cxrtrek.errors import ConfigError
from cxrtrek.memory import HashEmbedder, VectorMemory
from cxrtrek.memory.server import chroma_executable, chroma_server, free_port

pytestmark = pytest.mark.skipif(chroma_executable() is None,
                                reason="no chroma command beside python or on PATH")


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/heartbeat",
                                    timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def test_a_server_runs_for_the_block_and_keeps_its_data(tmp_path: Path) -> None:
    with chroma_server(tmp_path, start_timeout_s=30) as settings:
        assert settings.mode == "server" and settings.host == "127.0.0.1"
        assert _answers(settings.port)
        memory = VectorMemory(settings, embedder=HashEmbedder())
        memory.sync_pairs("run-1", [(2, "eff", "Is there an effusion?", "Yes.", {})],
                          study_id="s1")
        assert memory.counts()["stage_memory"] == 1
    assert not _answers(settings.port)
    assert (tmp_path / "db").is_dir() and (tmp_path / "server.log").is_file()

    with chroma_server(tmp_path, start_timeout_s=30) as again:  # the same folder, again
        assert VectorMemory(again, embedder=HashEmbedder()).counts()["stage_memory"] == 1


def test_the_server_stops_when_the_block_raises(tmp_path: Path) -> None:
    with pytest.raises(KeyError), chroma_server(tmp_path, start_timeout_s=30) as settings:
        assert _answers(settings.port)
        raise KeyError("boom")
    assert not _answers(settings.port)


def test_a_taken_port_is_an_error_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()  # listens, but answers no heartbeat
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"chroma run on port {port} (exited with|did "
                                              r"not answer its heartbeat within 20 s)"), \
                chroma_server(tmp_path, port=port, start_timeout_s=20):
            pytest.fail("the block must not run")


def test_no_answer_in_time_is_an_error_and_the_server_is_stopped(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did not answer its heartbeat within 0 s"), \
            chroma_server(tmp_path, port=(port := free_port()), start_timeout_s=0):
        pytest.fail("the block must not run")
    deadline = time.monotonic() + 5  # a server left running would answer within this
    while time.monotonic() < deadline:
        assert not _answers(port)
        time.sleep(0.25)


def test_without_the_chroma_command_it_says_where_it_looked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match=r"'chroma' command beside .*bin/python or on PATH"), \
            chroma_server(tmp_path):
        pytest.fail("the block must not run")

