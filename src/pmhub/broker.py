"""The cross-node extension point: how hubs on several processes share events.

A hub publishes every fan-out as an :data:`Event` to its broker; the broker
hands every event (its own included) to every hub's ``deliver`` callback, and
each hub pushes it to the connections it holds. The broker also counts each
user's connections across nodes, so presence changes only on a user's first
open and last close anywhere, and the per-user connection cap holds across
nodes.

Events from one hub reach each hub in the order published; events from two
hubs may interleave in any order (so a message may arrive after one with a
higher id: connections place messages by id and drop exact repeats).

:class:`InProcessBroker` serves a single process. Any broker can check itself
with :func:`pmhub.testing.check_broker`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import anyio
import msgspec
from anyio.abc import TaskStatus

__all__ = ["Broker", "Deliver", "Deliverer", "Event", "InProcessBroker", "Presence", "Revoke"]


class Deliver(msgspec.Struct, tag="deliver", frozen=True):
    """Push ``frame`` (encoded JSON) to every connection of ``user_ids``,
    except the connection ``exclude``."""

    user_ids: list[int]
    frame: bytes
    message_id: int | None = None
    exclude: str | None = None


class Presence(msgspec.Struct, tag="presence", frozen=True):
    """``user_id`` came online or went offline: tell ``viewers`` (their online
    contacts) whether ``user_id`` is online now.

    The event carries no state: each hub reads it from the broker when the
    event arrives. Events of two nodes may arrive in either order, but the
    one published after the last change is read after it, so every viewer
    ends with the truth.
    """

    user_id: int
    viewers: list[int]


class Revoke(msgspec.Struct, tag="revoke", frozen=True):
    """Close every connection authenticated by session ``session_id``."""

    session_id: str


Event = Deliver | Presence | Revoke
Deliverer = Callable[[Event], Awaitable[None]]


class Broker(Protocol):
    """Carries events between hubs and counts connections per user."""

    async def run(
        self, deliver: Deliverer, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Hand every published event to ``deliver`` until cancelled.

        Call ``task_status.started()`` once subscribed; raise if the link is
        lost for good (the hub then stops rather than serve without fan-out).
        """
        ...

    async def publish(self, event: Event) -> None:
        """Send ``event`` to every running hub, this one included."""
        ...

    async def join(self, user_id: int) -> int:
        """Count a new connection of ``user_id``; return how many they now have
        open anywhere (1: they just came online)."""
        ...

    async def leave(self, user_id: int) -> int:
        """Count a closed connection of ``user_id``; return how many they still
        have open anywhere (0: they just went offline)."""
        ...

    async def online(self, user_ids: Iterable[int] | None = None) -> set[int]:
        """Which of ``user_ids`` have an open connection anywhere (every online
        user when ``None``: that costs O(online users), which only policies
        without contacts need)."""
        ...

    async def ping(self) -> None:
        """Raise if the broker cannot carry events (for health checks)."""
        ...


class InProcessBroker:
    """The broker of a single process: events go straight to its hubs."""

    def __init__(self) -> None:
        self._deliverers: list[Deliverer] = []
        self._connections: Counter[int] = Counter()

    async def run(
        self, deliver: Deliverer, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self._deliverers.append(deliver)
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            self._deliverers.remove(deliver)

    async def publish(self, event: Event) -> None:
        for deliver in tuple(self._deliverers):
            await deliver(event)

    async def join(self, user_id: int) -> int:
        self._connections[user_id] += 1
        return self._connections[user_id]

    async def leave(self, user_id: int) -> int:
        count = self._connections.get(user_id, 0)
        if count <= 0:
            raise RuntimeError(f"leave({user_id}) without a matching join()")
        if count == 1:
            del self._connections[user_id]
        else:
            self._connections[user_id] = count - 1
        return count - 1

    async def online(self, user_ids: Iterable[int] | None = None) -> set[int]:
        if user_ids is None:
            return set(self._connections)
        return {user_id for user_id in user_ids if user_id in self._connections}

    async def ping(self) -> None:
        return None
