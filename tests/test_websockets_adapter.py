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


@pytest.mark.anyio
@pytest.mark.parametrize("own_server", [False, True], ids=["listen", "own-serve"])
async def test_fragments_binary_frames_and_bad_utf8_are_read_as_the_protocol_says(
    own_server: bool,
) -> None:
    """A fragmented text message is one message; a binary frame is an
    ``invalid_frame``; invalid UTF-8 closes with 1007 and (``listen``) a message
    in too many fragments with 1009. ``listen`` reads the
    messages itself, a server of your own through the library: the same."""
    store = MemoryStore()
    auth = SessionAuthenticator("a secret of at least sixteen bytes", store)
    async with Hub(store, AllowAll()) as hub:
        server = PmhubServer(hub, auth)
        listening = (
            serve(server.handler, "127.0.0.1", 0, process_request=server.process_request)
            if own_server
            else server.listen("127.0.0.1", 0)
        )
        async with listening as running:
            port = running.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/ws"
            async with connect(url, additional_headers=cookie_header(auth.issue(1))) as ws:
                assert (await recv_json(ws))["type"] == "system"
                await ws.send(['{"type":"private_message",', '"recipient_id":2,"content":"é"}'])
                echo = await recv_json(ws)
                assert echo["type"] == "private_message"
                assert echo["message"]["content"] == "é"
                await ws.send(b'{"type":"sync","after_id":0}')
                error = await recv_json(ws)
                assert error["type"] == "error" and error["code"] == "invalid_frame"
                assert "binary" in error["message"]
                ws.protocol.send_frame(Frame(Opcode.TEXT, b'{"type":"sync","after_id":"\xff"}'))
                ws.send_data()
                with pytest.raises(ConnectionClosed):
                    while True:
                        await recv_json(ws)
                assert ws.close_code == 1007
            if own_server:
                return  # the library's own reassembly has no count of fragments
            async with connect(url, additional_headers=cookie_header(auth.issue(1))) as ws:
                assert (await recv_json(ws))["type"] == "system"
                with pytest.raises(ConnectionClosed):
                    await ws.send(" " for _ in range(1000))  # one message in 1,000 pieces
                    while True:
                        await recv_json(ws)
                assert ws.close_code == 1009
