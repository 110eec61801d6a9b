"""Readers of the public chest X-ray VQA benchmarks, for ``cxrtrek eval``.

::

    from cxrtrek.evals.datasets import load_benchmark

    bench = load_benchmark("VQA_RAD Dataset Public.json", organ="CHEST")
    bench.studies        # one Study per kept record: its image(s), one typed question
    bench.tags           # what the benchmark says of each question (category, scoring)
    bench.report()       # what was kept, what was skipped and why

One module per format (:mod:`.vqa_rad`, :mod:`.slake`, :mod:`.rexvqa`, :mod:`.mimic_cxr_vqa`,
:mod:`.chestagentbench`), each stating the release it follows, its fields, its question types
and the rule that places its questions in a CXRTrek stage. The format is named, or recognised
from the first record's fields (:func:`recognise`). A malformed record raises
:class:`~cxrtrek.errors.FormatError` with one line naming the file, the record and the field;
a record outside the chosen subset (organ, language, modality, split) or unusable (no options,
no images) is skipped and counted by reason.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cxrtrek.errors import ConfigError, FormatError
from cxrtrek.evals.benchmark_metrics import BenchTag
from cxrtrek.evals.datasets._base import (
    Reader,
    ReadOptions,
    Skip,
    build_study,
    describe_error,
    read_json_records,
)
from cxrtrek.schema import Study

__all__ = [
    "BENCHMARK_FORMATS",
    "FORMATS",
    "BenchmarkSet",
    "load_benchmark",
    "reader",
    "recognise",
]

BENCHMARK_FORMATS = ("vqa-rad", "slake", "rexvqa", "mimic-cxr-vqa", "chestagentbench")
FORMATS = ("auto", "cxrtrek", *BENCHMARK_FORMATS)
"""What ``--format`` takes: ``auto`` (recognised from the file), ``cxrtrek``, a benchmark."""

_MODULES = {"vqa-rad": "vqa_rad", "slake": "slake", "rexvqa": "rexvqa",
            "mimic-cxr-vqa": "mimic_cxr_vqa", "chestagentbench": "chestagentbench"}


def reader(name: str) -> Reader:
    """The reader of a benchmark format."""
    import importlib

    module = _MODULES.get(name)
    if module is None:
        raise ConfigError(f"unknown benchmark format {name!r}; expected one of "
                          f"{', '.join(BENCHMARK_FORMATS)}")
    found: Reader = importlib.import_module(f"cxrtrek.evals.datasets.{module}").READER
    return found


_CXRTREK = re.compile(r'"(?:data_dict|cxrtrek_data|messages)"\s*:')


def _looks_like_cxrtrek(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            head = fh.read(65536)
    except OSError:
        return False
    return _CXRTREK.search(head) is not None


def _recognise_records(records: list[dict[str, Any]], path: Path) -> str:
    first = records[0] if records else {}
    for name in BENCHMARK_FORMATS:
        if reader(name).matches(first):
            return name
    keys = ", ".join(sorted(k for k in first if not k.startswith("_"))[:10]) or "none"
    raise FormatError(f"{path}: cannot tell the format from the first record (its fields: "
                      f"{keys}); expected a CXRTrek file or one of "
                      f"{', '.join(BENCHMARK_FORMATS)} (name it with --format)")


def recognise(path: str | Path) -> str:
    """The format of a data file: ``cxrtrek`` or a benchmark's name (from the first record's
    fields); :class:`FormatError` when it is none of them."""
    path = Path(path)
    if _looks_like_cxrtrek(path):
        return "cxrtrek"
    return _recognise_records(read_json_records(path), path)


@dataclass
class BenchmarkSet:
    """The kept questions of a benchmark file, and what was skipped."""

    format: str
    title: str
    version: str
    path: Path
    image_root: Path
    studies: list[Study]
    tags: list[BenchTag]
    """One per study, in the same order."""
    records: int
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> records skipped for it."""
    skipped_examples: dict[str, str] = field(default_factory=dict)
    """Reason -> the first record skipped for it."""

    def limit(self, n: int | None) -> BenchmarkSet:
        """The first ``n`` kept questions (all when None)."""
        if n is None:
            return self
        return BenchmarkSet(self.format, self.title, self.version, self.path, self.image_root,
                            self.studies[:n], self.tags[:n], self.records,
                            dict(self.skipped), dict(self.skipped_examples))

    def describe(self) -> dict[str, Any]:
        """What ``results.json`` records of the benchmark: name, version, counts, skips."""
        return {"benchmark": self.title, "version": self.version,
                "image_root": str(self.image_root), "records": self.records,
                "kept": len(self.studies), "skipped": dict(self.skipped)}

    def report(self) -> str:
        """One line: records read, questions kept, skipped by reason."""
        kept = len(self.studies)
        line = f"{self.title}: {self.records} record(s) read, {kept} question(s) kept"
        n_skipped = sum(self.skipped.values())
        if n_skipped:
            reasons = "; ".join(f"{reason} ({n}, e.g. {self.skipped_examples[reason]})"
                                for reason, n in sorted(self.skipped.items(),
                                                        key=lambda x: (-x[1], x[0])))
            line += f"; {n_skipped} skipped: {reasons}"
        return line


