"""Conformance checks that every backend runs, and that yours can run too.

::

    async def test_my_store():
        await check_store(MyStore(...))   # a fresh, empty store

Each check raises ``AssertionError`` naming the rule a backend broke.
"""

from __future__ import annotations

import anyio

from .broker import Broker, Deliver, Deliverer, Event, Presence, Revoke
from .store import Draft, MessageStore

__all__ = ["check_broker", "check_store"]


def _check(condition: bool, rule: str) -> None:
    if not condition:
        raise AssertionError(f"store or broker breaks the rule: {rule}")


async def check_store(store: MessageStore) -> None:
    """Check the rules of :class:`~pmhub.store.MessageStore` on a fresh, empty store."""
    await store.ping()
    alice, bob, carol = 1_000_001, 1_000_002, 1_000_003
    content = 'Hello <b>bob</b> \u00e9\u4e2d\U0001f600 \\ " \x00 \u2028'
    first, created = await store.save(Draft(alice, bob, content, "c-1"))
    _check(created, "saving a new message returns created=True")
    _check(first.content == content, "content is stored byte-exact")
    _check((first.sender_id, first.receiver_id) == (alice, bob), "sender and receiver are kept")
    _check(
        not first.is_read and first.client_id == "c-1", "a new message is unread, keeps client_id"
    )
    _check(first.created_at.tzinfo is not None, "created_at is timezone-aware (UTC)")

    again, created = await store.save(Draft(alice, bob, "different", "c-1"))
    _check(not created and again == first, "a resend of (sender, client_id) returns the first")
    _check(await store.find(alice, "c-1") == first, "find() returns the stored message")
    _check(await store.find(bob, "c-1") is None, "client_id is scoped to the sender")
    other, created = await store.save(Draft(bob, alice, "same key, other sender", "c-1"))
    _check(created, "the same client_id from another sender is a new message")

    ids = [first.id, other.id]
    for n in range(5):
        message, _ = await store.save(
            Draft(alice if n % 2 else bob, bob if n % 2 else alice, f"m{n}")
        )
        ids.append(message.id)
    noise, _ = await store.save(Draft(carol, bob, "not for alice"))
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
            Presence(1, b'{"type":"user_online_status","user_id":1,"is_online":true}'),
            Revoke("session-1"),
        ]
        for event in events:
            await first.publish(event)
        with anyio.fail_after(5):
            await arrived.wait()
        _check(got[0] == events and got[1] == events, "every node gets every event, in order")

        user = 1_000_321
        _check(await first.join(user), "the first connection anywhere is reported first")
        _check(not await second.join(user), "a second connection is not the first")
        _check(user in await first.online() and user in await second.online(), "online()")
        _check(not await first.leave(user), "closing one of two is not the last")
        _check(await second.leave(user), "closing the last connection is reported last")
        _check(user not in await first.online(), "a user with no connection is offline")
        tg.cancel_scope.cancel()
