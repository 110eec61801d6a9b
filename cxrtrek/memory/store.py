"""The vector memory: three chromadb collections behind one object.

* **stage memory** (``<prefix>_stage_memory``): every answered question of every run, id
  ``<run>/<stage>/<question id>``, embedded as question + answer. :meth:`VectorMemory.recall`
  searches one run; :meth:`VectorMemory.retriever_for` is the graph's ``ContextRetriever``
  for one run (only the candidates the graph offers). Both rank the run's items by cosine
  in-process: a run holds tens of items, while chromadb's filtered reads (``where``) cost time
  in proportion to the whole collection. ``recall`` keeps an index of each run it read (ids,
  metadata, embeddings; see "The run index" below), so a repeated recall of a run reads
  chromadb only by id;
* **run tokens** (``<prefix>_run_tokens``): one item per run, id ``<run id>``, whose document
  is a random token replaced by every stage-memory write through :class:`VectorMemory`
  (any process, any client) and deleted with the run: the cheap check of the run index;
* **patient history** (``<prefix>_patient_history``): each completed study's report, image
  SHA-256s and date, id ``<patient key>/<study id>``; :meth:`VectorMemory.find_prior` is the
  graph's prior lookup for stage 5;
* **case library** (``<prefix>_case_library``): completed studies by an image embedding from
  an :class:`~cxrtrek.memory.images.ImageEncoder`, with findings and impression, id
  ``case/<study id>``; :meth:`VectorMemory.similar_cases` searches it.

Every write is an upsert under an id derived from what was written, so retries, resumed runs
and re-runs never duplicate; unchanged stage answers are not even re-embedded. Erasure:
:meth:`VectorMemory.forget_run` and :meth:`VectorMemory.forget_patient`. Patients are stored
only as a one-way key (the trace's :func:`~cxrtrek.graph.trace.hash_patient`); image paths
only when :attr:`MemorySettings.store_image_paths` says so.

The client connects on first use; the text model loads on first embedding. Query texts'
embeddings are kept in a small LRU (``query_cache_size``): the graph and the tools ask the
same question templates again and again.

The run index
-------------

The first :meth:`VectorMemory.recall` of a run in a :class:`VectorMemory` reads the run with
one ``where`` on its run id (the plain path) and keeps its ids, metadata and embeddings; a
later recall of the run checks the index with two reads by id (the run's token; the ids, to
see deletions) and ranks the kept embeddings. Results are those of the plain path on the same
data: the same items, order and scores (cosines in float64, rounded to 6 places). What a
recall sees:

* every write and erasure made through any :class:`VectorMemory`, in this process or another
  one, on this client or another one sharing the database, before the recall started: such a
  write replaces the run's token, an erasure deletes it, and a token that differs from the
  index's makes the recall re-read the run by ``where``. This object's own writes update its
  index in place (no re-read) when the token showed no other write since the index was read;
* items deleted around :class:`VectorMemory` (a raw chromadb client): at once (the id check);
* items added or changed around :class:`VectorMemory`, and a write whose token update failed
  or raced another client's write to the *same run* in the same milliseconds: once the
  index is older than ``run_index_ttl_s`` (default 60 s), when the run is read by ``where``
  again. ``run_index_ttl_s=0`` turns the index off (every recall reads by ``where``).

An embedded chromadb (``PersistentClient``) keeps its vector index in its process: a second
process writing the same folder is not supported by chromadb (reads of embeddings it wrote
fail with ``Error finding id`` in both paths alike); share a memory between processes through
a ``chroma run`` server.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from cxrtrek.errors import ConfigError, DataError
from cxrtrek.memory.embedding import MiniLMEmbedder, TextEmbedder
from cxrtrek.memory.records import PriorStudy, SimilarCase, StageHit
from cxrtrek.memory.settings import MemorySettings
from cxrtrek.schema import ImageRef, ImageRole, Report, StageResult, Study

if TYPE_CHECKING:
    from cxrtrek.graph.context import ContextItem, ScoredContext
    from cxrtrek.memory.images import ImageEncoder

__all__ = ["ImageResolver", "StageRetriever", "VectorMemory", "patient_key"]

log = logging.getLogger(__name__)

T = TypeVar("T")

ImageResolver = Callable[[str], ImageRef | None]
"""Finds a readable image (path or bytes) by its SHA-256, e.g. in an archive; None if not."""

Where = dict[str, Any]

STAGE, PATIENT, CASES = "stage_memory", "patient_history", "case_library"
TOKENS = "run_tokens"

MAX_INDEXED_RUNS = 256
"""Runs whose index a :class:`VectorMemory` keeps (least recently recalled dropped first;
about 1.6 kB per item with all-MiniLM-L6-v2)."""


def patient_key(patient_id: str | None) -> str | None:
    """The one-way key a patient is stored under (the same as in traces)."""
    from cxrtrek.graph.trace import hash_patient

    return hash_patient(patient_id)


def _where(**conds: Any) -> Where | None:
    """A chromadb ``where`` of equality conditions (``$and`` when several; None when none);
    a value ``("$ne", x)`` or ``("$in", [..])`` uses that operator."""
    clauses: list[Where] = []
    for key, value in conds.items():
        if value is None:
            continue
        if isinstance(value, tuple):
            op, arg = value
            clauses.append({key: {op: arg}})
        else:
            clauses.append({key: value})
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _clean(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata chromadb accepts: no None values."""
    return {k: v for k, v in meta.items() if v is not None}


