"""The hub, driven without sockets: frames in with ``receive``, frames out of each queue.

A send returns once its draft is queued for the writer; after :func:`committed`
every client's queue holds exactly what it was sent (fan-out through the
in-process broker is immediate).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import Any

import anyio
import pytest
from queues import drain

from pmhub import BackendError, Hub, Identity, Limits, MemoryStore, Rejected, StaticPolicy
from pmhub.api import Health
from pmhub.connection import Connection
from pmhub.store import Draft, ReadReceipt

pytestmark = pytest.mark.anyio

Frame = dict[str, Any]
ALICE, BOB, CAROL, MALLORY = 1, 2, 3, 4


def demo_policy() -> StaticPolicy:
    """The demo's rules: mallory (4) converses only with carol (3)."""
    return StaticPolicy({ALICE, BOB, CAROL, MALLORY}, only={MALLORY: {CAROL}})


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def running_hub(store: MemoryStore | None = None, **options: Any) -> AsyncIterator[Hub]:
    async with Hub(store if store is not None else MemoryStore(), demo_policy(), **options) as hub:
        yield hub


async def drain_all(*clients: Connection) -> None:
    for client in clients:
        await drain(client)


async def next_frame(client: Connection) -> Frame:
    """Wait for the next frame ``client`` is sent."""
    with anyio.fail_after(5):
        outgoing = await client.next_frame()
    assert outgoing is not None, f"closed with {client.close_code}"
    return json.loads(outgoing.data)  # type: ignore[no-any-return]


async def send(
    hub: Hub, client: Connection, recipient: int, content: str, client_id: str | None = None
) -> None:
    frame: Frame = {"type": "private_message", "recipient_id": recipient, "content": content}
    if client_id is not None:
        frame["client_id"] = client_id
    await hub.receive(client, json.dumps(frame))
    await committed()


async def committed() -> None:
    """Wait until the hub's writer has committed and fanned out what was sent
    (a WebSocket send returns once queued, not once stored)."""
    await anyio.wait_all_tasks_blocked()


async def send_ok(hub: Hub, client: Connection, recipient: int, content: str) -> int:
    """Send a message that must be accepted; return its id (drains the sender's queue)."""
    await drain(client)
    await send(hub, client, recipient, content)
    frames = await drain(client)
    assert [f["type"] for f in frames] == ["private_message"], frames
    return int(frames[0]["message"]["id"])


def online(user_id: int, is_online: bool = True) -> Frame:
    return {"type": "user_online_status", "user_id": user_id, "is_online": is_online}


def typing(user_id: int, recipient_id: int, is_typing: bool) -> Frame:
    return {
        "type": "typing_indicator",
        "user_id": user_id,
        "recipient_id": recipient_id,
        "is_typing": is_typing,
    }


# -- connecting and presence -------------------------------------------------------------------


async def test_welcome_then_presence_snapshot_of_contacts() -> None:
    async with (
        running_hub(welcome="hello there") as hub,
        hub.connect(Identity(BOB)) as bob,
        hub.connect(Identity(ALICE)) as alice,
    ):
        assert await drain(alice) == [{"type": "system", "message": "hello there"}, online(BOB)]
        async with hub.connect(Identity(CAROL)) as carol:
            assert await drain(carol) == [
                {"type": "system", "message": "hello there"},
                online(ALICE),
                online(BOB),
            ]
            async with hub.connect(Identity(MALLORY)) as mallory:
                # Only carol is mallory's contact.
                assert await drain(mallory) == [
                    {"type": "system", "message": "hello there"},
                    online(CAROL),
                ]
                assert await drain(carol) == [online(MALLORY)]
                assert await drain(alice) == [online(CAROL)]
                assert await drain(bob) == [
                    {"type": "system", "message": "hello there"},
                    online(ALICE),
                    online(CAROL),
                ]


async def test_presence_changes_only_on_first_open_and_last_close() -> None:
    async with running_hub() as hub, hub.connect(Identity(BOB)) as bob:
        await drain(bob)
        async with hub.connect(Identity(ALICE)) as phone:
            assert await drain(bob) == [online(ALICE)]
            welcome = {"type": "system", "message": "Welcome to the chat!"}
            assert await drain(phone) == [welcome, online(BOB)]
            async with hub.connect(Identity(ALICE)) as laptop:
                assert await drain(bob) == []
                assert await drain(laptop) == [welcome, online(BOB)]
                assert await drain(phone) == []  # no echo of her own second device
            assert await drain(bob) == []
            assert await drain(phone) == []
        assert await drain(bob) == [online(ALICE, False)]
        async with hub.connect(Identity(ALICE)):
            assert await drain(bob) == [online(ALICE)]
        assert await drain(bob) == [online(ALICE, False)]


