"""A Python client for the pmhub wire protocol, on anyio (asyncio or trio).

:class:`Client` holds one user's side of the contract in docs/protocol.md:

* **Every stored message once.** Messages arrive live, as answers to resends
  and through ``sync``; the client drops ids it has already seen, so the event
  stream yields each stored message exactly once and :meth:`Client.messages`
  holds a conversation ordered by id, whatever order the frames came in.
* **An outbox that survives the network.** :meth:`Client.post` queues a
  message with a ``client_id``; the client sends one at a time (so a
  ``rate_limited`` answer, retried after ``retry_after``, cannot let a later
  message overtake it) and sends it again on every new connection until the
  server's echo confirms it. Resends are idempotent on the server.
* **Reconnects that lose nothing.** A lost connection (close, reset, 20 s
  without a pong) is followed by a new one after a backoff with full jitter;
  each connection first sends ``sync`` from :attr:`Client.last_id`. Refused
  credentials (HTTP 401/403, close 1008) stop the client instead of looping.

The transport is websockets' sans-I/O :class:`~websockets.client.ClientProtocol`
driven over an anyio byte stream: this module moves bytes between the two and
keeps the rules above; it never parses WebSocket framing itself.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import os
import random
import ssl
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Final, cast

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from .errors import ErrorCode, PmhubError, Rejected, Unauthenticated
from .frames import (
    MAX_SAFE_INT,
    Error,
    MarkRead,
    Message,
    MessagesRead,
    PrivateMessage,
    SendMessage,
    SetTyping,
    Sync,
    SyncComplete,
    System,
    TypingIndicator,
    UserOnlineStatus,
    decode_server_frame,
    encode,
)

try:
    from websockets.client import ClientProtocol
    from websockets.exceptions import InvalidStatus, InvalidURI
    from websockets.frames import Frame, Opcode
    from websockets.http11 import Response
    from websockets.protocol import CONNECTING, OPEN, State
    from websockets.uri import WebSocketURI, parse_uri
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pmhub.client needs the websockets library (>= 14): pip install 'pmhub[client]'"
    ) from exc

__all__ = [
    "Client",
    "Connected",
    "Disconnected",
    "Event",
    "PendingSend",
    "Synced",
    "connect",
]

logger = logging.getLogger("pmhub.client")

#: Close codes after which reconnecting cannot help: the session is gone.
_CLOSE_REFUSED: Final = 1008
#: Typing: ``is_typing: true`` again after this share of the typing timeout
#: (2 s of 3 s), so the server's own timeout never fires while someone types.
_TYPING_REFRESH: Final = 2 / 3


# -- events the client adds to the server's frames ---------------------------------


class Connected(msgspec.Struct, frozen=True):
    """A WebSocket is open; the welcome, the presence snapshot and a ``sync`` follow."""


class Synced(msgspec.Struct, frozen=True):
    """The ``sync`` of this connection finished: nothing up to ``last_id`` is missing."""

    last_id: int


class Disconnected(msgspec.Struct, frozen=True):
    """A connection ended, or an attempt failed (``code`` is None: no WebSocket was open).

    ``reconnect_in`` is the delay before the next attempt, or None when the
    client stops (closed by you, or refused credentials).
    """

    code: int | None
    reason: str
    reconnect_in: float | None


#: What ``async for event in client`` yields: the server's frames (an ``Error``
#: only when no ``send`` or ``sync`` of the client answered it) and the client's.
Event = (
    PrivateMessage
    | TypingIndicator
    | UserOnlineStatus
    | MessagesRead
    | System
    | Error
    | Connected
    | Disconnected
    | Synced
)


class PendingSend:
    """A message in the outbox, until the server's echo confirms it or an error refuses it.

    Cancelling a wait on :meth:`confirmed` does not withdraw the message: once
    posted, it is delivered (or refused), like a chat app's send button.
    """

    __slots__ = ("_done", "_error", "_message", "answered", "client_id", "frame", "not_before")

    def __init__(self, frame: SendMessage, client_id: str) -> None:
        self.frame = frame
        self.client_id = client_id
        #: The earliest time (anyio clock) it may be sent again (after ``rate_limited``).
        self.not_before = -math.inf
        #: Set when an answer to the current attempt arrived (the outbox moves on).
        self.answered = anyio.Event()
        self._done = anyio.Event()
        self._message: Message | None = None
        self._error: BaseException | None = None

    @property
    def recipient_id(self) -> int:
        return self.frame.recipient_id

    @property
    def content(self) -> str:
        return self.frame.content

    @property
    def done(self) -> bool:
        """True once confirmed or refused."""
        return self._done.is_set()

    @property
    def message(self) -> Message | None:
        """The stored message, once confirmed."""
        return self._message

    async def confirmed(self) -> Message:
        """The stored message; raises :class:`~pmhub.errors.Rejected` if the server refused it.

        Also raises :class:`~pmhub.errors.Unauthenticated` when the client
        stopped on refused credentials, and ``anyio.ClosedResourceError`` when
        it was closed first (the message may or may not have been stored).
        """
        await self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._message is not None
        return self._message

    def _settle(self, message: Message | None, error: BaseException | None = None) -> None:
        if not self._done.is_set():
            self._message, self._error = message, error
            self._done.set()
        self.answered.set()

    def __repr__(self) -> str:
        state = "confirmed" if self._message else "refused" if self._error else "pending"
        return f"<PendingSend {self.client_id} to {self.recipient_id} {state}>"


class _Signal:
    """Wakes every task waiting on it, then re-arms (an ``anyio.Event`` cannot be cleared)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class _Typing:
    __slots__ = ("sent_at", "stop_at")

    def __init__(self, stop_at: float) -> None:
        self.sent_at: float | None = None  # when ``is_typing: true`` last went out
        self.stop_at = stop_at


