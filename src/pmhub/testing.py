"""Conformance checks that every backend runs, and that yours can run too.

::

    async def test_my_store():
        await check_store(MyStore(...))   # a fresh, empty store

Each check raises ``AssertionError`` naming the rule a backend broke.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from .auth import RevocationStore
from .broker import Broker, Deliver, Deliverer, Event, Presence, Revoke
from .frames import Message
from .store import Draft, MessageStore

__all__ = ["check_broker", "check_revocations", "check_store"]


Reopen = Callable[[], Awaitable[RevocationStore]]


def _check(condition: bool, rule: str) -> None:
    if not condition:
        raise AssertionError(f"store or broker breaks the rule: {rule}")


async def check_store(store: MessageStore) -> None:
    """Check the rules of :class:`~pmhub.store.MessageStore` on a fresh, empty store."""
    await store.ping()
    alice, bob, carol = 1_000_001, 1_000_002, 1_000_003

    async def save(draft: Draft) -> tuple[Message, bool]:
        [result] = await store.save_many([draft])
        return result

    content = 'Hello <b>bob</b> \u00e9\u4e2d\U0001f600 \\ " \x00 \u2028'
    first, created = await save(Draft(alice, bob, content, "c-1"))
    _check(created, "saving a new message returns created=True")
    _check(first.content == content, "content is stored byte-exact")
    _check((first.sender_id, first.receiver_id) == (alice, bob), "sender and receiver are kept")
    _check(
        not first.is_read and first.client_id == "c-1", "a new message is unread, keeps client_id"
    )
    _check(first.created_at.tzinfo is not None, "created_at is timezone-aware (UTC)")

    again, created = await save(Draft(alice, bob, "different", "c-1"))
    _check(not created and again == first, "a resend of (sender, client_id) returns the first")
    _check(await store.find(alice, "c-1") == first, "find() returns the stored message")
    _check(await store.find(bob, "c-1") is None, "client_id is scoped to the sender")
    other, created = await save(Draft(bob, alice, "same key, other sender", "c-1"))
    _check(created, "the same client_id from another sender is a new message")

    ids = [first.id, other.id]
    for n in range(5):
        message, _ = await save(Draft(alice if n % 2 else bob, bob if n % 2 else alice, f"m{n}"))
        ids.append(message.id)
    noise, _ = await save(Draft(carol, bob, "not for alice"))
    _check(ids == sorted(ids) and len(set(ids)) == len(ids), "ids strictly increase")
    _check(noise.id > ids[-1], "ids strictly increase across conversations")

    everything = await store.since(alice, 0, 100)
    _check([m.id for m in everything] == ids, "since() returns the user's messages in id order")
    _check([m.id for m in await store.since(alice, ids[2], 2)] == ids[3:5], "since() pages")
    _check(len(await store.since(bob, 0, 100)) == len(ids) + 1, "since() includes received")

    page = await store.history(alice, bob, None, 3)
    _check([m.id for m in page] == ids[-3:], "history() returns the newest, oldest first")
    older = await store.history(alice, bob, page[0].id, 100)
    _check([m.id for m in older] == ids[:-3], "history(before_id) returns the older ones")
    _check(await store.history(alice, carol, None, 10) == [], "history() is per conversation")

    from_bob = [m.id for m in everything if m.sender_id == bob]
    receipt = await store.mark_read(alice, bob, from_bob[1])
    _check(receipt.updated == 2 and receipt.up_to_id == from_bob[1], "mark_read() up to an id")
    receipt = await store.mark_read(alice, bob, from_bob[1])
    _check(receipt.updated == 0 and receipt.up_to_id is None, "mark_read() is idempotent")
    _check((await store.mark_read(bob, carol, 10**12)).updated == 1, "mark_read() per peer")
    read = {m.id for m in await store.since(alice, 0, 100) if m.is_read}
    _check(read == set(from_bob[:2]), "only the peer's messages up to the id are read")

    rows = await store.conversations(bob)
    _check([r.peer_id for r in rows] == [carol, alice], "conversations(), most recent first")
    _check(rows[1].last_message.id == ids[-1], "a conversation shows its last message")
    alice_rows = await store.conversations(alice)
    unread = len(from_bob) - 2
    _check(
        [(r.peer_id, r.unread_count) for r in alice_rows] == [(bob, unread)],
        "conversations() counts unread messages received from the peer",
    )
    _check(await store.conversations(1_000_009) == [], "no conversations for a new user")
    await _check_batches(store)


async def _check_batches(store: MessageStore) -> None:
    """Batches: one transaction each, in order, resends and duplicates within them."""
    dave, erin = 1_000_011, 1_000_012
    [(before, _)] = await store.save_many([Draft(dave, erin, "before", "b-0")])
    batch = [
        Draft(dave, erin, "new 1", "b-1"),
        Draft(dave, erin, "resend of an older one", "b-0"),
        Draft(erin, dave, "new 2, no key"),
        Draft(dave, erin, "duplicate within the batch", "b-1"),
        Draft(dave, erin, "new 3", "b-3"),
    ]
    results = await store.save_many(batch)
    _check(len(results) == len(batch), "save_many() answers every draft, in order")
    created = [message for message, new in results if new]
    _check([r[1] for r in results] == [True, False, True, False, True], "a batch finds resends")
    _check(results[1][0] == before, "a resend in a batch returns the earlier message")
    _check(results[3][0] == results[0][0], "a duplicate within a batch returns its first copy")
    _check(
        [m.content for m in created] == ["new 1", "new 2, no key", "new 3"]
        and [m.id for m in [before, *created]] == sorted({m.id for m in [before, *created]}),
        "a batch's new messages get increasing ids, in draft order",
    )
    _check(await store.save_many([]) == [], "an empty batch stores nothing")

    stored = await store.since(dave, 0, 100)
    poisoned = [Draft(dave, erin, "lost 1", "p-1"), Draft(2**63, erin, "too big an id")]
    try:
        await store.save_many([*poisoned, Draft(dave, erin, "lost 2", "p-2")])
    except Exception:
        pass
    else:
        _check(False, "save_many() raises for a user id outside 64 bits")
    _check(await store.since(dave, 0, 100) == stored, "a failed batch stores none of its drafts")
    _check(await store.find(dave, "p-1") is None, "a failed batch keeps no client_id")

    # Concurrent writers: ids are unique and grow in commit order across batches.
    writers, per_writer, size = 8, 5, 4
    committed: list[list[int]] = []

    async def writer(sender: int) -> None:
        for n in range(per_writer):
            drafts = [Draft(sender, erin, f"{sender}/{n}/{k}", f"w-{n}-{k}") for k in range(size)]
            results = await store.save_many(drafts)
            _check(all(new for _, new in results), "concurrent batches create their messages")
            committed.append([message.id for message, _ in results])

    async with anyio.create_task_group() as tg:
        for sender in range(2_000_001, 2_000_001 + writers):
            tg.start_soon(writer, sender)
    committed.sort()
    ids = [i for batch_ids in committed for i in batch_ids]
    _check(len(set(ids)) == writers * per_writer * size, "concurrent saves get unique ids")
    _check(ids == sorted(ids), "each batch gets increasing ids that no other batch interleaves")
    received = await store.since(erin, created[-1].id, 1000)
    _check([m.id for m in received] == ids, "since() sees every concurrent save once, in order")
    _check(
        all(m.content.startswith(f"{m.sender_id}/") for m in received),
        "each id holds the content saved under it",
    )


async def check_revocations(store: RevocationStore, *, reopen: Reopen | None = None) -> None:
    """Check the rules of :class:`~pmhub.auth.RevocationStore` on a fresh store.

    With ``reopen`` (an async callable returning the same store opened anew,
    for a durable store), also check that revocations survive it.
    """
    now = 1_000_000.0

    async def since(cursor: int) -> tuple[dict[str, float], int]:
        new, after = await store.revocations_since(cursor)
        _check(after >= cursor, "the cursor never goes back")
        _check(len({sid for sid, _ in new}) == len(new), "each revocation is read once")
        return dict(new), after

    _check(await since(0) == ({}, 0), "a fresh store has no revocations, cursor 0")
    await store.revoke_session("s-1", now + 60, now)
    await store.revoke_session("s-2", now + 10, now)
    everything, first = await since(0)
    _check(everything == {"s-1": now + 60, "s-2": now + 10}, "revocations are read back")
    await store.revoke_session("s-1", now + 99, now)  # twice keeps the first
    _check(await since(first) == ({}, first), "revoking a session again adds nothing")
    await store.revoke_session("s-3", now + 60, now + 30)  # s-2 has expired by now
    new, second = await since(first)
    _check(new == {"s-3": now + 60}, "a later read gets only what was revoked since")
    everything, _ = await since(0)
    _check(everything == {"s-1": now + 60, "s-3": now + 60}, "expired revocations are pruned")
    if reopen is not None:
        store = await reopen()
        _check(await since(0) == (everything, second), "revocations survive reopening the store")


async def check_broker(first: Broker, second: Broker) -> None:
    """Check a broker: ``first`` and ``second`` are two handles on the same bus
    (two nodes). For an in-process broker pass the same instance twice."""
    await first.ping()
    got: list[list[Event]] = [[], []]
    arrived = anyio.Event()

    def collector(index: int) -> Deliverer:
        async def deliver(event: Event) -> None:
            got[index].append(event)
            if all(len(events) >= 3 for events in got):
                arrived.set()

        return deliver

    async with anyio.create_task_group() as tg:
        await tg.start(first.run, collector(0))
        await tg.start(second.run, collector(1))
        events: list[Event] = [
            Deliver([1, 2], b'{"type":"system","message":"x"}', 7, "node-1"),
            Revoke("session-1"),
            Presence(1, [3, 4]),
        ]
        for event in events:
            await first.publish(event)
        with anyio.fail_after(5):
            await arrived.wait()
        _check(got[0] == events and got[1] == events, "every node gets every event, in order")

        user, other = 1_000_321, 1_000_322
        _check(await first.join(user) == 1, "the first connection anywhere is counted 1")
        _check(await second.join(user) == 2, "connections are counted across nodes")
        _check(user in await first.online() and user in await second.online(), "online()")
        _check(await second.online([other, user]) == {user}, "online(user_ids) filters them")
        _check(await first.leave(user) == 1, "closing one of two leaves one")
        _check(await second.leave(user) == 0, "closing the last connection leaves none")
        _check(user not in await first.online(), "a user with no connection is offline")
        _check(await first.online([user]) == set(), "online(user_ids) forgets who left")
        tg.cancel_scope.cancel()
