"""A store in a Python list: fast, exact and gone when the process ends."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from ..frames import Conversation, Message
from ..store import Draft, ReadReceipt
from ._time import now

__all__ = ["MemoryStore"]


class MemoryStore:
    """Keeps every message in memory. For tests and throwaway demos."""

    def __init__(self) -> None:
        self._messages: list[Message] = []  # in id order; id == index + 1
        self._by_client_id: dict[tuple[int, str], int] = {}  # → id
        # session id → (cursor, when its cookie expires), in cursor order
        self._revoked: dict[str, tuple[int, float]] = {}
        self._revocations = 0

    async def save_many(self, drafts: Sequence[Draft]) -> list[tuple[Message, bool]]:
        for draft in drafts:  # refuse the whole batch before changing anything
            for user_id in (draft.sender_id, draft.receiver_id):
                if not -(2**63) <= user_id < 2**63:
                    raise OverflowError(f"user id {user_id} does not fit in 64 bits")
        created_at = now()
        results = []
        for draft in drafts:
            key = None if draft.client_id is None else (draft.sender_id, draft.client_id)
            stored = None if key is None else self._by_client_id.get(key)
            if stored is not None:
                results.append((self._messages[stored - 1], False))
                continue
            message = Message(
                id=len(self._messages) + 1,
                content=draft.content,
                sender_id=draft.sender_id,
                receiver_id=draft.receiver_id,
                created_at=created_at,
                client_id=draft.client_id,
            )
            self._messages.append(message)
            if key is not None:
                self._by_client_id[key] = message.id
            results.append((message, True))
        return results

    async def find(self, sender_id: int, client_id: str) -> Message | None:
        stored = self._by_client_id.get((sender_id, client_id))
        return None if stored is None else self._messages[stored - 1]

    async def since(self, user_id: int, after_id: int, limit: int) -> list[Message]:
        page = []
        for message in self._messages[max(after_id, 0) :]:
            if user_id in (message.sender_id, message.receiver_id):
                page.append(message)
                if len(page) == limit:
                    break
        return page

    async def history(
        self, user_id: int, peer_id: int, before_id: int | None, limit: int
    ) -> list[Message]:
        end = (
            len(self._messages)
            if before_id is None
            else max(0, min(before_id - 1, len(self._messages)))
        )
        page: list[Message] = []
        for message in reversed(self._messages[:end]):
            if _between(message, user_id, peer_id):
                page.append(message)
                if len(page) == limit:
                    break
        page.reverse()
        return page

    async def mark_read(self, reader_id: int, peer_id: int, up_to_id: int) -> ReadReceipt:
        updated, highest = 0, None
        for message in self._messages[: max(0, up_to_id)]:
            if (
                message.sender_id == peer_id
                and message.receiver_id == reader_id
                and not message.is_read
            ):
                self._messages[message.id - 1] = msgspec.structs.replace(message, is_read=True)
                updated += 1
                highest = message.id
        return ReadReceipt(updated, highest)

    async def conversations(self, user_id: int) -> list[Conversation]:
        last: dict[int, Message] = {}
        unread: dict[int, int] = {}
        for message in self._messages:
            if message.sender_id == user_id:
                last[message.receiver_id] = message
            elif message.receiver_id == user_id:
                last[message.sender_id] = message
                if not message.is_read:
                    unread[message.sender_id] = unread.get(message.sender_id, 0) + 1
        rows = [Conversation(peer, m, unread.get(peer, 0)) for peer, m in last.items()]
        rows.sort(key=lambda row: row.last_message.id, reverse=True)
        return rows

    async def revoke_session(self, session_id: str, expires_at: float, now: float) -> None:
        self._revoked = {sid: kept for sid, kept in self._revoked.items() if kept[1] > now}
        if session_id not in self._revoked:
            self._revocations += 1
            self._revoked[session_id] = (self._revocations, expires_at)

    async def revocations_since(self, cursor: int) -> tuple[list[tuple[str, float]], int]:
        new = [(sid, until) for sid, (seq, until) in self._revoked.items() if seq > cursor]
        return new, max(cursor, self._revocations)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _between(message: Message, user_id: int, peer_id: int) -> bool:
    return (message.sender_id, message.receiver_id) in ((user_id, peer_id), (peer_id, user_id))
