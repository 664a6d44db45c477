"""A :class:`Connection` is one connected device of a user, as the hub sees it.

Its outbound queue is bounded by frames and by bytes and never blocks the
hub: :meth:`Connection.push` either queues a frame or, when the queue is full,
closes the connection with 1013 so the device reconnects and resumes with
``sync``. One slow or dead device never stalls anyone else.

Replies a client asks for in bulk (``sync`` pages, resends) wait for room
instead (:meth:`Connection.wait_for_room`): that holds back the asking
connection's own reads and leaves the other half of the queue to live frames.

A transport takes frames in one of two ways: a task awaits
:meth:`Connection.next_frames` (ASGI, whose ``send`` must be awaited), or the
transport registers :meth:`Connection.on_ready` and takes them with
:meth:`Connection.take_frames` when told (a socket it can write without
waiting). The second keeps no task asleep per connection: every object such a
wait allocates outlives several garbage collections, and with a thousand
connections those collections were the latency tail.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

import anyio

from .auth import Identity
from .frames import Outgoing
from .limits import Limits
from .protocol import CLOSE_TRY_AGAIN_LATER, ConnectionProtocol

__all__ = ["Connection"]

_ids = itertools.count(1)
_node = os.urandom(4).hex()

#: How many recent live message ids a connection remembers to drop repeats.
DEDUP_WINDOW = 128


class _RecentIds:
    """The last :data:`DEDUP_WINDOW` ids seen: exact de-duplication in a
    bounded window, whatever order the ids arrive in."""

    __slots__ = ("_order", "_seen")

    def __init__(self) -> None:
        self._order: deque[int] = deque()
        self._seen: set[int] = set()

    def add(self, message_id: int) -> bool:
        """Remember ``message_id``; False if it was already seen."""
        if message_id in self._seen:
            return False
        if len(self._order) == DEDUP_WINDOW:
            self._seen.discard(self._order.popleft())
        self._order.append(message_id)
        self._seen.add(message_id)
        return True


class _Event(Protocol):
    def set(self) -> None: ...
    async def wait(self) -> None: ...


class _FutureEvent:
    """An event for one waiter on asyncio, in one Future: 0.2 KiB where an
    ``asyncio.Event`` (under ``anyio.Event``) takes 1.1 KiB, and every idle
    connection holds one while its writer waits."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    async def wait(self) -> None:
        await self._future


