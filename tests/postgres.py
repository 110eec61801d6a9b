"""A real PostgreSQL server for tests (:mod:`cxrtrek.agent.pglocal`: the installed binaries,
a temporary folder, 127.0.0.1 and a free port, durability off for speed; stopped at the end).
Without the binaries the tests skip with the reason, except in CI (``$CI`` set), where they
fail."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from cxrtrek.agent.pglocal import NOT_INSTALLED, local_postgres, new_database, pg_binaries

__all__ = ["new_database", "pg_binaries", "postgres_server"]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A server for the block; the URL of its ``postgres`` database."""
    folder = pg_binaries()
    if folder is None:
        if os.environ.get("CI"):
            pytest.fail(NOT_INSTALLED)
        pytest.skip(NOT_INSTALLED)
    with local_postgres(binaries=folder) as url:
        yield url
