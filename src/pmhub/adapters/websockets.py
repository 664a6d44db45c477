"""The ``websockets`` adapter: the chat protocol on the ``websockets`` server library.

``pip install 'pmhub[websockets]'``. :class:`PmhubServer` serves ``/ws`` and
``/healthz`` with the library's asyncio API, with the same hub, frames,
limits, close codes, authentication and ``Origin`` check as the ASGI
adapter; it has no HTTP API (use the ASGI adapter for that). Unlike ASGI,
``websockets`` sends real pings, at ``Limits.ping_interval``.

::

    async with hub:
        await PmhubServer(hub, authenticator).serve(host="127.0.0.1", port=8000)

or, in a server of your own::

    server = PmhubServer(hub, authenticator)
    websockets.asyncio.server.serve(server.handler, process_request=server.process_request, ...)
"""

from __future__ import annotations

import contextlib
import http
import logging
import signal
import threading
import weakref
from collections.abc import Collection, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio

try:
    from websockets.asyncio.server import ServerConnection
    from websockets.asyncio.server import serve as websockets_serve
    from websockets.datastructures import Headers
    from websockets.exceptions import ConnectionClosed
    from websockets.http11 import Request as HTTPRequest
    from websockets.http11 import Response
    from websockets.protocol import OPEN
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pmhub.adapters.websockets needs websockets: pip install 'pmhub[websockets]'"
    ) from None

from .. import runner
from ..api import Unhealthy
from ..auth import Authenticator, Identity, Request
from ..errors import BackendError, Rejected, error_body
from ..frames import Outgoing, encode
from ..hub import Hub

__all__ = ["PmhubServer"]

logger = logging.getLogger("pmhub")


class _Transport:
    """A ``websockets`` connection as a :class:`~pmhub.runner.Transport`."""

    __slots__ = ("_ws",)

    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws

    async def receive(self) -> str | bytes | None:
        try:
            return await self._ws.recv()
        except ConnectionClosed:
            return None

    async def send(self, frames: Sequence[Outgoing]) -> None:
        ws = self._ws
        protocol = ws.protocol
        if (
            protocol.state is OPEN
            and not ws.paused
            and not protocol.extensions
            and not ws.transport.is_closing()
        ):
            # The common case, written here: the frames, framed in one buffer,
            # in one write (the library's send() costs more than the write).
            # The protocol has nothing of its own queued (it writes what it
            # makes at once), so nothing can be overtaken.
            chunks = protocol.data_to_send()
            for frame in frames:
                data = frame.data
                chunks.append(_text_header(len(data)))
                chunks.append(data)
            ws.transport.write(b"".join(chunks))
            return
        try:  # closing, or the socket's buffer is full: the library waits, or raises
            async with ws.send_context():
                for frame in frames:
                    protocol.send_text(frame.data)
        except ConnectionClosed as exc:
            raise OSError("the WebSocket is closed") from exc

    async def close(self, code: int, reason: str) -> None:
        await self._ws.close(code, reason)


_SHORT_HEADERS = [bytes((0x81, length)) for length in range(126)]


def _text_header(length: int) -> bytes:
    """The header of a final, unmasked text frame of ``length`` bytes (a
    server's frame, RFC 6455 section 5.2)."""
    if length < 126:
        return _SHORT_HEADERS[length]
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big")
    return b"\x81\x7f" + length.to_bytes(8, "big")


class _Connection(ServerConnection):
    """Writes what the protocol has to send in one system call, not one per frame."""

    def send_data(self) -> None:
        chunks = self.protocol.data_to_send()
        if len(chunks) > 1 and all(chunks):  # an empty chunk is end-of-stream: keep it apart
            self.transport.write(b"".join(chunks))
        else:
            for chunk in chunks:
                self._send_chunk(chunk)

    def _send_chunk(self, chunk: bytes) -> None:
        if chunk:
            self.transport.write(chunk)
        elif self.transport.can_write_eof():  # half-close, as websockets does
            with contextlib.suppress(Exception):  # uvloop may raise RuntimeError
                self.transport.write_eof()
        else:
            self.transport.close()


