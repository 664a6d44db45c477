"""The storage extension point: what a message store must do.

Implementations: :class:`pmhub.stores.MemoryStore`, :class:`pmhub.stores.SQLiteStore`.
Any store can check itself with :func:`pmhub.testing.check_store`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec

from .frames import Conversation, Message

__all__ = ["Draft", "MessageStore", "ReadReceipt"]


class Draft(msgspec.Struct, frozen=True, gc=False):
    """A message to store; the store assigns ``id`` and ``created_at``."""

    sender_id: int
    receiver_id: int
    content: str
    client_id: str | None = None


class ReadReceipt(msgspec.Struct, frozen=True):
    """What ``mark_read`` changed: how many messages, and the highest id now read."""

    updated: int
    up_to_id: int | None


class MessageStore(Protocol):
    """Durable storage of private messages.

    Rules every store keeps (and :func:`pmhub.testing.check_store` checks):

    * ``id`` is unique and strictly increasing in commit order across the store
      (also across processes that share it), and in draft order within a batch.
    * ``(sender_id, client_id)`` is unique when ``client_id`` is set: saving it
      again, in a later batch or later in the same one, returns the first
      stored message and ``created=False``.
    * A batch is one transaction: when ``save_many`` raises, none of its
      drafts is stored.
    * Content is stored byte-exact.
    """

    async def save_many(self, drafts: Sequence[Draft]) -> list[tuple[Message, bool]]:
        """Store ``drafts`` in one transaction, in order; return, for each, the
        stored message and whether it was created (False for a resend).

        The hub sends everything that arrived while the previous batch was
        being committed, so one commit (and one fsync) serves many messages.
        """
        ...

    async def find(self, sender_id: int, client_id: str) -> Message | None:
        """The message ``sender_id`` stored under ``client_id``, if any."""
        ...

    async def since(self, user_id: int, after_id: int, limit: int) -> list[Message]:
        """Up to ``limit`` messages sent or received by ``user_id`` with id > ``after_id``,
        in id order."""
        ...

    async def history(
        self, user_id: int, peer_id: int, before_id: int | None, limit: int
    ) -> list[Message]:
        """The newest ``limit`` messages between the two users with id < ``before_id``
        (all when ``None``), oldest first."""
        ...

    async def mark_read(self, reader_id: int, peer_id: int, up_to_id: int) -> ReadReceipt:
        """Mark messages from ``peer_id`` to ``reader_id`` with id ≤ ``up_to_id`` read.

        ``up_to_id`` of the receipt is the highest such id, or ``None`` when
        nothing changed.
        """
        ...

    async def conversations(self, user_id: int) -> list[Conversation]:
        """Every conversation of ``user_id``, most recent first, with unread counts."""
        ...

    async def ping(self) -> None:
        """Raise if the store cannot serve requests (for health checks)."""
        ...

    async def aclose(self) -> None:
        """Release connections and threads."""
        ...
