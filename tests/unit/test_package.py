"""Packaging: light imports, a fast --help, the public API."""

from __future__ import annotations

import subprocess
import sys
import time

import cxrtrek

HEAVY = ("torch", "transformers", "chromadb", "langgraph", "pydicom", "PIL", "rich")


def _imported_after(code: str) -> set[str]:
    probe = (
        f"import sys\n{code}\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True).stdout.strip()
    return set(filter(None, out.split(",")))


def test_import_cxrtrek_is_light() -> None:
    assert _imported_after("import cxrtrek, cxrtrek.schema, cxrtrek.stages") == set()


def test_cli_help_is_light_and_fast() -> None:
    code = ("from cxrtrek.interfaces.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert not _imported_after(code) & {"torch", "transformers", "chromadb", "langgraph"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cxrtrek.interfaces.cli", "--help"],
                          capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    assert "inspect" in proc.stdout
    assert elapsed < 1.0, f"cxrtrek --help took {elapsed:.2f} s"


def test_public_api_resolves() -> None:
    for name in cxrtrek.__all__:
        assert getattr(cxrtrek, name) is not None


def test_all_matches_the_lazy_exports() -> None:
    assert set(cxrtrek.__all__) - {"__version__"} == set(cxrtrek._EXPORTS)