class PmhubServer:
    """Serves a hub over the ``websockets`` library.

    * ``websocket_path`` (default ``/ws``) opens the chat protocol;
      ``/healthz`` answers the health check; anything else is 404.
    * ``allowed_origins`` lists extra browser origins allowed besides the
      request's own host, as for the ASGI adapter.
    """

    def __init__(
        self,
        hub: Hub,
        authenticator: Authenticator,
        *,
        websocket_path: str = "/ws",
        allowed_origins: Collection[str] = (),
    ) -> None:
        if not websocket_path.startswith("/"):
            raise ValueError(f"websocket_path must start with '/', got {websocket_path!r}")
        self.hub = hub
        self.authenticator = authenticator
        self.websocket_path = websocket_path
        self.allowed_origins = frozenset(allowed_origins)
        # Who each accepted handshake authenticated, until its handler takes it.
        self._identities: weakref.WeakKeyDictionary[ServerConnection, Identity] = (
            weakref.WeakKeyDictionary()
        )

    async def process_request(self, ws: ServerConnection, request: HTTPRequest) -> Response | None:
        """Answer ``/healthz`` and refusals; None lets the handshake go on."""
        path = urlsplit(request.path).path
        if path == "/healthz":
            return await self._healthz()
        if path != self.websocket_path:
            return _json_response(404, error_body("not_found", f"no WebSocket endpoint at {path}"))
        try:
            identity = await runner.admit(
                self.hub, self.authenticator, _request(ws, request), self.allowed_origins
            )
        except Rejected as exc:
            return _json_response(exc.status, error_body(exc.code, exc.message))
        self._identities[ws] = identity
        return None

    async def handler(self, ws: ServerConnection) -> None:
        """Serve one accepted WebSocket (the ``handler`` of ``websockets``' ``serve``)."""
        identity = self._identities.pop(ws)
        await runner.run(self.hub, identity, _Transport(ws))

    def listen(
        self, host: str | None = "127.0.0.1", port: int | None = 8000, **options: Any
    ) -> Any:
        """``websockets.asyncio.server.serve`` with this server's handler and pmhub's
        settings (use ``async with``); ``options`` go to it as well (``sock=``...).

        Pings follow ``Limits``; a handshake must arrive within
        ``Limits.request_timeout``; no per-message deflate (no CPU or memory bomb
        to defuse); frames up to 4x ``Limits.max_frame_size`` reach pmhub, which
        closes with 1009 over its limit.
        """
        limits = self.hub.limits
        settings: dict[str, Any] = {
            "process_request": self.process_request,
            "compression": None,
            "open_timeout": limits.request_timeout,
            "ping_interval": limits.ping_interval,
            "ping_timeout": limits.ping_timeout,
            "max_size": limits.max_frame_size * 4 + 1024,
            "create_connection": _Connection,
        }
        return websockets_serve(self.handler, host, port, **{**settings, **options})

    async def serve(self, *, host: str = "127.0.0.1", port: int = 8000) -> None:
        """Serve on ``host:port`` until cancelled, Ctrl+C or SIGTERM.

        The hub must be running (``async with hub:``). On the way out every
        connection is closed with 1001 before the server stops.
        """
        async with self.listen(host, port) as server:
            logger.info("pmhub serving on %s", ", ".join(_addresses(server)))
            try:
                await _until_stopped()
            finally:
                with anyio.CancelScope(shield=True):
                    await self.hub.close_all()
                    server.close()
                    await server.wait_closed()

    async def _healthz(self) -> Response:
        try:
            details = await self.hub.health()
        except BackendError as exc:
            return _json_response(503, encode(Unhealthy(str(exc))))
        return _json_response(200, encode(details))


async def _until_stopped() -> None:
    """Wait for Ctrl+C or SIGTERM (in the main thread; elsewhere until cancelled)."""
    if threading.current_thread() is not threading.main_thread():
        await anyio.sleep_forever()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


def _request(ws: ServerConnection, request: HTTPRequest) -> Request:
    headers: dict[str, str] = {}
    for name, value in request.headers.raw_items():
        headers.setdefault(name.lower(), value)  # the first one wins, as for ASGI
    parts = urlsplit(request.path)
    query = {name: value for name, value in reversed(parse_qsl(parts.query))}
    client = ws.remote_address
    return Request(parts.path, headers, (client[0], client[1]) if client else None, query)


def _json_response(status: int, body: bytes) -> Response:
    headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("X-Content-Type-Options", "nosniff"),
            ("Connection", "close"),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def _addresses(server: object) -> list[str]:
    sockets = getattr(server, "sockets", ()) or ()
    return [f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in sockets]
