"""The ASGI adapter: ``/ws`` and the HTTP API of the wire protocol, in pure ASGI.

:class:`PmhubApp` runs on any ASGI server (uvicorn, hypercorn, daphne…) and
mounts under a prefix in Starlette or FastAPI. It only moves frames between
the server and the :class:`~pmhub.hub.Hub`; every decision is the hub's.

ASGI has no ping frames, so the WebSocket heartbeat is the server's: run it
with pings on (uvicorn: ``ws_ping_interval=20, ws_ping_timeout=20``, as
:func:`pmhub.adapters.asgi.serve` does). pmhub enforces its own frame-size
limit (close 1009) whatever the server's is.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Mapping,
    MutableMapping,
    Sequence,
)
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import anyio
import msgspec

from .. import runner
from ..api import HistoryPage, PostMessage, PostRead, ReadResult, Unhealthy
from ..auth import Authenticator, Identity, Request, origin_allowed
from ..connection import Connection
from ..errors import BackendError, ErrorCode, Rejected, error_body
from ..frames import MAX_SAFE_INT, Outgoing, decode_body, encode
from ..hub import Hub
from ..protocol import CLOSE_POLICY_VIOLATION

__all__ = [
    "ASGIApp",
    "PmhubApp",
    "Receive",
    "Scope",
    "Send",
    "read_json",
    "request_from",
    "respond_bytes",
    "respond_error",
    "respond_json",
    "route_path",
    "serve",
]

logger = logging.getLogger("pmhub")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

S = TypeVar("S", bound=msgspec.Struct)
#: On every response: a browser never guesses another type than the one sent.
NOSNIFF = (b"x-content-type-options", b"nosniff")
JSON = [(b"content-type", b"application/json"), NOSNIFF]


class _Transport:
    """An accepted ASGI WebSocket as a :class:`~pmhub.runner.Transport`."""

    __slots__ = ("_receive", "_send")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive, self._send = receive, send

    def attach(self, connection: Connection) -> bool:
        return False  # ASGI's send() must be awaited: run() sends from a task

    async def receive(self) -> tuple[str | bytes, bool] | None:
        message = await self._receive()
        if message["type"] == "websocket.disconnect":
            return None
        text: str | None = message.get("text")
        return (text, False) if text is not None else (message.get("bytes") or b"", True)

    async def send(self, frames: Sequence[Outgoing]) -> None:
        for frame in frames:  # ASGI has no way to send several at once
            await self._send({"type": "websocket.send", "text": frame.text})

    async def close(self, code: int, reason: str) -> None:
        await self._send({"type": "websocket.close", "code": code, "reason": reason})


class PmhubApp:
    """An ASGI application serving a hub.

    * ``websocket_path`` (default ``/ws``) upgrades to the chat protocol.
    * ``/api/...``, ``/healthz`` and ``/metrics`` serve the HTTP API.
    * ``/client.js`` serves the browser client (an ES module);
      ``/asyncapi.json`` and ``/openapi.json`` describe the protocol.
    * ``allowed_origins`` lists extra browser origins allowed besides the
      request's own host (``"https://app.example.com"`` or ``"app.example.com"``).

    Run standalone, it starts the hub on the server's lifespan; mounted in
    another app, pass :meth:`lifespan` to that app (see docs/embedding.md).
    """

    def __init__(
        self,
        hub: Hub,
        authenticator: Authenticator,
        *,
        websocket_path: str = "/ws",
        allowed_origins: Collection[str] = (),
        max_body_size: int = 64 * 1024,
    ) -> None:
        if not websocket_path.startswith("/"):
            raise ValueError(f"websocket_path must start with '/', got {websocket_path!r}")
        self.hub = hub
        self.authenticator = authenticator
        self.websocket_path = websocket_path
        self.allowed_origins = frozenset(allowed_origins)
        self.max_body_size = max_body_size

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Run the hub for the life of an application (a Starlette ``lifespan``)."""
        async with self.hub:
            yield

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        path = route_path(scope)
        if kind == "websocket" and path == self.websocket_path:
            await self._websocket(scope, receive, send)
        elif kind == "http" and path in _STATIC:
            await self._static(scope, send, path)
        elif kind == "http" and (path.startswith("/api/") or path in ("/healthz", "/metrics")):
            await self._http(scope, receive, send, path)
        elif kind == "websocket":
            await _refuse(scope, send, 404, "not_found", f"no WebSocket endpoint at {path}")
        else:
            await respond_json(send, 404, error_body("not_found", f"no route for {path}"))

    def guard(self, scope: Scope) -> Request:
        """The request of an HTTP scope, refused if it may be forged by another site.

        A request that changes state (any method but GET and HEAD) is refused
        with 403 ``forbidden`` when it comes from a page of a foreign Origin,
        and with 415 ``unsupported_media_type`` when it carries a body that is
        not ``application/json`` (an HTML form can send no such body). Route
        your own state-changing endpoints (a login!) through it too.
        """
        request = request_from(scope)
        if scope["method"] in ("GET", "HEAD"):
            return request
        headers = request.headers
        if not origin_allowed(headers.get("origin"), headers.get("host"), self.allowed_origins):
            raise Rejected("forbidden", "this Origin may not make this request")
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        has_body = headers.get("content-length", "0").strip() != "0" or (
            "transfer-encoding" in headers
        )
        if (media_type or has_body) and media_type != "application/json":
            raise Rejected(
                "unsupported_media_type",
                "send the body as JSON, with Content-Type: application/json",
            )
        return request

    # -- lifespan --------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        started = False
        try:
            async with self.lifespan():
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
        except BaseException as exc:
            failed = "lifespan.shutdown.failed" if started else "lifespan.startup.failed"
            with anyio.CancelScope(shield=True):
                await send({"type": failed, "message": repr(exc)})
            raise
        await send({"type": "lifespan.shutdown.complete"})

    # -- WebSocket ---------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        # The request (its headers) is not kept for the life of the connection.
        try:
            identity = await runner.admit(
                self.hub, self.authenticator, request_from(scope), self.allowed_origins
            )
        except Rejected as exc:
            await _refuse(scope, send, exc.status, exc.code, exc.message)
            return
        await send({"type": "websocket.accept"})
        await runner.run(self.hub, identity, _Transport(receive, send))

    # -- HTTP -------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        method = scope["method"]
        parts = path.strip("/").split("/")
        try:
            if path == "/healthz":
                _allow(method, "GET")
                await self._healthz(send)
                return
            if path == "/metrics":
                _allow(method, "GET")
                await self._metrics(send)
                return
            if not self.hub.running:
                raise BackendError("the hub is not running")
            request = self.guard(scope)
            match parts:
                case ["api", "messages"]:
                    _allow(method, "POST")
                    identity = await self.authenticator.authenticate(request)
                    body = await read_json(receive, PostMessage, self.max_body_size)
                    await self._known(body.recipient_id)
                    message, created = await self.hub.send_message(
                        identity.user_id, body.recipient_id, body.content, body.client_id
                    )
                    await respond_json(send, 201 if created else 200, encode(message))
                case ["api", "messages", peer]:
                    _allow(method, "GET")
                    await self._history(send, request, _user_id(peer))
                case ["api", "messages", peer, "read"]:
                    _allow(method, "POST")
                    identity = await self.authenticator.authenticate(request)
                    peer_id = _user_id(peer)
                    read = await read_json(receive, PostRead, self.max_body_size)
                    await self._known(peer_id)
                    updated = await self.hub.mark_read(identity.user_id, peer_id, read.up_to_id)
                    await respond_json(send, 200, encode(ReadResult(updated)))
                case ["api", "conversations"]:
                    _allow(method, "GET")
                    identity = await self.authenticator.authenticate(request)
                    rows = await self.hub.conversations(identity.user_id)
                    await respond_json(send, 200, encode(rows))
                case _:
                    raise Rejected("not_found", f"no route for {path}")
        except BackendError as exc:
            # The store is down or the hub stopped: nothing was confirmed; try again later.
            logger.error("HTTP %s %s failed: %s", method, path, exc)
            self.hub.metrics.error("unavailable")
            unavailable = error_body("unavailable", "the service is unavailable: try again later")
            await respond_json(send, 503, unavailable)
        except Rejected as exc:
            self.hub.metrics.error(exc.code)
            await respond_error(send, exc)

    async def _known(self, user_id: int) -> None:
        if not await self.hub.policy.exists(user_id):
            raise Rejected("not_found", f"there is no user {user_id}")

    async def _history(self, send: Send, request: Request, peer_id: int) -> None:
        identity: Identity = await self.authenticator.authenticate(request)
        query = request.query
        before_id = _int_param(query, "before_id")
        limit = _int_param(query, "limit")
        await self._known(peer_id)
        messages, has_more = await self.hub.history(
            identity.user_id, peer_id, before_id=before_id, limit=50 if limit is None else limit
        )
        await respond_json(send, 200, encode(HistoryPage(messages, has_more)))

    async def _static(self, scope: Scope, send: Send, path: str) -> None:
        """The browser client (an ES module) and the protocol's AsyncAPI and OpenAPI documents."""
        try:
            _allow(scope["method"], "GET")
        except Rejected as exc:
            await respond_error(send, exc)
            return
        content_type, body = _static(path)
        await respond_bytes(
            send,
            content_type,
            body,
            [(b"cache-control", b"no-cache")],
            head=scope["method"] == "HEAD",
        )

    async def _healthz(self, send: Send) -> None:
        try:
            details = await self.hub.health()
        except BackendError as exc:
            await respond_json(send, 503, encode(Unhealthy(str(exc))))
            return
        await respond_json(send, 200, encode(details))

    async def _metrics(self, send: Send) -> None:
        render = getattr(self.hub.metrics, "render", None)
        if render is None:
            raise Rejected(
                "not_found", "metrics are off: give the Hub PrometheusMetrics()", status=404
            )
        body, content_type = render()
        await respond_bytes(send, content_type.encode(), body)


