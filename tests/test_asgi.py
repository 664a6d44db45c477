"""End to end: the demo ASGI app under a real uvicorn server, over real sockets.

Every row of the wire protocol (docs/protocol.md) is exercised here with the
clients a user would run: ``websockets`` for ``/ws`` and ``httpx`` for the HTTP
API. Each test gets its own server and SQLite file; limits are shrunk (typing
timeout, queue, sync page, rates) where a default would make a test slow or
timing-dependent.

"Nothing else arrives" is proved with a barrier, never a sleep: the test
sends a frame that has a reply (``sync`` from the far future answers
``sync_complete`` at once); frames are queued per connection in order, so
anything the server sent before handling it arrives before that reply.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import string
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry
from servers import (
    LiveServer,
    cookie_header,
    load_example,
    login,
    open_ws,
    recv_json,
    websockets_server,
)
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pmhub import Hub, Limits, MemoryStore, PrometheusMetrics, SessionAuthenticator
from pmhub.store import Draft

pytestmark = pytest.mark.anyio

chat = load_example("asgi_chat")

SECRET = "end-to-end-test-secret-0123456789"
ALICE, BOB, CAROL, MALLORY = 1, 2, 3, 4
JSON_BODY = {"content-type": "application/json"}
NAMES = {ALICE: "alice", BOB: "bob", CAROL: "carol", MALLORY: "mallory"}
FAR = 2**53  # the largest id the wire accepts: a sync from here replays nothing
MESSAGE_KEYS = {"id", "content", "sender_id", "receiver_id", "created_at", "is_read", "client_id"}
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
ADAPTERS = ["asgi", "websockets"]
SLOW_RATE = 0.01  # tokens per second: a test never sees the bucket refill


@pytest.fixture
def anyio_backend() -> str:
    # The clients (websockets, httpx) run on asyncio; the server has its own loop.
    return "asyncio"


# -- the demo under test ------------------------------------------------------------------


class Demo:
    """A running demo app: its server, its hub and logged-in sessions.

    ``ws_url`` is the WebSocket of the adapter under test: the ASGI app's
    ``/ws``, or a ``websockets`` adapter served beside it on the same hub (the
    HTTP API, logins included, is always the ASGI app's).
    """

    def __init__(self, server: LiveServer, hub: Hub, adapter: str = "asgi") -> None:
        self.server = server
        self.hub = hub
        self.adapter = adapter
        self.url = server.url
        base = server.websockets_url if adapter == "websockets" else server.ws_url
        self.ws_url = base + "/ws"
        #: The ``Host`` header of a handshake on ``ws_url`` (``host:port``).
        self.ws_host = base.removeprefix("ws://")
        self._sessions: dict[str, str] = {}

    async def session(self, name: str, *, fresh: bool = False) -> str:
        """The ``session`` cookie of ``name`` (one per user unless ``fresh``)."""
        if fresh:
            return await login(self.url, name)
        if name not in self._sessions:
            self._sessions[name] = await login(self.url, name)
        return self._sessions[name]

    async def connect(
        self, stack: AsyncExitStack, who: str, *, session: str | None = None, **options: Any
    ) -> ClientConnection:
        """Open a WebSocket for ``who`` and read its welcome (the first frame)."""
        cookie = session if session is not None else await self.session(who)
        ws = await stack.enter_async_context(open_ws(self.ws_url, cookie, **options))
        welcome = await recv_json(ws)
        assert welcome["type"] == "system", welcome
        assert set(welcome) == {"type", "message"}
        assert isinstance(welcome["message"], str) and welcome["message"]
        return ws

    def api(self, session: str | None = None, **headers: str) -> httpx.AsyncClient:
        """An HTTP client, authenticated with ``session`` when given."""
        if session is not None:
            headers.update(cookie_header(session))
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10)

    async def seed(self, rows: list[tuple[int, int, str]]) -> list[int]:
        """Store messages directly (bypassing policy and limits); return their ids."""

        async def save_all() -> list[int]:
            saved = await self.hub.store.save_many([Draft(*row) for row in rows])
            assert all(created for _, created in saved)
            return [message.id for message, _ in saved]

        return await self.server.acall(save_all)

    async def let_go(self, user_id: int, count: int) -> None:
        """Wait until the hub holds exactly ``count`` connections of ``user_id``."""
        await self.server.until(
            lambda: len(self.hub.connections(user_id)) == count,
            what=f"{count} connection(s) of user {user_id}",
        )


@pytest.fixture(params=ADAPTERS)
def adapter(request: pytest.FixtureRequest) -> str:
    """The WebSocket adapter under test: every protocol test runs against both."""
    return str(request.param)


@pytest.fixture
def start_demo(tmp_path: Path, adapter: str) -> Iterator[Callable[..., Demo]]:
    """Start demo servers (fresh SQLite file each); they stop after the test."""
    yield from _demos(tmp_path, adapter)


@pytest.fixture
def http_demo(tmp_path: Path) -> Iterator[Demo]:
    """A demo for the tests of the HTTP API alone, which only the ASGI adapter serves."""
    for start in _demos(tmp_path, "asgi"):
        yield start()


def _demos(tmp_path: Path, adapter: str) -> Iterator[Callable[..., Demo]]:
    with ExitStack() as stack:
        count = 0

        def start(
            *,
            limits: Limits | None = None,
            metrics: bool = False,
            sndbuf: int | None = None,
        ) -> Demo:
            nonlocal count
            count += 1
            app, hub = chat.build_app(
                str(tmp_path / f"chat{count}.db"),
                SECRET,
                limits=limits,
                metrics=PrometheusMetrics(registry=CollectorRegistry()) if metrics else None,
            )
            server = LiveServer(
                app,
                # As pmhub.adapters.asgi.serve(): close every connection with 1001
                # before uvicorn's own shutdown (which would send 1012).
                before_shutdown=hub.close_all,  # the hub closes its store on lifespan exit
                ws_ping_interval=hub.limits.ping_interval,
                ws_ping_timeout=hub.limits.ping_timeout,
                ws_max_size=hub.limits.max_frame_size * 4 + 1024,
                sndbuf=sndbuf,
                websockets=websockets_server(hub, SECRET) if adapter == "websockets" else None,
            )
            server.start()
            stack.callback(server.stop)
            return Demo(server, hub, adapter)

        yield start


@pytest.fixture
def demo(start_demo: Callable[..., Demo]) -> Demo:
    return start_demo()


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


# -- helpers ---------------------------------------------------------------------------


async def send(ws: ClientConnection, frame: dict[str, Any]) -> None:
    await ws.send(json.dumps(frame))


def pm(recipient_id: int, content: str, client_id: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "private_message",
        "recipient_id": recipient_id,
        "content": content,
    }
    if client_id is not None:
        frame["client_id"] = client_id
    return frame


async def say(ws: ClientConnection, recipient: int, content: str) -> dict[str, Any]:
    """Send a message (setup): its confirmation, skipping whatever else arrives first."""
    await send(ws, pm(recipient, content))
    while True:
        frame = await recv_json(ws)
        assert frame["type"] != "error", frame
        if frame["type"] == "private_message" and frame["message"]["content"] == content:
            assert frame["recipient_id"] == recipient
            return frame


async def barrier(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every frame the server queued for ``ws`` before it handled a fresh request."""
    await send(ws, {"type": "sync", "after_id": FAR})
    frames = []
    while (frame := await recv_json(ws))["type"] != "sync_complete":
        frames.append(frame)
    assert frame == {"type": "sync_complete", "last_id": FAR, "has_more": False}
    return frames


async def close_code(ws: ClientConnection, within: float = 5.0) -> tuple[int, list[dict]]:
    """Read until the server closes ``ws``: its close code and the frames before it."""
    frames: list[dict[str, Any]] = []
    try:
        with anyio.fail_after(within):
            while True:
                frames.append(await recv_json(ws, within))
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, f"closed without a close frame: {exc!r}"
        return exc.rcvd.code, frames
    raise AssertionError("unreachable")  # pragma: no cover


async def sync_all(ws: ClientConnection, after_id: int) -> tuple[list[dict], list[dict]]:
    """Sync page by page from ``after_id``: the replayed frames and each sync_complete."""
    replayed, pages = [], []
    while True:
        await send(ws, {"type": "sync", "after_id": after_id})
        while (frame := await recv_json(ws))["type"] == "private_message":
            replayed.append(frame)
        assert frame["type"] == "sync_complete", frame
        pages.append(frame)
        if not frame["has_more"]:
            return replayed, pages
        after_id = frame["last_id"]


def check_message(
    message: dict[str, Any],
    *,
    sender: int,
    receiver: int,
    content: str,
    client_id: str | None = None,
    is_read: bool = False,
) -> None:
    assert set(message) == MESSAGE_KEYS, message
    assert type(message["id"]) is int and message["id"] > 0
    assert message["sender_id"] == sender
    assert message["receiver_id"] == receiver
    assert message["content"] == content
    assert message["client_id"] == client_id
    assert message["is_read"] is is_read
    assert RFC3339_UTC.match(message["created_at"]), message["created_at"]


def check_error(response: httpx.Response, status: int, code: str) -> None:
    """Every 4xx: that status and a JSON body ``{"error": {"code", "message"}}``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def check_refused(info: pytest.ExceptionInfo[InvalidStatus], status: int, code: str) -> None:
    response = info.value.response
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    body = json.loads(bytes(response.body or b""))
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]


def online(user_id: int, is_online: bool = True) -> dict[str, Any]:
    return {"type": "user_online_status", "user_id": user_id, "is_online": is_online}


def typing(user_id: int, recipient_id: int, is_typing: bool) -> dict[str, Any]:
    return {
        "type": "typing_indicator",
        "user_id": user_id,
        "recipient_id": recipient_id,
        "is_typing": is_typing,
    }


# -- handshake -------------------------------------------------------------------------


async def test_handshake_without_cookie_is_refused_with_401(demo: Demo) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(demo.ws_url):
            pass
    check_refused(info, 401, "unauthenticated")


async def test_handshake_with_invalid_cookie_is_refused_with_401(demo: Demo) -> None:
    good = await demo.session("alice")
    payload, _, signature = good.partition(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    other_secret = SessionAuthenticator("another-secret-of-32-characters!", MemoryStore()).issue(
        ALICE
    )
    bob_payload = (await demo.session("bob")).partition(".")[0]
    for cookie in [
        "garbage",
        f"{payload}.{flipped}",  # tampered signature
        f"{bob_payload}.{signature}",  # bob's payload under alice's signature
        f"{payload}",  # no signature
        other_secret,  # signed with another key
        SessionAuthenticator(SECRET, MemoryStore(), clock=lambda: 0.0).issue(
            ALICE
        ),  # expired in 1970
    ]:
        with pytest.raises(InvalidStatus) as info:
            async with open_ws(demo.ws_url, cookie):
                pass
        check_refused(info, 401, "unauthenticated")


async def test_handshake_with_revoked_session_is_refused_with_403(demo: Demo) -> None:
    session = await demo.session("alice", fresh=True)
    async with demo.api(session) as http:
        assert (await http.post("/api/logout")).status_code == 200
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(demo.ws_url, session):
            pass
    check_refused(info, 403, "forbidden")


@pytest.mark.parametrize(
    ("origin", "accepted"),
    [
        (None, True),  # not a browser
        ("http://{host}", True),  # same site
        ("https://{host}", True),  # the check is scheme-less
        ("http://evil.example", False),
        ("http://127.0.0.1:1", False),  # same host, another port
        ("null", False),  # sandboxed iframe, file://
    ],
    ids=["none", "same-host", "same-host-https", "evil", "other-port", "null"],
)
async def test_handshake_origin_check(demo: Demo, origin: str | None, accepted: bool) -> None:
    session = await demo.session("alice")
    headers = {} if origin is None else {"Origin": origin.format(host=demo.ws_host)}
    if accepted:
        async with AsyncExitStack() as stack:
            ws = await demo.connect(stack, "alice", headers=headers)
            assert await barrier(ws) == []
    else:
        with pytest.raises(InvalidStatus) as info:
            async with open_ws(demo.ws_url, session, headers=headers):
                pass
        check_refused(info, 403, "forbidden")


async def test_unknown_websocket_path_is_404(demo: Demo) -> None:
    session = await demo.session("alice")
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(demo.server.ws_url + "/nope", session):
            pass
    check_refused(info, 404, "not_found")


# -- after accept: welcome and presence snapshot ----------------------------------------------


async def test_welcome_then_presence_snapshot_of_contacts_only(
    demo: Demo, stack: AsyncExitStack
) -> None:
    alice = await demo.connect(stack, "alice")  # the welcome is checked by connect()
    assert await barrier(alice) == []  # nobody else is online

    bob = await demo.connect(stack, "bob")
    assert await barrier(bob) == [online(ALICE)]
    assert await barrier(alice) == [online(BOB)]

    carol = await demo.connect(stack, "carol")
    assert await barrier(carol) == [online(ALICE), online(BOB)]  # snapshot in id order

    mallory = await demo.connect(stack, "mallory")
    assert await barrier(mallory) == [online(CAROL)]  # never alice or bob
    assert await barrier(carol) == [online(MALLORY)]
    assert await barrier(alice) == [online(CAROL)]  # carol, but never mallory
    assert await barrier(bob) == [online(CAROL)]

    alice2 = await demo.connect(stack, "alice")
    assert await barrier(alice2) == [online(BOB), online(CAROL)]
    assert await barrier(bob) == []  # a second device does not repeat alice's presence
    assert await barrier(mallory) == []  # alice's devices never show up for mallory


# -- private_message -----------------------------------------------------------------------

PAYLOADS = [
    "Hello!",
    "<script>alert(1)</script>",
    "<img src=x onerror=\"alert('x')\">",
    "emoji 😀👩‍👩‍👧 and CJK 你好",
    "line\u2028separator\u2029paragraph",
    "quotes \" ' and backslashes \\ \\\\ \\n \\u0041",
    "control \x01\x1f and NUL \x00 and DEL \x7f",
    "  leading and trailing spaces  ",
    "\ufeffBOM and RTL \u202e text",
]


async def test_private_message_reaches_every_device_of_both_users_byte_exact(
    demo: Demo, stack: AsyncExitStack
) -> None:
    a1 = await demo.connect(stack, "alice")
    a2 = await demo.connect(stack, "alice")
    b1 = await demo.connect(stack, "bob")
    b2 = await demo.connect(stack, "bob")
    carol = await demo.connect(stack, "carol")
    for ws in (a1, a2, b1, b2, carol):
        await barrier(ws)  # drop the presence frames

    async with demo.api(await demo.session("bob")) as bob_http:
        for number, content in enumerate(PAYLOADS):
            client_id = f"c-{number}"
            await send(a1, pm(BOB, content, client_id))
            raw = [await asyncio.wait_for(ws.recv(), 5) for ws in (a1, a2, b1, b2)]
            assert len(set(raw)) == 1, "every device gets the same frame"
            frame = json.loads(raw[0])
            assert set(frame) == {"type", "sender_id", "recipient_id", "message"}
            assert frame["type"] == "private_message"
            assert (frame["sender_id"], frame["recipient_id"]) == (ALICE, BOB)
            check_message(
                frame["message"], sender=ALICE, receiver=BOB, content=content, client_id=client_id
            )
            # Persisted before fan-out: the recipient's copy is already in the history.
            history = (await bob_http.get(f"/api/messages/{ALICE}")).json()["messages"]
            assert history[-1] == frame["message"]

    assert await barrier(carol) == []  # nothing leaks to a third user
    ids = [m["id"] for m in history]
    assert ids == sorted(ids) and len(ids) == len(PAYLOADS)
    assert [m["content"] for m in history] == PAYLOADS


async def test_idempotent_resend_returns_stored_message_to_the_sending_connection_only(
    demo: Demo, stack: AsyncExitStack
) -> None:
    a1 = await demo.connect(stack, "alice")
    a2 = await demo.connect(stack, "alice")
    b1 = await demo.connect(stack, "bob")
    for ws in (a1, a2, b1):
        await barrier(ws)

    await send(a1, pm(BOB, "first", "key-1"))
    original = await recv_json(a1)
    assert original == await recv_json(a2) == await recv_json(b1)

    # Same client_id, other content: first write wins, only a1 hears of it.
    await send(a1, pm(BOB, "second", "key-1"))
    assert await recv_json(a1) == original
    await send(a1, pm(BOB, "marker", "key-2"))
    marker = await recv_json(a1)
    assert marker["message"]["content"] == "marker"
    assert marker["message"]["id"] > original["message"]["id"]
    for ws in (a2, b1):  # the next frame is the marker, not a copy of the resend
        assert await recv_json(ws) == marker
        assert await barrier(ws) == []

    # The resend stored nothing.
    async with demo.api(await demo.session("alice")) as http:
        stored = (await http.get(f"/api/messages/{BOB}")).json()["messages"]
    assert [m["content"] for m in stored] == ["first", "marker"]

    # Another device of the sender resending the key gets the stored message too.
    await send(a2, pm(BOB, "third", "key-1"))
    assert await recv_json(a2) == original
    assert await barrier(a1) == []


# -- typing_indicator ------------------------------------------------------------------------


async def test_typing_indicator_goes_to_the_recipient_with_the_server_stamped_user_id(
    demo: Demo, stack: AsyncExitStack
) -> None:
    a1 = await demo.connect(stack, "alice")
    a2 = await demo.connect(stack, "alice")
    b1 = await demo.connect(stack, "bob")
    b2 = await demo.connect(stack, "bob")
    carol = await demo.connect(stack, "carol")
    for ws in (a1, a2, b1, b2, carol):
        await barrier(ws)

    fake = {"type": "typing_indicator", "recipient_id": BOB, "is_typing": True, "user_id": CAROL}
    await send(a1, fake)
    for ws in (b1, b2):
        assert await recv_json(ws) == typing(ALICE, BOB, True)
    await send(a1, {"type": "typing_indicator", "recipient_id": BOB, "is_typing": False})
    for ws in (b1, b2):
        assert await recv_json(ws) == typing(ALICE, BOB, False)
    for ws in (a1, a2, carol):  # neither the typist's devices nor anyone else
        assert await barrier(ws) == []


async def test_typing_expires_without_a_refresh(
    start_demo: Callable[..., Demo], stack: AsyncExitStack
) -> None:
    demo = start_demo(limits=Limits(typing_timeout=0.3))
    alice = await demo.connect(stack, "alice")
    bob = await demo.connect(stack, "bob")
    await barrier(alice)
    await barrier(bob)

    loop = asyncio.get_running_loop()
    started = loop.time()
    await send(alice, {"type": "typing_indicator", "recipient_id": BOB, "is_typing": True})
    assert await recv_json(bob) == typing(ALICE, BOB, True)
    assert await recv_json(bob, timeout=10) == typing(ALICE, BOB, False)
    assert loop.time() - started >= 0.29  # the server's timer, not an echo
    assert await barrier(alice) == []
    assert await barrier(bob) == []


async def test_typing_is_turned_off_when_the_typist_goes_offline(
    demo: Demo, stack: AsyncExitStack
) -> None:
    bob = await demo.connect(stack, "bob")
    async with AsyncExitStack() as alice_stack:
        alice = await demo.connect(alice_stack, "alice")
        assert await barrier(bob) == [online(ALICE)]
        await send(alice, {"type": "typing_indicator", "recipient_id": BOB, "is_typing": True})
        assert await recv_json(bob) == typing(ALICE, BOB, True)
    assert await recv_json(bob) == typing(ALICE, BOB, False)
    assert await recv_json(bob) == online(ALICE, False)


async def test_forbidden_typing_is_dropped_silently(demo: Demo, stack: AsyncExitStack) -> None:
    alice = await demo.connect(stack, "alice")
    mallory = await demo.connect(stack, "mallory")
    await barrier(alice)
    for recipient in (ALICE, MALLORY, 99):  # forbidden, yourself, nobody
        await send(
            mallory, {"type": "typing_indicator", "recipient_id": recipient, "is_typing": True}
        )
    assert await barrier(mallory) == []  # no error frame: the sync's reply comes next
    assert await barrier(alice) == []


async def test_typing_over_its_rate_is_dropped_silently(
    start_demo: Callable[..., Demo], stack: AsyncExitStack
) -> None:
    demo = start_demo(limits=Limits(typing_rate=SLOW_RATE, typing_burst=5))
    alice = await demo.connect(stack, "alice")
    bob = await demo.connect(stack, "bob")
    await barrier(alice)
    await barrier(bob)
    for number in range(8):
        frame = {"type": "typing_indicator", "recipient_id": BOB, "is_typing": number % 2 == 0}
        await send(alice, frame)
    assert await barrier(alice) == []
    assert await barrier(bob) == [typing(ALICE, BOB, n % 2 == 0) for n in range(5)]


# -- user_online_status ----------------------------------------------------------------------


async def test_presence_changes_on_first_open_and_last_close_only(
    demo: Demo, stack: AsyncExitStack
) -> None:
    bob = await demo.connect(stack, "bob")
    mallory = await demo.connect(stack, "mallory")
    assert await barrier(bob) == []  # mallory is a stranger to bob

    async with AsyncExitStack() as second:
        async with AsyncExitStack() as first:
            a1 = await demo.connect(first, "alice")
            assert await recv_json(a1) == online(BOB)  # the snapshot
            assert await recv_json(bob) == online(ALICE)  # first open
            a2 = await demo.connect(second, "alice")
            assert await recv_json(a2) == online(BOB)
            assert await barrier(bob) == []  # a second device does not repeat it
        await demo.let_go(ALICE, 1)
        assert await barrier(bob) == []  # closing one of two: still online
        assert await barrier(a2) == []
    assert await recv_json(bob) == online(ALICE, False)  # the last close
    assert await barrier(bob) == []

    async with AsyncExitStack() as again:
        await demo.connect(again, "alice")
        assert await recv_json(bob) == online(ALICE)
    assert await recv_json(bob) == online(ALICE, False)
    assert await barrier(mallory) == []  # a stranger never hears of any of it


# -- messages_read ---------------------------------------------------------------------------


async def test_messages_read_goes_to_the_author_and_the_readers_other_connections(
    demo: Demo, stack: AsyncExitStack
) -> None:
    a1 = await demo.connect(stack, "alice")
    a2 = await demo.connect(stack, "alice")
    b1 = await demo.connect(stack, "bob")
    b2 = await demo.connect(stack, "bob")
    carol = await demo.connect(stack, "carol")
    for ws in (a1, a2, b1, b2, carol):
        await barrier(ws)

    ids = []
    for sender, recipient, content in [
        (a1, BOB, "one"),
        (a1, BOB, "two"),
        (a1, BOB, "three"),
        (carol, BOB, "from carol"),
        (b1, ALICE, "from bob"),
    ]:
        ids.append((await say(sender, recipient, content))["message"]["id"])
    for ws in (a1, a2, b1, b2, carol):
        await barrier(ws)
    one, two, three, from_carol, from_bob = ids

    await send(b1, {"type": "mark_read", "peer_id": ALICE, "up_to_id": two})
    receipt = {"type": "messages_read", "reader_id": BOB, "peer_id": ALICE, "up_to_id": two}
    assert await barrier(b1) == []  # not the connection that sent mark_read
    for ws in (a1, a2, b2):
        assert await barrier(ws) == [receipt]
    assert await barrier(carol) == []

    # Idempotent: nothing changed, nothing goes out.
    await send(b1, {"type": "mark_read", "peer_id": ALICE, "up_to_id": two})
    await send(b1, {"type": "mark_read", "peer_id": ALICE, "up_to_id": 0})
    assert await barrier(b1) == []
    for ws in (a1, a2, b2):
        assert await barrier(ws) == []

    # up_to_id is the highest of the peer's messages now read, not the request's.
    await send(b1, {"type": "mark_read", "peer_id": ALICE, "up_to_id": FAR})
    receipt = {"type": "messages_read", "reader_id": BOB, "peer_id": ALICE, "up_to_id": three}
    assert await barrier(b1) == []
    for ws in (a1, a2, b2):
        assert await barrier(ws) == [receipt]
    assert await barrier(carol) == []

    async with demo.api(await demo.session("bob")) as http:
        with_alice = (await http.get(f"/api/messages/{ALICE}")).json()["messages"]
        with_carol = (await http.get(f"/api/messages/{CAROL}")).json()["messages"]
    read = {m["id"]: m["is_read"] for m in with_alice + with_carol}
    assert read == {one: True, two: True, three: True, from_carol: False, from_bob: False}


async def test_mark_read_needs_no_permission(demo: Demo, stack: AsyncExitStack) -> None:
    # alice wrote to mallory before the policy kept them apart; mallory may still read it.
    (old,) = await demo.seed([(ALICE, MALLORY, "from before")])
    alice = await demo.connect(stack, "alice")
    mallory = await demo.connect(stack, "mallory")
    await send(mallory, {"type": "mark_read", "peer_id": ALICE, "up_to_id": old})
    assert await barrier(mallory) == []
    receipt = {"type": "messages_read", "reader_id": MALLORY, "peer_id": ALICE, "up_to_id": old}
    assert await barrier(alice) == [receipt]


async def test_concurrent_senders_arrive_in_id_order_once_each(
    demo: Demo, stack: AsyncExitStack
) -> None:
    alice = await demo.connect(stack, "alice")
    b1 = await demo.connect(stack, "bob")
    b2 = await demo.connect(stack, "bob")
    for ws in (alice, b1, b2):
        await barrier(ws)

    async def over_http(number: int) -> int:
        body = {"recipient_id": BOB, "content": f"carol {number}"}
        response = await http.post("/api/messages", json=body)
        assert response.status_code == 201
        return int(response.json()["id"])

    for number in range(20):  # alice's burst over the WebSocket ...
        await send(alice, pm(BOB, f"alice {number}"))
    async with demo.api(await demo.session("carol")) as http:  # ... while carol posts
        from_carol = await asyncio.gather(*(over_http(n) for n in range(20)))
    from_alice = [(await recv_json(alice))["message"]["id"] for _ in range(20)]
    assert from_alice == sorted(from_alice)
    for ws in (b1, b2):
        live = [(await recv_json(ws))["message"]["id"] for _ in range(40)]
        assert live == sorted(set(live))  # strictly increasing: in order, once each
        assert set(live) == set(from_alice) | set(from_carol)
        assert await barrier(ws) == []


# -- sync ----------------------------------------------------------------------------------


async def test_sync_replays_in_id_order_in_pages(
    start_demo: Callable[..., Demo], stack: AsyncExitStack
) -> None:
    demo = start_demo(limits=Limits(sync_page_size=3, max_queue=64))
    rows = [
        (ALICE, BOB, "a→b 1"),
        (BOB, CAROL, "b→c (not alice's)"),
        (BOB, ALICE, "b→a 1"),
        (ALICE, CAROL, "a→c 1"),
        (CAROL, BOB, "c→b (not alice's)"),
        (CAROL, ALICE, "c→a 1"),
        (ALICE, BOB, "a→b 2"),
        (BOB, ALICE, "b→a 2"),
    ]
    ids = await demo.seed(rows)
    mine = [(i, r) for i, r in zip(ids, rows, strict=True) if ALICE in r[:2]]
    assert len(mine) == 6

    alice = await demo.connect(stack, "alice")
    replayed, pages = await sync_all(alice, 0)
    assert [f["message"]["id"] for f in replayed] == [i for i, _ in mine]
    for frame, (_, (sender, receiver, content)) in zip(replayed, mine, strict=True):
        assert (frame["sender_id"], frame["recipient_id"]) == (sender, receiver)
        check_message(frame["message"], sender=sender, receiver=receiver, content=content)
    assert pages == [
        {"type": "sync_complete", "last_id": mine[2][0], "has_more": True},
        {"type": "sync_complete", "last_id": mine[5][0], "has_more": False},  # a full page
    ]

    # From the middle, and nothing new: last_id is after_id.
    replayed, pages = await sync_all(alice, mine[3][0])
    assert [f["message"]["id"] for f in replayed] == [mine[4][0], mine[5][0]]
    assert pages == [{"type": "sync_complete", "last_id": mine[5][0], "has_more": False}]
    for after_id in (mine[5][0], 10**9):
        await send(alice, {"type": "sync", "after_id": after_id})
        assert await recv_json(alice) == {
            "type": "sync_complete",
            "last_id": after_id,
            "has_more": False,
        }

    # A message that arrived since: a one-message page.
    (late,) = await demo.seed([(CAROL, ALICE, "late")])
    replayed, pages = await sync_all(alice, mine[5][0])
    assert [f["message"]["id"] for f in replayed] == [late]
    assert pages == [{"type": "sync_complete", "last_id": late, "has_more": False}]


# -- error frames -----------------------------------------------------------------------------

INVALID_FRAMES = {
    "not JSON": "hello",
    "truncated JSON": '{"type": "sync", "after_id": 1',
    "an array": '[{"type": "sync", "after_id": 0}]',
    "a string": '"sync"',
    "null": "null",
    "no type": '{"after_id": 0}',
    "unknown type": '{"type": "shout", "content": "hi"}',
    "type of a server frame": '{"type": "sync_complete", "last_id": 1, "has_more": false}',
    "missing field": '{"type": "private_message", "content": "hi"}',
    "string for an int": '{"type": "private_message", "recipient_id": "2", "content": "hi"}',
    "bool for an int": '{"type": "sync", "after_id": true}',
    "float for an int": '{"type": "sync", "after_id": 1.5}',
    "int for a bool": '{"type": "typing_indicator", "recipient_id": 2, "is_typing": 1}',
    "null content": '{"type": "private_message", "recipient_id": 2, "content": null}',
    "empty client_id": '{"type": "private_message", "recipient_id": 2, "content": "x", '
    '"client_id": ""}',
    "nested 40 deep": '{"type": "sync", "after_id": 0, "x": ' + "[" * 40 + "]" * 40 + "}",
    "integer 2**60": f'{{"type": "sync", "after_id": {2**60}}}',
    "integer -2**60": f'{{"type": "mark_read", "peer_id": 2, "up_to_id": {-(2**60)}}}',
    "integer 2**53+1": f'{{"type": "sync", "after_id": {2**53 + 1}}}',
    "NaN": '{"type": "sync", "after_id": NaN}',
    "Infinity": '{"type": "mark_read", "peer_id": 2, "up_to_id": Infinity}',
    "lone surrogate": '{"type": "private_message", "recipient_id": 2, "content": "a\\ud800b"}',
    "lone low surrogate": '{"type": "private_message", "recipient_id": 2, "content": "\\udc00"}',
}


async def test_each_invalid_frame_gets_invalid_frame_and_the_connection_stays_open(
    demo: Demo, stack: AsyncExitStack
) -> None:
    alice = await demo.connect(stack, "alice")
    bob = await demo.connect(stack, "bob")
    await barrier(alice)
    await barrier(bob)
    for cause, text in INVALID_FRAMES.items():
        await alice.send(text)
        error = await recv_json(alice)
        assert error["type"] == "error" and error["code"] == "invalid_frame", (cause, error)
        assert set(error) == {"type", "code", "message"}, (cause, error)
        assert isinstance(error["message"], str) and error["message"], cause
        assert await barrier(alice) == [], cause  # still open, nothing else queued
    await alice.send(b'{"type": "sync", "after_id": 0}')  # a binary frame
    error = await recv_json(alice)
    assert (error["type"], error["code"]) == ("error", "invalid_frame")
    assert await barrier(alice) == []
    assert await barrier(bob) == []  # none of them was delivered

    # Just inside the limits: nested 32 deep, an unknown field, ids of ±2**53.
    inside = '{"type": "sync", "after_id": 9007199254740992, "x": ' + "[" * 31 + "]" * 31 + "}"
    await alice.send(inside)
    assert await recv_json(alice) == {"type": "sync_complete", "last_id": FAR, "has_more": False}
    await send(alice, {"type": "mark_read", "peer_id": BOB, "up_to_id": -FAR})
    assert await barrier(alice) == []


async def test_forbidden_sends_get_forbidden(demo: Demo, stack: AsyncExitStack) -> None:
    alice = await demo.connect(stack, "alice")
    mallory = await demo.connect(stack, "mallory")
    await barrier(alice)
    await barrier(mallory)
    for sender, recipient in [(mallory, ALICE), (alice, MALLORY), (alice, ALICE), (alice, 99)]:
        await send(sender, pm(recipient, "hi", "k-1"))
        error = await recv_json(sender)
        assert error["type"] == "error" and error["code"] == "forbidden", error
        assert error["client_id"] == "k-1"
        assert set(error) == {"type", "code", "message", "client_id"}
    await send(mallory, pm(CAROL, "mallory may talk to carol"))
    assert (await recv_json(mallory))["type"] == "private_message"
    await send(mallory, pm(ALICE, "no client id"))
    error = await recv_json(mallory)
    assert error["code"] == "forbidden" and "client_id" not in error
    assert await barrier(alice) == []
    assert await barrier(mallory) == []
    async with demo.api(await demo.session("alice")) as http:
        for peer in (ALICE, MALLORY):
            assert (await http.get(f"/api/messages/{peer}")).json()["messages"] == []


async def test_content_limits_give_too_long(demo: Demo, stack: AsyncExitStack) -> None:
    alice = await demo.connect(stack, "alice")
    bob = await demo.connect(stack, "bob")
    await barrier(alice)
    await barrier(bob)
    for content in ["", " ", " \t\r\n ", "\u3000\u00a0", "a" * 4001, "😀" * 4001]:
        await send(alice, pm(BOB, content, "k"))
        error = await recv_json(alice)
        assert (error["type"], error["code"], error["client_id"]) == ("error", "too_long", "k")
    for content in ["a" * 4000, "😀" * 4000, " x "]:  # characters, not bytes
        await send(alice, pm(BOB, content))
        frame = await recv_json(alice)
        assert frame["type"] == "private_message"
        assert frame["message"]["content"] == content
        assert await recv_json(bob) == frame
    assert await barrier(bob) == []


async def test_rate_limited_with_retry_after_resends_included(
    start_demo: Callable[..., Demo], stack: AsyncExitStack
) -> None:
    demo = start_demo(limits=Limits(message_rate=SLOW_RATE))  # burst: the default 20
    a1 = await demo.connect(stack, "alice")
    a2 = await demo.connect(stack, "alice")
    bob = await demo.connect(stack, "bob")
    for ws in (a1, a2, bob):
        await barrier(ws)

    sent = {}
    for number in range(20):
        await send(a1, pm(BOB, f"m{number}", f"k{number}"))
        frame = await recv_json(a1)
        assert frame["type"] == "private_message", (number, frame)
        sent[f"k{number}"] = frame
    await send(a1, pm(BOB, "one too many", "k20"))
    error = await recv_json(a1)
    assert (error["type"], error["code"], error["client_id"]) == ("error", "rate_limited", "k20")
    assert isinstance(error["retry_after"], (int, float)) and error["retry_after"] > 0

    # A resend counts against the rate too: answering it costs as much as a send.
    await send(a1, pm(BOB, "again", "k5"))
    error = await recv_json(a1)
    assert (error["type"], error["code"], error["client_id"]) == ("error", "rate_limited", "k5")

    # Each over-limit frame gets its own error, and they are not abuse (no 1008 at 50).
    for _ in range(60):
        await send(a1, pm(BOB, "spam"))
    for _ in range(60):
        error = await recv_json(a1)
        assert error["code"] == "rate_limited" and error["retry_after"] > 0
    assert await barrier(a1) == []
    for ws in (a2, bob):  # exactly the 20 messages, once each
        frames = await barrier(ws)
        assert frames == list(sent.values())


async def test_default_rate_limit_allows_a_burst_of_20(demo: Demo, stack: AsyncExitStack) -> None:
    alice = await demo.connect(stack, "alice")
    await barrier(alice)
    for number in range(40):  # sent at once: the server sees a burst
        await send(alice, pm(BOB, f"m{number}"))
    answers = [await recv_json(alice) for _ in range(40)]
    # Answers come as they are ready: a refusal does not wait for a commit.
    sent = [frame["message"]["content"] for frame in answers if frame["type"] != "error"]
    assert sent[:20] == [f"m{number}" for number in range(20)]
    limited = [frame for frame in answers if frame["type"] == "error"]
    assert limited, "40 messages at once must go over 10/s burst 20"
    for error in limited:
        assert error["code"] == "rate_limited"
        assert 0 < error["retry_after"] <= 0.1  # one token at 10 per second


async def test_a_resend_counts_against_the_rate_once(
    start_demo: Callable[..., Demo], stack: AsyncExitStack
) -> None:
    demo = start_demo(limits=Limits(message_rate=SLOW_RATE))
    alice = await demo.connect(stack, "alice")
    bob = await demo.connect(stack, "bob")
    await barrier(alice)
    await barrier(bob)
    for number in range(15):
        await send(alice, pm(BOB, f"m{number}", f"k{number}"))
        assert (await recv_json(alice))["type"] == "private_message"
    for _ in range(5):  # the rest of the burst of 20: each resend is one request
        await send(alice, pm(BOB, "resend", "k3"))
        assert (await recv_json(alice))["message"]["client_id"] == "k3"
    await send(alice, pm(BOB, "the 21st", "k20"))
    assert (await recv_json(alice))["code"] == "rate_limited"
    assert len(await barrier(bob)) == 15  # resends are never fanned out again


# -- close codes ---------------------------------------------------------------------------


async def test_a_frame_over_64_KiB_closes_with_1009(demo: Demo, stack: AsyncExitStack) -> None:
    head = f'{{"type": "sync", "after_id": {FAR}, "pad": "'
    exactly = head + "x" * (64 * 1024 - len(head) - 2) + '"}'
    assert len(exactly.encode()) == 64 * 1024
    alice = await demo.connect(stack, "alice")
    await alice.send(exactly)
    assert await recv_json(alice) == {"type": "sync_complete", "last_id": FAR, "has_more": False}
    await alice.send(exactly[:-2] + 'x"}')
    code, frames = await close_code(alice)
    assert (code, frames) == (1009, [])

    # Bytes count, not characters: 16,385 emoji are 65,540 bytes.
    alice2 = await demo.connect(stack, "alice")
    await send(alice2, pm(BOB, "😀" * 16385))
    assert await close_code(alice2) == (1009, [])


async def test_50_invalid_frames_in_a_row_close_with_1008(
    demo: Demo, stack: AsyncExitStack
) -> None:
    alice = await demo.connect(stack, "alice")
    for _ in range(49):
        await alice.send("not json")
    for _ in range(49):
        assert (await recv_json(alice))["code"] == "invalid_frame"
    assert await barrier(alice) == []  # 49 do not close; a valid frame resets the count
    for _ in range(49):
        await alice.send("not json")
    await send(alice, pm(BOB, "valid"))
    for _ in range(49):
        assert (await recv_json(alice))["code"] == "invalid_frame"
    assert (await recv_json(alice))["type"] == "private_message"
    for _ in range(50):
        await alice.send("not json")
    code, frames = await close_code(alice)
    assert code == 1008
    assert len(frames) <= 49 and all(f["code"] == "invalid_frame" for f in frames)


async def test_a_slow_consumer_is_closed_with_1013_and_sync_recovers_everything(
    start_demo: Callable[..., Demo], stack: AsyncExitStack
) -> None:
    limits = Limits(max_queue=8, sync_page_size=4, message_rate=10_000, message_burst=10_000)
    # Small socket buffers on both ends so back-pressure reaches the app quickly.
    demo = start_demo(limits=limits, metrics=True, sndbuf=4096)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", demo.server.port))
    # A client that stops reading: no compression (so bytes add up), a 1-frame buffer.
    slow = await demo.connect(stack, "bob", sock=sock, max_queue=1, compression=None)

    rng = random.Random(1013)
    ids = []
    async with demo.api(await demo.session("alice")) as http:
        for _ in range(2000):  # a failure guard: some 30 are enough with these buffers
            content = "".join(rng.choices(string.ascii_letters, k=4000))
            response = await http.post(
                "/api/messages", json={"recipient_id": BOB, "content": content}
            )
            assert response.status_code == 201
            ids.append(response.json()["id"])
            metrics = (await http.get("/metrics")).text
            if "pmhub_slow_consumer_closes_total 1.0" in metrics:
                break
        else:
            pytest.fail("the slow consumer was never closed")

    code, frames = await close_code(slow, within=30)
    assert code == 1013
    live = [frame["message"]["id"] for frame in frames]
    assert live == ids[: len(live)]  # in order, nothing skipped before the close
    assert len(live) < len(ids)  # ... and some were lost with the queue

    bob = await demo.connect(stack, "bob")
    replayed, pages = await sync_all(bob, live[-1] if live else 0)
    assert live + [frame["message"]["id"] for frame in replayed] == ids
    assert pages[-1] == {"type": "sync_complete", "last_id": ids[-1], "has_more": False}


async def test_logout_closes_that_sessions_connections_with_1008(
    demo: Demo, stack: AsyncExitStack
) -> None:
    first = await demo.session("alice", fresh=True)
    second = await demo.session("alice", fresh=True)
    bob = await demo.connect(stack, "bob")
    a1 = await demo.connect(stack, "alice", session=first)
    a2 = await demo.connect(stack, "alice", session=first)
    other = await demo.connect(stack, "alice", session=second)
    for ws in (bob, a1, a2, other):
        await barrier(ws)

    async with demo.api(first) as http:
        response = await http.post("/api/logout")
    assert response.status_code == 200
    assert "Max-Age=0" in response.headers["set-cookie"]
    for ws in (a1, a2):
        code, _ = await close_code(ws, within=5)  # within 5 s
        assert code == 1008
    await demo.let_go(ALICE, 1)
    assert await barrier(other) == []  # the other session of the same user stays open
    assert await barrier(bob) == []  # and alice is still online

    async with demo.api(first) as http:
        check_error(await http.get("/api/me"), 403, "forbidden")
        check_error(await http.get(f"/api/messages/{BOB}"), 403, "forbidden")
        response = await http.post("/api/messages", json={"recipient_id": BOB, "content": "x"})
        check_error(response, 403, "forbidden")


async def test_server_shutdown_closes_with_1001(demo: Demo, stack: AsyncExitStack) -> None:
    alice = await demo.connect(stack, "alice")
    bob = await demo.connect(stack, "bob")
    await barrier(alice)
    await barrier(bob)
    stopping = asyncio.create_task(asyncio.to_thread(demo.server.stop))
    try:
        for ws in (alice, bob):
            assert await close_code(ws, within=10) == (1001, [])
    finally:
        await stopping


async def test_an_internal_failure_closes_with_1011_and_loses_nothing_confirmed(
    demo: Demo,
    stack: AsyncExitStack,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice = await demo.connect(stack, "alice")
    bob = await demo.connect(stack, "bob")
    await barrier(alice)
    await barrier(bob)
    confirmed = []
    for number in range(2):
        await send(alice, pm(BOB, f"kept {number}", f"k{number}"))
        confirmed.append(await recv_json(alice))
        assert await recv_json(bob) == confirmed[-1]

    async def broken_save(drafts: list[Draft]) -> None:
        raise RuntimeError("the disk is on fire")

    secret = "the plan: meet at 7f3a"
    monkeypatch.setattr(demo.hub.store, "save_many", broken_save)
    await send(alice, pm(BOB, secret, "k2"))
    code, frames = await close_code(alice)
    assert (code, frames) == (1011, [])  # no confirmation for what was not stored
    assert "the disk is on fire" in caplog.text  # the failure is logged ...
    assert secret not in caplog.text  # ... the content never
    assert await barrier(bob) == [online(ALICE, False)]  # bob's connection is unaffected
    monkeypatch.undo()

    alice = await demo.connect(stack, "alice")
    assert await barrier(alice) == [online(BOB)]
    assert await barrier(bob) == [online(ALICE)]
    replayed, _ = await sync_all(alice, 0)
    assert replayed == confirmed
    await send(alice, pm(BOB, secret, "k2"))  # the client retries: now it is stored
    retried = await recv_json(alice)
    assert retried["message"]["content"] == secret
    assert retried["message"]["id"] > confirmed[-1]["message"]["id"]


async def test_heartbeat_drops_a_client_that_does_not_answer_pings(
    start_demo: Callable[..., Demo], stack: AsyncExitStack
) -> None:
    demo = start_demo(limits=Limits(ping_interval=0.2, ping_timeout=1.5))
    bob = await demo.connect(stack, "bob")  # answers pings: stays
    session = await demo.session("alice")
    host, port = demo.ws_host.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            (
                "GET /ws HTTP/1.1\r\n"
                f"Host: {demo.ws_host}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n"
                f"Cookie: session={session}\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert await recv_json(bob) == online(ALICE)

        async def frame() -> tuple[int, bytes]:
            first, second = await reader.readexactly(2)
            size = second & 0x7F
            if size >= 126:
                size = int.from_bytes(await reader.readexactly(2 if size == 126 else 8), "big")
            return first & 0x0F, await reader.readexactly(size)

        opcodes = []
        with anyio.fail_after(10):
            try:
                while not opcodes or opcodes[-1] != 0x8:  # never answer: read until closed
                    opcode, _ = await frame()
                    opcodes.append(opcode)
            except asyncio.IncompleteReadError:
                opcodes.append(None)
        assert opcodes[0] == 0x1  # the welcome
        assert 0x9 in opcodes  # the server pinged
    finally:
        writer.close()
        await writer.wait_closed()
    assert await recv_json(bob, timeout=10) == online(ALICE, False)
    assert await barrier(bob) == []  # bob answered every ping and is still here


# -- HTTP API: messages -------------------------------------------------------------------------


async def test_post_message_201_and_fan_out_to_both_users(
    demo: Demo, stack: AsyncExitStack
) -> None:
    alice = await demo.connect(stack, "alice")
    bob = await demo.connect(stack, "bob")
    carol = await demo.connect(stack, "carol")
    for ws in (alice, bob, carol):
        await barrier(ws)
    async with demo.api(await demo.session("alice")) as http:
        for content in PAYLOADS[:3]:
            response = await http.post(
                "/api/messages", json={"recipient_id": BOB, "content": content}
            )
            assert response.status_code == 201
            assert response.headers["content-type"].startswith("application/json")
            message = response.json()
            check_message(message, sender=ALICE, receiver=BOB, content=content)
            expected = {
                "type": "private_message",
                "sender_id": ALICE,
                "recipient_id": BOB,
                "message": message,
            }
            assert await recv_json(alice) == expected
            assert await recv_json(bob) == expected
    assert await barrier(carol) == []


async def test_post_message_resend_is_200_with_the_stored_message(
    demo: Demo, stack: AsyncExitStack
) -> None:
    alice = await demo.connect(stack, "alice")
    bob = await demo.connect(stack, "bob")
    await barrier(alice)
    await barrier(bob)
    async with demo.api(await demo.session("alice")) as http:
        body = {"recipient_id": BOB, "content": "once", "client_id": "http-1"}
        created = await http.post("/api/messages", json=body)
        assert created.status_code == 201
        check_message(
            created.json(), sender=ALICE, receiver=BOB, content="once", client_id="http-1"
        )
        again = await http.post("/api/messages", json={**body, "content": "twice"})
        assert again.status_code == 200
        assert again.json() == created.json()
    for ws in (alice, bob):  # fanned out once
        assert (await recv_json(ws))["message"] == created.json()
        assert await barrier(ws) == []


async def test_post_message_errors(http_demo: Demo) -> None:
    alice = await http_demo.session("alice")
    mallory = await http_demo.session("mallory")
    async with http_demo.api(alice) as http:
        for body in [b"not json", b"[]", b"{}", b'{"recipient_id": 2}', b'{"content": "x"}']:
            check_error(
                await http.post("/api/messages", content=body, headers=JSON_BODY),
                400,
                "invalid_frame",
            )
        for body in [
            {"recipient_id": "2", "content": "x"},
            {"recipient_id": 2, "content": 5},
            {"recipient_id": 2, "content": "x", "client_id": 7},
            {"recipient_id": 2, "content": "x", "client_id": ""},
            {"recipient_id": 2**60, "content": "x"},  # outside ±2**53, as on the WebSocket
        ]:
            check_error(await http.post("/api/messages", json=body), 400, "invalid_frame")
        for content in ["", "   ", "x" * 4001]:
            response = await http.post(
                "/api/messages", json={"recipient_id": BOB, "content": content}
            )
            check_error(response, 400, "too_long")
        for recipient in (ALICE, MALLORY):
            response = await http.post(
                "/api/messages", json={"recipient_id": recipient, "content": "x"}
            )
            check_error(response, 403, "forbidden")
        response = await http.post("/api/messages", json={"recipient_id": 99, "content": "x"})
        check_error(response, 404, "not_found")
        huge = {"recipient_id": BOB, "content": "x" * (64 * 1024)}
        check_error(await http.post("/api/messages", json=huge), 413, "too_large")
        evil = {"Origin": "http://evil.example"}
        response = await http.post(
            "/api/messages", json={"recipient_id": BOB, "content": "x"}, headers=evil
        )
        check_error(response, 403, "forbidden")
        assert (await http.get(f"/api/messages/{BOB}")).json()["messages"] == []
    async with http_demo.api(mallory) as http:
        response = await http.post("/api/messages", json={"recipient_id": ALICE, "content": "x"})
        check_error(response, 403, "forbidden")
    async with http_demo.api() as http:
        response = await http.post("/api/messages", json={"recipient_id": BOB, "content": "x"})
        check_error(response, 401, "unauthenticated")
    async with http_demo.api(alice + "x") as http:
        response = await http.post("/api/messages", json={"recipient_id": BOB, "content": "x"})
        check_error(response, 401, "unauthenticated")


async def test_post_message_over_the_rate_is_429_with_retry_after(
    start_demo: Callable[..., Demo],
) -> None:
    demo = start_demo(limits=Limits(message_rate=SLOW_RATE))
    async with demo.api(await demo.session("alice")) as http:
        for number in range(20):
            body = {"recipient_id": BOB, "content": f"m{number}", "client_id": f"k{number}"}
            assert (await http.post("/api/messages", json=body)).status_code == 201
        response = await http.post("/api/messages", json={"recipient_id": BOB, "content": "more"})
        check_error(response, 429, "rate_limited")
        assert int(response.headers["retry-after"]) >= 1
        resend = {"recipient_id": BOB, "content": "again", "client_id": "k7"}
        check_error(await http.post("/api/messages", json=resend), 429, "rate_limited")


async def test_post_message_while_the_store_fails_is_503_and_a_resend_later_stores_it(
    http_demo: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_save(drafts: list[Draft]) -> None:
        raise RuntimeError("the disk is on fire")

    body = {"recipient_id": BOB, "content": "later", "client_id": "k-503"}
    async with http_demo.api(await http_demo.session("alice")) as http:
        monkeypatch.setattr(http_demo.hub.store, "save_many", broken_save)
        response = await http.post("/api/messages", json=body)
        check_error(response, 503, "unavailable")
        assert int(response.headers["content-length"]) == len(response.content)
        monkeypatch.undo()
        response = await http.post("/api/messages", json=body)
        assert response.status_code == 201
        assert (await http.post("/api/messages", json=body)).json() == response.json()


async def test_a_resend_is_answered_with_the_stored_message_whatever_it_carries_now(
    demo: Demo, stack: AsyncExitStack
) -> None:
    alice = await demo.connect(stack, "alice")
    await barrier(alice)
    await send(alice, pm(BOB, "first", "k-1"))
    stored = await recv_json(alice)
    for resend in (pm(BOB, "   ", "k-1"), pm(ALICE, "to myself", "k-1")):
        await send(alice, resend)  # blank, or to a forbidden recipient: first write wins
        assert await recv_json(alice) == stored


async def test_history_pages_oldest_first_within_a_page(http_demo: Demo) -> None:
    rows = []
    for number in range(250):
        rows.append((ALICE, BOB, f"ab{number}") if number % 2 else (BOB, ALICE, f"ba{number}"))
        if number % 50 == 0:
            rows.append((ALICE, CAROL, f"ac{number}"))
    ids = await http_demo.seed(rows)
    pair = [i for i, row in zip(ids, rows, strict=True) if CAROL not in row[:2]]
    assert len(pair) == 250

    async with http_demo.api(await http_demo.session("alice")) as http:

        async def page(**params: int) -> tuple[list[int], bool]:
            response = await http.get(f"/api/messages/{BOB}", params=params)
            assert response.status_code == 200
            body = response.json()
            assert set(body) == {"messages", "has_more"}
            return [m["id"] for m in body["messages"]], body["has_more"]

        assert await page() == (pair[-50:], True)  # default limit 50, the newest
        assert await page(limit=500) == (pair[-200:], True)  # clamped to 200
        assert await page(limit=200, before_id=pair[-200]) == (pair[:50], False)
        assert await page(limit=10, before_id=pair[10]) == (pair[:10], False)
        assert await page(limit=10, before_id=pair[11]) == (pair[1:11], True)
        assert await page(before_id=pair[0]) == ([], False)

        collected: list[int] = []  # walking back with before_id sees every message once
        more, before = True, None
        while more:
            params = {"limit": 70} if before is None else {"limit": 70, "before_id": before}
            chunk, more = await page(**params)
            collected[:0] = chunk
            before = chunk[0]
        assert collected == pair

        check_error(await http.get(f"/api/messages/{BOB}?limit=ten"), 400, "invalid_frame")
        check_error(await http.get(f"/api/messages/{BOB}?before_id=x"), 400, "invalid_frame")
        check_error(await http.get("/api/messages/99"), 404, "not_found")
        check_error(await http.get("/api/messages/bob"), 404, "not_found")
    async with http_demo.api() as http:
        check_error(await http.get(f"/api/messages/{BOB}"), 401, "unauthenticated")


async def test_history_is_only_the_callers_own_conversation(http_demo: Demo) -> None:
    # Messages between mallory and alice from before the policy forbade them.
    rows = [
        (ALICE, MALLORY, "old 1"),
        (ALICE, BOB, "ab"),
        (MALLORY, ALICE, "old 2"),
        (CAROL, ALICE, "ca"),
        (BOB, CAROL, "bc"),
    ]
    ids = dict(zip([r[2] for r in rows], await http_demo.seed(rows), strict=True))

    async def contents(name: str, peer: int) -> list[str]:
        async with http_demo.api(await http_demo.session(name)) as http:
            response = await http.get(f"/api/messages/{peer}")
        assert response.status_code == 200
        messages = response.json()["messages"]
        assert [m["id"] for m in messages] == [ids[m["content"]] for m in messages]
        return [m["content"] for m in messages]

    assert await contents("alice", BOB) == ["ab"]
    assert await contents("bob", ALICE) == ["ab"]
    assert await contents("alice", CAROL) == ["ca"]
    assert await contents("carol", BOB) == ["bc"]
    assert await contents("carol", MALLORY) == []
    assert await contents("mallory", ALICE) == ["old 1", "old 2"]  # may read, not write
    assert await contents("alice", MALLORY) == ["old 1", "old 2"]
    assert await contents("mallory", BOB) == []


async def test_mark_read_over_http(demo: Demo, stack: AsyncExitStack) -> None:
    a1 = await demo.connect(stack, "alice")
    a2 = await demo.connect(stack, "alice")
    bob = await demo.connect(stack, "bob")
    for ws in (a1, a2, bob):
        await barrier(ws)
    ids = []
    for content in ("one", "two", "three"):
        await send(bob, pm(ALICE, content))
        ids.append((await recv_json(bob))["message"]["id"])
    for ws in (a1, a2, bob):
        await barrier(ws)

    async with demo.api(await demo.session("alice")) as http:
        response = await http.post(f"/api/messages/{BOB}/read", json={"up_to_id": ids[1]})
        assert response.status_code == 200
        assert response.json() == {"updated": 2}
        receipt = {"type": "messages_read", "reader_id": ALICE, "peer_id": BOB, "up_to_id": ids[1]}
        for ws in (bob, a1, a2):  # the author, and every connection of the reader
            assert await barrier(ws) == [receipt]

        response = await http.post(f"/api/messages/{BOB}/read", json={"up_to_id": ids[1]})
        assert response.json() == {"updated": 0}
        for ws in (bob, a1, a2):
            assert await barrier(ws) == []

        response = await http.post(f"/api/messages/{BOB}/read", json={"up_to_id": FAR})
        assert response.json() == {"updated": 1}
        receipt = {"type": "messages_read", "reader_id": ALICE, "peer_id": BOB, "up_to_id": ids[2]}
        assert await barrier(bob) == [receipt]

        check_error(await http.post(f"/api/messages/{BOB}/read", json={}), 400, "invalid_frame")
        for up_to_id in ("1", 2**60, None):
            response = await http.post(f"/api/messages/{BOB}/read", json={"up_to_id": up_to_id})
            check_error(response, 400, "invalid_frame")
        response = await http.post("/api/messages/99/read", json={"up_to_id": 1})
        check_error(response, 404, "not_found")
    async with demo.api() as http:
        response = await http.post(f"/api/messages/{BOB}/read", json={"up_to_id": 1})
        check_error(response, 401, "unauthenticated")


async def test_conversations_most_recent_first_with_unread_counts(http_demo: Demo) -> None:
    ids = await http_demo.seed(
        [
            (BOB, ALICE, "b1"),
            (ALICE, CAROL, "a1"),
            (BOB, ALICE, "b2"),
            (CAROL, ALICE, "c1"),
            (ALICE, BOB, "a2"),
            (BOB, CAROL, "bc"),
        ]
    )

    async def rows(name: str) -> list[tuple[int, str, int]]:
        async with http_demo.api(await http_demo.session(name)) as http:
            response = await http.get("/api/conversations")
        assert response.status_code == 200
        body = response.json()
        for row in body:
            assert set(row) == {"peer_id", "last_message", "unread_count"}
            assert set(row["last_message"]) == MESSAGE_KEYS
        return [(r["peer_id"], r["last_message"]["content"], r["unread_count"]) for r in body]

    assert await rows("alice") == [(BOB, "a2", 2), (CAROL, "c1", 1)]
    assert await rows("carol") == [(BOB, "bc", 1), (ALICE, "c1", 1)]
    assert await rows("mallory") == []
    async with http_demo.api(await http_demo.session("alice")) as http:
        await http.post(f"/api/messages/{BOB}/read", json={"up_to_id": ids[2]})
    assert await rows("alice") == [(BOB, "a2", 0), (CAROL, "c1", 1)]
    async with http_demo.api() as http:
        check_error(await http.get("/api/conversations"), 401, "unauthenticated")


# -- HTTP API: operations ---------------------------------------------------------------------


async def test_healthz(demo: Demo, stack: AsyncExitStack, monkeypatch: pytest.MonkeyPatch) -> None:
    await demo.connect(stack, "alice")
    async with demo.api() as http:
        response = await http.get("/healthz")
        assert response.status_code == 200
        assert response.json()["status"] == "ok"

        async def down() -> None:
            raise RuntimeError("the database went away")

        monkeypatch.setattr(demo.hub.store, "ping", down)
        response = await http.get("/healthz")
        assert response.status_code == 503
        assert response.json()["status"] != "ok"
        monkeypatch.undo()
        assert (await http.get("/healthz")).status_code == 200


async def test_metrics_in_prometheus_text_format(
    start_demo: Callable[..., Demo], stack: AsyncExitStack
) -> None:
    demo = start_demo(metrics=True)
    alice = await demo.connect(stack, "alice")
    await send(alice, pm(BOB, "counted"))
    await recv_json(alice)
    await send(alice, pm(ALICE, "forbidden"))
    await recv_json(alice)
    async with demo.api() as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE pmhub_connections gauge" in text
    assert "pmhub_connections 1.0" in text
    assert "pmhub_users_online 1.0" in text
    assert "pmhub_messages_in_total 1.0" in text
    assert 'pmhub_errors_total{code="forbidden"} 1.0' in text
    assert 'pmhub_store_seconds_count{operation="save"}' in text


async def test_metrics_off_is_404(http_demo: Demo) -> None:
    async with http_demo.api() as http:
        check_error(await http.get("/metrics"), 404, "not_found")


async def test_unknown_routes_are_404_and_wrong_methods_405(http_demo: Demo) -> None:
    async with http_demo.api(await http_demo.session("alice")) as http:
        for path in ["/nope", "/api/nope", "/api/messages/2/read/more", "/api", "/ws/x"]:
            check_error(await http.get(path), 404, "not_found")
        for method, path, allow in [
            ("GET", "/api/messages", "POST"),
            ("DELETE", "/api/messages", "POST"),
            ("POST", "/api/messages/2", "GET"),
            ("GET", "/api/messages/2/read", "POST"),
            ("POST", "/api/conversations", "GET"),
            ("POST", "/healthz", "GET"),
            ("PUT", "/metrics", "GET"),
        ]:
            response = await http.request(method, path)
            check_error(response, 405, "method_not_allowed")
            assert response.headers["allow"] == allow


# -- the demo's own routes ----------------------------------------------------------------------


async def test_demo_routes_answer_405_to_other_methods(http_demo: Demo) -> None:
    async with http_demo.api() as http:
        response = await http.get("/api/login")
        check_error(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "POST"


async def test_demo_login_and_me(http_demo: Demo) -> None:
    async with http_demo.api() as http:
        response = await http.post("/api/login", json={"username": "alice", "password": "alice"})
        assert response.status_code == 200
        assert response.json() == {"id": ALICE, "username": "alice"}
        cookie = response.headers["set-cookie"]
        assert cookie.startswith("session=")
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
        session = response.cookies["session"]
        http.cookies.clear()  # httpx keeps cookies: this client stays anonymous

        for body in [
            {"username": "alice", "password": "bob"},
            {"username": "alice", "password": ""},
            {"username": "eve", "password": "eve"},
            {"username": "alice", "password": "pässwörd"},  # non-ASCII is just wrong
            {"username": "älice", "password": "älice"},
        ]:
            response = await http.post("/api/login", json=body)
            check_error(response, 401, "unauthenticated")
            assert "set-cookie" not in response.headers
        for raw in [b"", b"not json", b'{"username": "alice"}', b'{"username": 1, "password": 1}']:
            check_error(
                await http.post("/api/login", content=raw, headers=JSON_BODY), 400, "invalid_frame"
            )

        check_error(await http.get("/api/me"), 401, "unauthenticated")
    async with http_demo.api(session) as http:
        response = await http.get("/api/me")
        assert response.status_code == 200
        assert response.json() == {"id": ALICE, "username": "alice"}


async def test_demo_users_lists_who_you_may_talk_to(http_demo: Demo) -> None:
    expected = {
        "alice": [BOB, CAROL],
        "bob": [ALICE, CAROL],
        "carol": [ALICE, BOB, MALLORY],
        "mallory": [CAROL],
    }
    for name, peers in expected.items():
        async with http_demo.api(await http_demo.session(name)) as http:
            response = await http.get("/api/users")
        assert response.status_code == 200
        assert response.json() == [{"id": peer, "username": NAMES[peer]} for peer in peers]
    async with http_demo.api() as http:
        check_error(await http.get("/api/users"), 401, "unauthenticated")


@pytest.mark.parametrize(
    ("path", "name", "content_type"),
    [
        ("/", "chat.html", "text/html; charset=utf-8"),
        ("/chat.js", "chat.js", "text/javascript; charset=utf-8"),
        ("/chat.css", "chat.css", "text/css; charset=utf-8"),
        ("/client.js", "client.js", "text/javascript; charset=utf-8"),
    ],
)
async def test_demo_serves_the_page_and_the_browser_client_from_the_package(
    http_demo: Demo, path: str, name: str, content_type: str
) -> None:
    async with http_demo.api() as http:
        response = await http.get(path)
        head = await http.head(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == (resources.files("pmhub.web") / name).read_bytes()
    assert head.status_code == 200 and head.content == b""
    if path != "/client.js":  # served by the demo, with the page's policy
        csp = response.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "unsafe" not in csp