async def test_presence_never_leaks_to_strangers() -> None:
    async with (
        running_hub() as hub,
        hub.connect(Identity(ALICE)) as alice,
        hub.connect(Identity(CAROL)) as carol,
    ):
        await drain_all(alice, carol)
        async with hub.connect(Identity(MALLORY)) as mallory:
            assert await drain(carol) == [online(MALLORY)]
            assert await drain(alice) == []
            assert await drain(mallory) == [
                {"type": "system", "message": "Welcome to the chat!"},
                online(CAROL),
            ]
            async with hub.connect(Identity(BOB)):
                assert await drain(mallory) == []
        assert await drain(carol) == [online(BOB), online(BOB, False), online(MALLORY, False)]
        assert await drain(alice) == [online(BOB), online(BOB, False)]


async def test_clients_lists_the_open_connections_of_a_user() -> None:
    async with running_hub() as hub:
        async with hub.connect(Identity(ALICE)) as phone, hub.connect(Identity(ALICE)) as laptop:
            assert {c.id for c in hub.connections(ALICE)} == {phone.id, laptop.id}
            assert hub.connections(BOB) == []
            assert await hub.health() == Health(connections=2, users_online=1)
        assert hub.connections(ALICE) == []


async def test_connect_needs_a_running_hub() -> None:
    hub = Hub(MemoryStore(), demo_policy())
    with pytest.raises(RuntimeError, match="not running"):
        async with hub.connect(Identity(ALICE)):
            pass
    async with hub:
        with pytest.raises(RuntimeError, match="already running"):
            await hub.__aenter__()
    assert not hub.running
    with pytest.raises(RuntimeError, match="not running"):
        await hub.send_message(ALICE, BOB, "hi")


# -- private messages --------------------------------------------------------------------------


async def test_message_goes_to_every_connection_of_both_users() -> None:
    store = MemoryStore()
    async with running_hub(store) as hub, AsyncExitStack() as stack:
        alice1, alice2, bob1, bob2, carol = [
            await stack.enter_async_context(hub.connect(Identity(user)))
            for user in (ALICE, ALICE, BOB, BOB, CAROL)
        ]
        await drain_all(alice1, alice2, bob1, bob2, carol)

        await send(hub, alice1, BOB, "Hello <b>bob</b> \u2028\U0001f600", "c-1f3a")

        stored = await store.since(ALICE, 0, 10)
        assert len(stored) == 1
        outgoing = [await client.next_frame() for client in (alice1, alice2, bob1, bob2)]
        assert all(o is not None and o.data is outgoing[0].data for o in outgoing)  # type: ignore[union-attr]
        frame = json.loads(outgoing[0].data)  # type: ignore[union-attr]
        message = frame.pop("message")
        assert frame == {"type": "private_message", "sender_id": ALICE, "recipient_id": BOB}
        created_at = datetime.fromisoformat(message.pop("created_at").replace("Z", "+00:00"))
        assert created_at.tzinfo is not None
        assert message == {
            "id": stored[0].id,
            "content": "Hello <b>bob</b> \u2028\U0001f600",
            "sender_id": ALICE,
            "receiver_id": BOB,
            "is_read": False,
            "client_id": "c-1f3a",
        }
        assert await drain(carol) == []
        for client in (alice1, alice2, bob1, bob2):
            assert await drain(client) == []


async def test_message_ids_increase_and_arrive_in_order() -> None:
    async with (
        running_hub() as hub,
        hub.connect(Identity(ALICE)) as alice,
        hub.connect(Identity(BOB)) as bob,
    ):
        await drain_all(alice, bob)
        for n in range(5):
            await send(hub, alice if n % 2 else bob, BOB if n % 2 else ALICE, f"m{n}")
        ids = [f["message"]["id"] for f in await drain(bob)]
        assert ids == sorted(ids) and len(set(ids)) == 5
        assert [f["message"]["id"] for f in await drain(alice)] == ids


