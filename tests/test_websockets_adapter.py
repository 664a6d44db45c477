"""The websockets adapter's own framing: what it writes is what the library would."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from servers import cookie_header, recv_json
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


@pytest.mark.anyio
@pytest.mark.parametrize("own_server", [False, True], ids=["listen", "own-serve"])
async def test_both_ways_of_serving_deliver_and_close(own_server: bool) -> None:
    """``PmhubServer.listen`` writes from the event loop; a ``serve()`` of your
    own (the library's connection class) sends from a task: both deliver in
    order and close with the hub's code."""
    store = MemoryStore()
    auth = SessionAuthenticator("a secret of at least sixteen bytes", store)
    limits = Limits(message_rate=1000, message_burst=1000)
    async with Hub(store, AllowAll(), limits=limits) as hub:
        server = PmhubServer(hub, auth)
        listening = (
            serve(server.handler, "127.0.0.1", 0, process_request=server.process_request)
            if own_server
            else server.listen("127.0.0.1", 0)
        )
        async with listening as running:
            port = running.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/ws"
            alice = await connect(url, additional_headers=cookie_header(auth.issue(1)))
            bob = await connect(url, additional_headers=cookie_header(auth.issue(2)))
            for ws in (alice, bob):
                assert (await recv_json(ws))["type"] == "system"
            for ws, other in ((alice, 2), (bob, 1)):  # the snapshot, or the change
                presence = {"type": "user_online_status", "user_id": other, "is_online": True}
                assert (await recv_json(ws)) == presence
            for n in range(300):  # more than one write's worth
                await alice.send(f'{{"type":"private_message","recipient_id":2,"content":"m{n}"}}')
            for ws in (alice, bob):
                got = [await recv_json(ws) for _ in range(300)]
                assert [f["message"]["content"] for f in got] == [f"m{n}" for n in range(300)]
            await hub.close_all()
            for ws in (alice, bob):
                with pytest.raises(ConnectionClosed):
                    while True:
                        await recv_json(ws)
                assert ws.close_code == 1001