class _Refused(Exception):
    """Internal: the server refused the credentials; carries what to raise to users."""

    def __init__(self, error: PmhubError, code: int | None, reason: str) -> None:
        super().__init__(reason)
        self.error, self.code, self.reason = error, code, reason


class _ErrorDetail(msgspec.Struct):
    code: str = "unavailable"
    message: str = ""


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


class _Link:
    """One open WebSocket: websockets' sans-I/O protocol and the anyio stream it runs over.

    Any task may queue a frame (:meth:`send`, no await); only the writer task
    writes to the stream, so frames never interleave on the wire.
    """

    def __init__(self, protocol: ClientProtocol, stream: anyio.abc.ByteStream) -> None:
        self.protocol = protocol
        self.stream = stream
        self.opened_at = anyio.current_time()
        self.writes: deque[bytes] = deque()
        self.writable = _Signal()
        self.scope = anyio.CancelScope()
        self.code: int | None = None
        self.reason = ""
        self.fragments: list[bytes] | None = None
        self.synced = anyio.Event()
        self.max_seen = 0  # highest message id this connection delivered
        self.delivered = False  # a private_message arrived: the connection was useful
        self.pong = anyio.Event()

    def flush(self) -> None:
        """Hand what the protocol wants to send (frames, pongs, close) to the writer."""
        data = self.protocol.data_to_send()
        if data:
            self.writes.extend(data)
            self.writable.notify()

    def send(self, frame: SendMessage | SetTyping | MarkRead | Sync) -> bool:
        """Queue ``frame``; False when the connection is no longer open."""
        if self.protocol.state is not OPEN:
            return False
        self.protocol.send_text(encode(frame))
        self.flush()
        return True

    def end(self, code: int | None, reason: str) -> None:
        """Record why the connection ends (first reason wins) and stop its tasks."""
        if self.code is None and not self.reason:
            self.code, self.reason = code, reason
        self.scope.cancel()