async def test_idempotent_resend_returns_the_stored_message_to_the_sender_only() -> None:
    store = MemoryStore()
    async with running_hub(store) as hub, AsyncExitStack() as stack:
        phone, laptop, bob = [
            await stack.enter_async_context(hub.connect(Identity(user)))
            for user in (ALICE, ALICE, BOB)
        ]
        await drain_all(phone, laptop, bob)
        await send(hub, phone, BOB, "first", "c-1")
        original = (await drain(phone))[0]
        await drain_all(laptop, bob)

        await send(hub, phone, BOB, "changed my mind", "c-1")
        assert await drain(phone) == [original]  # first write wins, original id
        assert await drain(laptop) == []
        assert await drain(bob) == []

        await send(hub, laptop, BOB, "from the other device", "c-1")
        assert await drain(laptop) == [original]
        assert await drain(phone) == []
        assert await drain(bob) == []
        assert [m.content for m in await store.since(ALICE, 0, 10)] == ["first"]

        # The key is the sender's: bob may use the same client_id.
        await send(hub, bob, ALICE, "bob's own", "c-1")
        assert (await drain(bob))[0]["message"]["content"] == "bob's own"


async def test_a_resend_counts_against_the_rate_once() -> None:
    clock = FakeClock()
    async with (
        running_hub(clock=clock) as hub,
        hub.connect(Identity(ALICE)) as alice,
        hub.connect(Identity(BOB)) as bob,
    ):
        await drain_all(alice, bob)
        await send(hub, alice, BOB, "once", "c-0")
        original = await drain(alice)
        for _ in range(9):
            await send(hub, alice, BOB, "once", "c-0")
            assert await drain(alice) == original
        for n in range(1, 11):  # the rest of the burst of 20
            await send(hub, alice, BOB, f"m{n}", f"c-{n}")
            assert (await drain(alice))[0]["type"] == "private_message"
        # The bucket is empty now: a resend is limited like any request.
        await send(hub, alice, BOB, "once", "c-0")
        [error] = await drain(alice)
        assert (error["code"], error["client_id"]) == ("rate_limited", "c-0")
        clock.now += 0.1  # one token back
        await send(hub, alice, BOB, "once", "c-0")
        assert await drain(alice) == original
        assert len(await drain(bob)) == 11


@pytest.mark.parametrize(
    ("sender", "recipient"),
    [(MALLORY, ALICE), (ALICE, MALLORY), (BOB, MALLORY), (ALICE, ALICE), (ALICE, 99)],
)
async def test_forbidden_message_is_answered_and_not_stored(sender: int, recipient: int) -> None:
    store = MemoryStore()
    async with running_hub(store) as hub, AsyncExitStack() as stack:
        client, *others = [
            await stack.enter_async_context(hub.connect(Identity(user)))
            for user in (sender, ALICE, MALLORY)
        ]
        await drain_all(client, *others)
        await send(hub, client, recipient, "hi", "c-9")
        [error] = await drain(client)
        assert error["type"] == "error"
        assert error["code"] == "forbidden"
        assert error["client_id"] == "c-9"
        assert "retry_after" not in error
        assert [await drain(other) for other in others] == [[]] * len(others)
        assert await store.since(sender, 0, 10) == []
        assert not client.closing


@pytest.mark.parametrize("content", ["", " ", " \n\t\u3000 ", "x" * 4001, "\U0001f600" * 4001])
async def test_too_long_content_is_refused(content: str) -> None:
    store = MemoryStore()
    async with (
        running_hub(store) as hub,
        hub.connect(Identity(ALICE)) as alice,
        hub.connect(Identity(BOB)) as bob,
    ):
        await drain_all(alice, bob)
        await send(hub, alice, BOB, content)
        [error] = await drain(alice)
        assert (error["type"], error["code"]) == ("error", "too_long")
        assert "client_id" not in error
        assert await drain(bob) == []
        assert await store.since(ALICE, 0, 10) == []


async def test_4000_characters_are_accepted() -> None:
    async with (
        running_hub() as hub,
        hub.connect(Identity(ALICE)) as alice,
        hub.connect(Identity(BOB)) as bob,
    ):
        await drain_all(alice, bob)
        content = " \U0001f600" * 2000  # 4000 characters, 10000 bytes
        await send(hub, alice, BOB, content)
        assert (await drain(bob))[0]["message"]["content"] == content


