"""The run index of :meth:`VectorMemory.recall` against a real ``chroma run`` server: a run
written and erased by another process (its own HttpClient) while this process holds the run's
index gives the same results as the plain ``where`` path and chromadb's filtered query."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from cxrtrek.memory import HashEmbedder, MemorySettings, VectorMemory

QUESTIONS = [
    (1, "view", "What is the view of this X-ray?", "PA view."),
    (2, "find", "What are the abnormal findings?", "Cardiomegaly and a left pleural effusion."),
    (2, "eff", "Is there a pleural effusion?", "Yes, on the left."),
    (3, "loc", "Where is the effusion located?", "Left lower zone."),
    (4, "dev", "What devices are present?", "A right internal jugular line."),
    (8, "imp", "What is the impression?", "Cardiomegaly with a left effusion."),
]

_CLIENT = """
import json, sys
from cxrtrek.memory import HashEmbedder, MemorySettings, VectorMemory
port, prefix, run, action = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
m = VectorMemory(MemorySettings(mode="server", host="127.0.0.1", port=port, prefix=prefix),
                 embedder=HashEmbedder())
if action == "forget":
    print(m.forget_run(run))
else:
    pairs = [(s, q, t, a, {}) for s, q, t, a in json.loads(action)]
    m.sync_pairs(run, pairs, study_id="s1")
"""


def _other_process(settings: MemorySettings, run: str, action: Any) -> str:
    import json

    arg = action if action == "forget" else json.dumps(action)
    done = subprocess.run([sys.executable, "-c", _CLIENT, str(settings.port), settings.prefix,
                           run, arg],
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip()


def _check(memory: VectorMemory, run: str) -> None:
    plain = VectorMemory(memory.settings, embedder=memory.embedder, client=memory.client,
                         run_index_ttl_s=0, query_cache_size=0)
    col = memory._collection("stage_memory")
    for query in ("pleural effusion", "view", "devices", "impression"):
        for filters in ({}, {"stages": [2, 3]}, {"before_stage": 3}):
            new = memory.recall(run, query, k=20, **filters)
            assert new == plain.recall(run, query, k=20, **filters)
            where: dict[str, Any] = {"run_id": run}
            if filters.get("stages"):
                where = {"$and": [where, {"stage": {"$in": filters["stages"]}}]}
            if filters.get("before_stage"):
                where = {"$and": [where, {"stage": {"$lt": filters["before_stage"]}}]}
            res = col.query(query_embeddings=[memory.embedder.embed([query])[0]],
                            n_results=20, where=where, include=["distances"])
            ref = {i: 1.0 - d for i, d in zip(res["ids"][0], res["distances"][0], strict=True)}
            assert {h.id for h in new} == set(ref)
            assert all(abs(h.score - ref[h.id]) < 1e-5 for h in new)


def test_another_process_writes_and_erases_a_run_this_one_has_indexed(
        chroma_server: MemorySettings) -> None:
    settings = MemorySettings(mode="server", host=chroma_server.host, port=chroma_server.port,
                              prefix="runindex")
    memory = VectorMemory(settings, embedder=HashEmbedder())
    memory.sync_pairs("r", [(s, q, t, a, {}) for s, q, t, a in QUESTIONS[:3]])
    assert len(memory.recall("r", "view", k=20)) == 3  # the run is indexed here
    reads = memory.index_reads
    assert len(memory.recall("r", "view", k=20)) == 3 and memory.index_reads == reads

    _other_process(settings, "r", [list(x) for x in QUESTIONS[3:]])  # new items
    _other_process(settings, "r", [[2, "eff", "Is there a pleural effusion?", "No."]])  # an edit
    hits = memory.recall("r", "effusion", k=20)
    assert len(hits) == len(QUESTIONS) and {h.id: h.answer for h in hits}["r/2/eff"] == "No."
    _check(memory, "r")

    assert _other_process(settings, "r", "forget") == str(len(QUESTIONS))
    assert memory.recall("r", "view", k=20) == []
    _check(memory, "r")