class Client:
    """One user's connection to a pmhub server, kept alive across network failures.

    Use it as an async context manager (``connect`` is the same class)::

        async with pmhub.client.connect("wss://chat.example.com/ws", cookie=session) as chat:
            await chat.send(2, "hello")
            async for event in chat:
                ...

    * ``url``: the WebSocket endpoint, ``ws://`` or ``wss://`` (TLS with
      ``ssl_context``, by default :func:`ssl.create_default_context`).
    * ``cookie``: the ``session`` cookie value (sent as ``Cookie: session=…``);
      ``headers``: any other handshake headers your authenticator reads.
    * ``user_id``: your own id if you know it; otherwise it is learnt from the
      first confirmed send. Only needed to tell your conversations apart.
    * ``last_id``: the highest message id you already have (persist
      :attr:`last_id` across runs); the first ``sync`` starts there.
    * ``ping_interval``/``ping_timeout``: a ping every 20 s; 20 s without a
      pong counts as a dead connection.
    * ``reconnect_delay``/``max_reconnect_delay``: the backoff, doubling from
      0.5 s to 30 s with full jitter, reset after a connection that stayed
      open ``good_after`` (10 s) or delivered a message.
    * ``max_frame_size``: the server's inbound frame limit (64 KiB); a larger
      send is refused locally, since the server would close the connection.
      ``max_message_size``: the largest frame accepted from the server (1 MiB).
    * ``typing_timeout``: the server's ``Limits.typing_timeout`` (3 s), after
      which :meth:`typing` sends ``is_typing: false`` by itself.
    * ``open_timeout``: for the TCP connect and the handshake (10 s);
      ``close_timeout``: how long a closing connection waits for the server.

    The client keeps every message it saw, for :meth:`messages`.
    """

    def __init__(
        self,
        url: str,
        *,
        cookie: str | None = None,
        headers: Mapping[str, str] | None = None,
        user_id: int | None = None,
        last_id: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        ping_interval: float = 20.0,
        ping_timeout: float = 20.0,
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 30.0,
        good_after: float = 10.0,
        open_timeout: float = 10.0,
        close_timeout: float = 5.0,
        max_frame_size: int = 64 * 1024,
        max_message_size: int = 2**20,
        typing_timeout: float = 3.0,
    ) -> None:
        try:
            self._uri: WebSocketURI = parse_uri(url)
        except InvalidURI as exc:
            raise ValueError(f"{url!r} is not a ws:// or wss:// URL: {exc}") from None
        for name, value in {
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            "reconnect_delay": reconnect_delay,
            "max_reconnect_delay": max_reconnect_delay,
            "good_after": good_after,
            "open_timeout": open_timeout,
            "close_timeout": close_timeout,
            "max_frame_size": max_frame_size,
            "max_message_size": max_message_size,
            "typing_timeout": typing_timeout,
        }.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        _check_id("last_id", last_id)
        if user_id is not None:
            _check_id("user_id", user_id)
        self._headers = _handshake_headers(cookie, headers)
        self._ssl_context = ssl_context
        self._ping_interval, self._ping_timeout = ping_interval, ping_timeout
        self._reconnect_delay, self._max_reconnect_delay = reconnect_delay, max_reconnect_delay
        self._good_after = good_after
        self._open_timeout, self._close_timeout = open_timeout, close_timeout
        self._max_frame_size, self._max_message_size = max_frame_size, max_message_size
        self._typing_timeout = typing_timeout

        self._user_id = user_id
        self._last_id = last_id
        self._seen: set[int] = set()
        self._conversations: dict[frozenset[int], list[Message]] = {}
        self._online: set[int] = set()
        self._outbox: deque[PendingSend] = deque()
        self._by_client_id: dict[str, PendingSend] = {}
        self._outbox_changed = _Signal()
        self._reads: dict[int, int] = {}
        self._typing: dict[int, _Typing] = {}
        self._typing_changed = _Signal()
        self._events: deque[Event] = deque()
        self._events_ready = _Signal()

        self._link: _Link | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._started = False
        self._closing = anyio.Event()
        self._stopped = anyio.Event()
        self._ended = False  # no more events will come
        self._fatal: PmhubError | None = None

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Client:
        if self._started:
            raise RuntimeError("a Client can be used in `async with` only once")
        self._started = True
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._run, name=f"pmhub client {self._uri.host}")
        self._task_group.start_soon(self._expire_typing, name="pmhub client typing")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Close: a clean WebSocket close when leaving normally, at once otherwise.

        Sends still in the outbox fail with ``anyio.ClosedResourceError``.
        """
        if self._task_group is None:
            raise RuntimeError("__aexit__ without __aenter__")
        self._closing.set()
        link = self._link
        if exc_type is None and link is not None and link.protocol.state is OPEN:
            link.protocol.send_close(1000, "bye")
            link.flush()
            with anyio.move_on_after(self._close_timeout):
                await self._stopped.wait()
        self._task_group.cancel_scope.cancel()
        try:
            return await self._task_group.__aexit__(exc_type, exc, tb)
        finally:
            closed = anyio.ClosedResourceError("the client was closed before this was confirmed")
            self._fail_outbox(closed)
            self._end()

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Event:
        """The next event; raises ``Unauthenticated`` once the server refused the session."""
        if not self._started:
            raise RuntimeError("use the client inside `async with` before iterating it")
        while not self._events:
            if self._ended:
                if self._fatal is not None:
                    raise self._fatal
                raise StopAsyncIteration
            await self._events_ready.wait()
        return self._events.popleft()

    # -- what users call ---------------------------------------------------------------

    def post(self, recipient_id: int, content: str, *, client_id: str | None = None) -> PendingSend:
        """Put a message in the outbox at once and return its handle (see :meth:`send`).

        For UIs: show it as pending, ``await handle.confirmed()`` elsewhere.
        Outbox order is post order, and confirmed ids follow it.
        """
        self._check_open()
        _check_id("recipient_id", recipient_id)
        client_id = uuid.uuid4().hex if client_id is None else client_id
        if not 1 <= len(client_id) <= 128:
            raise ValueError("client_id must be 1 to 128 characters")
        if client_id in self._by_client_id:
            raise ValueError(f"a message with client_id {client_id!r} is already in the outbox")
        frame = SendMessage(recipient_id, content, client_id)
        size = len(encode(frame))
        if size > self._max_frame_size:
            # The server would close the connection (1009), and the outbox would
            # send it again on every reconnect.
            raise Rejected(
                "too_long", f"the message is {size} bytes encoded; at most {self._max_frame_size}"
            )
        pending = PendingSend(frame, client_id)
        self._outbox.append(pending)
        self._by_client_id[client_id] = pending
        self._outbox_changed.notify()
        self._stop_typing(recipient_id)
        return pending

    async def send(
        self, recipient_id: int, content: str, *, client_id: str | None = None
    ) -> Message:
        """Send a message and return it as stored, once the server's echo confirms it.

        While disconnected it waits in the outbox and goes out on reconnect.
        Raises :class:`~pmhub.errors.Rejected` (``.code``: ``forbidden``,
        ``too_long``, ``invalid_frame``) when the server refuses it; a
        ``rate_limited`` answer is retried by itself.
        """
        return await self.post(recipient_id, content, client_id=client_id).confirmed()

    def typing(self, recipient_id: int) -> None:
        """Call on each keystroke: ``is_typing: true`` goes out at most every 2 s,
        ``false`` 3 s (``typing_timeout``) after the last call, or at once when
        you send to ``recipient_id``.

        Typing is ephemeral: while disconnected nothing is sent.
        """
        self._check_open()
        _check_id("recipient_id", recipient_id)
        now = anyio.current_time()
        timeout = self._typing_timeout
        state = self._typing.setdefault(recipient_id, _Typing(now + timeout))
        state.stop_at = now + timeout
        if state.sent_at is None or now - state.sent_at >= timeout * _TYPING_REFRESH:
            link = self._link
            if link is not None and link.send(SetTyping(recipient_id, True)):
                state.sent_at = now
        self._typing_changed.notify()

    async def mark_read(self, peer_id: int, up_to_id: int) -> None:
        """Mark ``peer_id``'s messages to you up to ``up_to_id`` read (idempotent).

        Sent now if connected, else on the next connection; the peer gets
        ``messages_read``. :meth:`messages` shows them read at once.
        """
        self._check_open()
        _check_id("peer_id", peer_id)
        _check_id("up_to_id", up_to_id)
        self._reads[peer_id] = max(up_to_id, self._reads.get(peer_id, up_to_id))
        self._mark_read_locally(peer_id, peer_id, up_to_id)
        link = self._link
        if link is not None and link.send(MarkRead(peer_id, self._reads[peer_id])):
            del self._reads[peer_id]
        await anyio.lowlevel.checkpoint()

    def messages(self, peer_id: int) -> list[Message]:
        """Your conversation with ``peer_id`` as far as this client saw it: by id, each once."""
        if self._user_id is not None:
            return list(self._conversations.get(frozenset((self._user_id, peer_id)), ()))
        found = [conv for key, conv in self._conversations.items() if peer_id in key]
        # Without your own id, only the peer is in exactly one conversation.
        return list(found[0]) if len(found) == 1 else []

    @property
    def last_id(self) -> int:
        """The id up to which nothing is missing: the next ``sync`` starts here. Persist it."""
        return self._last_id

    @property
    def user_id(self) -> int | None:
        """Your own id, as given or learnt from the first confirmed send."""
        return self._user_id

    @property
    def connected(self) -> bool:
        """True while a WebSocket is open."""
        link = self._link
        return link is not None and link.protocol.state is OPEN

    @property
    def online(self) -> frozenset[int]:
        """Contacts online as of the current connection (empty while disconnected)."""
        return frozenset(self._online)

    @property
    def pending(self) -> list[PendingSend]:
        """The outbox, in the order messages will be stored."""
        return list(self._outbox)

    # -- connection loop --------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        try:
            while not self._closing.is_set():
                try:
                    code, reason, good = await self._connect_once()
                except _Refused as refused:
                    logger.warning("pmhub client stopped: %s", refused.reason)
                    self._emit(Disconnected(refused.code, refused.reason, None))
                    self._fatal = refused.error
                    self._fail_outbox(refused.error)
                    self._end()
                    return
                if self._closing.is_set():
                    return
                attempt = 0 if good else attempt + 1
                ceiling = self._reconnect_delay * 2 ** min(max(attempt - 1, 0), 30)
                delay = random.uniform(0, min(self._max_reconnect_delay, ceiling))
                logger.info(
                    "pmhub client disconnected (%s %s); again in %.2f s", code, reason, delay
                )
                self._emit(Disconnected(code, reason, delay))
                with anyio.move_on_after(delay):
                    await self._closing.wait()
        finally:
            self._stopped.set()

    async def _connect_once(self) -> tuple[int | None, str, bool]:
        """One connection from TCP connect to close: (close code, reason, was it good)."""
        uri = self._uri
        try:
            with anyio.fail_after(self._open_timeout):
                if uri.secure:
                    # No TLS close_notify exchange on close: the WebSocket close
                    # handshake already ends the stream, and a dead peer never answers.
                    stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                        uri.host,
                        uri.port,
                        ssl_context=self._ssl_context or ssl.create_default_context(),
                        tls_hostname=uri.host,
                        tls_standard_compatible=False,
                    )
                else:
                    stream = await anyio.connect_tcp(uri.host, uri.port)
        except (OSError, TimeoutError, anyio.BrokenResourceError) as exc:
            return None, f"cannot connect: {_describe(exc)}", False
        try:
            protocol = ClientProtocol(uri, max_size=self._max_message_size)
            request = protocol.connect()
            for name, value in self._headers:
                request.headers[name] = value
            protocol.send_request(request)
            try:
                with anyio.fail_after(self._open_timeout):
                    early = await self._handshake(protocol, stream)
            except (OSError, TimeoutError, anyio.BrokenResourceError) as exc:
                return None, f"handshake failed: {_describe(exc)}", False
            if isinstance(early, str):
                return None, early, False
            link = _Link(protocol, stream)
            try:
                await self._serve(link, early)
            finally:
                self._link = None
                self._online.clear()
                for state in self._typing.values():
                    state.sent_at = None  # the server stopped it with the connection
        finally:
            await anyio.aclose_forcefully(stream)
        if link.code == _CLOSE_REFUSED:
            reason = link.reason or "the server closed the session (1008)"
            raise _Refused(Unauthenticated(reason, status=403), link.code, reason)
        good = link.delivered or anyio.current_time() - link.opened_at >= self._good_after
        return link.code, link.reason, good

    async def _handshake(
        self, protocol: ClientProtocol, stream: anyio.abc.ByteStream
    ) -> list[object] | str:
        """Send the upgrade and read the answer: the events that came with it, or
        why a retry may help; raises ``_Refused`` when it cannot."""
        for data in protocol.data_to_send():
            await stream.send(data)
        while protocol.state is CONNECTING and protocol.handshake_exc is None:
            try:
                data = await stream.receive()
            except anyio.EndOfStream:
                protocol.receive_eof()
            else:
                protocol.receive_data(data)
        events: list[object] = list(protocol.events_received())
        error = protocol.handshake_exc
        if error is None:
            return [event for event in events if not isinstance(event, Response)]
        if not isinstance(error, InvalidStatus):
            return f"handshake failed: {error}"
        status = error.response.status_code
        code, message = _refusal(error.response)
        if status in (401, 403):
            reason = f"HTTP {status}: {message}"
            raise _Refused(Unauthenticated(message, status=status), None, reason)
        if 400 <= status < 500 and status not in (408, 429):
            # A wrong path or a malformed request: retrying cannot fix it.
            raise _Refused(
                Rejected(_error_code(code), message, status=status),
                None,
                f"HTTP {status}: {message}",
            )
        return f"HTTP {status}: {message}"

    async def _serve(self, link: _Link, early: list[object]) -> None:
        """Run one open connection until it ends; its tasks end with it."""
        self._link = link
        self._emit(Connected())
        link.send(Sync(self._last_id))
        for peer_id, up_to_id in list(self._reads.items()):
            if link.send(MarkRead(peer_id, up_to_id)):
                del self._reads[peer_id]
        with link.scope:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._write, link)
                tasks.start_soon(self._ping, link)
                tasks.start_soon(self._pump, link)
                self._handle(link, early, tasks)
                await self._read(link, tasks)
                tasks.cancel_scope.cancel()

    async def _read(self, link: _Link, tasks: anyio.abc.TaskGroup) -> None:
        protocol = link.protocol
        while True:
            # Once a close was sent or answered, the server closes TCP next; wait
            # for that only so long.
            patience = self._close_timeout if protocol.close_expected() else math.inf
            try:
                with anyio.move_on_after(patience) as waiting:
                    data = await link.stream.receive()
            except anyio.EndOfStream:
                protocol.receive_eof()
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                link.end(1006, f"connection lost while reading: {_describe(exc)}")
                return
            else:
                if waiting.cancelled_caught:
                    protocol.receive_eof()
                else:
                    protocol.receive_data(data)
            link.flush()
            self._handle(link, protocol.events_received(), tasks)
            if protocol.state is State.CLOSED:
                link.end(protocol.close_code, protocol.close_reason or "")
                return

    async def _write(self, link: _Link) -> None:
        """The only task that writes to the stream."""
        try:
            while True:
                while link.writes:
                    data = link.writes.popleft()
                    if data:
                        await link.stream.send(data)
                    else:  # the protocol's end-of-stream marker
                        with contextlib.suppress(NotImplementedError):  # TLS < 1.3
                            await link.stream.send_eof()
                await link.writable.wait()
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            link.end(1006, f"connection lost while writing: {_describe(exc)}")

    async def _ping(self, link: _Link) -> None:
        while True:
            await anyio.sleep(self._ping_interval)
            link.pong = anyio.Event()
            if link.protocol.state is not OPEN:
                return
            link.protocol.send_ping(os.urandom(4))
            link.flush()
            with anyio.move_on_after(self._ping_timeout):
                await link.pong.wait()
            if not link.pong.is_set():
                link.end(1006, f"no pong within {self._ping_timeout:g} s")
                return

    async def _pump(self, link: _Link) -> None:
        """Send the outbox, one message at a time, after this connection's sync."""
        await link.synced.wait()
        while True:
            if not self._outbox:
                await self._outbox_changed.wait()
                continue
            head = self._outbox[0]
            wait = head.not_before - anyio.current_time()
            if wait > 0:
                with anyio.move_on_after(wait):
                    await self._outbox_changed.wait()
                continue
            head.answered = anyio.Event()
            if not link.send(head.frame):
                return
            await head.answered.wait()

    async def _sync_later(self, link: _Link, delay: float, after_id: int) -> None:
        await anyio.sleep(delay)
        link.send(Sync(after_id))

    async def _expire_typing(self) -> None:
        """Send ``is_typing: false`` for recipients not typed to within ``typing_timeout``."""
        while True:
            now = anyio.current_time()
            for recipient_id in [r for r, s in self._typing.items() if s.stop_at <= now]:
                self._stop_typing(recipient_id)
            deadline = min((s.stop_at for s in self._typing.values()), default=math.inf)
            with anyio.move_on_after(deadline - now):
                await self._typing_changed.wait()

    # -- frames in ------------------------------------------------------------------

    def _handle(self, link: _Link, events: Sequence[object], tasks: anyio.abc.TaskGroup) -> None:
        for event in events:
            if not isinstance(event, Frame):
                continue
            if event.opcode is Opcode.PONG:
                link.pong.set()
            elif event.opcode is Opcode.TEXT or (
                event.opcode is Opcode.CONT and link.fragments is not None
            ):
                parts = link.fragments if link.fragments is not None else []
                parts.append(bytes(event.data))
                link.fragments = None if event.fin else parts
                if event.fin:
                    self._on_text(link, b"".join(parts), tasks)

    def _on_text(self, link: _Link, data: bytes, tasks: anyio.abc.TaskGroup) -> None:
        try:
            frame = decode_server_frame(data)
        except msgspec.DecodeError:
            # A frame type from a newer protocol version: ignored, as v1 clients must.
            logger.debug("ignored a frame this client does not know: %.200r", data)
            return
        match frame:
            case PrivateMessage():
                self._on_message(link, frame)
            case SyncComplete(last_id=last_id, has_more=has_more):
                self._last_id = max(self._last_id, last_id)
                if has_more:
                    link.send(Sync(last_id))
                else:
                    # Everything before the sync arrived in it, everything since live.
                    self._last_id = max(self._last_id, link.max_seen)
                    link.synced.set()
                    self._emit(Synced(self._last_id))
            case Error():
                self._on_error(link, frame, tasks)
            case UserOnlineStatus(user_id=user_id, is_online=is_online):
                if is_online:
                    self._online.add(user_id)
                else:
                    self._online.discard(user_id)
                self._emit(frame)
            case MessagesRead(reader_id=reader_id, peer_id=peer_id, up_to_id=up_to_id):
                self._mark_read_locally(reader_id, peer_id, up_to_id)
                self._emit(frame)
            case _:
                self._emit(frame)

    def _on_message(self, link: _Link, frame: PrivateMessage) -> None:
        message = frame.message
        link.delivered = True
        link.max_seen = max(link.max_seen, message.id)
        if link.synced.is_set():
            self._last_id = max(self._last_id, message.id)
        pending = self._by_client_id.get(message.client_id or "")
        if pending is not None and self._user_id in (None, message.sender_id):
            self._user_id = message.sender_id
            self._settle(pending, message)
        if message.id in self._seen:
            return  # a sync replay or a resend's answer of a message already yielded
        self._seen.add(message.id)
        key = frozenset((message.sender_id, message.receiver_id))
        bisect.insort(self._conversations.setdefault(key, []), message, key=_by_id)
        self._emit(frame)

    def _on_error(self, link: _Link, frame: Error, tasks: anyio.abc.TaskGroup) -> None:
        pending = self._by_client_id.get(frame.client_id or "")
        if pending is not None:
            if frame.code == "rate_limited":
                pending.not_before = anyio.current_time() + (frame.retry_after or 1.0)
                pending.answered.set()
            else:
                self._settle(pending, None, Rejected(_error_code(frame.code), frame.message))
        elif frame.code == "rate_limited" and frame.client_id is None and not link.synced.is_set():
            # Only sends and syncs are rate limited, and every send has a client_id.
            tasks.start_soon(self._sync_later, link, frame.retry_after or 1.0, self._last_id)
        else:
            self._emit(frame)

    # -- state ---------------------------------------------------------------------------

    def _settle(
        self, pending: PendingSend, message: Message | None, error: BaseException | None = None
    ) -> None:
        self._by_client_id.pop(pending.client_id, None)
        with contextlib.suppress(ValueError):  # settled already
            self._outbox.remove(pending)
        pending._settle(message, error)
        self._outbox_changed.notify()

    def _fail_outbox(self, error: BaseException) -> None:
        for pending in list(self._outbox):
            self._settle(pending, None, error)

    def _mark_read_locally(self, reader_id: int, author_id: int, up_to_id: int) -> None:
        for key, conversation in self._conversations.items():
            if author_id not in key or (reader_id != author_id and reader_id not in key):
                continue
            end = bisect.bisect_right(conversation, up_to_id, key=_by_id)
            for index in range(end):
                message = conversation[index]
                if message.sender_id == author_id and not message.is_read:
                    conversation[index] = msgspec.structs.replace(message, is_read=True)

    def _stop_typing(self, recipient_id: int) -> None:
        state = self._typing.pop(recipient_id, None)
        link = self._link
        if state is not None and state.sent_at is not None and link is not None:
            link.send(SetTyping(recipient_id, False))

    def _emit(self, event: Event) -> None:
        if not self._ended:
            self._events.append(event)
            self._events_ready.notify()

    def _end(self) -> None:
        self._ended = True
        self._events_ready.notify()

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if not self._started:
            raise RuntimeError("use the client inside `async with` first")
        if self._closing.is_set():
            raise anyio.ClosedResourceError("the client is closed")


