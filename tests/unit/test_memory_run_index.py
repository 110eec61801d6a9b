"""The run index of :meth:`VectorMemory.recall` (embedded chromadb): the same results as the
plain ``where`` path and as chromadb's own filtered query, and what it sees of writes made by
other memories, other processes and raw chromadb clients."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cxrtrek.errors import BackendError, ConfigError
from cxrtrek.memory import HashEmbedder, MemorySettings, StageHit, VectorMemory

QUESTIONS = [
    (1, "view", "What is the view of this X-ray?", "PA view."),
    (1, "qual", "Is the image quality good?", "Yes, adequate inspiration."),
    (2, "find", "What are the abnormal findings?", "Cardiomegaly and a left pleural effusion."),
    (2, "eff", "Is there a pleural effusion?", "Yes, on the left."),
    (3, "loc", "Where is the effusion located?", "Left lower zone."),
    (3, "size", "How large is the effusion?", "Moderate."),
    (4, "dev", "What devices are present?", "A right internal jugular line."),
    (8, "imp", "What is the impression?", "Cardiomegaly with a left effusion."),
]

QUERIES = ["pleural effusion on the left", "view", "devices lines tubes",
           "impression cardiomegaly", "how big is it"]

FILTERS: list[dict[str, Any]] = [
    {}, {"stages": [2, 3]}, {"before_stage": 3}, {"context_ids": ["2:eff", "8:imp", "9:x"]},
    {"stages": [1, 2, 3], "before_stage": 3, "context_ids": ["1:view", "2:find", "3:loc"]},
    {"stages": [5]},
]


def _pairs(run: str, answers_of: str = "") -> list[tuple[int, str, str, str, dict[str, Any]]]:
    return [(s, q, text, f"{answer} {answers_of}".strip(), {"task_type": f"T{s}"})
            for s, q, text, answer in QUESTIONS]


def _memory(path: Path, **kw: Any) -> VectorMemory:
    return VectorMemory(MemorySettings(path=str(path)), embedder=HashEmbedder(), **kw)


def _plain(memory: VectorMemory) -> VectorMemory:
    """The same database without the run index: every recall reads by ``where``."""
    return VectorMemory(memory.settings, embedder=memory.embedder, client=memory.client,
                        run_index_ttl_s=0, query_cache_size=0)


def _chroma_query(memory: VectorMemory, run: str, query: str, k: int,
                  **filters: Any) -> list[tuple[str, float]]:
    """chromadb's own filtered vector search (``query(where=...)``) of the same request."""
    clauses: list[dict[str, Any]] = [{"run_id": run}]
    if filters.get("stages"):
        clauses.append({"stage": {"$in": list(filters["stages"])}})
    if filters.get("context_ids"):
        clauses.append({"context_id": {"$in": list(filters["context_ids"])}})
    if filters.get("before_stage") is not None:
        clauses.append({"stage": {"$lt": filters["before_stage"]}})
    where = clauses[0] if len(clauses) == 1 else {"$and": clauses}
    col = memory._collection("stage_memory")
    res = col.query(query_embeddings=[memory.embedder.embed([query])[0]], n_results=k,
                    where=where, include=["distances"])
    return [(i, 1.0 - float(d)) for i, d in zip(res["ids"][0], res["distances"][0], strict=True)]


def _same_as_plain_and_chroma(memory: VectorMemory, runs: Sequence[str], k: int = 20) -> None:
    plain = _plain(memory)
    for run in runs:
        for query in QUERIES:
            for filters in FILTERS:
                new = memory.recall(run, query, k=k, **filters)
                assert new == plain.recall(run, query, k=k, **filters), (run, query, filters)
                # chromadb: the same items and scores (float32 distances; its own order of
                # ties), when k covers the run
                ref = dict(_chroma_query(memory, run, query, k, **filters))
                assert {h.id for h in new} == set(ref), (run, query, filters)
                assert all(abs(h.score - ref[h.id]) < 1e-5 for h in new)
                assert [h.score for h in new] == sorted((h.score for h in new), reverse=True)
        assert memory.recall(run, QUERIES[0], k=2) == plain.recall(run, QUERIES[0], k=2)


