"""The README's layout and its table of renamed import paths match the package."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import cxrtrek

ROOT = Path(cxrtrek.__file__).parent
README = (ROOT.parent / "README.md").read_text(encoding="utf-8")
LAYOUT = README[README.index("## Layout"):]


def _block() -> str:
    match = re.search(r"```\n(cxrtrek/\n.*?)```", LAYOUT, re.S)
    assert match, "the layout section has a tree of the package"
    return match.group(1)


def test_the_layout_names_every_folder_of_the_package_in_import_order() -> None:
    listed = re.findall(r"^  (\w+)/", _block(), re.M)
    folders = sorted(p.name for p in ROOT.iterdir()
                     if p.is_dir() and (p / "__init__.py").is_file())
    assert sorted(listed) == folders
    # each folder is above every folder it imports (the README's rule, "imports point down")
    position = {name: n for n, name in enumerate(listed)}
    for folder in listed:
        for path in (ROOT / folder).rglob("*.py"):
            for other in set(re.findall(r"^\s*from cxrtrek\.(\w+)[. ]", path.read_text(),
                                        re.M)) & set(position):
                assert position[other] >= position[folder], f"{path} imports cxrtrek.{other}"


def test_every_new_path_of_the_renames_table_imports() -> None:
    table = LAYOUT[LAYOUT.index("### Renamed import paths"):]
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) >= 10
    for _, new in rows:
        for module in re.findall(r"`(cxrtrek(?:\.\w+)*)`", new):
            importlib.import_module(module)
    assert {"QType", "base_qtype"} <= set(vars(importlib.import_module("cxrtrek.stages")))
    from cxrtrek.protocol import request_id, split_request_id

    assert split_request_id(request_id("run-1", 2, "q")) == ("run-1", 2, "q")


def test_every_package_says_its_job() -> None:
    for init in sorted(ROOT.rglob("__init__.py")):
        doc = (importlib.import_module(".".join(
            init.relative_to(ROOT.parent).parent.parts)).__doc__ or "").strip()
        assert len(doc.split()) >= 8, f"{init}: no docstring that says the package's job"
