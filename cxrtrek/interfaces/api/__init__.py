"""The HTTP API of the reading agent: cxrtrek as a sub-agent of another system.

::

    settings = ApiSettings(backend="demo", port=8080)       # 127.0.0.1, no token
    serve_api(settings)                                     # until SIGINT / SIGTERM

    app = create_app(agent, settings)                       # the FastAPI app of an agent

    curl -F images=@frontal.dcm -F images=@lateral.png -F prior=@old.png \\
         -F indication="Cough for 3 weeks." -F review_after=2 http://127.0.0.1:8080/v1/runs
    curl -N http://127.0.0.1:8080/v1/runs/<run_id>/events  # stage events as they complete

Endpoints (those under ``/v1`` need ``Authorization: Bearer <token>`` when a token is set):

=================================  ==========================================================
``GET /health``                    ``{"status": "ok", "model", "runs": {status: count}}``; no
                                   token; 503 ``draining`` while shutting down
``POST /v1/runs``                  multipart form: ``images`` (1+ files: the current study,
                                   first image first), ``prior`` (0+ files), ``indication``,
                                   ``stages`` (``"1,2,8"``), ``review_after`` (``"2"``) ->
                                   202 ``{"run_id", "status", "links"}``
``GET /v1/runs/{id}``              ``{"run_id", "status", "error", "report", "links"}``: the
                                   report so far (a :class:`~cxrtrek.agent.agent.RunReport`)
``GET /v1/runs/{id}/events``       server-sent events: ``stage`` (a
                                   :class:`~cxrtrek.agent.agent.StageEvent`) per stage done
                                   or gone around (``result.skipped`` says why),
                                   then ``report``, ``review`` or ``error``; then the stream
                                   ends. A late client gets the past events first (``id:`` is
                                   the event's index; ``Last-Event-ID`` skips those seen)
``GET /v1/runs/{id}/trace``        the trace records, a JSON list (``?format=jsonl``: lines)
``POST /v1/runs/{id}/review``      ``{"edits": {question_id: text}}`` (``{}``: approve) for a
                                   run awaiting review -> 202; the run goes on
``POST /v1/runs/{id}/followups``   ``{"question": "..."}`` -> 200, a
                                   :class:`~cxrtrek.agent.agent.FollowUp`
``POST /v1/runs/{id}/resume``      an incomplete or failed run (killed, server restarted,
                                   backend down) goes on from its last checkpoint -> 202
``DELETE /v1/runs/{id}``           a run that has ended: its uploads, checkpoints, trace and
                                   vector-memory items -> 200 ``{"run_id", "checkpoints",
                                   "trace", "memory_items", "uploads"}``; 409 while it is
                                   queued or running
=================================  ==========================================================

Run statuses (:mod:`.runs`): ``queued`` (waiting for one of ``max_concurrent_runs`` slots),
``running``, ``awaiting_review``, ``completed``, ``stopped`` (stage 1 judged the study
non-diagnostic under the ``stop`` policy), ``failed`` (``error`` says why), ``incomplete``
(interrupted; resumable).
Runs of an earlier process are found in the agent's checkpoints (their events are rebuilt
from the report). After a review or a resume, the run's events go on where they stopped.

*Uploads* (:mod:`.uploads`). Everything is checked in memory first: the token, the body
size (the ``Content-Length`` and the bytes as they stream; a body is never read past the
limit), the time the body takes (``body_timeout_s``: a stalled upload gets 408 and its
connection is closed), how many bodies are being received at once
(``max_concurrent_bodies``: beyond it, 503 with ``Retry-After`` at once), each
file's size, the image count, the form fields, and every image decoded with the rules of
:func:`~cxrtrek.data.intake.study_from_images` (PNG, JPEG, chest radiograph DICOM). Only then
are the files written, atomically, to ``<home>/uploads/<run_id>/``, and the study refers to
them by path, so that resume, review and follow-ups work after a restart. A refused request
leaves nothing behind: no upload folder, no checkpoint, no trace.

*Errors* are always ``{"error": {"type", "message"}}`` (``type``: the
:mod:`cxrtrek.errors` class, or an HTTP-level name), never a traceback. The statuses of
cxrtrek's errors come from the table the model server uses too
(:func:`cxrtrek.serve.http_common.status_of`):

====  =======================================================================================
400   ``InvalidRequest``: a malformed multipart or JSON body
401   ``Unauthorized``: a missing or wrong bearer token
404   ``NotFound``: an unknown run or route
408   ``RequestTimeout``: the body did not arrive within ``body_timeout_s``
409   ``Conflict``: a review of a run not awaiting one, a resume of a run that is not
      interrupted, a follow-up on a run that has not started
413   ``PayloadTooLarge`` (body or file over its limit), ``DecompressionBombError``
415   ``UnsupportedMediaType`` (not a multipart form), ``NotAnImageError``,
      ``UnsupportedTransferSyntaxError``
422   ``InvalidRequest`` (missing images, too many, an unknown field, bad stages, unknown
      review edits), ``NotARadiographError`` (e.g. a CT DICOM), ``TruncatedImageError``,
      ``EmptyFileError`` and other ``DataError``
502   ``BackendError`` (a follow-up's model call failed); 503 ``TransientError``,
      ``ServiceUnavailable`` (shutting down, too many runs queued, or too many bodies
      being received at once)
500   ``InternalError``
====  =======================================================================================

*Security.* Binds 127.0.0.1 by default; any other address needs a token
(:class:`~cxrtrek.errors.ConfigError` otherwise). Tokens are compared in constant time.
Client file names are never used as paths.

*The ``cxrtrek api`` command* builds :class:`ApiSettings` with :meth:`ApiSettings.create`
from these flags and calls :func:`serve_api`: ``--host`` (127.0.0.1), ``--port`` (8080),
``--token`` (default ``$CXRTREK_API_TOKEN``), ``--backend`` (``demo``; see
:mod:`cxrtrek.backends.registry`), ``--home`` (``$CXRTREK_HOME`` or ``./.cxrtrek``),
``--context`` (``full``, ``retrieved`` or ``none``), ``--max-image-mb`` (20),
``--max-request-mb`` (64), ``--max-images`` (8), ``--max-concurrent-runs`` (2),
``--body-timeout-s`` (120), ``--max-concurrent-bodies`` (16); ``--store`` (a
``postgresql://`` URL; default ``$CXRTREK_STORE``), ``--uploads-dir`` (``HOME/uploads``),
``--serve-only`` or ``--workers-only`` (with a store), ``--lease-s`` (15),
``--memory-server HOST:PORT`` (a ``chroma run`` server).

*Several processes* (``--store postgresql://...``): runs, their checkpoints, traces, events
and status live in PostgreSQL (:mod:`cxrtrek.agent.pgstore`); every API process answers for
every run (:mod:`.shared`), new runs, reviews and resumes are queued there, and workers
(``cxrtrek worker``, ``cxrtrek api --workers-only``, and each API process unless
``--serve-only``) take them (:mod:`cxrtrek.agent.worker`). Uploads go to ``--uploads-dir``, a
folder every process mounts. See ``docs/deployment.md``.

Modules: :mod:`.settings` (:class:`ApiSettings`), :mod:`.uploads` (the multipart form, the
study, the files), :mod:`.runs` (the run table, slots and event streams), :mod:`.shared` (the
same from a shared PostgreSQL store), :mod:`.app` (routes, error answers, :func:`api_server`,
:func:`serve_api`, :func:`serve_workers`).
"""

from __future__ import annotations

from cxrtrek.interfaces.api.app import (
    FollowUpBody,
    ReviewBody,
    api_server,
    create_app,
    serve_api,
    serve_workers,
)
from cxrtrek.interfaces.api.settings import MAX_IMAGES, ApiSettings

__all__ = ["MAX_IMAGES", "ApiSettings", "FollowUpBody", "ReviewBody", "api_server", "create_app",
           "serve_api", "serve_workers"]