# -- helpers -----------------------------------------------------------------------------


_STATIC = ("/client.js", "/asyncapi.json", "/openapi.json")


@functools.cache
def _static(path: str) -> tuple[bytes, bytes]:
    if path == "/client.js":
        body = (resources.files("pmhub.web") / "client.js").read_bytes()
        return b"text/javascript; charset=utf-8", body
    from .. import schemas  # only when asked: most servers never are

    document = schemas.asyncapi() if path == "/asyncapi.json" else schemas.openapi()
    return b"application/json", schemas.render(document).encode()


def route_path(scope: Scope) -> str:
    """The path below the mount point (``root_path``), as Starlette routes it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


def request_from(scope: Scope) -> Request:
    """The transport-neutral :class:`~pmhub.auth.Request` of an HTTP or WebSocket scope."""
    headers = {
        name.decode("latin-1").lower(): value.decode("latin-1")
        for name, value in scope.get("headers", ())
    }
    client = scope.get("client")
    return Request(route_path(scope), headers, tuple(client) if client else None, _query(scope))


def _query(scope: Scope) -> dict[str, str]:
    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
    return {name: value for name, value in reversed(pairs)}  # the first value wins


def _int_param(query: Mapping[str, str], name: str) -> int | None:
    if name not in query:
        return None
    value = _integer(query[name])
    if value is None:
        raise Rejected("invalid_frame", f"query parameter {name} must be an integer")
    return _in_range(value, f"query parameter {name}")


def _user_id(text: str) -> int:
    value = _integer(text)
    if value is None:
        raise Rejected("not_found", f"{text[:40]!r} is not a user id")
    return _in_range(value, "a user id")


def _integer(text: str) -> int | None:
    # ASCII digits only: int() also takes "1_000", " 7" and other scripts' digits.
    if not _DECIMAL.fullmatch(text):
        return None
    if len(text.lstrip("-0")) > 16:  # beyond ±2^53 (and int() refuses 4,300 digits)
        return -MAX_SAFE_INT - 1
    return int(text)


def _in_range(value: int, what: str) -> int:
    if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        raise Rejected("invalid_frame", f"{what} must be an integer within ±2^53")
    return value


_DECIMAL = re.compile(r"-?[0-9]+")


def _allow(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise Rejected("method_not_allowed", f"use {allowed}", status=405)


async def respond_error(send: Send, exc: Rejected) -> None:
    """Answer with ``exc`` as ``{"error": {"code", "message"}}`` and its status.

    ``rate_limited`` gets a ``Retry-After`` header (whole seconds, rounded up);
    405 an ``Allow`` header naming the method (the message ends with it).
    """
    headers = []
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(math.ceil(exc.retry_after)).encode()))
    if exc.status == 405:
        headers.append((b"allow", exc.message.rsplit(" ", 1)[-1].encode()))
    await respond_json(send, exc.status, error_body(exc.code, exc.message), headers)


async def respond_bytes(
    send: Send,
    content_type: bytes,
    body: bytes,
    headers: Collection[tuple[bytes, bytes]] = (),
    *,
    head: bool = False,
) -> None:
    """Send a complete 200 answer of ``content_type`` (``nosniff``, a length, and
    ``headers``); for a HEAD request (``head``) without the body."""
    start = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        NOSNIFF,
        *headers,
    ]
    await send({"type": "http.response.start", "status": 200, "headers": start})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def respond_json(
    send: Send, status: int, body: bytes, headers: Collection[tuple[bytes, bytes]] = ()
) -> None:
    """Send a complete JSON response (``body`` is already encoded), with ``headers``
    besides its content type and length."""
    headers = [*JSON, *headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_json(receive: Receive, schema: type[S], limit: int) -> S:
    """Read a request body of at most ``limit`` bytes and decode it into ``schema``.

    Raises ``Rejected``: ``too_large`` (413) over the limit, ``invalid_frame``
    (400) for anything that does not match the schema.
    """
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Rejected("invalid_frame", "the client went away mid-request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Rejected("too_large", f"the body is over {limit} bytes", status=413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        return decode_body(b"".join(chunks), schema)
    except Rejected as exc:
        raise Rejected("invalid_frame", f"invalid JSON body: {exc.message}") from None


async def _refuse(scope: Scope, send: Send, status: int, code: ErrorCode, message: str) -> None:
    """Refuse a handshake: an HTTP answer where the server can send one, else close."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": JSON})
        await send({"type": "websocket.http.response.body", "body": error_body(code, message)})
    else:
        await send({"type": "websocket.close", "code": CLOSE_POLICY_VIOLATION, "reason": message})


