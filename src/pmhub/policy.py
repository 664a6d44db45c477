"""The permission extension point: who may converse with whom."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Protocol, runtime_checkable

__all__ = ["AllowAll", "ContactPolicy", "PermissionPolicy", "StaticPolicy"]


class PermissionPolicy(Protocol):
    """Decides who may converse with whom, and which user ids exist.

    The hub asks before every message and typing indicator, and to scope
    presence: a user's online status only reaches users allowed to converse
    with them. A user never converses with themselves (the hub checks that).
    """

    async def exists(self, user_id: int) -> bool:
        """Whether ``user_id`` names a user (unknown users answer HTTP 404)."""
        ...

    async def may_converse(self, user_id: int, peer_id: int) -> bool:
        """Whether ``user_id`` may message ``peer_id`` (and see their presence)."""
        ...


@runtime_checkable
class ContactPolicy(PermissionPolicy, Protocol):
    """A policy that also lists each user's contacts: implement it at scale.

    With it, connecting and disconnecting cost O(contacts) instead of
    O(online users): the presence snapshot and the presence broadcasts go to
    the contacts who are online, and nobody else. ``contacts`` must be
    symmetric (``a`` in ``contacts(b)`` exactly when ``b`` in ``contacts(a)``)
    and a subset of whom ``may_converse`` allows: a friends list, or the
    people one has conversations with.
    """

    async def contacts(self, user_id: int) -> Collection[int]:
        """The users who see ``user_id``'s presence, and whose presence they see."""
        ...


class AllowAll:
    """Every positive user id exists and everyone may converse with everyone."""

    async def exists(self, user_id: int) -> bool:
        return user_id > 0

    async def may_converse(self, user_id: int, peer_id: int) -> bool:
        return user_id != peer_id


class StaticPolicy:
    """A fixed set of users; everyone may converse with everyone except where
    ``only`` restricts a user to the listed peers (in both directions).

    ``StaticPolicy({1, 2, 3, 4}, only={4: {3}})`` is the demo's policy:
    user 4 converses only with user 3. It is a :class:`ContactPolicy`: a
    user's contacts are everyone they may converse with (so it suits small,
    fixed sets of users).
    """

    def __init__(
        self, users: Collection[int], *, only: Mapping[int, Collection[int]] | None = None
    ) -> None:
        self.users = frozenset(users)
        self.only = {user: frozenset(peers) for user, peers in (only or {}).items()}
        for user, peers in self.only.items():
            unknown = (peers | {user}) - self.users
            if unknown:
                raise ValueError(f"StaticPolicy(only=...) names unknown users {sorted(unknown)}")

    async def exists(self, user_id: int) -> bool:
        return user_id in self.users

    async def may_converse(self, user_id: int, peer_id: int) -> bool:
        return self._allowed(user_id, peer_id)

    async def contacts(self, user_id: int) -> list[int]:
        return [peer for peer in self.users if self._allowed(user_id, peer)]

    def _allowed(self, user_id: int, peer_id: int) -> bool:
        if user_id == peer_id or user_id not in self.users or peer_id not in self.users:
            return False
        if user_id in self.only and peer_id not in self.only[user_id]:
            return False
        return not (peer_id in self.only and user_id not in self.only[peer_id])
