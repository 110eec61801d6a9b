"""What the two HTTP servers share: the model server (:mod:`cxrtrek.serve.app`) and the
agent's HTTP API (:mod:`cxrtrek.interfaces.api`).

- :class:`HttpProblem`: an error answer before a server gives it its body shape (the model
  server answers OpenAI's ``{"error": {"message", "type", "code"}}``, the API
  ``{"error": {"type", "message"}}``);
- :func:`status_of`: the one table from a :class:`~cxrtrek.errors.CXRTrekError` to an HTTP
  status (below);
- :class:`BodyReader`: request bodies read within a size limit and a time limit, with a bound
  on how many are read at once;
- :func:`parse_json`, :func:`authorize`, :func:`route_problem`: a JSON body as a pydantic
  model, the bearer token, unknown routes and methods;
- :func:`settings_from`, :func:`refuse_open_bind`, :func:`uvicorn_config`: settings and
  serving.

*Statuses.* One rule for both servers: **400** when the body cannot be read as what it claims
to be (not JSON, a malformed multipart form, a client gone mid-body); **422** when it can, but
what it says cannot be used (a field the endpoint does not take, a missing image, stage 9, an
image that does not decode, a CT where a radiograph is expected: every
:class:`~cxrtrek.errors.DataError`). That is the split HTTP itself draws (RFC 9110: 422 is
content the server understands and cannot process) and the one FastAPI makes; a client can
retry a 400 after fixing its encoder, a 422 only with other data. Two kinds of DataError say
more: an upload that is not an image format cxrtrek reads is **415**, an image with more
pixels than allowed **413**. A :class:`~cxrtrek.errors.BackendError` is **502**: the server
is a gateway to the model, and the model failed, not the server (a
:class:`~cxrtrek.errors.TransientError` **503** with ``Retry-After``: worth a retry, and the
HTTP backend does). A model output that a strict caller needed parsed and could not is 502
too. Anything else, a :class:`~cxrtrek.errors.ConfigError` included, is **500**.

*Bodies.* A body larger than its limit is refused as soon as the ``Content-Length`` or the
bytes counted say so (413); a body that has not arrived within ``timeout_s`` gets 408; beyond
``max_reads`` bodies being read at once, the next request gets 503 with ``Retry-After`` without
waiting. The last two end the connection (``Connection: close``): a client that stalls does
not hold a worker, and a flood of them does not hold the server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from cxrtrek.errors import (
    BackendError,
    BackendMismatchError,
    ConfigError,
    CXRTrekError,
    DataError,
    DecompressionBombError,
    NotAnImageError,
    ParseError,
    TransientError,
    UnsupportedTransferSyntaxError,
)

if TYPE_CHECKING:
    import uvicorn

__all__ = [
    "BodyReader",
    "HttpProblem",
    "authorize",
    "bearer_problem",
    "invalid",
    "is_loopback_host",
    "parse_json",
    "refuse_open_bind",
    "route_problem",
    "settings_from",
    "status_of",
    "uvicorn_config",
]

_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}
_CLOSE = {"Connection": "close"}


class HttpProblem(Exception):
    """An error answer: HTTP status, message, a short ``snake_case`` code, extra headers.
    Each server renders it in its own body shape."""

    def __init__(self, status: int, message: str, code: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers) if headers else None


def invalid(message: str, code: str = "invalid_request") -> HttpProblem:
    """422: the request parses, but what it says cannot be used."""
    return HttpProblem(422, message, code)


# --- errors -> statuses ----------------------------------------------------------------------


STATUS_OF: tuple[tuple[type[CXRTrekError], int], ...] = (
    (BackendMismatchError, 409), (NotAnImageError, 415), (UnsupportedTransferSyntaxError, 415),
    (DecompressionBombError, 413), (DataError, 422),
    (TransientError, 503), (BackendError, 502), (ParseError, 502))
"""The first class that matches decides (subclasses before their bases); else 500."""


def status_of(exc: CXRTrekError) -> tuple[int, dict[str, str] | None]:
    """The HTTP status of a cxrtrek error (see the module docstring) and the headers that go
    with it (``Retry-After`` for 503)."""
    status = next((s for kind, s in STATUS_OF if isinstance(exc, kind)), 500)
    return status, ({"Retry-After": "1"} if status == 503 else None)


def error_code(exc: BaseException) -> str:
    """A cxrtrek error's class as a ``snake_case`` code (``NotAnImageError`` ->
    ``not_an_image_error``)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_",
                  type(exc).__name__).lower()


# --- requests --------------------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bearer_problem(authorization: str | None, token: str | None) -> tuple[str, str] | None:
    """What is wrong with an ``Authorization`` header where ``token`` is required: None when
    it carries ``Bearer <token>`` (or no token is required), else ``(code, message)`` with
    code ``missing_token`` or ``invalid_token``. The token is compared in constant time."""
    if token is None:
        return None
    if not authorization:
        return "missing_token", "missing bearer token: send 'Authorization: Bearer <token>'"
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(),
                                                                 token.encode()):
        return "invalid_token", "invalid bearer token"
    return None