def test_recall_matches_the_where_path_and_chromas_filtered_query(tmp_path: Path) -> None:
    memory = _memory(tmp_path / "mem")
    for run in ("run-a", "run-b", "run-c"):
        memory.sync_pairs(run, _pairs(run, answers_of=run), study_id=f"s-{run}")
    # some items written around VectorMemory (a raw client), before the first recall
    col = memory._collection("stage_memory")
    col.add(ids=["run-a/5/raw"], documents=["Q: Compared to the prior?\nA: Stable."],
            embeddings=[memory.embedder.embed(["Q: Compared to the prior?\nA: Stable."])[0]],
            metadatas=[{"run_id": "run-a", "stage": 5, "question_id": "raw",
                        "context_id": "5:raw", "question": "Compared to the prior?",
                        "answer": "Stable."}])
    _same_as_plain_and_chroma(memory, ["run-a", "run-b", "run-c"])
    assert memory.index_reads == 3  # one where read per run; the rest by id
    hits = memory.recall("run-a", "effusion", k=3)
    assert all(isinstance(h, StageHit) and h.run_id == "run-a" for h in hits)
    assert hits[0].score >= hits[1].score >= hits[2].score
    assert memory.recall("nobody", "view", k=3) == []
    assert memory.recall("nobody", "view", k=3) == []


def test_own_writes_update_the_index_without_a_where_read(tmp_path: Path) -> None:
    memory = _memory(tmp_path / "mem")
    memory.sync_pairs("r", _pairs("r")[:3])
    memory.recall("r", "view")
    reads = memory.index_reads
    memory.sync_pairs("r", _pairs("r")[3:])  # new items
    memory.sync_pairs("r", [(2, "eff", "Is there a pleural effusion?", "No.", {})])  # an edit
    _same_as_plain_and_chroma(memory, ["r"])
    assert memory.index_reads == reads
    assert {h.question_id: h.answer for h in memory.recall("r", "effusion", k=20)}["eff"] == "No."


def test_writes_and_erasure_by_another_memory_are_seen_at_once(tmp_path: Path) -> None:
    reader, writer = _memory(tmp_path / "mem"), _memory(tmp_path / "mem")
    writer.sync_pairs("r", _pairs("r")[:4])
    assert len(reader.recall("r", "view", k=20)) == 4
    writer.sync_pairs("r", _pairs("r")[4:])  # new items of the run, after reader's read
    writer.sync_pairs("r", [(1, "view", "What is the view of this X-ray?", "AP view.", {})])
    hits = reader.recall("r", "view", k=20)
    assert len(hits) == len(QUESTIONS) and {h.id: h.answer for h in hits}["r/1/view"] == "AP view."
    _same_as_plain_and_chroma(reader, ["r"])
    # the reader's own write, then the writer's: both seen
    reader.sync_pairs("r", [(9, "x", "Anything else?", "No.", {})])
    writer.sync_pairs("r", [(9, "y", "Anything more?", "Nothing.", {})])
    assert {"r/9/x", "r/9/y"} <= {h.id for h in reader.recall("r", "anything", k=20)}
    _same_as_plain_and_chroma(reader, ["r"])
    assert writer.forget_run("r") == len(QUESTIONS) + 2
    assert reader.recall("r", "view", k=20) == []
    writer.sync_pairs("r", _pairs("r")[:2])  # the run written again after its erasure
    assert [h.id for h in reader.recall("r", "view", k=20)] == [
        h.id for h in _plain(reader).recall("r", "view", k=20)]


def test_raw_client_writes_deletions_at_once_additions_within_the_ttl(tmp_path: Path) -> None:
    memory = _memory(tmp_path / "mem", run_index_ttl_s=0.5)
    memory.sync_pairs("r", _pairs("r"))
    assert len(memory.recall("r", "view", k=20)) == len(QUESTIONS)
    col = memory._collection("stage_memory")
    col.delete(ids=["r/1/view"])  # around VectorMemory: seen at once (the id check)
    assert "r/1/view" not in {h.id for h in memory.recall("r", "view", k=20)}
    doc = "Q: Compared to the prior?\nA: Stable."
    col.add(ids=["r/5/raw"], documents=[doc], embeddings=[memory.embedder.embed([doc])[0]],
            metadatas=[{"run_id": "r", "stage": 5, "question_id": "raw",
                        "context_id": "5:raw", "question": "Compared to the prior?",
                        "answer": "Stable."}])
    # an addition around VectorMemory is not in the index until it expires ...
    assert "r/5/raw" not in {h.id for h in memory.recall("r", "prior", k=20)}
    time.sleep(0.6)
    # ... and is there once it has (the run read by ``where`` again)
    assert "r/5/raw" in {h.id for h in memory.recall("r", "prior", k=20)}
    _same_as_plain_and_chroma(memory, ["r"])


