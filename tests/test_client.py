"""A Client's bounded, ordered outbound queue."""

from __future__ import annotations

import anyio
import pytest

from pmhub.auth import Identity
from pmhub.client import Client
from pmhub.frames import Outgoing
from pmhub.limits import Limits

pytestmark = pytest.mark.anyio


def live(message_id: int) -> Outgoing:
    return Outgoing(b'{"type":"private_message","n":%d}' % message_id, message_id)


def notice(n: int) -> Outgoing:
    return Outgoing(b'{"type":"system","message":"%d"}' % n)


async def drain(client: Client) -> list[Outgoing]:
    frames = []
    while client._queue:
        frame = await client.next_frame()
        assert frame is not None
        frames.append(frame)
    return frames


async def test_frames_come_out_in_push_order_and_identical() -> None:
    client = Client(Identity(1), Limits())
    frames = [notice(1), live(1), notice(2)]
    for frame in frames:
        assert client.push(frame)
    drained = await drain(client)
    assert len(drained) == len(frames)
    assert all(got is sent for got, sent in zip(drained, frames, strict=True))


async def test_live_messages_keep_id_order_and_drop_repeats() -> None:
    client = Client(Identity(1), Limits())
    assert client.push(live(1))
    assert client.push(live(3))
    assert not client.push(live(3))  # a repeat
    assert not client.push(live(2))  # older than one already queued
    assert client.push(notice(0))  # other frames are not ordered by id
    assert client.push(live(4))
    assert [f.message_id for f in await drain(client)] == [1, 3, None, 4]
    assert not client.push(live(4))  # still a repeat after it was sent


async def test_replay_frames_are_exempt_and_do_not_move_the_live_order() -> None:
    client = Client(Identity(1), Limits())
    assert client.push(live(5))
    assert client.push(live(2), replay=True)
    assert client.push(live(5), replay=True)
    assert client.push(live(9), replay=True)
    assert client.push(live(6))  # the replay of 9 did not raise the live mark
    assert [f.message_id for f in await drain(client)] == [5, 2, 5, 9, 6]
    assert not client.closing


async def test_overflow_closes_1013_and_drops_later_pushes() -> None:
    client = Client(Identity(1), Limits(max_queue=4, sync_page_size=2))
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
    client = Client(Identity(1), Limits())
    client.push(notice(1))
    client.close(1008, "logged out")
    client.close(1001, "shutting down")
    assert (client.close_code, client.close_reason) == (1008, "logged out")
    assert await client.next_frame() is None
    assert await client.next_frame() is None
    assert not client.push(notice(2))


async def test_next_frame_waits_for_a_push() -> None:
    client = Client(Identity(1), Limits())
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
    client = Client(Identity(1), Limits())
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
    first, second = Client(identity, Limits()), Client(identity, Limits())
    assert first.id != second.id
    assert first.user_id == 7 and first.identity is identity