def _pair_text(question: str, answer: str) -> str:
    return f"Q: {question}\nA: {answer}"


def _score(distance: float) -> float:
    return round(1.0 - float(distance), 6)


def _date_key(value: str | None) -> int | None:
    """A sortable day number of a study date (ISO, or CXRTrek's YYYYMMDD), None when not
    parseable."""
    if not value:
        return None
    text = value.strip()
    try:
        return datetime.fromisoformat(text).toordinal()
    except ValueError:
        pass
    if len(text) >= 8 and text[:8].isdigit():
        try:
            return datetime.strptime(text[:8], "%Y%m%d").toordinal()
        except ValueError:
            return None
    return None


def _cosines(query: Sequence[float], vectors: Any) -> list[float]:
    """Cosine of ``query`` with each row of ``vectors`` (the stored float32 values, computed
    in float64: a row's score does not depend on which other rows are ranked with it)."""
    import numpy as np

    q = np.asarray(query, dtype=np.float32).astype(np.float64)
    m = np.asarray(vectors, dtype=np.float32).astype(np.float64).reshape(-1, q.shape[0])
    norms = np.linalg.norm(m, axis=1) * (float(np.linalg.norm(q)) or 1.0)
    return [float(x) for x in (m @ q) / np.where(norms > 0, norms, 1.0)]


def _rank(vector: Sequence[float], ids: Sequence[str], metas: Sequence[Mapping[str, Any]],
          embeddings: Any, k: int) -> list[StageHit]:
    """The ``k`` stage items closest to ``vector``, best first (ties by id)."""
    if not ids:
        return []
    scores = _cosines(vector, embeddings)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], ids[i]))[:k]
    hits: list[StageHit] = []
    for i in order:
        meta = metas[i]
        hits.append(StageHit(
            id=ids[i], run_id=str(meta["run_id"]), stage=int(meta["stage"]),
            question_id=str(meta["question_id"]), study_id=meta.get("study_id"),
            task_type=meta.get("task_type"), qtype=meta.get("qtype"),
            question=str(meta.get("question", "")), answer=str(meta.get("answer", "")),
            score=round(scores[i], 6)))
    return hits


def _selector(stages: Sequence[int] | None, before_stage: int | None,
              context_ids: Sequence[str] | None) -> Callable[[Mapping[str, Any]], bool]:
    """The in-process twin of recall's ``where`` (run id aside): ``stage $in``, ``stage
    $lt`` and ``context_id $in``; an item without the key never matches, as in chromadb."""
    wanted = {int(s) for s in stages} if stages else None
    below = int(before_stage) if before_stage is not None else None
    cids = set(context_ids) if context_ids else None

    def select(meta: Mapping[str, Any]) -> bool:
        stage = meta.get("stage")
        if not isinstance(stage, int) or isinstance(stage, bool):
            stage = None
        if wanted is not None and (stage is None or stage not in wanted):
            return False
        if below is not None and (stage is None or stage >= below):
            return False
        return cids is None or meta.get("context_id") in cids

    return select


@dataclass(frozen=True)
class _RunIndex:
    """What a :class:`VectorMemory` knows of one run's stage items (a snapshot; replaced,
    never changed). ``token``: the run's token when read (None: the run has none);
    ``read_at``: when the run was last read by ``where`` (monotonic seconds)."""

    token: str | None
    read_at: float
    ids: tuple[str, ...]
    metas: tuple[Mapping[str, Any], ...]
    vectors: Any
    """float32 array, one row per id."""

    def updated(self, token: str, ids: Sequence[str], metas: Sequence[Mapping[str, Any]],
                vectors: Any) -> _RunIndex:
        """This index after this memory upserted ``ids`` (as read back; token: the one it
        wrote)."""
        import numpy as np

        rows = {rid: i for i, rid in enumerate(self.ids)}
        all_ids, all_metas = list(self.ids), list(self.metas)
        new = np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1)
        if len(self.ids) and new.shape[1] != self.vectors.shape[1]:
            raise DataError(f"embedding dim {new.shape[1]} differs from the stored "
                            f"{self.vectors.shape[1]}")
        table = [self.vectors[i] for i in range(len(self.ids))]
        for rid, meta, vec in zip(ids, metas, new, strict=True):
            at = rows.get(rid)
            if at is None:
                rows[rid] = len(all_ids)
                all_ids.append(rid)
                all_metas.append(meta)
                table.append(vec)
            else:
                all_metas[at] = meta
                table[at] = vec
        return replace(self, token=token, ids=tuple(all_ids), metas=tuple(all_metas),
                       vectors=np.stack(table) if table else new)


