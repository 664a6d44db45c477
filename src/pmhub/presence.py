"""Presence: who is told that a user came online or went offline.

A user's presence goes to their contacts who are online, and the snapshot a
new connection gets lists the same people. With a
:class:`~pmhub.policy.ContactPolicy` that costs O(contacts) per connect and
disconnect; a policy without ``contacts()`` makes the hub ask
``may_converse`` about every online user instead (O(online users): fine for
small deployments, not for large ones).

Connects and disconnects of one user are serialized (per user, not per hub),
so their presence changes go out in the order they happened.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache

import anyio

from .broker import Broker
from .frames import Outgoing, UserOnlineStatus
from .policy import ContactPolicy, PermissionPolicy

__all__ = ["Roster", "presence_frame"]


@lru_cache(maxsize=16_384)
def presence_frame(user_id: int, is_online: bool) -> Outgoing:
    """The encoded ``user_online_status`` frame (shared: snapshots repeat them)."""
    return Outgoing.of(UserOnlineStatus(user_id, is_online))


class Roster:
    """Who of a user's contacts is online; one connect or disconnect per user at a time."""

    def __init__(self, broker: Broker, policy: PermissionPolicy) -> None:
        self._broker = broker
        self._policy = policy
        self._contact_policy = policy if isinstance(policy, ContactPolicy) else None
        self._locks: dict[int, tuple[anyio.Lock, list[int]]] = {}

    async def online_contacts(self, user_id: int) -> list[int]:
        """The contacts of ``user_id`` who have a connection open anywhere, in id order."""
        if self._contact_policy is not None:
            contacts = await self._contact_policy.contacts(user_id)
            return sorted(await self._broker.online(contacts))
        return [
            other
            for other in sorted(await self._broker.online())
            if other != user_id and await self._policy.may_converse(user_id, other)
        ]

    @asynccontextmanager
    async def changing(self, user_id: int) -> AsyncIterator[None]:
        """Hold ``user_id``'s presence still: one connect or disconnect at a time."""
        entry = self._locks.get(user_id)
        if entry is None:
            # fast_acquire: an uncontended connect takes the lock without a trip
            # through the event loop (a checkpoint per connect, profiled at 7%).
            entry = self._locks[user_id] = (anyio.Lock(fast_acquire=True), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[user_id]
