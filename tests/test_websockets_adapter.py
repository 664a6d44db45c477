"""The websockets adapter's own framing: what it writes is what the library would."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import NamedTuple

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from servers import close_code_after, cookie_header, recv_json, send_invalid_utf8
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from pmhub import AllowAll, Hub, Limits, MemoryStore, SessionAuthenticator
from pmhub.adapters.websockets import PmhubServer, _text_header


@given(st.integers(min_value=0, max_value=2**20))
@example(125)
@example(126)
@example(65535)
@example(65536)
def test_text_frames_are_framed_as_the_library_frames_them(length: int) -> None:
    data = b"x" * length
    expected = Frame(Opcode.TEXT, data).serialize(mask=False, extensions=[])
    assert _text_header(length) + data == expected


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the websockets library's asyncio API


@asynccontextmanager
async def serving(own_server: bool, limits: Limits | None = None) -> AsyncIterator[Served]:
    """A hub on ``PmhubServer.listen``, or on a ``serve()`` of your own (the
    library's connection class), on a free port; each user connects with a cookie."""
    store = MemoryStore()
    auth = SessionAuthenticator("a secret of at least sixteen bytes", store)
    async with Hub(store, AllowAll(), limits=limits) as hub:
        server = PmhubServer(hub, auth)
        listening = (
            serve(server.handler, "127.0.0.1", 0, process_request=server.process_request)
            if own_server
            else server.listen("127.0.0.1", 0)
        )
        async with listening as running:
            url = f"ws://127.0.0.1:{running.sockets[0].getsockname()[1]}/ws"
            yield Served(
                hub, lambda user: connect(url, additional_headers=cookie_header(auth.issue(user)))
            )


class Served(NamedTuple):
    hub: Hub
    connect: Callable[[int], connect]


BOTH_WAYS = pytest.mark.parametrize("own_server", [False, True], ids=["listen", "own-serve"])


@pytest.mark.anyio
@BOTH_WAYS
async def test_both_ways_of_serving_deliver_and_close(own_server: bool) -> None:
    """``PmhubServer.listen`` writes from the event loop; a ``serve()`` of your
    own (the library's connection class) sends from a task: both deliver in
    order and close with the hub's code."""
    limits = Limits(message_rate=1000, message_burst=1000)
    async with serving(own_server, limits) as (hub, open_as):
        alice, bob = await open_as(1), await open_as(2)
        for ws in (alice, bob):
            assert (await recv_json(ws))["type"] == "system"
        for ws, other in ((alice, 2), (bob, 1)):  # the snapshot, or the change
            presence = {"type": "user_online_status", "user_id": other, "is_online": True}
            assert (await recv_json(ws)) == presence
        for n in range(300):  # more than one write's worth, and of the reader's inbox
            await alice.send(f'{{"type":"private_message","recipient_id":2,"content":"m{n}"}}')
        for ws in (alice, bob):
            got = [await recv_json(ws) for _ in range(300)]
            assert [f["message"]["content"] for f in got] == [f"m{n}" for n in range(300)]
        await hub.close_all()
        for ws in (alice, bob):
            assert await close_code_after(ws) == 1001


@pytest.mark.anyio
@BOTH_WAYS
async def test_fragments_binary_frames_and_bad_utf8_are_read_as_the_protocol_says(
    own_server: bool,
) -> None:
    """A fragmented text message is one message; a binary frame is an
    ``invalid_frame``; invalid UTF-8 closes with 1007 and (``listen``) a message
    in too many fragments with 1009."""
    async with serving(own_server) as (_, open_as):
        async with open_as(1) as ws:
            assert (await recv_json(ws))["type"] == "system"
            await ws.send(['{"type":"private_message",', '"recipient_id":2,"content":"é"}'])
            echo = await recv_json(ws)
            assert echo["type"] == "private_message"
            assert echo["message"]["content"] == "é"
            await ws.send(b'{"type":"sync","after_id":0}')
            error = await recv_json(ws)
            assert error["type"] == "error" and error["code"] == "invalid_frame"
            assert "binary" in error["message"]
            send_invalid_utf8(ws)
            assert await close_code_after(ws) == 1007
        if own_server:
            return  # the library's own reassembly has no count of fragments
        async with open_as(1) as ws:
            assert (await recv_json(ws))["type"] == "system"
            with contextlib.suppress(ConnectionClosed):  # closed while it sends, or after
                await ws.send(" " for _ in range(1000))  # one message in 1,000 pieces
            assert await close_code_after(ws) == 1009