def _split_context_id(context_id: str) -> tuple[int, str]:
    stage, _, question = context_id.partition(":")
    if not question or not stage.isdigit():
        raise DataError(f"expected a context id '<stage>:<question id>'; got {context_id!r}")
    return int(stage), question


class StageRetriever:
    """The graph's :class:`~cxrtrek.graph.context.ContextRetriever` for one run.

    ``retrieve`` ranks the candidates the graph offers (the run's earlier answered pairs) by
    the cosine of their stage-memory embedding to the question: one read of the candidates'
    ids and one query embedding (kept for repeated questions). Candidates missing from the
    memory, or whose answer changed (a review edit, a fork), are upserted first, so the
    ranking always reflects the state of the run.
    """

    def __init__(self, memory: VectorMemory, run_id: str, study_id: str | None = None) -> None:
        self.memory = memory
        self.run_id = run_id
        self.study_id = study_id

    def retrieve(self, query: str, candidates: Sequence[ContextItem],
                 k: int) -> list[ScoredContext]:
        from cxrtrek.graph.context import ScoredContext

        if k < 1:
            raise ConfigError(f"top-k must be at least 1; got {k}")
        if not candidates:
            return []
        vectors = self.memory.sync_pairs(self.run_id, [
            (c.stage, _split_context_id(c.id)[1], c.question, c.answer, {}) for c in candidates
        ], study_id=self.study_id)
        query_vector = self.memory.embed_query(query)
        order = [c for c in candidates if c.id in vectors]
        scores = _cosines(query_vector, [vectors[c.id] for c in order])
        ranked = sorted(range(len(order)), key=lambda i: -scores[i])[:k]
        return [ScoredContext(item=order[i], score=round(scores[i], 6)) for i in ranked]


