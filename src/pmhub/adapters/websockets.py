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

import asyncio
import collections
import contextlib
import http
import logging
import signal
import threading
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio

try:
    from websockets.asyncio.server import ServerConnection
    from websockets.asyncio.server import serve as websockets_serve
    from websockets.datastructures import Headers
    from websockets.exceptions import ConnectionClosed
    from websockets.frames import DATA_OPCODES, CloseCode, Frame, Opcode
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
from ..connection import Connection
from ..errors import BackendError, Rejected, error_body
from ..frames import Outgoing, encode
from ..hub import Hub
from ..protocol import CLOSE_INTERNAL_ERROR, CLOSE_NORMAL

__all__ = ["PmhubServer"]

logger = logging.getLogger("pmhub")


#: Frames taken from a connection's queue per write (a sync page is 500).
FLUSH_FRAMES = 256


class _Transport:
    """A ``websockets`` connection as a :class:`~pmhub.runner.Transport`.

    On pmhub's own connection class (``PmhubServer.listen``) it writes what
    the hub queues from the event loop, in the turn after the push: a
    fan-out to many connections wakes no task, and several frames queued in
    one turn go out in one write. A socket whose peer stops reading is left
    alone until its buffer drains (the hub's queue budget then closes it
    with 1013). In a server of your own without that class, a task sends.
    """

    __slots__ = ("_closer", "_connection", "_scheduled", "_ws")

    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws
        self._connection: Connection | None = None
        self._scheduled = False
        self._closer: asyncio.Task[None] | None = None

    def attach(self, connection: Connection) -> bool:
        ws = self._ws
        if not isinstance(ws, _Connection):
            return False
        self._connection = connection
        ws.on_writable = self._wake
        connection.on_ready(self._wake)
        return True

    def _wake(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._ws.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        connection = self._connection
        if connection is None:
            return
        try:
            if connection.closing:
                self._start_close(connection.close_code or CLOSE_NORMAL, connection.close_reason)
                return
            if self._ws.paused:  # resume_writing() wakes this again
                return
            frames = connection.take_frames(FLUSH_FRAMES)
            # Not written only if the socket is closing: the reader sees the end.
            _write_now(self._ws, frames)
            if len(frames) == FLUSH_FRAMES:  # perhaps more
                self._wake()
        except Exception:  # a bug must not reach the event loop, nor stop other sockets
            logger.exception("writing to %r failed", connection)
            connection.close(CLOSE_INTERNAL_ERROR, "internal error")

    async def receive(self) -> tuple[str | bytes, bool] | None:
        ws = self._ws
        if isinstance(ws, _Connection):
            return await ws.next_message()
        try:
            data = await ws.recv()
        except ConnectionClosed:
            return None
        return data, isinstance(data, bytes)

    async def send(self, frames: Sequence[Outgoing]) -> None:
        if _write_now(self._ws, frames):
            return
        try:  # closing, or the socket's buffer is full: the library waits, or raises
            async with self._ws.send_context():
                for frame in frames:
                    self._ws.protocol.send_text(frame.data)
        except ConnectionClosed as exc:
            raise OSError("the WebSocket is closed") from exc

    async def close(self, code: int, reason: str) -> None:
        await asyncio.shield(self._start_close(code, reason))

    def _start_close(self, code: int, reason: str) -> asyncio.Task[None]:
        """The closing handshake, started once (``close()`` waits for it)."""
        if self._closer is None:
            self._closer = self._ws.loop.create_task(_close(self._ws, code, reason))
        return self._closer


async def _close(ws: ServerConnection, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):  # the peer is gone: closed all the same
        await ws.close(code, reason)


def _write_now(ws: ServerConnection, frames: Sequence[Outgoing]) -> bool:
    """Write ``frames`` in one system call if the socket is open and its buffer
    is not full; False (nothing written) if not."""
    protocol = ws.protocol
    if protocol.state is not OPEN or ws.paused or ws.transport.is_closing():
        return False
    if protocol.extensions:  # compression in a server of your own: the library frames
        for frame in frames:
            protocol.send_text(frame.data)
        ws.send_data()
        return True
    # Framed here (the library's framing costs more than the write). The
    # protocol has nothing of its own queued (it writes what it makes at
    # once), so nothing is overtaken.
    chunks = protocol.data_to_send()
    for frame in frames:
        data = frame.data
        chunks.append(_text_header(len(data)))
        chunks.append(data)
    ws.transport.write(b"".join(chunks))
    return True


_SHORT_HEADERS = [bytes((0x81, length)) for length in range(126)]


def _text_header(length: int) -> bytes:
    """The header of a final, unmasked text frame of ``length`` bytes (a
    server's frame, RFC 6455 section 5.2)."""
    if length < 126:
        return _SHORT_HEADERS[length]
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big")
    return b"\x81\x7f" + length.to_bytes(8, "big")


#: Whole messages a connection buffers before it stops reading the socket
#: (websockets' own default), and the count under which it reads again.
INBOX_HIGH, INBOX_LOW = 16, 4
#: Fragments of one message beyond which the connection is closed (1009):
#: the size limit holds across fragments, but each one costs an object.
MAX_FRAGMENTS = 64


class _Connection(ServerConnection):
    """Writes what the protocol has to send in one system call, not one per
    frame, and tells pmhub when a full socket buffer has drained.

    It also keeps the messages it receives itself, as ``bytes`` (text frames
    stay UTF-8: the library has checked it, the hub decodes bytes), instead of
    through the library's assembler: waiting for the next one then holds one
    future, not a chain of coroutines renewed for every message. Those chains,
    a thousand connections of them, outlived garbage collections and made
    the full collections (tens of milliseconds) frequent.
    """

    on_writable: Callable[[], None] | None = None
    _inbox: collections.deque[tuple[bytes, bool]] | None = None
    _fragments: list[Frame] | None = None
    _waiter: asyncio.Future[None] | None = None
    _ended = False

    def process_event(self, event: Any) -> None:
        if self.request is None or not isinstance(event, Frame) or event.opcode not in DATA_OPCODES:
            super().process_event(event)  # the handshake, pings, pongs, the close
        elif self.protocol.state is not OPEN:  # failed on an earlier frame of the same read
            pass
        elif event.opcode is not Opcode.CONT:
            if event.fin:
                self._deliver(bytes(event.data), event.opcode is Opcode.BINARY)
            else:
                self._fragments = [event]
        else:  # the library checked the sequence of fragments
            fragments = self._fragments
            assert fragments is not None
            fragments.append(event)
            if event.fin:
                self._fragments = None
                data = b"".join(frame.data for frame in fragments)
                self._deliver(data, fragments[0].opcode is Opcode.BINARY)
            elif len(fragments) > MAX_FRAGMENTS:
                self._fragments = None
                self._fail(CloseCode.MESSAGE_TOO_BIG, "too many fragments")

    def _fail(self, code: CloseCode, reason: str) -> None:
        self.protocol.fail(code, reason)
        self.send_data()

    def _deliver(self, data: bytes, binary: bool) -> None:
        if not binary and not data.isascii():  # ASCII is UTF-8: no copy to check it
            try:
                data.decode()  # RFC 6455: invalid UTF-8 in a text message fails the connection
            except UnicodeDecodeError as exc:
                self._fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                return
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = collections.deque()
        inbox.append((data, binary))
        if len(inbox) == INBOX_HIGH:
            self.transport.pause_reading()
        self._wake_reader()

    def _wake_reader(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_message(self) -> tuple[bytes, bool] | None:
        """The next message (text as UTF-8) and whether it is binary, or None
        once the peer has closed or gone."""
        while not self._inbox:
            if self._ended:
                return None
            self._waiter = self.loop.create_future()
            await self._waiter
            self._waiter = None
        message = self._inbox.popleft()
        if len(self._inbox) == INBOX_LOW and not self._ended:
            self.transport.resume_reading()
        return message

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.on_writable is not None:
            self.on_writable()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.on_writable = None
        self._ended = True
        self._wake_reader()

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