#: ``async with pmhub.client.connect(url, cookie=...) as chat`` (the same class).
connect = Client


def _by_id(message: Message) -> int:
    return message.id


def _check_id(name: str, value: int) -> None:
    if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        raise ValueError(f"{name} must be an integer within ±2^53, got {value!r}")


def _handshake_headers(
    cookie: str | None, headers: Mapping[str, str] | None
) -> list[tuple[str, str]]:
    pairs = list((headers or {}).items())
    if cookie is not None:
        if any(name.lower() == "cookie" for name, _ in pairs):
            raise ValueError("pass the session either as cookie= or as a Cookie header, not both")
        if not cookie or any(c in cookie for c in ";, \t\r\n"):
            raise ValueError("cookie must be the session cookie's value alone")
        pairs.append(("Cookie", f"session={cookie}"))
    for name, value in pairs:
        if any(c in name + value for c in "\r\n\0"):
            raise ValueError(f"header {name!r} contains a line break or NUL")
    return pairs


def _error_code(code: str) -> ErrorCode:
    """The server's code, passed on as it is: a newer server may send one that
    this version's ``ErrorCode`` does not list yet."""
    return cast("ErrorCode", code)


def _refusal(response: Response) -> tuple[str, str]:
    """The error code and message of a refused handshake (pmhub answers JSON)."""
    try:
        detail = msgspec.json.decode(response.body or b"", type=_ErrorBody).error
    except msgspec.DecodeError:
        reason = response.reason_phrase or "refused"
        return "unavailable", f"the server refused the WebSocket ({reason})"
    return detail.code, detail.message or "refused"


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return str(exc) or (repr(cause) if cause is not None else type(exc).__name__)