class VectorMemory:
    """Stage memory, patient history and case library over chromadb.

    ``embedder`` embeds text (default: all-MiniLM-L6-v2, loaded on first use);
    ``image_encoder`` embeds images for the case library (None: the case library is not
    written, and is searched by precomputed embeddings only); ``image_resolver`` locates a
    prior study's images by SHA-256 when patient history holds no path; ``client`` is an
    already made chromadb client (tests), otherwise made from ``settings`` on first use.
    ``run_index_ttl_s``: how long a run's index is used before the run is read by ``where``
    again (it bounds how late items written around :class:`VectorMemory` are seen; 0: no
    index, ``math.inf``: no expiry); ``query_cache_size``: query texts whose embeddings are
    kept (0: none). See the module's "The run index".
    """

    def __init__(self, settings: MemorySettings | None = None, *,
                 embedder: TextEmbedder | None = None,
                 image_encoder: ImageEncoder | None = None,
                 image_resolver: ImageResolver | None = None, client: Any = None,
                 run_index_ttl_s: float = 60.0, query_cache_size: int = 256) -> None:
        if not run_index_ttl_s >= 0 or query_cache_size < 0:
            raise ConfigError("expected run_index_ttl_s >= 0 and query_cache_size >= 0; got "
                              f"{run_index_ttl_s!r}, {query_cache_size!r}")
        self.settings = settings or MemorySettings()
        self.embedder: TextEmbedder = embedder or MiniLMEmbedder()
        self.image_encoder = image_encoder
        self.image_resolver = image_resolver
        self.run_index_ttl_s = float(run_index_ttl_s)
        self.query_cache_size = int(query_cache_size)
        self._client = client
        self._collections: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._index_lock = threading.Lock()
        self._runs: OrderedDict[str, _RunIndex] = OrderedDict()
        self._queries: OrderedDict[str, tuple[float, ...]] = OrderedDict()
        self._queries_embedder: TextEmbedder | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.writes = 0
        """Stage-memory items (re-)embedded and written by this object so far."""
        self.index_reads = 0
        """Runs read by ``where`` into the run index so far (first recalls and re-reads)."""

    def __repr__(self) -> str:
        return f"VectorMemory({self.settings.describe()}, embedder={self.embedder.model_id!r})"

    # --- plumbing ------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        from cxrtrek.memory._chroma import call

        return call(self.settings, what, fn)

    @property
    def client(self) -> Any:
        """The chromadb client (connected on first use)."""
        with self._lock:
            if self._client is None:
                from cxrtrek.memory._chroma import make_client

                t0 = time.perf_counter()
                self._client = make_client(self.settings)
                log.info("memory: connected to %s in %.2f s", self.settings.describe(),
                         time.perf_counter() - t0)
            return self._client

    def heartbeat(self) -> int:
        """The server's (or embedded system's) heartbeat, in ns; raises when unreachable."""
        return int(self._call("checking the heartbeat", lambda: self.client.heartbeat()))

    def collection_name(self, kind: str) -> str:
        return f"{self.settings.prefix}_{kind}"

    def _collection(self, kind: str) -> Any:
        with self._lock:
            found = self._collections.get(kind)
            if found is not None:
                return found
            client = self.client
            configuration: dict[str, Any] | None = {"hnsw": {"space": "cosine"}}
            if kind == TOKENS:  # no vectors to speak of: one constant 1-d vector per run
                space_id, ef, configuration = None, None, None
            elif kind == CASES:
                if self.image_encoder is None:
                    space_id, ef = None, None
                else:
                    space_id, ef = self.image_encoder.model_id, None
            else:
                from cxrtrek.memory._chroma import TextEmbeddingFunction

                space_id, ef = self.embedder.model_id, TextEmbeddingFunction(self.embedder)
            name = self.collection_name(kind)
            meta = {"cxrtrek_kind": kind}
            if space_id is not None:
                meta["cxrtrek_embedder"] = space_id

            def open_it() -> Any:
                return client.get_or_create_collection(
                    name, embedding_function=ef, metadata=meta, configuration=configuration)

            col = self._call(f"opening collection {name}", open_it)
            stored = (col.metadata or {}).get("cxrtrek_embedder")
            if space_id is not None and stored is not None and stored != space_id:
                raise ConfigError(f"collection {name} was built with embeddings of {stored!r}; "
                                  f"this memory embeds with {space_id!r} (use another prefix "
                                  "or the same embedder)")
            self._collections[kind] = col
            return col

    def counts(self) -> dict[str, int]:
        """Items per collection."""
        return {kind: int(self._call(f"counting {kind}", self._collection(kind).count))
                for kind in (STAGE, PATIENT, CASES)}

    # --- stage memory ----------------------------------------------------------------------

    @staticmethod
    def stage_id(run_id: str, stage: int, question_id: str) -> str:
        """The id of one answered question: ``<run>/<stage>/<question id>``."""
        return f"{run_id}/{stage}/{question_id}"

    def sync_pairs(self, run_id: str,
                   pairs: Sequence[tuple[int, str, str, str, Mapping[str, Any]]], *,
                   study_id: str | None = None,
                   patient_id: str | None = None) -> dict[str, list[float]]:
        """Upsert answered questions ``(stage, question id, question, answer, extra
        metadata)`` of a run; pairs already stored with the same text are left alone (not
        re-embedded). Returns each pair's embedding by context id (``<stage>:<question>``)."""
        if not pairs:
            return {}
        col = self._collection(STAGE)
        ids = [self.stage_id(run_id, s, q) for s, q, _, _, _ in pairs]
        docs = [_pair_text(question, answer) for _, _, question, answer, _ in pairs]
        # by id alone (a ``where`` would cost more), the run id checked here
        stored = self._call("reading stage memory", lambda: col.get(
            ids=ids, include=["documents", "embeddings", "metadatas"]))
        have = {rid: (doc, emb) for rid, doc, emb, meta in zip(
            stored["ids"], stored["documents"], stored["embeddings"], stored["metadatas"],
            strict=True) if (meta or {}).get("run_id") == run_id}
        vectors: dict[str, list[float]] = {}
        todo: list[int] = []
        for i, (rid, doc) in enumerate(zip(ids, docs, strict=True)):
            found = have.get(rid)
            if found is not None and found[0] == doc:
                vectors[f"{pairs[i][0]}:{pairs[i][1]}"] = [float(x) for x in found[1]]
            else:
                todo.append(i)
        if not todo:
            return vectors
        key = patient_key(patient_id)
        metas = []
        for i in todo:
            stage, qid, question, answer, extra = pairs[i]
            metas.append(_clean({
                **extra, "run_id": run_id, "stage": stage, "question_id": qid,
                "context_id": f"{stage}:{qid}", "study_id": study_id, "patient": key,
                "question": question, "answer": answer}))
        new = self.embedder.embed([docs[i] for i in todo])
        # the run's index stays valid through this write only if no other write happened
        # since it was read (the run's token unchanged); otherwise it is dropped
        known = self._indexed(run_id)
        if known is not None and self._read_token(run_id) != known.token:
            known = None
        self._drop_index(run_id)
        self._call("writing stage memory", lambda: col.upsert(
            ids=[ids[i] for i in todo], documents=[docs[i] for i in todo],
            embeddings=new, metadatas=metas))
        token = self._write_token(run_id)
        if known is not None:  # read back what was written: chromadb merges metadata
            written = [ids[i] for i in todo]
            back = self._call("reading stage memory", lambda: col.get(
                ids=written, include=["metadatas", "embeddings"]))
            if sorted(back["ids"]) == sorted(written) and all(
                    (m or {}).get("run_id") == run_id for m in back["metadatas"]):
                self._keep_index(run_id, known.updated(
                    token, back["ids"], back["metadatas"], back["embeddings"]),
                    only_if_absent=True)
        for i, vec in zip(todo, new, strict=True):
            vectors[f"{pairs[i][0]}:{pairs[i][1]}"] = vec
        self.writes += len(todo)
        return vectors

    def record_stage(self, run_id: str, study: Study, result: StageResult) -> int:
        """Write a stage's answered questions (the graph calls it after each stage)."""
        questions = {q.id: q for q in result.questions}
        pairs: list[tuple[int, str, str, str, Mapping[str, Any]]] = []
        for answer in result.answers:
            q = questions.get(answer.question_id)
            pairs.append((result.stage, answer.question_id, q.text if q else "", answer.text,
                          {"task_type": q.task_type if q else None,
                           "qtype": q.qtype if q else None}))
        before = self.writes
        self.sync_pairs(run_id, pairs, study_id=study.study_id, patient_id=study.patient_id)
        return self.writes - before

    def recall(self, run_id: str, query: str | Sequence[float], *, k: int = 4,
               stages: Sequence[int] | None = None, before_stage: int | None = None,
               context_ids: Sequence[str] | None = None) -> list[StageHit]:
        """The ``k`` answered questions of run ``run_id`` closest to ``query`` (a text or a
        precomputed embedding), best first; optionally only some stages, only stages before
        ``before_stage``, or only some context ids (``<stage>:<question id>``)."""
        if k < 1:
            raise ConfigError(f"k must be at least 1; got {k}")
        if self.run_index_ttl_s > 0:
            index, vector = self._index_and_vector(run_id, query)
            select = _selector(stages, before_stage, context_ids)
            rows = [i for i, meta in enumerate(index.metas) if select(meta)]
            return _rank(vector, [index.ids[i] for i in rows],
                         [index.metas[i] for i in rows], index.vectors[rows], k)
        vector = self._query_vector(query)
        return self._recall_where(run_id, vector, k=k, stages=stages,
                                  before_stage=before_stage, context_ids=context_ids)

    def _index_and_vector(self, run_id: str,
                          query: str | Sequence[float]) -> tuple[_RunIndex, list[float]]:
        """The run's index and the query's vector; a text not embedded yet is embedded while
        the index is checked (chromadb reads wait on I/O or run outside the GIL, as does the
        embedder's torch work), so a recall costs about the larger of the two, not the sum."""
        if not isinstance(query, str) or self._cached_query(query) is not None:
            return self._run_index(run_id), self._query_vector(query)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="cxrtrek-memory")
            pool = self._pool
        checked = pool.submit(self._run_index, run_id)
        vector = self.embed_query(query)
        return checked.result(), vector

    def _cached_query(self, text: str) -> tuple[float, ...] | None:
        with self._index_lock:
            if self.query_cache_size == 0 or self._queries_embedder is not self.embedder:
                return None
            return self._queries.get(text)

    def _recall_where(self, run_id: str, vector: Sequence[float], *, k: int,
                      stages: Sequence[int] | None, before_stage: int | None,
                      context_ids: Sequence[str] | None) -> list[StageHit]:
        """recall without the run index: one ``where`` read of the run's matching items."""
        col = self._collection(STAGE)
        where = _where(
            run_id=run_id,
            stage=("$in", [int(s) for s in stages]) if stages else None,
            context_id=("$in", list(context_ids)) if context_ids else None)
        if before_stage is not None:
            clause = {"stage": {"$lt": int(before_stage)}}
            where = {"$and": [*(where["$and"] if where and "$and" in where
                                else [where] if where else []), clause]}
        # A run holds tens of items: fetch them by the run's ``where`` and rank them here.
        # (chromadb's filtered HNSW search costs O(collection); this costs O(run).)
        got = self._call("reading stage memory", lambda: col.get(
            where=where, include=["metadatas", "embeddings"]))
        return _rank(vector, got["ids"], got["metadatas"], got["embeddings"], k)

    def retriever_for(self, run_id: str) -> StageRetriever:
        """The graph's context retriever for run ``run_id``."""
        return StageRetriever(self, run_id)

    def embed_query(self, text: str) -> list[float]:
        """The embedding of a query text; the last ``query_cache_size`` texts' are kept."""
        if self.query_cache_size == 0:
            return self.embedder.embed([text])[0]
        with self._index_lock:
            if self._queries_embedder is not self.embedder:  # embedder swapped: start over
                self._queries.clear()
                self._queries_embedder = self.embedder
            found = self._queries.get(text)
            if found is not None:
                self._queries.move_to_end(text)
                return list(found)
            embedder = self.embedder
        vector = embedder.embed([text])[0]
        with self._index_lock:
            if self._queries_embedder is embedder:
                self._queries[text] = tuple(float(x) for x in vector)
                while len(self._queries) > self.query_cache_size:
                    self._queries.popitem(last=False)
        return vector

    def _query_vector(self, query: str | Sequence[float]) -> list[float]:
        if isinstance(query, str):
            return self.embed_query(query)
        return [float(x) for x in query]

    # --- the run index (see the module's docstring) ----------------------------------------

    def _read_token(self, run_id: str) -> str | None:
        """The run's current token (None: the run has none)."""
        col = self._collection(TOKENS)
        got = self._call("reading the run's token",
                         lambda: col.get(ids=[run_id], include=["documents"]))
        docs = got["documents"] or []
        return str(docs[0]) if got["ids"] and docs and docs[0] is not None else None

    def _write_token(self, run_id: str) -> str:
        """Replace the run's token (after a write to its stage items); the new token."""
        token = uuid.uuid4().hex
        col = self._collection(TOKENS)
        self._call("writing the run's token", lambda: col.upsert(
            ids=[run_id], documents=[token], embeddings=[[1.0]],
            metadatas=[{"run_id": run_id}]))
        return token

    def _indexed(self, run_id: str, *, touch: bool = False) -> _RunIndex | None:
        with self._index_lock:
            found = self._runs.get(run_id)
            if found is not None and touch:
                self._runs.move_to_end(run_id)
            return found

    def _keep_index(self, run_id: str, index: _RunIndex, *, only_if_absent: bool = False) -> None:
        if self.run_index_ttl_s <= 0:
            return
        with self._index_lock:
            if only_if_absent and run_id in self._runs:
                return
            self._runs[run_id] = index
            self._runs.move_to_end(run_id)
            while len(self._runs) > MAX_INDEXED_RUNS:
                self._runs.popitem(last=False)

    def _drop_index(self, run_id: str | None = None) -> None:
        """Forget one run's index (None: every run's)."""
        with self._index_lock:
            if run_id is None:
                self._runs.clear()
            else:
                self._runs.pop(run_id, None)

    def _read_run(self, run_id: str, token: str | None) -> _RunIndex:
        """Read the run by ``where`` into a new index; ``token`` must have been read before
        (so a write that ends after this read changes the token again)."""
        import numpy as np

        col = self._collection(STAGE)
        read_at = time.monotonic()
        got = self._call("reading stage memory", lambda: col.get(
            where={"run_id": run_id}, include=["metadatas", "embeddings"]))
        ids = tuple(str(x) for x in got["ids"])
        vectors = (np.asarray(got["embeddings"], dtype=np.float32).reshape(len(ids), -1)
                   if ids else np.zeros((0, self.embedder.dim), dtype=np.float32))
        index = _RunIndex(token=token, read_at=read_at, ids=ids,
                          metas=tuple(got["metadatas"]), vectors=vectors)
        self._keep_index(run_id, index)
        self.index_reads += 1
        return index

    def _run_index(self, run_id: str) -> _RunIndex:
        """The run's index, checked: kept if fresh (token unchanged, every id still there,
        younger than ``run_index_ttl_s``), else read again by ``where``."""
        index = self._indexed(run_id, touch=True)
        token = self._read_token(run_id)
        if index is None or index.token != token or (
                math.isfinite(self.run_index_ttl_s)
                and time.monotonic() - index.read_at > self.run_index_ttl_s):
            return self._read_run(run_id, token)
        if index.ids:
            col = self._collection(STAGE)
            present = self._call("checking stage memory",
                                 lambda: col.get(ids=list(index.ids), include=[]))
            if len(present["ids"]) != len(index.ids):  # deleted around VectorMemory
                return self._read_run(run_id, token)
        return index

    # --- patient history -------------------------------------------------------------------

    def add_study(self, study: Study, report: Report, *, run_id: str | None = None) -> bool:
        """Write a completed study into patient history (skipped without a patient id)."""
        key = patient_key(study.patient_id)
        if key is None:
            log.debug("memory: study %s has no patient id; not in patient history",
                      study.study_id)
            return False
        images = [r for r in study.images if r.role is not ImageRole.PRIOR]
        shas = [r.sha256 for r in images if r.sha256]
        meta = _clean({
            "patient": key, "study_id": study.study_id, "run_id": run_id or report.run_id,
            "date": study.date, "date_key": _date_key(study.date), "recorded_at": time.time(),
            "findings": report.findings, "impression": report.impression,
            "image_sha256": ",".join(shas),
            "image_paths": ("\n".join(r.path or "" for r in images)
                            if self.settings.store_image_paths else None)})
        doc = "\n".join(x for x in (report.findings, report.impression) if x) or study.study_id
        col = self._collection(PATIENT)
        vector = self.embedder.embed([doc])[0]
        self._call("writing patient history", lambda: col.upsert(
            ids=[f"{key}/{study.study_id}"], documents=[doc], embeddings=[vector],
            metadatas=[meta]))
        return True

    @staticmethod
    def _prior(meta: Mapping[str, Any], score: float | None = None) -> PriorStudy:
        shas = [s for s in str(meta.get("image_sha256", "")).split(",") if s]
        paths = str(meta["image_paths"]).split("\n") if meta.get("image_paths") else []
        return PriorStudy(study_id=str(meta["study_id"]), run_id=meta.get("run_id"),
                          date=meta.get("date"), findings=meta.get("findings"),
                          impression=meta.get("impression"), image_sha256=shas,
                          image_paths=[p for p in paths if p], score=score)

    def prior_studies(self, patient_id: str, *, query: str | None = None, k: int = 5,
                      before: str | None = None,
                      exclude_study_id: str | None = None) -> list[PriorStudy]:
        """A patient's completed studies: the ``k`` latest (dated before ``before`` when
        given), or with ``query`` the ``k`` whose reports are closest to it."""
        key = patient_key(patient_id)
        if key is None:
            raise DataError("searching prior studies needs a patient id; got none")
        if k < 1:
            raise ConfigError(f"k must be at least 1; got {k}")
        col = self._collection(PATIENT)
        where = _where(patient=key, study_id=("$ne", exclude_study_id)
                       if exclude_study_id else None)
        cutoff = _date_key(before)
        if query is not None:
            vector = self._query_vector(query)
            res = self._call("searching patient history", lambda: col.query(
                query_embeddings=[vector], n_results=k, where=where,
                include=["metadatas", "distances"]))
            found = [self._prior(m, _score(d))
                     for m, d in zip(res["metadatas"][0], res["distances"][0], strict=True)]
            return [p for p in found
                    if cutoff is None or (_date_key(p.date) or -1) < cutoff]
        got = self._call("reading patient history",
                         lambda: col.get(where=where, include=["metadatas"]))
        metas = [m for m in got["metadatas"]
                 if cutoff is None or (m.get("date_key") or -1) < cutoff]
        metas.sort(key=lambda m: (m.get("date_key") or -1, m.get("recorded_at") or 0.0),
                   reverse=True)
        return [self._prior(m) for m in metas[:k]]

    def find_prior(self, study: Study, *, require_images: bool = True) -> Study | None:
        """The graph's prior lookup: the patient's latest earlier study, as a prior
        :class:`Study` whose images are located by stored path or the ``image_resolver``.

        None when the study has no patient id, the patient has no earlier study, or (with
        ``require_images``) the prior's images cannot be located.
        """
        if study.patient_id is None:
            return None
        found = self.prior_studies(study.patient_id, k=1, before=study.date,
                                   exclude_study_id=study.study_id)
        if not found:
            return None
        prior = found[0]
        refs: list[ImageRef] = []
        for i, sha in enumerate(prior.image_sha256):
            path = prior.image_paths[i] if i < len(prior.image_paths) else None
            ref: ImageRef | None = None
            if path:
                ref = ImageRef(path=path, sha256=sha, role=ImageRole.PRIOR)
            elif self.image_resolver is not None:
                resolved = self.image_resolver(sha)
                if resolved is not None:
                    ref = resolved.model_copy(update={"role": ImageRole.PRIOR})
            if ref is None:
                if require_images:
                    log.info("memory: prior study %s of study %s found, but image %s cannot be "
                             "located (no stored path, no resolver hit); not used",
                             prior.study_id, study.study_id, sha[:12])
                    return None
                ref = ImageRef(sha256=sha, role=ImageRole.PRIOR)
            refs.append(ref)
        if not refs:
            return None
        log.info("memory: study %s: prior %s (dated %s) found in patient history",
                 study.study_id, prior.study_id, prior.date)
        return Study(study_id=prior.study_id, patient_id=study.patient_id, images=refs,
                     date=prior.date)

    # --- case library ---------------------------------------------------------------------

    def add_case(self, study: Study, report: Report, *, run_id: str | None = None) -> bool:
        """Index a completed study by the embedding of its first current image (skipped
        without an image encoder, or when the image cannot be read)."""
        if self.image_encoder is None:
            return False
        image = next((r for r in study.images if r.role is not ImageRole.PRIOR), None)
        if image is None:
            return False
        try:
            vector = self.image_encoder.embed_images([image])[0]
        except (OSError, DataError) as exc:
            log.warning("memory: study %s not added to the case library: its image cannot "
                        "be read (%s)", study.study_id, exc)
            return False
        doc = "\n".join(x for x in (report.findings, report.impression) if x) or study.study_id
        meta = _clean({"study_id": study.study_id, "run_id": run_id or report.run_id,
                       "patient": patient_key(study.patient_id),
                       "findings": report.findings, "impression": report.impression,
                       "image_sha256": image.sha256})
        col = self._collection(CASES)
        self._call("writing the case library", lambda: col.upsert(
            ids=[f"case/{study.study_id}"], documents=[doc], embeddings=[vector],
            metadatas=[meta]))
        return True

    def similar_cases(self, image: ImageRef | Sequence[float], *, k: int = 5,
                      exclude_study_id: str | None = None,
                      exclude_patient_id: str | None = None) -> list[SimilarCase]:
        """The ``k`` library cases whose image embeddings are closest to ``image`` (an image,
        embedded with the image encoder, or a precomputed embedding)."""
        if k < 1:
            raise ConfigError(f"k must be at least 1; got {k}")
        if isinstance(image, ImageRef):
            if self.image_encoder is None:
                raise ConfigError("finding similar cases by image needs an image encoder; "
                                  "this memory has none (pass image_encoder=)")
            vector = self.image_encoder.embed_images([image])[0]
        else:
            vector = [float(x) for x in image]
        col = self._collection(CASES)
        where = _where(study_id=("$ne", exclude_study_id) if exclude_study_id else None,
                       patient=("$ne", patient_key(exclude_patient_id))
                       if exclude_patient_id else None)
        res = self._call("searching the case library", lambda: col.query(
            query_embeddings=[vector], n_results=k, where=where,
            include=["metadatas", "distances"]))
        return [SimilarCase(study_id=str(m["study_id"]), run_id=m.get("run_id"),
                            findings=m.get("findings"), impression=m.get("impression"),
                            image_sha256=m.get("image_sha256"), score=_score(d))
                for m, d in zip(res["metadatas"][0], res["distances"][0], strict=True)]

    # --- a completed run -------------------------------------------------------------------

    def record_report(self, run_id: str, study: Study, report: Report) -> None:
        """After a completed run (the graph's ``finalize`` calls it): every stage's answers
        (only changed ones re-embedded), patient history and the case library."""
        for result in report.stages:
            if result.answers:
                self.record_stage(run_id, study, result)
        self.add_study(study, report, run_id=run_id)
        self.add_case(study, report, run_id=run_id)

    # --- erasure -------------------------------------------------------------------------------

    def _ids(self, kind: str, where: Where) -> list[str]:
        col = self._collection(kind)

        def find() -> list[str]:
            return list(col.get(where=where, include=[])["ids"])

        return self._call(f"finding items in {kind}", find)

    def _delete(self, where: Where) -> int:
        total = 0
        for kind in (STAGE, PATIENT, CASES):
            ids = self._ids(kind, where)
            if ids:
                col = self._collection(kind)

                def delete(c: Any = col, i: list[str] = ids) -> None:
                    c.delete(ids=i)

                self._call(f"deleting from {kind}", delete)
                total += len(ids)
        return total

    def _delete_tokens(self, where: Where) -> None:
        """Delete runs' tokens (readers elsewhere then read those runs again) and this
        object's run index."""
        self._drop_index()
        col = self._collection(TOKENS)
        self._call("deleting run tokens", lambda: col.delete(where=where))
        self._drop_index()

    def forget_run(self, run_id: str) -> int:
        """Delete everything a run wrote (its answers; its study in patient history and the
        case library). Returns the number of items deleted."""
        n = self._delete({"run_id": run_id})
        self._delete_tokens({"run_id": run_id})
        log.info("memory: forgot run %s (%d items)", run_id, n)
        return n

    def forget_patient(self, patient_id: str) -> int:
        """Delete everything stored for a patient (an erasure request). Returns the number
        of items deleted."""
        key = patient_key(patient_id)
        if key is None:
            raise DataError("forgetting a patient needs a patient id; got none")
        runs: set[str] = set()
        for kind in (STAGE, PATIENT, CASES):
            col = self._collection(kind)

            def metas(c: Any = col) -> list[Mapping[str, Any]]:
                return list(c.get(where={"patient": key}, include=["metadatas"])["metadatas"])

            found = self._call(f"finding the patient's runs in {kind}", metas)
            runs.update(str(m["run_id"]) for m in found if m.get("run_id"))
        n = self._delete({"patient": key})
        if runs:  # items of the patient's runs written without the key (by the retriever)
            n += self._delete({"run_id": {"$in": sorted(runs)}})
            self._delete_tokens({"run_id": {"$in": sorted(runs)}})
        else:
            self._drop_index()
        log.info("memory: forgot a patient (%d items)", n)
        return n