def _event_factory() -> Callable[[], _Event]:
    """:class:`_FutureEvent` on asyncio, else the running backend's ``anyio.Event``
    (looked up once, not on every wait)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return type(anyio.Event())
    return _FutureEvent


class Connection:
    """One connection: its identity, protocol state and outbound queue."""

    __slots__ = (
        "_event",
        "_max_bytes",
        "_max_queue",
        "_on_ready",
        "_queue",
        "_queued_bytes",
        "_recent",
        "_room",
        "_wakeup",
        "close_code",
        "close_reason",
        "id",
        "identity",
        "protocol",
        "user_id",
    )

    def __init__(self, identity: Identity, limits: Limits) -> None:
        self.identity = identity
        self.user_id = identity.user_id
        #: Unique across nodes, so an event can name the connection it skips.
        self.id = f"{_node}-{next(_ids)}"
        self.protocol = ConnectionProtocol(limits)
        self.close_code: int | None = None
        self.close_reason = ""
        self._max_queue = limits.max_queue
        self._max_bytes = limits.max_queue_bytes
        # Made when a frame is queued, dropped when the queue empties: an idle
        # connection holds no deque (0.75 KiB each).
        self._queue: deque[Outgoing] | None = None
        self._queued_bytes = 0
        self._event = _event_factory()
        self._wakeup: _Event | None = None  # made while next_frames() waits
        self._on_ready: Callable[[], None] | None = None
        self._room: _Event | None = None  # set when a bulk reply may go on
        self._recent: _RecentIds | None = None  # made on the first live message

    @property
    def closing(self) -> bool:
        """True once the hub decided to close this connection."""
        return self.close_code is not None

    def push(self, frame: Outgoing, *, replay: bool = False) -> bool:
        """Queue ``frame``; return False if it was dropped or the client is closing.

        A live ``private_message`` frame is delivered once: a repeat of one of
        the last :data:`DEDUP_WINDOW` ids is dropped, but one that arrives
        after a higher id (from another node) is not. ``replay`` frames (a
        ``sync`` page, an idempotent resend) are exempt: a replay may repeat.
        """
        if self.close_code is not None:
            return False
        if frame.message_id is not None and not replay:
            if self._recent is None:
                self._recent = _RecentIds()
            if not self._recent.add(frame.message_id):
                return False
        size = len(frame.data)
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        if len(queue) >= self._max_queue or self._queued_bytes + size > self._max_bytes:
            self.close(CLOSE_TRY_AGAIN_LATER, "too slow: reconnect and sync")
            return False
        queue.append(frame)
        self._queued_bytes += size
        self._wake()
        return True

    def prepend(self, frames: Iterable[Outgoing]) -> bool:
        """Queue ``frames`` ahead of everything queued so far (the welcome and
        the presence snapshot go before live frames that arrived while the
        connection was being set up); False if that overflows the queue."""
        if self.close_code is not None:
            return False
        ahead = list(frames)
        for frame in ahead:
            self._queued_bytes += len(frame.data)
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        queue.extendleft(reversed(ahead))
        if len(queue) > self._max_queue or self._queued_bytes > self._max_bytes:
            self.close(CLOSE_TRY_AGAIN_LATER, "too much to send at connect: reconnect later")
            return False
        self._wake()
        return True

    def on_ready(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` (at once, from the pushing code) whenever frames are
        queued or the connection starts closing, instead of waking
        :meth:`next_frames`; now too if either is already the case. It must not
        block: a socket transport schedules its write and returns. ``None``
        detaches it."""
        self._on_ready = callback
        if callback is not None and (self._queue or self.close_code is not None):
            callback()

    def _wake(self) -> None:
        if self._on_ready is not None:
            self._on_ready()
        elif self._wakeup is not None:
            self._wakeup.set()

    def _has_room(self) -> bool:
        if not self._queue:  # one frame always fits an empty queue
            return True
        return len(self._queue) * 2 < self._max_queue and self._queued_bytes * 2 < self._max_bytes

    async def wait_for_room(self) -> bool:
        """Wait until the queue is at most half full; False if the connection closes."""
        while self.close_code is None and not self._has_room():
            self._room = self._event()
            await self._room.wait()
        return self.close_code is None

    def close(self, code: int, reason: str = "") -> None:
        """Ask the transport to close with ``code``; later pushes are dropped."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self._queue = None
            self._queued_bytes = 0
            self._wake()
            if self._room is not None:
                self._room.set()

    async def next_frame(self) -> Outgoing | None:
        """Wait for the next frame to send; None once the connection must close."""
        frames = await self.next_frames(1)
        return frames[0] if frames else None

    async def next_frames(self, limit: int = 64) -> list[Outgoing]:
        """Wait for frames to send and take up to ``limit`` of those queued, in
        order, so a transport can write them at once; ``[]`` once the
        connection must close."""
        while not self._queue:
            if self.close_code is not None:
                return []
            self._wakeup = self._event()  # unset: a push while we wait sets it
            await self._wakeup.wait()
            self._wakeup = None
        return self.take_frames(limit)

    def take_frames(self, limit: int = 64) -> list[Outgoing]:
        """Take up to ``limit`` queued frames, in order, without waiting: ``[]``
        if none are queued or the connection must close."""
        queue = self._queue
        if not queue or self.close_code is not None:
            return []
        if len(queue) <= limit:
            frames = list(queue)
            self._queue = None
            self._queued_bytes = 0
        else:
            frames = [queue.popleft() for _ in range(limit)]
            self._queued_bytes -= sum(len(frame.data) for frame in frames)
        if self._room is not None and self._has_room():
            self._room.set()
            self._room = None
        return frames

    def __repr__(self) -> str:
        return f"<Connection {self.id} user={self.user_id}>"
