"""A throwaway local PostgreSQL server, for tests and benchmarks of the PostgreSQL run store:
started from the installed binaries (``initdb``, ``pg_ctl``: on the PATH or in Debian's
``/usr/lib/postgresql/*/bin``) in a temporary folder, on 127.0.0.1 and a free port; as root
the server runs as the ``postgres`` user. Stopped, and its folder removed, when the block ends::

    with local_postgres() as server:          # postgresql://cxrtrek@127.0.0.1:PORT/postgres
        url = new_database(server)            # a fresh, empty database on it
"""

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

from cxrtrek.errors import ConfigError

__all__ = ["NOT_INSTALLED", "local_postgres", "new_database", "pg_binaries"]

USER = "cxrtrek"
NOT_INSTALLED = ("PostgreSQL is not installed (no initdb/pg_ctl on the PATH nor in "
                 "/usr/lib/postgresql/*/bin); apt-get install postgresql")


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
def local_postgres(*, durable: bool = False, binaries: Path | None = None) -> Iterator[str]:
    """A server for the block; the URL of its ``postgres`` database. ``durable``: keep
    PostgreSQL's default durability (fsync and synchronous commit, as in production); else
    they are off, for speed. ConfigError when the binaries are not installed."""
    folder = binaries or pg_binaries()
    if folder is None:
        raise ConfigError(NOT_INSTALLED)
    root = Path(tempfile.mkdtemp(prefix="cxrtrek-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    port = _free_port()
    try:
        initdb = subprocess.run(_as_server([str(folder / "initdb"), "-D", str(data), "-A",
                                            "trust", "-U", USER, "--no-sync", "-E", "UTF8"]),
                                capture_output=True, text=True, check=False)
        if initdb.returncode != 0:
            raise ConfigError(f"initdb failed: {initdb.stderr.strip()}")
        options = f"-k {root} -h 127.0.0.1 -p {port} -c max_connections=200"
        if not durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        start = subprocess.run(_as_server([str(folder / "pg_ctl"), "-D", str(data), "-o",
                                           options, "-l", str(root / "log"), "-w", "-t", "60",
                                           "start"]),
                               capture_output=True, text=True, check=False)
        if start.returncode != 0:
            log = (root / "log").read_text(errors="replace") if (root / "log").is_file() else ""
            raise ConfigError(f"pg_ctl start failed: {start.stderr.strip()} {log.strip()}")
        try:
            yield f"postgresql://{USER}@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(_as_server([str(folder / "pg_ctl"), "-D", str(data), "-m",
                                       "immediate" if not durable else "fast", "-w", "stop"]),
                           capture_output=True, check=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def new_database(server_url: str, prefix: str = "t") -> str:
    """A fresh, empty database on the server; its URL."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"
