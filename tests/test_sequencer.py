"""The group-commit writer (:class:`pmhub.sequencer.Sequencer`) with a fake store and broker.

``FakeBackend.save`` records every batch it is handed and can be held on an
event the test controls, so a test decides when a commit is "in flight";
``FakeBackend.publish`` records the order of fan-out. The last tests drive
the same writer through :meth:`Hub.send_message` with real stores.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from pmhub import BackendError, Hub, Identity, MemoryStore, SQLiteStore, StaticPolicy
from pmhub.frames import Message
from pmhub.sequencer import Sequencer
from pmhub.store import Draft, MessageStore

pytestmark = pytest.mark.anyio

Saved = tuple[Message, bool]
EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)


def draft(content: str, client_id: str | None = None, sender: int = 1) -> Draft:
    return Draft(sender, 2 if sender != 2 else 1, content, client_id)


class FakeBackend:
    """A save that records batches (and may be held or fail) and a publish that records ids.

    ``log`` interleaves what happened: ``("save", [contents])``, ``("publish", id)`` and,
    written by the tests' submitters, ``("woken", content)``.
    """

    def __init__(self) -> None:
        self.batches: list[list[Draft]] = []
        self.log: list[tuple[str, Any]] = []
        self.gates: list[anyio.Event] = []  # save number i waits on gates[i], if there is one
        self.failures: dict[int, Exception] = {}  # save number → what it raises
        self.published: list[Message] = []
        self.stored: dict[tuple[int, str], Message] = {}
        self.next_id = 1
        self.entered: dict[int, anyio.Event] = {}  # set when save number i starts

    def started(self, batch_number: int) -> anyio.Event:
        """An event set once save number ``batch_number`` has been called."""
        event = self.entered.setdefault(batch_number, anyio.Event())
        if len(self.batches) > batch_number:
            event.set()
        return event

    def hold(self, batch_number: int) -> anyio.Event:
        """Make save number ``batch_number`` (0-based) wait until the returned event is set."""
        while len(self.gates) <= batch_number:
            self.gates.append(anyio.Event())
            self.gates[-1].set()
        gate = self.gates[batch_number] = anyio.Event()
        return gate

    async def save(self, drafts: Sequence[Draft]) -> list[Saved]:
        number = len(self.batches)
        self.batches.append(list(drafts))
        self.log.append(("save", [d.content for d in drafts]))
        self.started(number).set()
        if number < len(self.gates):
            await self.gates[number].wait()
        await anyio.lowlevel.checkpoint()
        if number in self.failures:
            raise self.failures[number]
        results: list[Saved] = []
        for d in drafts:
            key = None if d.client_id is None else (d.sender_id, d.client_id)
            if key is not None and key in self.stored:
                results.append((self.stored[key], False))
                continue
            message = Message(
                self.next_id, d.content, d.sender_id, d.receiver_id, EPOCH, False, d.client_id
            )
            self.next_id += 1
            if key is not None:
                self.stored[key] = message
            results.append((message, True))
        return results

    async def publish(self, message: Message) -> None:
        # Yield a few times: a submitter woken too early would get to run and log itself.
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        self.log.append(("publish", message.id))
        self.published.append(message)


@asynccontextmanager
async def running(
    backend: FakeBackend, *, max_batch: int = 1000
) -> AsyncIterator[tuple[Sequencer, anyio.abc.TaskGroup]]:
    sequencer = Sequencer(backend.save, backend.publish, max_batch=max_batch)
    async with anyio.create_task_group() as tg:
        await tg.start(sequencer.run)
        yield sequencer, tg
        with anyio.fail_after(5):
            await sequencer.aclose()


class Submitter:
    """Runs ``sequencer.submit`` in a task and keeps what it returned or raised."""

    def __init__(self, sequencer: Sequencer, backend: FakeBackend, d: Draft) -> None:
        self.sequencer = sequencer
        self.backend = backend
        self.draft = d
        self.result: Saved | None = None
        self.error: BaseException | None = None
        self.done = anyio.Event()

    async def __call__(self) -> None:
        try:
            self.result = await self.sequencer.submit(self.draft)
            self.backend.log.append(("woken", self.draft.content))
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()


async def spawn(
    tg: anyio.abc.TaskGroup, sequencer: Sequencer, backend: FakeBackend, *drafts: Draft
) -> list[Submitter]:
    """Start one submitter per draft, in this order, each parked before the next starts."""
    submitters = []
    for d in drafts:
        submitter = Submitter(sequencer, backend, d)
        tg.start_soon(submitter)
        await anyio.wait_all_tasks_blocked()
        submitters.append(submitter)
    return submitters


async def finished(*submitters: Submitter) -> None:
    with anyio.fail_after(5):
        for submitter in submitters:
            await submitter.done.wait()


def contents(batches: list[list[Draft]]) -> list[list[str]]:
    return [[d.content for d in batch] for batch in batches]


# -- low load: no batching delay ------------------------------------------------------------


async def test_one_submit_commits_alone_at_once() -> None:
    backend = FakeBackend()
    async with running(backend) as (sequencer, _):
        start = anyio.current_time()
        with anyio.fail_after(1):
            message, created = await sequencer.submit(draft("hi"))
        elapsed = anyio.current_time() - start
    assert created and message.id == 1 and message.content == "hi"
    assert contents(backend.batches) == [["hi"]]
    assert elapsed < 0.5, f"a lone submit waited {elapsed:.3f} s: a batching timer?"


async def test_sequential_submits_each_commit_alone() -> None:
    backend = FakeBackend()
    async with running(backend) as (sequencer, _):
        ids = [(await sequencer.submit(draft(f"m{i}")))[0].id for i in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    assert contents(backend.batches) == [["m0"], ["m1"], ["m2"], ["m3"], ["m4"]]
    assert [m.id for m in backend.published] == ids


# -- group commit -----------------------------------------------------------------------------


async def test_submits_during_a_commit_form_the_next_single_batch() -> None:
    backend = FakeBackend()
    gate = backend.hold(0)
    async with running(backend) as (sequencer, tg):
        first = await spawn(tg, sequencer, backend, draft("a"))
        assert contents(backend.batches) == [["a"]]  # in flight, held
        rest = await spawn(tg, sequencer, backend, draft("b"), draft("c"), draft("d"))
        assert contents(backend.batches) == [["a"]], "the writer took a batch mid-commit"
        gate.set()
        await finished(*first, *rest)
    assert contents(backend.batches) == [["a"], ["b", "c", "d"]]


async def test_results_map_back_to_the_right_submitter() -> None:
    backend = FakeBackend()
    gate = backend.hold(0)
    async with running(backend) as (sequencer, tg):
        first = await spawn(tg, sequencer, backend, draft("zero"))
        drafts = [
            draft("one", "k1"),
            draft("two", sender=2),
            draft("three", "k1"),  # a resend of "one", same batch: first write wins
            draft("four", "k2"),
        ]
        rest = await spawn(tg, sequencer, backend, *drafts)
        gate.set()
        await finished(*first, *rest)
    by_content = {s.draft.content: s.result for s in [*first, *rest]}
    assert all(s.error is None for s in [*first, *rest])
    assert {c: (r[0].id, r[0].content, r[1]) for c, r in by_content.items() if r} == {
        "zero": (1, "zero", True),
        "one": (2, "one", True),
        "two": (3, "two", True),
        "three": (2, "one", False),
        "four": (4, "four", True),
    }
    result = by_content["two"]
    assert result is not None and (result[0].sender_id, result[0].receiver_id) == (2, 1)


async def test_publish_in_id_order_before_any_submitter_is_woken() -> None:
    backend = FakeBackend()
    gate = backend.hold(0)
    async with running(backend) as (sequencer, tg):
        first = await spawn(tg, sequencer, backend, draft("a"))
        rest = await spawn(
            tg, sequencer, backend, draft("b"), draft("c", "k"), draft("d"), draft("e", "k")
        )
        gate.set()
        await finished(*first, *rest)
    start = backend.log.index(("save", ["b", "c", "d", "e"]))
    # The first batch's submitter may wake while the second batch commits.
    second = [event for event in backend.log[start + 1 :] if event != ("woken", "a")]
    # persist → publish (new messages only, in id order) → confirm
    assert second[:3] == [("publish", 2), ("publish", 3), ("publish", 4)]
    assert sorted(second[3:]) == [("woken", c) for c in "bcde"]
    assert [m.id for m in backend.published] == [1, 2, 3, 4]
    woken_a = backend.log.index(("woken", "a"))
    assert backend.log.index(("publish", 1)) < woken_a


async def test_a_failed_save_fails_its_whole_batch_and_the_next_batch_works() -> None:
    backend = FakeBackend()
    gate = backend.hold(0)
    failure = OSError("disk full")
    backend.failures[1] = failure
    async with running(backend) as (sequencer, tg):
        first = await spawn(tg, sequencer, backend, draft("a"))
        doomed = await spawn(tg, sequencer, backend, draft("b"), draft("c"), draft("d"))
        gate.set()
        await finished(*first, *doomed)
        assert first[0].result is not None and first[0].error is None
        for submitter in doomed:
            assert isinstance(submitter.error, BackendError), submitter.error
            assert submitter.error.__cause__ is failure
            assert submitter.result is None
        message, created = await sequencer.submit(draft("after"))
    assert created and message.content == "after"
    assert contents(backend.batches) == [["a"], ["b", "c", "d"], ["after"]]
    assert [m.content for m in backend.published] == ["a", "after"], "a failed batch went out"


# -- bounded batch --------------------------------------------------------------------------


async def test_max_batch_bounds_the_open_batch() -> None:
    backend = FakeBackend()
    gate0, gate1 = backend.hold(0), backend.hold(1)
    async with running(backend, max_batch=2) as (sequencer, tg):
        first = await spawn(tg, sequencer, backend, draft("a"))
        full = await spawn(tg, sequencer, backend, draft("b"), draft("c"))
        extra = await spawn(tg, sequencer, backend, draft("d"))
        assert sequencer._open.drafts == [draft("b"), draft("c")], "d joined a full batch"
        gate0.set()
        # The writer takes [b, c] (held in save): d now has room in the next batch …
        with anyio.fail_after(5):
            await backend.started(1).wait()
        await anyio.wait_all_tasks_blocked()
        assert sequencer._open.drafts == [draft("d")]
        # … and one more submit joins d there, not a batch of its own.
        late = await spawn(tg, sequencer, backend, draft("e"))
        gate1.set()
        await finished(*first, *full, *extra, *late)
    assert contents(backend.batches) == [["a"], ["b", "c"], ["d", "e"]]
    assert all(s.error is None for s in [*first, *full, *extra, *late])
    assert [m.content for m in backend.published] == ["a", "b", "c", "d", "e"]


async def test_many_waiters_for_room_are_served_in_batches_of_at_most_max_batch() -> None:
    backend = FakeBackend()
    gate = backend.hold(0)
    async with running(backend, max_batch=3) as (sequencer, tg):
        first = await spawn(tg, sequencer, backend, draft("x"))
        rest = await spawn(tg, sequencer, backend, *(draft(str(i)) for i in range(10)))
        gate.set()
        await finished(*first, *rest)
    sizes = [len(batch) for batch in backend.batches]
    assert sizes[0] == 1 and all(size <= 3 for size in sizes) and sum(sizes) == 11
    assert sorted(s.result[0].id for s in [*first, *rest] if s.result) == list(range(1, 12))


# -- shutdown and cancellation ----------------------------------------------------------------


async def test_aclose_commits_what_was_submitted_then_refuses() -> None:
    backend = FakeBackend()
    gate = backend.hold(0)
    sequencer = Sequencer(backend.save, backend.publish, max_batch=1000)
    run_returned = anyio.Event()

    async def run() -> None:
        await sequencer.run()
        run_returned.set()

    closed = anyio.Event()

    async def close() -> None:
        await sequencer.aclose()
        closed.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.wait_all_tasks_blocked()
            submitted = await spawn(tg, sequencer, backend, draft("a"), draft("b"), draft("c"))
            tg.start_soon(close)
            await anyio.wait_all_tasks_blocked()
            assert not closed.is_set(), "aclose returned before the batch was stored"
            with pytest.raises(BackendError):
                await sequencer.submit(draft("too late"))
            gate.set()
            await closed.wait()
            assert run_returned.is_set(), "aclose returned before run did"
            await finished(*submitted)
    assert [s.result[0].content for s in submitted if s.result] == ["a", "b", "c"]
    assert contents(backend.batches) == [["a"], ["b", "c"]]
    assert [m.content for m in backend.published] == ["a", "b", "c"]
    with pytest.raises(BackendError):
        await sequencer.submit(draft("after close"))
    assert len(backend.batches) == 2


async def test_aclose_of_an_idle_writer_returns_at_once() -> None:
    backend = FakeBackend()
    async with running(backend) as (sequencer, _):
        await sequencer.submit(draft("a"))
    with pytest.raises(BackendError):
        await sequencer.submit(draft("b"))
    assert contents(backend.batches) == [["a"]]


async def test_cancelling_the_writer_fails_waiting_submits() -> None:
    backend = FakeBackend()
    backend.hold(0)  # never released: the commit is in flight when the writer dies
    sequencer = Sequencer(backend.save, backend.publish, max_batch=2)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            writer = anyio.CancelScope()

            async def run() -> None:
                with writer:
                    await sequencer.run()

            tg.start_soon(run)
            await anyio.wait_all_tasks_blocked()
            in_flight = await spawn(tg, sequencer, backend, draft("a"))
            queued = await spawn(tg, sequencer, backend, draft("b"), draft("c"))
            waiting_for_room = await spawn(tg, sequencer, backend, draft("d"))
            writer.cancel()
            await finished(*in_flight, *queued, *waiting_for_room)
    for submitter in [*in_flight, *queued, *waiting_for_room]:
        assert isinstance(submitter.error, BackendError), (submitter.draft, submitter.error)
    assert backend.published == []
    with pytest.raises(BackendError):
        await sequencer.submit(draft("after"))


async def test_cancelling_an_idle_writer_refuses_later_submits() -> None:
    backend = FakeBackend()
    sequencer = Sequencer(backend.save, backend.publish, max_batch=10)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(sequencer.run)
            tg.cancel_scope.cancel()
        with pytest.raises(BackendError):
            await sequencer.submit(draft("a"))
    assert backend.batches == []


# -- through the hub: a resend in the same batch as its original ------------------------------


class HeldStore:
    """Wraps a store; its first ``save_many`` waits for ``gate`` so later sends pile up."""

    def __init__(self, inner: MessageStore) -> None:
        self.inner = inner
        self.gate = anyio.Event()
        self.batches: list[list[Draft]] = []

    async def save_many(self, drafts: Sequence[Draft]) -> list[Saved]:
        self.batches.append(list(drafts))
        if len(self.batches) == 1:
            await self.gate.wait()
        return await self.inner.save_many(drafts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> MessageStore:
    if request.param == "memory":
        return MemoryStore()
    return SQLiteStore(tmp_path / "chat.db")


async def test_a_resend_in_the_same_batch_as_its_original_is_one_row(
    store: MessageStore, tmp_path: Path
) -> None:
    held = HeldStore(store)
    results: dict[str, tuple[Message, bool]] = {}

    async with (
        Hub(held, StaticPolicy({1, 2})) as hub,  # type: ignore[arg-type]
        hub.connect(Identity(2)) as bob,
    ):
        while bob._queue:
            await bob.next_frame()

        async def send(name: str, content: str, client_id: str | None) -> None:
            results[name] = await hub.send_message(1, 2, content, client_id)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send, "blocker", "first", None)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(send, "original", "hello", "k1")
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(send, "resend", "hello again", "k1")
                await anyio.wait_all_tasks_blocked()
                held.gate.set()
        assert [[d.content for d in b] for b in held.batches] == [
            ["first"],
            ["hello", "hello again"],
        ], "the resend did not share its original's batch"

        original, created = results["original"]
        resend, resend_created = results["resend"]
        assert created and not resend_created
        assert resend == original and resend.content == "hello"
        # Bob got each new message once; the resend was not fanned out.
        live = []
        while bob._queue:
            outgoing = await bob.next_frame()
            assert outgoing is not None
            live.append(outgoing.message_id)
        assert live == [results["blocker"][0].id, original.id]
        stored = await held.since(1, 0, 100)
        assert [(m.content, m.client_id) for m in stored] == [("first", None), ("hello", "k1")]
        assert await held.find(1, "k1") == original

    if isinstance(store, SQLiteStore):  # one row on disk, too
        with sqlite3.connect(store.path) as conn:
            rows = conn.execute("SELECT content FROM messages WHERE client_id = 'k1'").fetchall()
        conn.close()
        assert rows == [("hello",)]


# -- known issue --------------------------------------------------------------------------------


async def test_a_publish_failure_does_not_report_stored_messages_as_not_stored() -> None:
    backend = FakeBackend()
    gate = backend.hold(0)
    published: list[int] = []

    async def flaky_publish(message: Message) -> None:
        if message.content == "c":
            raise OSError("broker connection reset")
        published.append(message.id)

    sequencer = Sequencer(backend.save, flaky_publish, max_batch=1000)
    async with anyio.create_task_group() as tg:
        await tg.start(sequencer.run)
        first = await spawn(tg, sequencer, backend, draft("a"))
        rest = await spawn(tg, sequencer, backend, draft("b"), draft("c"), draft("d"))
        gate.set()
        await finished(*first, *rest)
        with anyio.fail_after(5):
            await sequencer.aclose()
    stored = {d.content for batch in backend.batches for d in batch}
    assert stored == {"a", "b", "c", "d"}  # save_many succeeded for every batch
    # Sequencer.submit's contract: BackendError means "none of the batch was stored".
    for submitter in rest:
        assert submitter.error is None, (submitter.draft.content, submitter.error)
    # and the messages after the one whose fan-out failed still go out
    assert 4 in published, published