async def test_rate_limited_after_a_burst_of_20_with_retry_after() -> None:
    clock = FakeClock()
    async with (
        running_hub(clock=clock) as hub,
        hub.connect(Identity(ALICE)) as alice,
        hub.connect(Identity(BOB)) as bob,
    ):
        await drain_all(alice, bob)
        for n in range(20):
            await send_ok(hub, alice, BOB, f"m{n}")
        await send(hub, alice, BOB, "m20", "c-20")
        [error] = await drain(alice)
        assert error["code"] == "rate_limited"
        assert error["client_id"] == "c-20"
        assert error["retry_after"] == pytest.approx(0.1)  # 1 token at 10/s
        assert len(await drain(bob)) == 20

        clock.now += 0.05
        await send(hub, alice, BOB, "m20", "c-20")
        # Rounded up to the millisecond, so that a client never retries too early.
        assert (await drain(alice))[0]["retry_after"] == pytest.approx(0.05, abs=0.0015)
        clock.now += 0.06
        await send_ok(hub, alice, BOB, "m20")
        # The limit is per user: bob still has his whole burst.
        await send_ok(hub, bob, ALICE, "bob")


async def test_rate_limited_answers_do_not_close_the_connection() -> None:
    clock = FakeClock()
    async with (
        running_hub(clock=clock) as hub,
        hub.connect(Identity(ALICE)) as alice,
        hub.connect(Identity(BOB)) as bob,
    ):
        for n in range(80):
            await send(hub, alice, BOB, f"m{n}")
            await drain_all(alice, bob)
        assert not alice.closing
        await send(hub, alice, BOB, "still rate limited")
        assert (await drain(alice))[0]["code"] == "rate_limited"


# -- typing --------------------------------------------------------------------------------------


async def test_typing_is_relayed_with_the_server_stamped_user_id() -> None:
    async with running_hub() as hub, AsyncExitStack() as stack:
        alice, bob1, bob2, carol = [
            await stack.enter_async_context(hub.connect(Identity(user)))
            for user in (ALICE, BOB, BOB, CAROL)
        ]
        await drain_all(alice, bob1, bob2, carol)
        await hub.receive(
            alice,
            '{"type":"typing_indicator","recipient_id":2,"is_typing":true,"user_id":3}',
        )
        assert await drain(bob1) == [typing(ALICE, BOB, True)]
        assert await drain(bob2) == [typing(ALICE, BOB, True)]
        assert await drain(alice) == []
        assert await drain(carol) == []
        await hub.receive(alice, '{"type":"typing_indicator","recipient_id":2,"is_typing":false}')
        assert await drain(bob1) == [typing(ALICE, BOB, False)]


@pytest.mark.parametrize(
    ("sender", "recipient"), [(MALLORY, ALICE), (ALICE, MALLORY), (ALICE, ALICE)]
)
async def test_forbidden_typing_is_dropped_silently(sender: int, recipient: int) -> None:
    async with running_hub() as hub, AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(hub.connect(Identity(user)))
            for user in (sender, ALICE, MALLORY)
        ]
        await drain_all(*clients)
        frame = {"type": "typing_indicator", "recipient_id": recipient, "is_typing": True}
        await hub.receive(clients[0], json.dumps(frame))
        assert [await drain(client) for client in clients] == [[], [], []]
        assert not clients[0].closing


async def test_typing_over_its_rate_is_dropped_silently() -> None:
    clock = FakeClock()
    async with (
        running_hub(clock=clock) as hub,
        hub.connect(Identity(ALICE)) as alice,
        hub.connect(Identity(BOB)) as bob,
    ):
        await drain_all(alice, bob)
        frame = '{"type":"typing_indicator","recipient_id":2,"is_typing":true}'
        for _ in range(8):
            await hub.receive(alice, frame)
        assert len(await drain(bob)) == 5  # typing burst
        assert await drain(alice) == []
        clock.now += 0.2  # one token at 5/s
        await hub.receive(alice, frame)
        assert await drain(bob) == [typing(ALICE, BOB, True)]


async def test_typing_turns_off_after_the_timeout() -> None:
    async with (
        running_hub(limits=Limits(typing_timeout=0.05)) as hub,
        hub.connect(Identity(ALICE)) as alice,
        hub.connect(Identity(BOB)) as bob,
    ):
        await drain_all(alice, bob)
        await hub.receive(alice, '{"type":"typing_indicator","recipient_id":2,"is_typing":true}')
        assert await next_frame(bob) == typing(ALICE, BOB, True)
        assert await next_frame(bob) == typing(ALICE, BOB, False)
        assert await drain(alice) == []