def test_index_off_and_bad_settings(tmp_path: Path) -> None:
    memory = _memory(tmp_path / "mem", run_index_ttl_s=0)
    memory.sync_pairs("r", _pairs("r"))
    memory.recall("r", "view")
    memory.recall("r", "view")
    assert memory.index_reads == 0 and not memory._runs
    with pytest.raises(ConfigError):
        _memory(tmp_path / "x", run_index_ttl_s=-1)
    with pytest.raises(ConfigError):
        _memory(tmp_path / "x", query_cache_size=-1)


class _CountingEmbedder(HashEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.texts.extend(texts)
        return super().embed(texts)


def test_query_embeddings_are_kept_in_a_small_lru(tmp_path: Path) -> None:
    embedder = _CountingEmbedder()
    memory = VectorMemory(MemorySettings(path=str(tmp_path / "mem")), embedder=embedder,
                          query_cache_size=2)
    memory.sync_pairs("r", _pairs("r"))
    embedder.texts.clear()
    first = memory.recall("r", "effusion", k=3)
    assert memory.recall("r", "effusion", k=3) == first
    assert memory.embed_query("effusion") == HashEmbedder().embed(["effusion"])[0]
    assert embedder.texts == ["effusion"]
    memory.embed_query("a")
    memory.embed_query("b")  # "effusion" is the least recent of three: dropped
    memory.embed_query("effusion")
    assert embedder.texts == ["effusion", "a", "b", "effusion"]
    other = _CountingEmbedder()
    memory.embedder = other  # another embedder: nothing kept is reused
    memory.embed_query("effusion")
    assert other.texts == ["effusion"]
    # the graph's retriever embeds its questions through the same cache
    from cxrtrek.graph.context import ContextItem

    item = ContextItem(id="2:eff", stage=2, question="Is there a pleural effusion?",
                       answer="Yes, on the left.")
    memory.retriever_for("r").retrieve("How large?", [item], 1)
    memory.retriever_for("r").retrieve("How large?", [item], 1)
    assert other.texts.count("How large?") == 1


_WRITER = """
import sys
from cxrtrek.memory import HashEmbedder, MemorySettings, VectorMemory
path, run, start, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, sys.argv[5])
from test_memory_run_index import _pairs
m = VectorMemory(MemorySettings(path=path), embedder=HashEmbedder())
m.sync_pairs(run, _pairs(run, answers_of=run)[start:stop], study_id="s-" + run)
"""


def _write_in_another_process(path: Path, run: str, start: int, stop: int) -> None:
    subprocess.run([sys.executable, "-c", _WRITER, str(path), run, str(start), str(stop),
                    str(Path(__file__).parent)], check=True, timeout=120)


def _outcome(memory: VectorMemory, run: str) -> list[StageHit] | str:
    try:
        return memory.recall(run, "pleural effusion", k=20)
    except BackendError as exc:
        return f"BackendError: {'Error finding id' in str(exc)}"


def test_runs_written_by_another_process_on_the_same_folder(tmp_path: Path) -> None:
    path = tmp_path / "mem"
    _write_in_another_process(path, "r", 0, 5)
    _write_in_another_process(path, "q", 0, 8)
    memory = _memory(path)
    _same_as_plain_and_chroma(memory, ["r", "q"])
    # another process writing while this one has the folder open: chromadb's embedded
    # client does not support it (its vector index lives in the process that loaded it);
    # the run index does what the where path does on the same data, error or not
    _write_in_another_process(path, "r", 5, 8)
    indexed, plain = _outcome(memory, "r"), _outcome(_plain(memory), "r")
    assert indexed == plain
    assert _outcome(memory, "q") == _outcome(_plain(memory), "q")  # untouched run: fine
    assert isinstance(_outcome(memory, "q"), list)
