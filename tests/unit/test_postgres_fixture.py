"""The PostgreSQL test server (tests/postgres.py) without its binaries: a skip with the
reason outside CI, a failure in CI (where .ci/run installs them)."""

from __future__ import annotations

import pytest

from tests import postgres


def test_without_binaries_it_skips_outside_ci_and_fails_in_ci(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres, "pg_binaries", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL is not installed"), \
            postgres.postgres_server():
        pass  # pragma: no cover
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install postgresql"), \
            postgres.postgres_server():
        pass  # pragma: no cover


def test_the_binaries_are_found_on_the_path_or_in_debians_folder() -> None:
    found = postgres.pg_binaries()
    if found is not None:
        assert (found / "initdb").exists() and (found / "pg_ctl").exists()
