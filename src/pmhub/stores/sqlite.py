"""SQLite, the embedded default store (stdlib ``sqlite3``).

Every call runs in one of two long-lived threads, so the event loop never
blocks on disk: one owns the connection that writes (``BEGIN IMMEDIATE``; the
hub hands it whole batches, so one transaction and one thread hop serve many
messages) and one the connection that reads (WAL lets reads run beside
writes). Each thread takes its calls in order from a queue and wakes the
event loop with the outcome: no thread pool, no per-call setup.

With ``synchronous="normal"`` a third thread copies the write-ahead log into
the database (a passive checkpoint) every few commits, beside the writes:
left to the writer, SQLite does it inside a commit every thousand pages, and
that commit, the log's first flush, held up every message behind it for
10 ms or more.

Ids come from ``AUTOINCREMENT`` under that single writer, so they grow
strictly in commit order, also across processes sharing the file.
Logged-out sessions are kept in the same file
(:class:`~pmhub.auth.RevocationStore`), so a logout lasts across restarts and
holds for every process on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from functools import partial
from typing import Any, Literal, TypeVar

import anyio

from ..frames import Conversation, Message
from ..store import Draft, ReadReceipt
from ._time import now

__all__ = ["SQLiteStore"]

logger = logging.getLogger("pmhub")

T = TypeVar("T")

SCHEMA = """
BEGIN IMMEDIATE;
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
CREATE TABLE IF NOT EXISTS revoked_sessions (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- grows in commit order: a cursor
    session_id  TEXT    NOT NULL UNIQUE,
    expires_at  REAL    NOT NULL                    -- seconds since the epoch
);
COMMIT;
"""

COLUMNS = "id, content, sender_id, receiver_id, created_at, is_read, client_id"
Row = tuple[int, str, int, int, int, int, "str | None"]
INSERT = (
    "INSERT INTO messages (sender_id, receiver_id, content, created_at, client_id)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (sender_id, client_id) DO NOTHING"
)
BY_CLIENT_ID = f"SELECT {COLUMNS} FROM messages WHERE sender_id = ? AND client_id = ?"
#: How long a connection waits for another one's lock (also another process's).
BUSY_TIMEOUT = 30.0
#: Commits between two checkpoints in the background.
CHECKPOINT_EVERY = 16


def _messages(rows: Iterable[Row]) -> list[Message]:
    """Messages of ``rows``; those stored in one batch share one ``created_at``,
    so a page converts each distinct timestamp once."""
    messages = []
    last_millis, created_at = None, None
    for id_, content, sender_id, receiver_id, millis, is_read, client_id in rows:
        if millis != last_millis:
            last_millis = millis
            created_at = datetime.fromtimestamp(millis / 1000, tz=timezone.utc)
        assert created_at is not None
        message = Message(
            id_, content, sender_id, receiver_id, created_at, bool(is_read), client_id
        )
        messages.append(message)
    return messages


def _message(row: Row) -> Message:
    return _messages((row,))[0]


class SQLiteStore:
    """Messages in a SQLite file (or ``":memory:"``), created on first use.

    ``synchronous`` is how far a confirmed message is durable (SQLite's
    ``PRAGMA synchronous`` in WAL mode):

    * ``"full"`` (the default): every commit is flushed to disk (fsync)
      before the hub confirms it, so a confirmed message survives a process
      kill, an OS crash and a power loss. Group commit makes this one fsync
      per batch, not per message.
    * ``"normal"``: commits reach the OS but are flushed only at checkpoints:
      a confirmed message survives a process kill (``kill -9``), but the last
      commits before an OS crash or a power loss may be lost. Faster on disks
      with slow flushes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "pmhub.db",
        *,
        synchronous: Literal["full", "normal"] = "full",
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', got {synchronous!r}")
        self.path = os.fspath(path)
        self.synchronous = synchronous
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._write_thread = _Thread("pmhub-sqlite-writer")
        self._read_thread = _Thread("pmhub-sqlite-reader")
        self._checkpoint_thread = _Thread("pmhub-sqlite-checkpoint")
        self._commits = 0  # since the last checkpoint was queued (writer thread)
        # With "full" each commit has flushed the log already, and the writer's
        # own checkpoint is quick: no checkpoints beside it.
        self._checkpoints = synchronous == "normal" and self.path != ":memory:"

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT
        )
        if self.path != ":memory:":
            _enable_wal(conn)
        conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
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
            if self._checkpoints:
                self._commits += 1
                if self._commits >= CHECKPOINT_EVERY:
                    self._commits = 0
                    self._checkpoint_thread.post(self._checkpoint)
            return result

        return await self._write_thread.run(run)

    def _checkpoint(self) -> None:
        """Copy what the log holds into the database without blocking writers
        (``PASSIVE``). The writer's own checkpoint, every thousand pages, then
        finds little left to copy and starts the log over from its beginning,
        which keeps the file small."""
        if self._checkpointer is None:
            self._checkpointer = self._connect()
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self.path == ":memory:":  # one database per connection: share the writer's
            return await self._write_thread.run(lambda: work(self._open_writer()))
        if self._reader is None:
            await self._write(lambda conn: None)  # the writer creates the schema first

        def run() -> T:
            if self._reader is None:
                self._reader = self._connect()
            return work(self._reader)

        return await self._read_thread.run(run)

    async def save_many(self, drafts: Sequence[Draft]) -> list[tuple[Message, bool]]:
        def work(conn: sqlite3.Connection) -> list[tuple[Message, bool]]:
            created_at = now()
            millis = int(created_at.timestamp() * 1000)
            cursor = conn.cursor()
            results = []
            for draft in drafts:
                params = (
                    draft.sender_id,
                    draft.receiver_id,
                    draft.content,
                    millis,
                    draft.client_id,
                )
                cursor.execute(INSERT, params)
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
                    results.append((message, True))
                else:  # a resend: the first write wins
                    row = cursor.execute(BY_CLIENT_ID, (draft.sender_id, draft.client_id))
                    results.append((_message(row.fetchone()), False))
            return results

        return await self._write(work)

    async def find(self, sender_id: int, client_id: str) -> Message | None:
        def work(conn: sqlite3.Connection) -> Message | None:
            row = conn.execute(BY_CLIENT_ID, (sender_id, client_id)).fetchone()
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
            return _messages(rows)

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
            return _messages(reversed(rows))

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

    async def revoke_session(self, session_id: str, expires_at: float, now: float) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM revoked_sessions WHERE expires_at <= ?", (now,))
            conn.execute(
                "INSERT INTO revoked_sessions (session_id, expires_at) VALUES (?, ?)"
                " ON CONFLICT (session_id) DO NOTHING",
                (session_id, expires_at),
            )

        await self._write(work)

    async def revocations_since(self, cursor: int) -> tuple[list[tuple[str, float]], int]:
        def work(conn: sqlite3.Connection) -> tuple[list[tuple[str, float]], int]:
            rows = conn.execute(
                "SELECT seq, session_id, expires_at FROM revoked_sessions"
                " WHERE seq > ? ORDER BY seq",
                (cursor,),
            ).fetchall()
            return [(sid, until) for _, sid, until in rows], rows[-1][0] if rows else cursor

        return await self._read(work)

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        # Each in its own thread, after the calls queued before it; the threads
        # end (a later call starts them again). The writer queues checkpoints:
        # it closes first.
        for thread, owned in (
            (self._read_thread, "_reader"),
            (self._write_thread, "_writer"),
            (self._checkpoint_thread, "_checkpointer"),
        ):
            await thread.run(partial(self._close_connection, owned), last=True)

    def _close_connection(self, attribute: str) -> None:
        conn: sqlite3.Connection | None = getattr(self, attribute)
        if conn is not None:
            conn.close()
            setattr(self, attribute, None)


