"""A Connection's outbound queue: bounded by frames and bytes, each live message once."""

from __future__ import annotations

import anyio
import pytest

from pmhub.auth import Identity
from pmhub.connection import DEDUP_WINDOW, Connection
from pmhub.frames import Outgoing
from pmhub.limits import Limits

pytestmark = pytest.mark.anyio


def live(message_id: int) -> Outgoing:
    return Outgoing(b'{"type":"private_message","n":%d}' % message_id, message_id)


def notice(n: int) -> Outgoing:
    return Outgoing(b'{"type":"system","message":"%d"}' % n)


async def drain(client: Connection) -> list[Outgoing]:
    frames = []
    while client._queue:
        frame = await client.next_frame()
        assert frame is not None
        frames.append(frame)
    return frames


async def test_frames_come_out_in_push_order_and_identical() -> None:
    client = Connection(Identity(1), Limits())
    frames = [notice(1), live(1), notice(2)]
    for frame in frames:
        assert client.push(frame)
    drained = await drain(client)
    assert len(drained) == len(frames)
    assert all(got is sent for got, sent in zip(drained, frames, strict=True))


async def test_live_messages_are_delivered_once_even_when_late() -> None:
    client = Connection(Identity(1), Limits())
    assert client.push(live(1))
    assert client.push(live(3))
    assert not client.push(live(3))  # a repeat
    assert client.push(live(2))  # late (another node): still delivered
    assert not client.push(live(2))
    assert client.push(notice(0))  # other frames are never de-duplicated
    assert client.push(notice(0))
    assert client.push(live(4))
    assert [f.message_id for f in await drain(client)] == [1, 3, 2, None, None, 4]
    assert not client.push(live(4))  # still a repeat after it was sent


async def test_the_repeat_window_is_bounded() -> None:
    client = Connection(Identity(1), Limits())
    for message_id in range(1, DEDUP_WINDOW + 2):
        assert client.push(live(message_id))
        await drain(client)
    assert not client.push(live(2))  # within the last DEDUP_WINDOW ids
    assert client.push(live(1))  # forgotten: the window holds only the recent ids


async def test_replay_frames_are_exempt_and_do_not_count_as_seen() -> None:
    client = Connection(Identity(1), Limits())
    assert client.push(live(5))
    assert client.push(live(2), replay=True)
    assert client.push(live(5), replay=True)
    assert client.push(live(9), replay=True)
    assert client.push(live(9))  # the replay of 9 does not hide its live copy
    assert [f.message_id for f in await drain(client)] == [5, 2, 5, 9, 9]
    assert not client.closing


async def test_the_queue_is_bounded_by_bytes_too() -> None:
    big = Outgoing(b"x" * 400)
    client = Connection(Identity(1), Limits(max_queue_bytes=1000))
    assert client.push(big) and client.push(big)
    assert not client.push(big)  # 1,200 bytes > 1,000
    assert client.close_code == 1013


async def test_prepend_puts_frames_ahead_of_what_is_queued() -> None:
    client = Connection(Identity(1), Limits())
    client.push(live(7))
    assert client.prepend([notice(1), notice(2)])
    assert [f.data for f in await drain(client)] == [notice(1).data, notice(2).data, live(7).data]
    small = Connection(Identity(1), Limits(max_queue=2))
    assert not small.prepend([notice(1), notice(2), notice(3)])
    assert small.close_code == 1013


async def test_wait_for_room_holds_bulk_replies_until_half_empty() -> None:
    client = Connection(Identity(1), Limits(max_queue=4))
    for n in range(2):
        client.push(notice(n))
    passed = []

    async def bulk() -> None:
        assert await client.wait_for_room()
        passed.append(True)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(bulk)
            await anyio.wait_all_tasks_blocked()
            assert passed == []  # half full: a bulk reply waits
            await client.next_frame()
    assert passed == [True]
    client.push(notice(3))
    client.close(1013)
    assert not await client.wait_for_room()  # a closing connection takes nothing more


async def test_overflow_closes_1013_and_drops_later_pushes() -> None:
    client = Connection(Identity(1), Limits(max_queue=4))
    for n in range(4):
        assert client.push(notice(n))
    assert not client.closing
    assert not client.push(notice(4))
    assert client.closing
    assert client.close_code == 1013
    assert not client.push(notice(5))
    assert not client.push(live(100), replay=True)
    assert await client.next_frame() is None


async def test_close_drops_queued_frames_and_keeps_the_first_code() -> None:
    client = Connection(Identity(1), Limits())
    client.push(notice(1))
    client.close(1008, "logged out")
    client.close(1001, "shutting down")
    assert (client.close_code, client.close_reason) == (1008, "logged out")
    assert await client.next_frame() is None
    assert await client.next_frame() is None
    assert not client.push(notice(2))


async def test_next_frame_waits_for_a_push() -> None:
    client = Connection(Identity(1), Limits())
    frame = notice(1)
    got: list[Outgoing | None] = []

    async def reader() -> None:
        got.append(await client.next_frame())

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        client.push(frame)
    assert got == [frame]


async def test_close_wakes_a_waiting_reader_with_none() -> None:
    client = Connection(Identity(1), Limits())
    got: list[Outgoing | None] = []

    async def reader() -> None:
        got.append(await client.next_frame())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            client.close(1001)
    assert got == [None]


async def test_ids_are_unique_and_identity_is_kept() -> None:
    identity = Identity(7, "s-1")
    first, second = Connection(identity, Limits()), Connection(identity, Limits())
    assert first.id != second.id
    assert first.user_id == 7 and first.identity is identity


async def test_a_writer_takes_what_is_queued_at_once_in_order_and_frees_its_room() -> None:
    client = Connection(Identity(1), Limits(max_queue=4))
    frames = [notice(n) for n in range(4)]
    for frame in frames:
        assert client.push(frame)
    assert not client.push(notice(9))  # full: this one closes the connection with 1013
    client = Connection(Identity(1), Limits(max_queue=4))
    for frame in frames:
        assert client.push(frame)
    first = await client.next_frames(3)
    assert first == frames[:3]
    assert await client.next_frames() == frames[3:]  # the rest, not more than there is
    for n in range(4):  # the queue's frames and bytes were given back
        assert client.push(notice(10 + n))
    client.close(1000, "done")
    assert await client.next_frames() == []