async def test_typing_turns_off_when_the_typers_last_connection_closes() -> None:
    async with running_hub() as hub, hub.connect(Identity(BOB)) as bob:
        async with hub.connect(Identity(ALICE)) as phone:
            async with hub.connect(Identity(ALICE)) as laptop:
                await drain_all(bob, phone, laptop)
                await hub.receive(
                    laptop, '{"type":"typing_indicator","recipient_id":2,"is_typing":true}'
                )
                assert await drain(bob) == [typing(ALICE, BOB, True)]
            assert await drain(bob) == []  # she still has her phone open
        assert await drain(bob) == [typing(ALICE, BOB, False), online(ALICE, False)]


async def test_no_typing_off_on_close_when_not_typing() -> None:
    async with running_hub() as hub, hub.connect(Identity(BOB)) as bob:
        async with hub.connect(Identity(ALICE)) as alice:
            await hub.receive(
                alice, '{"type":"typing_indicator","recipient_id":2,"is_typing":true}'
            )
            await hub.receive(
                alice, '{"type":"typing_indicator","recipient_id":2,"is_typing":false}'
            )
            await drain(bob)
        assert await drain(bob) == [online(ALICE, False)]


# -- mark_read ---------------------------------------------------------------------------------


def read(reader: int, peer: int, up_to_id: int) -> Frame:
    return {"type": "messages_read", "reader_id": reader, "peer_id": peer, "up_to_id": up_to_id}


async def test_mark_read_tells_the_author_and_the_readers_other_connections() -> None:
    store = MemoryStore()
    async with running_hub(store) as hub, AsyncExitStack() as stack:
        alice, bob1, bob2, carol = [
            await stack.enter_async_context(hub.connect(Identity(user)))
            for user in (ALICE, BOB, BOB, CAROL)
        ]
        m1, m2, m3 = [await send_ok(hub, alice, BOB, f"m{n}") for n in range(3)]
        m4 = await send_ok(hub, carol, BOB, "from carol")
        m5 = await send_ok(hub, bob1, ALICE, "bob's own")
        await drain_all(alice, bob1, bob2, carol)

        await hub.receive(bob1, json.dumps({"type": "mark_read", "peer_id": ALICE, "up_to_id": m2}))
        assert await drain(alice) == [read(BOB, ALICE, m2)]
        assert await drain(bob2) == [read(BOB, ALICE, m2)]
        assert await drain(bob1) == []
        assert await drain(carol) == []
        assert {m.id for m in await store.since(BOB, 0, 10) if m.is_read} == {m1, m2}

        # up_to_id is the highest id now read, not the one asked for.
        await hub.receive(bob2, '{"type":"mark_read","peer_id":1,"up_to_id":1000000}')
        assert await drain(alice) == [read(BOB, ALICE, m3)]
        assert await drain(bob1) == [read(BOB, ALICE, m3)]
        assert await drain(bob2) == []
        read_ids = {m.id for m in await store.since(BOB, 0, 10) if m.is_read}
        assert read_ids == {m1, m2, m3}
        assert m4 not in read_ids and m5 not in read_ids


async def test_mark_read_is_idempotent_and_silent_when_nothing_changed() -> None:
    async with running_hub() as hub, AsyncExitStack() as stack:
        alice, bob1, bob2 = [
            await stack.enter_async_context(hub.connect(Identity(user)))
            for user in (ALICE, BOB, BOB)
        ]
        m1 = await send_ok(hub, alice, BOB, "hi")
        await drain_all(bob1, bob2)
        frame = json.dumps({"type": "mark_read", "peer_id": ALICE, "up_to_id": m1})
        await hub.receive(bob1, frame)
        assert await drain(alice) == [read(BOB, ALICE, m1)]
        await drain(bob2)
        for data in (frame, '{"type":"mark_read","peer_id":1,"up_to_id":0}', frame):
            await hub.receive(bob1, data)
        await hub.receive(bob1, '{"type":"mark_read","peer_id":3,"up_to_id":1000}')
        # Reading your own messages to someone changes nothing.
        await hub.receive(alice, '{"type":"mark_read","peer_id":1,"up_to_id":1000}')
        assert [await drain(c) for c in (alice, bob1, bob2)] == [[], [], []]
        assert await hub.mark_read(BOB, ALICE, m1) == 0