async def serve(app: ASGIApp, hub: Hub, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``app`` (which runs ``hub``) with uvicorn, configured as pmhub expects.

    HTTP is parsed by h11, with ``hub.limits`` on requests (10 s to send one,
    16 KiB and 100 headers: 408 or 431 beyond); WebSockets by ``websockets``,
    with pings following ``hub.limits``. On shutdown every connection is closed
    with 1001 before the server stops, and after Ctrl+C or SIGTERM this returns
    normally. Needs ``pip install 'pmhub[examples]'``.
    """
    try:
        import uvicorn

        from ._uvicorn import MAX_HEADER_LINE, protocols
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("serve() needs uvicorn: pip install 'pmhub[examples]'") from None

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            await hub.close_all()
            await super().shutdown(sockets=sockets)
            # uvicorn re-raises a Ctrl+C or SIGTERM it handled once it has shut
            # down, which ends the process with a traceback; return instead.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    limits = hub.limits
    http, ws = protocols(limits, hub.metrics)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http,
        ws=ws,
        h11_max_incomplete_event_size=limits.max_header_size + MAX_HEADER_LINE,
        ws_ping_interval=limits.ping_interval,
        ws_ping_timeout=limits.ping_timeout,
        ws_max_size=limits.max_frame_size * 4 + 1024,  # pmhub closes with 1009 first
        log_level="info",
    )
    await Server(config).serve()