def _label(raw: dict[str, Any], index: int, id_field: str) -> str:
    rid = raw.get(id_field, raw.get("_key"))
    return f"record {index}" + (f" ({id_field} {rid})" if rid is not None else "")


def load_benchmark(path: str | Path, format: str = "auto", *,
                   image_root: str | Path | None = None, organ: str | None = None,
                   split: str | None = None,
                   allow_missing_images: bool = False) -> BenchmarkSet:
    """Read a benchmark file into studies (one question each) and their tags.

    ``format``: a benchmark's name or ``auto``. ``image_root``: the folder the record's image
    paths are relative to (default: the format's usual place beside the file). ``organ``
    (VQA-RAD) and ``split`` (VQA-RAD, MIMIC-CXR-VQA) keep a subset. A missing image raises
    :class:`~cxrtrek.errors.MissingImageError` unless ``allow_missing_images``.
    """
    path = Path(path)
    records = read_json_records(path)
    name = _recognise_records(records, path) if format == "auto" else format
    rd = reader(name)
    if organ is not None and not rd.organ:
        raise ConfigError(f"--organ applies to VQA-RAD (its image_organ); {rd.title} has no "
                          "organ field (SLAKE keeps its English X-ray subset)")
    if split is not None and not rd.split:
        raise ConfigError(f"--split applies to VQA-RAD and MIMIC-CXR-VQA; {rd.title} ships "
                          "one file per split: pass that file")
    root = Path(image_root) if image_root is not None else rd.image_root(path)
    options = ReadOptions(image_root=root, organ=organ, split=split,
                          allow_missing_images=allow_missing_images)
    studies: list[Study] = []
    tags: list[BenchTag] = []
    skipped: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for index, raw in enumerate(records):
        where = f"{path}: {_label(raw, index, rd.id_field)}"
        try:
            item = rd.convert({**raw, "_index": index}, options)
        except (ValidationError, ValueError) as exc:
            raise FormatError(f"{where}: not a {rd.title} record: {describe_error(exc)}") \
                from exc
        if isinstance(item, Skip):
            skipped[item.reason] += 1
            examples.setdefault(item.reason, _label(raw, index, rd.id_field))
            continue
        studies.append(build_study(item, where=where, root=root, reader=rd,
                                   allow_missing_images=allow_missing_images))
        tags.append(item.tag)
    return BenchmarkSet(format=name, title=rd.title, version=rd.version, path=path,
                        image_root=root, studies=studies, tags=tags, records=len(records),
                        skipped=dict(skipped), skipped_examples=examples)