async def test_mark_read_over_http_tells_every_connection_of_the_reader() -> None:
    async with running_hub() as hub, AsyncExitStack() as stack:
        alice, bob1, bob2 = [
            await stack.enter_async_context(hub.connect(Identity(user)))
            for user in (ALICE, BOB, BOB)
        ]
        m1 = await send_ok(hub, alice, BOB, "hi")
        await drain_all(bob1, bob2)
        assert await hub.mark_read(BOB, ALICE, m1) == 1
        assert [await drain(c) for c in (alice, bob1, bob2)] == [[read(BOB, ALICE, m1)]] * 3


# -- sync ----------------------------------------------------------------------------------------


async def test_sync_replays_in_pages_with_has_more() -> None:
    limits = Limits(sync_page_size=2, max_queue=10)
    async with running_hub(limits=limits) as hub, AsyncExitStack() as stack:
        alice, bob, carol = [
            await stack.enter_async_context(hub.connect(Identity(user)))
            for user in (ALICE, BOB, CAROL)
        ]
        ids = [
            await send_ok(hub, alice, BOB, "a"),
            await send_ok(hub, carol, ALICE, "b"),
            await send_ok(hub, bob, ALICE, "c"),
        ]
        await send_ok(hub, bob, CAROL, "not alice's")
        ids += [await send_ok(hub, alice, CAROL, "d"), await send_ok(hub, alice, BOB, "e")]
        await drain_all(alice, bob, carol)

        async def sync(after_id: int) -> tuple[list[int], Frame]:
            await hub.receive(alice, json.dumps({"type": "sync", "after_id": after_id}))
            *replayed, complete = await drain(alice)
            assert all(f["type"] == "private_message" for f in replayed)
            assert complete["type"] == "sync_complete"
            assert await drain(bob) == [] and await drain(carol) == []
            return [f["message"]["id"] for f in replayed], complete

        # The messages already arrived live: the replay repeats them anyway.
        assert await sync(0) == (
            ids[0:2],
            {"type": "sync_complete", "last_id": ids[1], "has_more": True},
        )
        assert await sync(ids[1]) == (
            ids[2:4],
            {"type": "sync_complete", "last_id": ids[3], "has_more": True},
        )
        assert await sync(ids[3]) == (
            ids[4:],
            {"type": "sync_complete", "last_id": ids[4], "has_more": False},
        )
        assert await sync(ids[4]) == (
            [],
            {"type": "sync_complete", "last_id": ids[4], "has_more": False},
        )
        assert await sync(10**9) == (
            [],
            {"type": "sync_complete", "last_id": 10**9, "has_more": False},
        )


async def test_sync_replays_read_state_and_content() -> None:
    async with (
        running_hub() as hub,
        hub.connect(Identity(ALICE)) as alice,
        hub.connect(Identity(BOB)) as bob,
    ):
        m1 = await send_ok(hub, alice, BOB, "\x00 nul and \u2028")
        await hub.mark_read(BOB, ALICE, m1)
        await drain_all(alice, bob)
        async with hub.connect(Identity(BOB)) as bob_again:
            await drain(bob_again)
            await hub.receive(bob_again, '{"type":"sync","after_id":0}')
            replay, complete = await drain(bob_again)
            assert replay["message"]["content"] == "\x00 nul and \u2028"
            assert replay["message"]["is_read"] is True
            assert complete == {"type": "sync_complete", "last_id": m1, "has_more": False}