def authorize(request: Request, token: str | None) -> None:
    """401 (``WWW-Authenticate: Bearer``) unless the request carries the bearer token."""
    problem = bearer_problem(request.headers.get("authorization"), token)
    if problem is not None:
        code, message = problem
        raise HttpProblem(401, message, code, {"WWW-Authenticate": "Bearer"})


def route_problem(request: Request, status: int, detail: str) -> HttpProblem:
    """The answer to a routing error of the framework: an unknown route, a method it does
    not take, or another HTTP-level status."""
    if status == 404:
        return HttpProblem(404, f"no route {request.method} {request.url.path}", "not_found")
    if status == 405:
        return HttpProblem(405, f"{request.method} is not allowed on {request.url.path}",
                           "method_not_allowed")
    return HttpProblem(status, detail, "http_error")


class BodyReader:
    """Reads request bodies within a size limit, a time limit, and a bound on how many are
    read at once (see the module docstring)."""

    def __init__(self, *, limit: int, timeout_s: float, max_reads: int | None) -> None:
        self.limit, self.timeout_s, self.max_reads = limit, timeout_s, max_reads
        self.reading = 0
        """Bodies being read now."""

    async def read(self, request: Request, limit: int | None = None) -> bytes:
        """The whole body (at most ``limit`` bytes, default the reader's)."""
        chunks: list[bytes] = []
        await self.feed(request, chunks.append, limit)
        return b"".join(chunks)

    async def feed(self, request: Request, sink: Callable[[bytes], object],
                   limit: int | None = None) -> None:
        """Hand the body's chunks to ``sink`` as they arrive (a parser that refuses early
        stops the read by raising)."""
        limit = self.limit if limit is None else limit
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HttpProblem(413, f"the request body is {int(declared)} bytes; the limit is "
                              f"{limit}", "request_too_large", _CLOSE)
        if self.max_reads is not None and self.reading >= self.max_reads:
            raise HttpProblem(503, f"{self.reading} request bodies are being received already "
                              "(the limit); retry shortly", "too_many_bodies",
                              {"Retry-After": "1", **_CLOSE})
        self.reading += 1
        try:
            await self._feed(request, sink, limit)
        finally:
            self.reading -= 1

    async def _feed(self, request: Request, sink: Callable[[bytes], object],
                    limit: int) -> None:
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        stream = request.stream()
        size = 0
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise HttpProblem(408, f"the request body did not arrive within "
                                      f"{self.timeout_s:g} s ({size} bytes came); send it "
                                      "whole, or raise the server's body timeout",
                                      "request_timeout", _CLOSE) from None
                size += len(chunk)
                if size > limit:
                    raise HttpProblem(413, f"the request body exceeds the limit of {limit} "
                                      "bytes", "request_too_large", _CLOSE)
                sink(chunk)
        except ClientDisconnect:
            raise HttpProblem(400, "the client disconnected while sending the body",
                              "client_disconnected") from None
        finally:
            await stream.aclose()


_M = TypeVar("_M", bound=BaseModel)


def parse_json(raw: bytes, model: type[_M], what: str) -> _M:
    """``raw`` as ``model`` (an empty body: the model's defaults): 400 ``invalid_json`` when
    it is not JSON, 422 ``invalid_request`` naming the first fields that do not fit."""
    try:
        return model.model_validate_json(raw if raw.strip() else b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise HttpProblem(400, f"the body is not valid JSON: {first['msg']}",
                              "invalid_json") from None
        raise invalid(f"invalid {what}: {_problems(exc, 3, 'body')}") from None


def _problems(exc: ValidationError, most: int, root: str) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or root}: {e['msg']}"
                     for e in exc.errors()[:most])


# --- settings and serving --------------------------------------------------------------------


def settings_from(cls: type[_M], what: str, values: Mapping[str, Any]) -> _M:
    """Settings of ``cls`` from keyword values (None values dropped, so a flag left out
    keeps the default); bad values: :class:`~cxrtrek.errors.ConfigError` naming them."""
    try:
        return cls.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(f"invalid {what} settings: {_problems(exc, 4, what)}") from None


def refuse_open_bind(host: str, token: str | None, what: str, env: str) -> None:
    """:class:`~cxrtrek.errors.ConfigError` for a non-loopback ``host`` without a token."""
    if not is_loopback_host(host) and not token:
        raise ConfigError(
            f"binding {host!r} exposes {what} beyond this machine; expected a bearer token "
            f"for any non-loopback address (pass --token or set {env}), or bind 127.0.0.1")


def uvicorn_config(app: Any, *, host: str, port: int, drain_timeout_s: float,
                   log_level: str = "info") -> uvicorn.Config:
    """How both servers run under uvicorn: lifespan on, no access log, uvicorn's logging
    left to ours, in-flight work given ``drain_timeout_s`` on shutdown."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, lifespan="on", log_level=log_level,
                          access_log=False, log_config=None,
                          timeout_graceful_shutdown=max(1, int(drain_timeout_s)))
