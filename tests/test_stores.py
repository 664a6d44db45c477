"""Every bundled store and broker passes the conformance checks; SQLite specifics."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest

from pmhub import Draft, InProcessBroker, MemoryStore, Message, SQLiteStore
from pmhub.store import MessageStore
from pmhub.testing import check_broker, check_store

pytestmark = pytest.mark.anyio


async def save(store: MessageStore, draft: Draft) -> tuple[Message, bool]:
    [result] = await store.save_many([draft])
    return result


@asynccontextmanager
async def sqlite(path: str | Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(path)
    try:
        yield store
    finally:
        await store.aclose()


STORES: dict[str, Callable[[Path], MessageStore]] = {
    "memory": lambda tmp_path: MemoryStore(),
    "sqlite-file": lambda tmp_path: SQLiteStore(tmp_path / "x.db"),
    "sqlite-memory": lambda tmp_path: SQLiteStore(":memory:"),
}


@pytest.mark.parametrize("kind", list(STORES))
async def test_check_store(kind: str, tmp_path: Path) -> None:
    store = STORES[kind](tmp_path)
    try:
        await check_store(store)
    finally:
        await store.aclose()


async def test_check_broker_in_process() -> None:
    broker = InProcessBroker()
    await check_broker(broker, broker)


async def test_check_store_names_the_broken_rule() -> None:
    class ForgetfulStore(MemoryStore):
        async def find(self, sender_id: int, client_id: str) -> None:
            return None

    with pytest.raises(AssertionError, match="find\\(\\) returns the stored message"):
        await check_store(ForgetfulStore())


# -- SQLite specifics ------------------------------------------------------------------------


async def test_sqlite_data_survives_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    async with sqlite(path) as store:
        first, _ = await save(store, Draft(1, 2, "hello", "c-1"))
        second, _ = await save(store, Draft(2, 1, "hi back"))
        await store.mark_read(2, 1, first.id)
    async with sqlite(path) as store:
        assert await store.since(1, 0, 10) == [msgspec.structs.replace(first, is_read=True), second]
        again, created = await save(store, Draft(1, 2, "resent", "c-1"))
        assert not created and again.id == first.id and again.content == "hello"
        third, created = await save(store, Draft(1, 2, "later"))
        assert created and third.id > second.id


async def test_sqlite_content_is_byte_exact(tmp_path: Path) -> None:
    contents = [
        "nul \x00 inside",
        "\U0001f600\U0001f468\u200d\U0001f469\u200d\U0001f467",
        "line\u2028separator\u2029paragraph",
        "<script>alert('x')</script>",
        'quote " backslash \\ tab \t newline \n cr \r',
        "\x00",
        "\ufeffbom",
    ]
    path = tmp_path / "exact.db"
    async with sqlite(path) as store:
        for content in contents:
            message, _ = await save(store, Draft(1, 2, content))
            assert message.content == content
    async with sqlite(path) as store:
        assert [m.content for m in await store.since(1, 0, 100)] == contents
        assert [m.content for m in await store.history(2, 1, None, 100)] == contents


async def test_sqlite_created_at_is_utc_milliseconds(tmp_path: Path) -> None:
    async with sqlite(tmp_path / "t.db") as store:
        message, _ = await save(store, Draft(1, 2, "x"))
        [reread] = await store.since(1, 0, 10)
    assert reread.created_at == message.created_at
    assert message.created_at.utcoffset() is not None
    assert message.created_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert message.created_at.microsecond % 1000 == 0


@pytest.mark.parametrize("target", ["file", ":memory:"])
async def test_sqlite_concurrent_saves_get_unique_increasing_ids(
    target: str, tmp_path: Path
) -> None:
    path = tmp_path / "busy.db" if target == "file" else ":memory:"
    per_task: dict[int, list[int]] = {}
    async with sqlite(path) as store:

        async def writer(sender: int) -> None:
            ids = per_task.setdefault(sender, [])
            for n in range(5):
                message, created = await save(store, Draft(sender, 1000, f"{sender}-{n}", f"k{n}"))
                assert created
                ids.append(message.id)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for sender in range(1, 21):
                    tg.start_soon(writer, sender)
        everything = await store.since(1000, 0, 1000)

    all_ids = [i for ids in per_task.values() for i in ids]
    assert len(all_ids) == len(set(all_ids)) == 100
    for ids in per_task.values():
        assert ids == sorted(ids)  # each writer's later save got a higher id
    assert [m.id for m in everything] == sorted(all_ids)
    for message in everything:  # each id holds the content that was saved under it
        sender, n = map(int, message.content.split("-"))
        assert per_task[sender][n] == message.id


async def test_sqlite_two_stores_on_one_file_share_the_id_sequence(tmp_path: Path) -> None:
    """Like two processes sharing the file: ids stay unique and increasing."""
    path = tmp_path / "shared.db"
    async with sqlite(path) as first, sqlite(path) as second:
        ids: list[int] = []

        async def writer(store: SQLiteStore, sender: int) -> None:
            for n in range(10):
                message, _ = await save(store, Draft(sender, 3, f"{n}"))
                ids.append(message.id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer, first, 1)
            tg.start_soon(writer, second, 2)
        # Each sees the other's commits.
        assert [m.id for m in await first.since(3, 0, 100)] == sorted(ids)
        assert len(set(ids)) == 20
        again, created = await save(second, Draft(1, 3, "x", "k"))
        assert created
        assert await first.find(1, "k") == again


async def test_sqlite_file_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    async with sqlite(path) as store:
        await save(store, Draft(1, 2, "x"))
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()


async def test_sqlite_reads_see_the_latest_write(tmp_path: Path) -> None:
    async with sqlite(tmp_path / "rw.db") as store:
        await store.ping()  # opens the reader before anything is written
        message, _ = await save(store, Draft(1, 2, "fresh"))
        assert await store.find(1, "nope") is None
        assert await store.since(2, 0, 10) == [message]
        await store.mark_read(2, 1, message.id)
        [row] = await store.conversations(2)
        assert row.unread_count == 0 and row.last_message.is_read


async def test_sqlite_store_can_be_closed_twice_and_unused(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "never.db")
    await store.aclose()
    await store.aclose()
    assert not (tmp_path / "never.db").exists()


@pytest.mark.parametrize(("synchronous", "pragma"), [("full", 2), ("normal", 1)])
async def test_sqlite_durability_is_the_synchronous_setting(
    synchronous: str, pragma: int, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "d.db", synchronous=synchronous)  # type: ignore[arg-type]
    try:
        await save(store, Draft(1, 2, "x"))
        assert store._writer is not None
        assert store._writer.execute("PRAGMA synchronous").fetchone()[0] == pragma
    finally:
        await store.aclose()


@pytest.mark.parametrize("synchronous", ["full", "normal"])
async def test_sqlite_log_stays_small_under_steady_writes(synchronous: str, tmp_path: Path) -> None:
    # Checkpoints beside the writes (normal) or in them (full) must still let
    # the log start over: a server that never stops writing keeps a small file.
    path = tmp_path / "w.db"
    before = set(threading.enumerate())
    store = SQLiteStore(path, synchronous=synchronous)  # type: ignore[arg-type]
    try:
        for n in range(2000):  # far past the 1,000 pages after which the log restarts
            await save(store, Draft(n % 50 + 1, n % 7 + 1, "x" * 200, f"c{n}"))
        assert (tmp_path / "w.db-wal").stat().st_size < 8 * 1024 * 1024
        mine = [n for n in range(2000) if n % 50 == 0 or n % 7 == 0]  # user 1 sent or got
        assert [m.client_id for m in await store.since(1, 0, 5000)] == [f"c{n}" for n in mine]
    finally:
        await store.aclose()
    for thread in set(threading.enumerate()) - before:  # aclose() ended the store's threads
        if thread.name.startswith("pmhub-sqlite"):
            thread.join(10)
            assert not thread.is_alive()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (2000,)


def test_sqlite_durability_defaults_to_full_and_refuses_unknown_settings() -> None:
    assert SQLiteStore(":memory:").synchronous == "full"
    with pytest.raises(ValueError, match="'full' or 'normal'"):
        SQLiteStore(":memory:", synchronous="off")  # type: ignore[arg-type]


async def test_sqlite_a_failed_batch_rolls_back_and_the_next_one_commits(tmp_path: Path) -> None:
    async with sqlite(tmp_path / "b.db") as store:
        with pytest.raises(OverflowError):
            await store.save_many([Draft(1, 2, "kept?", "k"), Draft(2**63, 2, "too big")])
        assert await store.since(2, 0, 10) == []
        [(message, created)] = await store.save_many([Draft(1, 2, "kept", "k")])
        assert created and await store.since(2, 0, 10) == [message]