async def test_a_message_stored_between_two_sync_pages_is_not_missed() -> None:
    # The next page is read while the current one is sent, before the client
    # asks for it: what is stored meanwhile must still reach the client.
    limits = Limits(sync_page_size=2)
    async with (
        running_hub(limits=limits) as hub,
        hub.connect(Identity(ALICE)) as alice,
        hub.connect(Identity(BOB)) as bob,
    ):
        ids = [await send_ok(hub, bob, ALICE, str(n)) for n in range(3)]
        await drain_all(alice, bob)

        await hub.receive(alice, json.dumps({"type": "sync", "after_id": 0}))
        *page, complete = await drain(alice)
        assert [f["message"]["id"] for f in page] == ids[:2]
        assert complete == {"type": "sync_complete", "last_id": ids[1], "has_more": True}
        late = await send_ok(hub, bob, ALICE, "while alice pages")
        await hub.receive(alice, json.dumps({"type": "sync", "after_id": ids[1]}))
        frames = await drain(alice)
        got = [f["message"]["id"] for f in frames if f["type"] == "private_message"]
        assert ids[2] in got and late in got
        assert frames[-1]["type"] == "sync_complete"

        # A page read ahead for one cursor does not answer another one.
        await hub.receive(alice, json.dumps({"type": "sync", "after_id": 0}))
        await drain(alice)
        await hub.receive(alice, json.dumps({"type": "sync", "after_id": ids[0]}))
        *page, complete = await drain(alice)
        assert [f["message"]["id"] for f in page] == [ids[1], ids[2]]
        assert complete == {"type": "sync_complete", "last_id": ids[2], "has_more": True}


async def test_live_messages_still_flow_after_a_sync() -> None:
    async with (
        running_hub() as hub,
        hub.connect(Identity(ALICE)) as alice,
        hub.connect(Identity(BOB)) as bob,
    ):
        await drain_all(alice, bob)
        first = await send_ok(hub, bob, ALICE, "1")
        await hub.receive(alice, json.dumps({"type": "sync", "after_id": 0}))
        await drain(alice)
        second = await send_ok(hub, bob, ALICE, "2")
        assert first < second
        assert [f["message"]["id"] for f in await drain(alice)] == [second]


# -- closing connections -------------------------------------------------------------------------


async def test_slow_consumer_is_closed_1013_and_others_carry_on() -> None:
    limits = Limits(max_queue=3, sync_page_size=1)
    async with running_hub(limits=limits) as hub, AsyncExitStack() as stack:
        alice, bob, carol = [
            await stack.enter_async_context(hub.connect(Identity(user)))
            for user in (ALICE, BOB, CAROL)
        ]
        await drain_all(alice, bob, carol)
        for n in range(3):
            await send_ok(hub, alice, BOB, f"m{n}")
        assert not bob.closing  # bob reads nothing: his queue is now full
        await send_ok(hub, alice, BOB, "one too many")
        assert bob.close_code == 1013
        assert await bob.next_frame() is None
        await send_ok(hub, alice, BOB, "still confirmed to alice")
        await send_ok(hub, alice, CAROL, "carol reads")
        assert len(await drain(carol)) == 1
        assert not alice.closing and not carol.closing


async def test_revoke_closes_that_sessions_connections_1008() -> None:
    async with running_hub() as hub, AsyncExitStack() as stack:
        phone, laptop, other_session, bob = [
            await stack.enter_async_context(hub.connect(identity))
            for identity in (
                Identity(ALICE, "s-1"),
                Identity(ALICE, "s-1"),
                Identity(ALICE, "s-2"),
                Identity(BOB, "s-1b"),
            )
        ]
        await hub.revoke("s-1")
        assert (phone.close_code, laptop.close_code) == (1008, 1008)
        assert phone.close_reason
        assert other_session.close_code is None and bob.close_code is None
        await hub.revoke("unknown")
        assert other_session.close_code is None
        await drain(bob)
        # Until its transport lets go, a logged-out connection can do nothing.
        await send(hub, phone, BOB, "after logout")
        assert await drain(bob) == []
        assert await hub.history(ALICE, BOB) == ([], False)


