"""A real PostgreSQL server for tests: started from the installed binaries (``initdb``,
``pg_ctl``: on the PATH or in Debian's ``/usr/lib/postgresql/*/bin``) in a temporary folder,
on 127.0.0.1 and a free port; stopped at the end. Without the binaries the tests skip with the
reason, except in CI (``$CI`` set), where they fail."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

USER = "cxrtrek"


def pg_binaries() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl`` (None: not installed)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server(cmd: list[str]) -> list[str]:
    """As root, PostgreSQL runs as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A server for the block; the URL of its ``postgres`` database."""
    folder = pg_binaries()
    if folder is None:
        message = ("PostgreSQL is not installed (no initdb/pg_ctl on the PATH nor in "
                   "/usr/lib/postgresql/*/bin); apt-get install postgresql")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="cxrtrek-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    port = _free_port()
    initdb = subprocess.run(_as_server([str(folder / "initdb"), "-D", str(data), "-A", "trust",
                                        "-U", USER, "--no-sync", "-E", "UTF8"]),
                            capture_output=True, text=True, check=False)
    assert initdb.returncode == 0, initdb.stderr
    options = (f"-k {root} -h 127.0.0.1 -p {port} -c fsync=off -c synchronous_commit=off "
               "-c full_page_writes=off -c max_connections=200")
    start = subprocess.run(_as_server([str(folder / "pg_ctl"), "-D", str(data), "-o", options,
                                       "-l", str(root / "log"), "-w", "-t", "60", "start"]),
                           capture_output=True, text=True, check=False)
    assert start.returncode == 0, start.stderr + (root / "log").read_text(errors="replace")
    try:
        yield f"postgresql://{USER}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_server([str(folder / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                   "-w", "stop"]), capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def new_database(server_url: str) -> str:
    """A fresh, empty database on the server; its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"