Outcome = tuple[bool, Any]  # (True, result) or (False, exception)
Call = tuple[Callable[[], Any], Callable[[Outcome], None]]


class _Thread:
    """A thread that runs calls one at a time, in the order they were made."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[Call | None] | None = None  # the running thread's

    def _started(self) -> queue.SimpleQueue[Call | None]:
        calls = self._calls
        if calls is None:
            calls = self._calls = queue.SimpleQueue()
            threading.Thread(target=_serve, args=(calls,), name=self._name, daemon=True).start()
            # A store dropped without aclose() must not leave its thread waiting.
            weakref.finalize(self, calls.put, None)
        return calls

    def post(self, work: Callable[[], object]) -> None:
        """Queue ``work`` without waiting for it (from any thread); a failure is logged."""
        self._started().put((work, _log_failure))

    async def run(self, work: Callable[[], T], *, last: bool = False) -> T:
        """Run ``work`` in the thread and return its result (or raise its
        exception). Cancelling waits for ``work`` to finish, as
        ``anyio.to_thread.run_sync`` does. ``last`` ends the thread after it
        (the next call starts a new one)."""
        if last and self._calls is None:  # nothing ran: nothing to close
            return work()
        calls = self._started()
        call_soon = _call_soon_threadsafe()
        done = anyio.Event()
        outcome: list[Outcome] = []

        def report(result: Outcome) -> None:
            outcome.append(result)
            call_soon(done.set)

        calls.put((work, report))
        if last:
            calls.put(None)
            self._calls = None
        with anyio.CancelScope(shield=True):
            await done.wait()
        ok, value = outcome[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value


def _serve(calls: queue.SimpleQueue[Call | None]) -> None:
    while (call := calls.get()) is not None:
        work, report = call
        try:
            result: Outcome = (True, work())
        except BaseException as exc:
            result = (False, exc)
        del call, work  # the store stays collectable while the thread waits
        report(result)
        del report, result


def _log_failure(outcome: Outcome) -> None:
    if not outcome[0]:
        logger.warning("a background SQLite call failed: %r", outcome[1])


def _call_soon_threadsafe() -> Callable[[Callable[[], object]], object]:
    """How a thread schedules a callback in the running event loop."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:  # anyio's other backend
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL (a no-op once it is; the mode is kept in the file).

    The switch needs an exclusive lock, and SQLite does not call the busy
    handler for it: a second connection that opens a fresh file while the
    first one switches it gets ``database is locked`` at once instead of
    waiting. So wait here, as the busy timeout would.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