async def test_shutdown_closes_connections_1001() -> None:
    codes: list[int | None] = []

    async def device(hub: Hub, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """A transport: sends until the hub closes the connection, then lets go."""
        async with hub.connect(Identity(ALICE)) as client:
            task_status.started()
            while await client.next_frame() is not None:
                pass
            codes.append(client.close_code)

    with anyio.fail_after(1.5):  # less than the 2 s grace: the hub did not wait it out
        async with (
            anyio.create_task_group() as tg,
            running_hub() as hub,
        ):
            await tg.start(device, hub)
            await tg.start(device, hub)
    assert codes == [1001, 1001]
    assert not hub.running


class FailingStore(MemoryStore):
    """A MemoryStore whose calls raise while ``failing`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    def _check(self) -> None:
        if self.failing:
            raise OSError("disk on fire")

    async def save_many(self, drafts: Sequence[Draft]) -> list[tuple[Any, bool]]:
        self._check()
        return await super().save_many(drafts)

    async def mark_read(self, reader_id: int, peer_id: int, up_to_id: int) -> ReadReceipt:
        self._check()
        return await super().mark_read(reader_id, peer_id, up_to_id)

    async def since(self, user_id: int, after_id: int, limit: int) -> list[Any]:
        self._check()
        return await super().since(user_id, after_id, limit)

    async def ping(self) -> None:
        self._check()


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"private_message","recipient_id":2,"content":"lost"}',
        '{"type":"mark_read","peer_id":2,"up_to_id":100}',
        '{"type":"sync","after_id":0}',
    ],
)
async def test_store_failure_closes_1011_and_the_hub_keeps_working(
    frame: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = FailingStore()
    async with running_hub(store) as hub, AsyncExitStack() as stack:
        alice, bob, carol = [
            await stack.enter_async_context(hub.connect(Identity(user)))
            for user in (ALICE, BOB, CAROL)
        ]
        await send_ok(hub, bob, ALICE, "before")
        await drain_all(alice, bob, carol)
        store.failing = True
        await hub.receive(alice, frame)
        await committed()
        assert alice.close_code == 1011
        assert await drain(bob) == []
        assert "lost" not in caplog.text  # content is never logged
        store.failing = False
        await send_ok(hub, bob, CAROL, "after")
        assert len(await drain(carol)) == 1
        assert [m.content for m in await store.since(BOB, 0, 10)] == ["before", "after"]


async def test_health_reports_counts_and_raises_when_the_store_is_down() -> None:
    store = FailingStore()
    async with running_hub(store) as hub:
        assert await hub.health() == Health(connections=0, users_online=0)
        store.failing = True
        with pytest.raises(BackendError, match="store"):
            await hub.health()
    with pytest.raises(BackendError):
        await hub.health()


async def test_invalid_frames_are_answered_then_close_1008() -> None:
    async with running_hub() as hub, hub.connect(Identity(ALICE)) as alice:
        await drain(alice)
        await hub.receive(alice, b"\x00\x01", binary=True)
        [error] = await drain(alice)
        assert error["code"] == "invalid_frame" and not alice.closing
        for _ in range(48):
            await hub.receive(alice, "{}")
        assert [f["code"] for f in await drain(alice)] == ["invalid_frame"] * 48
        await hub.receive(alice, "{}")
        assert alice.close_code == 1008


async def test_oversized_frame_closes_1009() -> None:
    async with (
        running_hub(limits=Limits(max_frame_size=1000)) as hub,
        hub.connect(Identity(ALICE)) as alice,
    ):
        await send(hub, alice, BOB, "\u00e9" * 600)
        assert alice.close_code == 1009


# -- operations for the HTTP API -------------------------------------------------------------------


async def test_send_message_returns_created_and_raises_rejected() -> None:
    async with running_hub() as hub, hub.connect(Identity(BOB)) as bob:
        await drain(bob)
        message, created = await hub.send_message(ALICE, BOB, "over http", "h-1")
        assert created
        again, created = await hub.send_message(ALICE, BOB, "over http", "h-1")
        assert (again, created) == (message, False)
        assert [f["message"]["id"] for f in await drain(bob)] == [message.id]
        with pytest.raises(Rejected) as info:
            await hub.send_message(MALLORY, ALICE, "hi")
        assert (info.value.code, info.value.status) == ("forbidden", 403)


async def test_history_pages_and_clamps_the_limit() -> None:
    async with running_hub(limits=Limits(max_history_page=3)) as hub:
        ids = [(await hub.send_message(ALICE, BOB, f"m{n}"))[0].id for n in range(5)]
        await hub.send_message(ALICE, CAROL, "elsewhere")
        page, more = await hub.history(BOB, ALICE, limit=100)
        assert ([m.id for m in page], more) == (ids[2:], True)
        page, more = await hub.history(BOB, ALICE, before_id=ids[2], limit=100)
        assert ([m.id for m in page], more) == (ids[:2], False)
        page, more = await hub.history(BOB, ALICE, limit=0)
        assert ([m.id for m in page], more) == (ids[-1:], True)
        rows = await hub.conversations(ALICE)
        assert [(r.peer_id, r.unread_count) for r in rows] == [(CAROL, 0), (BOB, 0)]
