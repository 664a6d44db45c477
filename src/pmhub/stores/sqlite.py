"""SQLite, the embedded default store (stdlib ``sqlite3``).

Every call runs in a worker thread, so the event loop never blocks on disk:
one connection writes (transactions serialized, ``BEGIN IMMEDIATE``) and one
reads (WAL lets reads run beside writes). Ids come from ``AUTOINCREMENT``
under that single writer, so they grow strictly in commit order, also across
processes sharing the file.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TypeVar

import anyio
import anyio.to_thread

from ..frames import Conversation, Message
from ..store import Draft, ReadReceipt
from ._time import now

__all__ = ["SQLiteStore"]

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    sender_id   INTEGER NOT NULL,
    receiver_id INTEGER NOT NULL,
    content     TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,            -- milliseconds since the epoch, UTC
    is_read     INTEGER NOT NULL DEFAULT 0,
    client_id   TEXT,
    UNIQUE (sender_id, client_id)
);
CREATE INDEX IF NOT EXISTS messages_by_pair     ON messages (sender_id, receiver_id, id);
CREATE INDEX IF NOT EXISTS messages_by_receiver ON messages (receiver_id, id);
CREATE INDEX IF NOT EXISTS messages_unread      ON messages (receiver_id, sender_id)
    WHERE is_read = 0;
"""

COLUMNS = "id, content, sender_id, receiver_id, created_at, is_read, client_id"
Row = tuple[int, str, int, int, int, int, "str | None"]


def _message(row: Row) -> Message:
    id_, content, sender_id, receiver_id, millis, is_read, client_id = row
    created_at = datetime.fromtimestamp(millis / 1000, tz=timezone.utc)
    return Message(id_, content, sender_id, receiver_id, created_at, bool(is_read), client_id)


class SQLiteStore:
    """Messages in a SQLite file (or ``":memory:"``), created on first use."""

    def __init__(self, path: str | os.PathLike[str] = "pmhub.db") -> None:
        self.path = os.fspath(path)
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._write_limiter = anyio.CapacityLimiter(1)
        self._read_limiter = anyio.CapacityLimiter(1)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        conn.execute("PRAGMA busy_timeout = 30000")
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _open_writer(self) -> sqlite3.Connection:
        if self._writer is None:
            conn = self._connect()
            conn.executescript(SCHEMA)
            self._writer = conn
        return self._writer

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = self._open_writer()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await anyio.to_thread.run_sync(run, limiter=self._write_limiter)

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self.path == ":memory:":  # one database per connection: share the writer's
            return await anyio.to_thread.run_sync(
                lambda: work(self._open_writer()), limiter=self._write_limiter
            )
        if self._reader is None:
            await self._write(lambda conn: None)  # the writer creates the schema first

        def run() -> T:
            if self._reader is None:
                self._reader = self._connect()
            return work(self._reader)

        return await anyio.to_thread.run_sync(run, limiter=self._read_limiter)

    async def save(self, draft: Draft) -> tuple[Message, bool]:
        def work(conn: sqlite3.Connection) -> tuple[Message, bool]:
            created_at = now()
            cursor = conn.execute(
                "INSERT INTO messages (sender_id, receiver_id, content, created_at, client_id)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (sender_id, client_id) DO NOTHING",
                (
                    draft.sender_id,
                    draft.receiver_id,
                    draft.content,
                    int(created_at.timestamp() * 1000),
                    draft.client_id,
                ),
            )
            if cursor.rowcount == 1 and cursor.lastrowid is not None:
                message = Message(
                    cursor.lastrowid,
                    draft.content,
                    draft.sender_id,
                    draft.receiver_id,
                    created_at,
                    False,
                    draft.client_id,
                )
                return message, True
            row = conn.execute(
                f"SELECT {COLUMNS} FROM messages WHERE sender_id = ? AND client_id = ?",
                (draft.sender_id, draft.client_id),
            ).fetchone()
            return _message(row), False

        return await self._write(work)

    async def find(self, sender_id: int, client_id: str) -> Message | None:
        def work(conn: sqlite3.Connection) -> Message | None:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM messages WHERE sender_id = ? AND client_id = ?",
                (sender_id, client_id),
            ).fetchone()
            return None if row is None else _message(row)

        return await self._read(work)

    async def since(self, user_id: int, after_id: int, limit: int) -> list[Message]:
        def work(conn: sqlite3.Connection) -> list[Message]:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM ("
                f" SELECT {COLUMNS} FROM messages WHERE sender_id = ? AND id > ?"
                f" UNION ALL"
                f" SELECT {COLUMNS} FROM messages"
                f"  WHERE receiver_id = ? AND id > ? AND sender_id != receiver_id"
                f") ORDER BY id LIMIT ?",
                (user_id, after_id, user_id, after_id, limit),
            ).fetchall()
            return [_message(row) for row in rows]

        return await self._read(work)

    async def history(
        self, user_id: int, peer_id: int, before_id: int | None, limit: int
    ) -> list[Message]:
        def work(conn: sqlite3.Connection) -> list[Message]:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM messages"
                " WHERE ((sender_id = ? AND receiver_id = ?)"
                "     OR (sender_id = ? AND receiver_id = ?))"
                "   AND id < ? ORDER BY id DESC LIMIT ?",
                (
                    user_id,
                    peer_id,
                    peer_id,
                    user_id,
                    before_id if before_id is not None else 2**63 - 1,
                    limit,
                ),
            ).fetchall()
            return [_message(row) for row in reversed(rows)]

        return await self._read(work)

    async def mark_read(self, reader_id: int, peer_id: int, up_to_id: int) -> ReadReceipt:
        def work(conn: sqlite3.Connection) -> ReadReceipt:
            rows = conn.execute(
                "UPDATE messages SET is_read = 1"
                " WHERE receiver_id = ? AND sender_id = ? AND id <= ? AND is_read = 0"
                " RETURNING id",
                (reader_id, peer_id, up_to_id),
            ).fetchall()
            return ReadReceipt(len(rows), max((row[0] for row in rows), default=None))

        return await self._write(work)

    async def conversations(self, user_id: int) -> list[Conversation]:
        def work(conn: sqlite3.Connection) -> list[Conversation]:
            rows = conn.execute(
                f"""
                WITH peers (peer, last_id) AS (
                    SELECT receiver_id, MAX(id) FROM messages WHERE sender_id = :u
                        GROUP BY receiver_id
                    UNION ALL
                    SELECT sender_id, MAX(id) FROM messages WHERE receiver_id = :u
                        GROUP BY sender_id
                ), latest (peer, last_id) AS (
                    SELECT peer, MAX(last_id) FROM peers GROUP BY peer
                )
                SELECT latest.peer,
                       (SELECT COUNT(*) FROM messages AS unread
                         WHERE unread.receiver_id = :u AND unread.sender_id = latest.peer
                           AND unread.is_read = 0),
                       {", ".join("m." + c for c in COLUMNS.split(", "))}
                  FROM latest JOIN messages AS m ON m.id = latest.last_id
                 ORDER BY m.id DESC
                """,
                {"u": user_id},
            ).fetchall()
            return [Conversation(row[0], _message(row[2:]), row[1]) for row in rows]

        return await self._read(work)

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        def close() -> None:
            for conn in (self._reader, self._writer):
                if conn is not None:
                    conn.close()
            self._reader = self._writer = None

        async with self._write_limiter, self._read_limiter:
            await anyio.to_thread.run_sync(close)
