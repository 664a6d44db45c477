"""A :class:`Client` is one connected device of a user, as the hub sees it.

Its outbound queue is bounded and never blocks the hub: :meth:`Client.push`
either queues a frame or, when the queue is full, closes the connection with
1013 so the device reconnects and resumes with ``sync``. One slow or dead
device never stalls anyone else.
"""

from __future__ import annotations

import itertools
import os
from collections import deque

import anyio

from .auth import Identity
from .frames import Outgoing
from .limits import Limits
from .protocol import CLOSE_TRY_AGAIN_LATER, ConnectionProtocol

__all__ = ["Client"]

_ids = itertools.count(1)
_node = os.urandom(4).hex()


class Client:
    """One connection: its identity, protocol state and outbound queue."""

    def __init__(self, identity: Identity, limits: Limits) -> None:
        self.identity = identity
        self.user_id = identity.user_id
        #: Unique across nodes, so an event can name the connection it skips.
        self.id = f"{_node}-{next(_ids)}"
        self.protocol = ConnectionProtocol(limits)
        self.close_code: int | None = None
        self.close_reason = ""
        self._max_queue = limits.max_queue
        self._queue: deque[Outgoing] = deque()
        self._wakeup = anyio.Event()
        self._last_live_id = 0

    @property
    def closing(self) -> bool:
        """True once the hub decided to close this connection."""
        return self.close_code is not None

    def push(self, frame: Outgoing, *, replay: bool = False) -> bool:
        """Queue ``frame``; return False if it was dropped or the client is closing.

        Live ``private_message`` frames keep id order: one with an id not above
        the last live one is a repeat and is dropped. ``replay`` frames (a
        ``sync`` page, an idempotent resend) are exempt.
        """
        if self.close_code is not None:
            return False
        if frame.message_id is not None and not replay:
            if frame.message_id <= self._last_live_id:
                return False
            self._last_live_id = frame.message_id
        if len(self._queue) >= self._max_queue:
            self.close(CLOSE_TRY_AGAIN_LATER, "too slow: reconnect and sync")
            return False
        self._queue.append(frame)
        self._wakeup.set()
        return True

    def close(self, code: int, reason: str = "") -> None:
        """Ask the transport to close with ``code``; later pushes are dropped."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self._queue.clear()
            self._wakeup.set()

    async def next_frame(self) -> Outgoing | None:
        """Wait for the next frame to send; None once the connection must close."""
        while not self._queue:
            if self.close_code is not None:
                return None
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
        if self.close_code is not None:
            return None
        return self._queue.popleft()

    def __repr__(self) -> str:
        return f"<Client {self.id} user={self.user_id}>"
