"""pmhub.client end to end: real servers on 127.0.0.1, real sockets, no mocks.

The demo app (examples/asgi_chat.py) runs under uvicorn in a thread
(:class:`servers.LiveServer`) or as its own process (:class:`servers.DemoProcess`,
for restarts). Between a client and the server there is often a :class:`Proxy`:
a TCP relay in the test's own event loop that can cut every connection with a
TCP reset, stall (hold bytes without closing, as a dead network does) or refuse
new connections (as a server that is down does). Faults are injected there, so
the client under test sees exactly what it would see on a real network.

Every wait is for an event (a :class:`Watcher` collects each client's events
and tests wait for a condition on them) under ``anyio.fail_after``, never a
sleep. Every test runs on asyncio and on trio; the servers have their own loop.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from anyio.abc import SocketAttribute, TaskStatus
from anyio.streams.tls import TLSStream
from docblocks import load_example as load_doc_example
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from servers import (
    DemoProcess,
    LiveServer,
    cookie_header,
    free_port,
    load_example,
    login,
    websockets_server,
)

from pmhub import Limits, MemoryStore, PrometheusMetrics, Rejected, SessionAuthenticator
from pmhub.client import Client, Connected, Disconnected, Event, PendingSend, Synced, connect
from pmhub.errors import Unauthenticated
from pmhub.frames import Message, MessagesRead, PrivateMessage, System, TypingIndicator

pytestmark = pytest.mark.anyio

demo_app = load_example("asgi_chat")

SECRET = "python-client-test-secret-0123456789"
ALICE, BOB, CAROL, MALLORY = 1, 2, 3, 4
NAMES = {ALICE: "alice", BOB: "bob", CAROL: "carol", MALLORY: "mallory"}
#: Fast reconnects: the tests wait for them, and the backoff logic is the same.
FAST = {"reconnect_delay": 0.02, "max_reconnect_delay": 0.2}
#: Rates no test reaches, for tests about something else.
UNLIMITED = Limits(message_rate=10_000.0, message_burst=10_000)
TIMEOUT = 20.0  # guards against a hang only


def session(user_id: int) -> str:
    """A ``session`` cookie the demo accepts when it signs with SECRET."""
    return SessionAuthenticator(SECRET, MemoryStore()).issue(user_id)


# -- servers ---------------------------------------------------------------------------


@dataclass
class Demo:
    server: LiveServer
    db: Path
    registry: CollectorRegistry
    last_id: int = 0  # for tests that reuse one server across examples

    adapter: str = "asgi"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def port(self) -> int:
        """The port of the WebSocket adapter under test."""
        return self.server.websockets_port if self.adapter == "websockets" else self.server.port

    def stored(self, content: str) -> int:
        return count_rows(self.db, content)

    def errors(self, code: str) -> float:
        value = self.registry.get_sample_value("pmhub_errors_total", {"code": code})
        return value or 0.0


def count_rows(db: Path, content: str) -> int:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        query = "SELECT count(*) FROM messages WHERE content = ?"
        (count,) = conn.execute(query, [content]).fetchone()
        return int(count)


@contextmanager
def serving(
    db: Path, limits: Limits | None = None, adapter: str = "asgi", **options: Any
) -> Iterator[Demo]:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    # Built in a thread without an event loop: anyio primitives created while a
    # trio test runs would belong to trio, and the server runs on asyncio.
    with ThreadPoolExecutor(1) as pool:
        app, hub = pool.submit(
            demo_app.build_app, str(db), SECRET, limits=limits, metrics=metrics
        ).result()
    options.setdefault("ws_ping_interval", hub.limits.ping_interval)
    options.setdefault("ws_ping_timeout", hub.limits.ping_timeout)
    if adapter == "websockets":  # served beside the ASGI app, on the same hub
        options["websockets"] = websockets_server(hub, SECRET)
    server = LiveServer(app, before_shutdown=hub.close_all, **options)
    server.start()
    try:
        yield Demo(server, db, registry, adapter=adapter)
    finally:
        server.stop()


@pytest.fixture(params=["asgi", "websockets"])
def adapter(request: pytest.FixtureRequest) -> str:
    """The server adapter the client talks to: every client test runs against both."""
    return str(request.param)


@pytest.fixture
def start_demo(tmp_path: Path, adapter: str) -> Iterator[Callable[..., Demo]]:
    """Start demo servers (a fresh SQLite file each); they stop after the test."""
    with ExitStack() as stack:
        count = 0

        def start(limits: Limits | None = None, **options: Any) -> Demo:
            nonlocal count
            count += 1
            db = tmp_path / f"chat{count}.db"
            return stack.enter_context(serving(db, limits, adapter, **options))

        yield start


# -- a relay that breaks the network on demand ----------------------------------------


class Proxy:
    """A TCP relay to ``127.0.0.1:upstream`` on a port of its own.

    ``cut()`` resets every relayed connection both ways; ``stall()`` holds
    the bytes (a black hole: nothing closes) until ``flow()``; ``down()``
    also resets new connections until ``up()``. ``endings`` records how each
    relayed connection ended: ``"closed"`` when both sides closed in turn,
    ``"broken"`` otherwise.
    """

    def __init__(self, upstream: int, tls: ssl.SSLContext | None = None) -> None:
        self.upstream = upstream
        self.tls = tls  # terminate TLS for the client, as a load balancer does
        self.port = 0
        self.accepted = 0
        self.refusing = False
        self.endings: list[str] = []
        self.ended = anyio.Event()  # re-armed after each ending
        self._flowing = anyio.Event()
        self._flowing.set()
        self._relays: set[anyio.CancelScope] = set()
        self._streams: set[anyio.abc.SocketStream] = set()

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}/ws"

    async def serve(self, *, task_status: TaskStatus[None]) -> None:
        (listener,) = (await anyio.create_tcp_listener(local_host="127.0.0.1")).listeners
        assert isinstance(listener, anyio.abc.SocketListener)
        async with listener, anyio.create_task_group() as tasks:
            self.port = listener.extra(SocketAttribute.local_port)
            task_status.started()
            while True:
                client = await listener.accept()
                self._streams.add(client)  # closed by aclose() if its task never runs
                tasks.start_soon(self._relay, client)

    async def aclose(self) -> None:
        for stream in list(self._streams):
            await self._reset(stream)

    def cut(self) -> None:
        for scope in list(self._relays):
            scope.cancel()

    def down(self) -> None:
        self.refusing = True
        self.cut()

    def up(self) -> None:
        self.refusing = False

    def stall(self) -> None:
        if self._flowing.is_set():
            self._flowing = anyio.Event()

    def flow(self) -> None:
        self._flowing.set()

    async def _relay(self, raw: anyio.abc.SocketStream) -> None:
        self.accepted += 1
        ending = "broken"
        client: anyio.abc.ByteStream = raw
        upstream: anyio.abc.SocketStream | None = None
        try:
            if self.refusing:
                return
            if self.tls is not None:
                try:
                    client = await TLSStream.wrap(
                        raw, server_side=True, ssl_context=self.tls, standard_compatible=False
                    )
                except (OSError, anyio.BrokenResourceError, anyio.EndOfStream):
                    return  # e.g. the client does not trust the certificate
            upstream = await anyio.connect_tcp("127.0.0.1", self.upstream)
            self._streams.add(upstream)
            with anyio.CancelScope() as scope:
                self._relays.add(scope)
                try:
                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(self._pipe, client, upstream, tasks.cancel_scope)
                        tasks.start_soon(self._pipe, upstream, client, tasks.cancel_scope)
                    ending = "broken" if scope.cancel_called else "closed"
                finally:
                    self._relays.discard(scope)
        except OSError:
            pass  # the server is not there: the client sees a reset
        finally:
            with anyio.CancelScope(shield=True):
                for stream in (raw, upstream):
                    if stream is not None:
                        await self._reset(stream)
            self.endings.append(ending)
            self.ended.set()
            self.ended = anyio.Event()

    async def _reset(self, stream: anyio.abc.SocketStream) -> None:
        """Close with a TCP RST instead of an orderly FIN."""
        self._streams.discard(stream)
        with contextlib.suppress(OSError):
            sock = stream.extra(SocketAttribute.raw_socket)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await anyio.aclose_forcefully(stream)

    async def _pipe(
        self, source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream, scope: anyio.CancelScope
    ) -> None:
        try:
            async for chunk in source:
                await self._flowing.wait()
                await sink.send(chunk)
            await sink.send_eof()
        except NotImplementedError:  # no half-close over TLS: close both ways
            scope.cancel()
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            scope.cancel()


@asynccontextmanager
async def proxy_to(port: int, tls: ssl.SSLContext | None = None) -> AsyncIterator[Proxy]:
    proxy = Proxy(port, tls)
    try:
        async with anyio.create_task_group() as tasks:
            await tasks.start(proxy.serve)
            yield proxy
            tasks.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await proxy.aclose()


# -- watching a client -------------------------------------------------------------------


class Watcher:
    """Reads a client's events in the background, for tests to wait on."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self.ended = False
        self._changed = anyio.Event()

    async def run(self) -> None:
        try:
            async for event in self.client:
                self.events.append(event)
                self._notify()
        except Exception as exc:
            self.error = exc
        finally:
            self.ended = True
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def until(self, predicate: Callable[[], object], what: str = "a condition") -> None:
        with anyio.fail_after(TIMEOUT):
            while not predicate():
                if self.ended and not predicate():
                    raise AssertionError(f"the client ended ({self.error!r}) before {what}")
                await self._changed.wait()

    def of(self, kind: type[Any]) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]

    def message_ids(self) -> Counter[int]:
        return Counter(frame.message.id for frame in self.of(PrivateMessage))

    async def synced(self, times: int = 1) -> None:
        await self.until(lambda: len(self.of(Synced)) >= times, f"sync #{times}")

    async def has(self, ids: set[int]) -> None:
        await self.until(lambda: ids <= set(self.message_ids()), f"messages {sorted(ids)}")


@asynccontextmanager
async def chatting(url: str, user_id: int, **options: Any) -> AsyncIterator[tuple[Client, Watcher]]:
    options.setdefault("cookie", session(user_id))
    async with connect(url, **options) as client, anyio.create_task_group() as tasks:
        watcher = Watcher(client)
        tasks.start_soon(watcher.run)
        yield client, watcher
        tasks.cancel_scope.cancel()


def check_conversation(
    client: Client, watcher: Watcher, peer: int, expected: dict[int, Message]
) -> None:
    """``client`` has exactly ``expected`` (by id) with ``peer``: once, in id order."""
    ids = watcher.message_ids()
    doubled = {id_: n for id_, n in ids.items() if id_ in expected and n > 1}
    assert not doubled, f"yielded more than once: {doubled}"
    conversation = [m for m in client.messages(peer) if m.id in expected]
    assert [m.id for m in conversation] == sorted(expected), "not every message, or not in order"
    for message in conversation:
        stored = expected[message.id]
        assert (message.content, message.sender_id, message.client_id) == (
            stored.content,
            stored.sender_id,
            stored.client_id,
        )


# -- the basics ----------------------------------------------------------------------------


async def every_message_once(
    sent: list[Any], alice: tuple[Client, Any], bob: tuple[Client, Any]
) -> list[Message]:
    """Every post of alice ("a...") and bob ("b...") confirmed, stored in post order,
    and seen by each side exactly once, in id order; return the stored messages."""
    with anyio.fail_after(TIMEOUT):
        stored = [await pending.confirmed() for pending in sent]
    expected = {m.id: m for m in stored}
    assert len(expected) == len(sent)
    for sender in "ab":
        ids = [m.id for m in stored if m.content.startswith(sender)]
        assert ids == sorted(ids), f"{sender}'s messages were stored out of order"
    for (client, seen), peer in ((alice, BOB), (bob, ALICE)):
        await seen.has(set(expected))
        check_conversation(client, seen, peer, expected)
    return stored


async def test_two_clients_exchange_messages_typing_and_read_marks(
    start_demo: Callable[..., Demo],
) -> None:
    # typing_timeout: the server's own "false" must not beat the client's.
    demo = start_demo(Limits(typing_timeout=60.0))
    async with (
        chatting(demo.ws_url, ALICE, typing_timeout=0.3) as (alice, seen_by_alice),
        chatting(demo.ws_url, BOB) as (bob, seen_by_bob),
    ):
        await seen_by_alice.synced()
        await seen_by_bob.synced()
        assert isinstance(seen_by_alice.events[0], Connected)
        assert isinstance(seen_by_alice.events[1], System)  # the welcome

        hello = await alice.send(BOB, "hello bob")
        assert (hello.sender_id, hello.receiver_id, hello.content) == (ALICE, BOB, "hello bob")
        assert hello.client_id and hello.id > 0
        assert alice.user_id == ALICE  # learnt from the confirmation
        answer = await bob.send(ALICE, "hi alice")
        assert answer.id > hello.id
        both = {hello.id: hello, answer.id: answer}
        await seen_by_alice.has(set(both))
        await seen_by_bob.has(set(both))
        check_conversation(alice, seen_by_alice, BOB, both)
        check_conversation(bob, seen_by_bob, ALICE, both)
        assert alice.last_id == bob.last_id == answer.id

        # Typing: one "true" for a burst of keystrokes, "false" as soon as bob sends.
        bob.typing(ALICE)
        bob.typing(ALICE)
        bob.typing(ALICE)
        await seen_by_alice.until(lambda: seen_by_alice.of(TypingIndicator), "typing")
        third = await bob.send(ALICE, "typed that")
        await seen_by_alice.has({third.id})
        typing = [(e.user_id, e.is_typing) for e in seen_by_alice.of(TypingIndicator)]
        assert typing == [(BOB, True), (BOB, False)]
        # And "false" by itself after typing_timeout without keystrokes.
        alice.typing(BOB)
        await seen_by_bob.until(
            lambda: [e.is_typing for e in seen_by_bob.of(TypingIndicator)] == [True, False],
            "alice stopped typing",
        )

        # Read marks reach the author and show in both conversations.
        await alice.mark_read(BOB, third.id)
        await seen_by_bob.until(lambda: seen_by_bob.of(MessagesRead), "messages_read")
        assert seen_by_bob.of(MessagesRead) == [MessagesRead(ALICE, BOB, third.id)]
        assert [m.is_read for m in bob.messages(ALICE)] == [False, True, True]
        assert [m.is_read for m in alice.messages(BOB)] == [False, True, True]

    # A client that persisted last_id gets only what came after it.
    async with chatting(demo.ws_url, ALICE, last_id=answer.id) as (again, seen_again):
        await seen_again.synced()
        assert set(seen_again.message_ids()) == {third.id}
        assert again.last_id == third.id


async def test_refused_sends_raise_with_the_code_and_the_outbox_moves_on(
    start_demo: Callable[..., Demo],
) -> None:
    demo = start_demo(UNLIMITED)
    async with chatting(demo.ws_url, MALLORY) as (mallory, _):
        forbidden = mallory.post(ALICE, "hi")  # mallory may talk to carol only
        empty = mallory.post(CAROL, "   ")
        fine = mallory.post(CAROL, "hello carol")
        with pytest.raises(Rejected) as refused:
            await forbidden.confirmed()
        assert refused.value.code == "forbidden"
        with pytest.raises(Rejected) as refused:
            await empty.confirmed()
        assert refused.value.code == "too_long"
        assert (await fine.confirmed()).content == "hello carol"
        with pytest.raises(Rejected) as refused:
            mallory.post(CAROL, "x" * 70_000)  # the server would close the connection
        assert refused.value.code == "too_long"
        assert mallory.pending == []


# -- faults ------------------------------------------------------------------------------------


async def test_connections_reset_while_both_sides_send(start_demo: Callable[..., Demo]) -> None:
    demo = start_demo(UNLIMITED)
    count = 40
    async with (
        proxy_to(demo.port) as to_alice,
        proxy_to(demo.port) as to_bob,
        chatting(to_alice.ws_url, ALICE, **FAST) as (alice, seen_by_alice),
        chatting(to_bob.ws_url, BOB, **FAST) as (bob, seen_by_bob),
    ):
        sent = [alice.post(BOB, f"a{i}") for i in range(count)]
        sent += [bob.post(ALICE, f"b{i}") for i in range(count)]

        def confirmed_each(count: int) -> Callable[[], bool]:
            def check() -> bool:
                return all(
                    sum(p.done for p in sent if p.content.startswith(sender)) >= count
                    for sender in "ab"
                )

            return check

        for cut_after in (5, 15, 25):
            # Cut both connections once each side has some confirmed, more in flight.
            await seen_by_alice.until(confirmed_each(cut_after), f"{cut_after} confirmed each")
            to_alice.cut()
            to_bob.cut()
        stored = await every_message_once(sent, (alice, seen_by_alice), (bob, seen_by_bob))
        assert len(seen_by_alice.of(Disconnected)) >= 3 and len(seen_by_bob.of(Disconnected)) >= 3
    for message in stored:
        assert demo.stored(message.content) == 1, message


@pytest.mark.parametrize("script", ["asgi_chat.py", "websockets_chat.py"])
async def test_server_restart_while_both_sides_send(tmp_path: Path, script: str) -> None:
    db, log = tmp_path / "chat.db", tmp_path / "demo.log"
    demo = DemoProcess(db, free_port(), log, secret=SECRET, script=script)
    url = f"ws://127.0.0.1:{demo.port}/ws"
    count = 25
    await demo.start()
    try:
        async with (
            chatting(url, ALICE, **FAST) as (alice, seen_by_alice),
            chatting(url, BOB, **FAST) as (bob, seen_by_bob),
        ):
            sent = []
            for i in range(count):  # interleaved, so both are mid-way at the restart
                sent += [alice.post(BOB, f"a{i}"), bob.post(ALICE, f"b{i}")]
            await seen_by_alice.until(lambda: sum(p.done for p in sent) >= 10, "some confirmations")
            assert await demo.stop() == 0
            await demo.start()
            stored = await every_message_once(sent, (alice, seen_by_alice), (bob, seen_by_bob))
            for watcher in (seen_by_alice, seen_by_bob):
                # 1001 as the demo shuts down, or a reset when the server closed
                # its socket with frames of ours unread; then failed attempts.
                assert watcher.of(Disconnected) and len(watcher.of(Connected)) == 2
    finally:
        await demo.stop()
    for message in stored:
        assert demo.stored(message.content) == 1, message


async def test_a_burst_over_the_rate_limit_is_confirmed_in_order(
    start_demo: Callable[..., Demo],
) -> None:
    demo = start_demo()  # the default limits: 10 messages/s, burst 20
    async with (
        chatting(demo.ws_url, ALICE) as (alice, _),
        chatting(demo.ws_url, BOB) as (_, seen_by_bob),
    ):
        sent = [alice.post(BOB, f"burst {i}") for i in range(30)]
        with anyio.fail_after(TIMEOUT):
            stored = [await pending.confirmed() for pending in sent]
        assert [m.content for m in stored] == [f"burst {i}" for i in range(30)]
        assert [m.id for m in stored] == sorted({m.id for m in stored})
        await seen_by_bob.has({m.id for m in stored})
        assert set(seen_by_bob.message_ids().values()) == {1}
    assert demo.errors("rate_limited") > 0, "the burst never reached the rate limit"
    assert all(demo.stored(m.content) == 1 for m in stored)


async def test_a_bad_cookie_stops_the_client_without_retrying(
    start_demo: Callable[..., Demo],
) -> None:
    demo = start_demo()
    async with (
        proxy_to(demo.port) as proxy,
        chatting(proxy.ws_url, ALICE, cookie="forged", **FAST) as (client, watcher),
    ):
        pending = client.post(BOB, "never sent")
        await watcher.until(lambda: watcher.ended, "the client to stop")
        assert isinstance(watcher.error, Unauthenticated)
        assert watcher.error.status == 401
        with pytest.raises(Unauthenticated):
            await pending.confirmed()
        with pytest.raises(Unauthenticated):
            await client.send(BOB, "again")
        assert watcher.of(Connected) == []
        assert [e.reconnect_in for e in watcher.of(Disconnected)] == [None]
        assert proxy.accepted == 1


async def test_logging_out_closes_with_1008_and_stops_the_client(
    start_demo: Callable[..., Demo],
) -> None:
    demo = start_demo()
    cookie = await login(demo.server.url, "alice")
    async with chatting(demo.ws_url, ALICE, cookie=cookie) as (client, watcher):
        await watcher.synced()
        async with httpx.AsyncClient(base_url=demo.server.url) as http:
            response = await http.post("/api/logout", headers=cookie_header(cookie))
            assert response.status_code == 200
        await watcher.until(lambda: watcher.ended, "the client to stop")
        assert isinstance(watcher.error, Unauthenticated) and watcher.error.status == 403
        assert [(e.code, e.reconnect_in) for e in watcher.of(Disconnected)] == [(1008, None)]
        assert not client.connected


async def test_a_silent_connection_is_dropped_after_the_ping_timeout(
    start_demo: Callable[..., Demo],
) -> None:
    demo = start_demo()
    async with (
        proxy_to(demo.port) as proxy,
        chatting(proxy.ws_url, ALICE, ping_interval=0.1, ping_timeout=0.3, **FAST) as (
            client,
            watcher,
        ),
    ):
        await watcher.synced()
        proxy.stall()  # nothing closes: only the missing pong tells
        await watcher.until(lambda: watcher.of(Disconnected), "the ping timeout")
        assert watcher.of(Disconnected)[0].reason == "no pong within 0.3 s"
        pending = client.post(BOB, "after the outage")
        proxy.flow()
        with anyio.fail_after(TIMEOUT):
            assert (await pending.confirmed()).content == "after the outage"
        await watcher.synced(2)


async def test_server_pings_are_answered(start_demo: Callable[..., Demo]) -> None:
    demo = start_demo(ws_ping_interval=0.05, ws_ping_timeout=0.2)
    async with chatting(demo.ws_url, ALICE) as (client, watcher):
        await watcher.synced()
        # Absence of an event over a period is the property: a dozen server pings.
        with anyio.move_on_after(0.6):
            await watcher.until(lambda: watcher.of(Disconnected), "a disconnect")
        assert watcher.of(Disconnected) == [] and client.connected


async def test_leaving_the_block_fails_what_is_pending_and_closes_cleanly(
    start_demo: Callable[..., Demo],
) -> None:
    demo = start_demo()
    async with proxy_to(demo.port) as proxy:
        async with chatting(proxy.ws_url, ALICE, **FAST) as (client, watcher):
            await watcher.synced()
            proxy.down()
            await watcher.until(lambda: watcher.of(Disconnected), "the disconnect")
            pending = client.post(BOB, "never confirmed")
        with pytest.raises(anyio.ClosedResourceError):
            await pending.confirmed()
        with pytest.raises(anyio.ClosedResourceError):
            client.post(BOB, "too late")

        proxy.up()
        del proxy.endings[:]
        async with chatting(proxy.ws_url, ALICE) as (client, watcher):
            await watcher.synced()
        with anyio.fail_after(TIMEOUT):
            while not proxy.endings:
                await proxy.ended.wait()
        # The close handshake, then the server closed TCP, then the client.
        assert proxy.endings == ["closed"]
        assert watcher.of(Disconnected) == []  # closing yourself is no disconnect to report


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_wss_through_a_tls_terminating_proxy(
    start_demo: Callable[..., Demo], certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    demo = start_demo()
    async with (
        proxy_to(demo.port, tls=server_side) as proxy,
        chatting(proxy.ws_url, ALICE, ssl_context=trusting, **FAST) as (alice, seen_by_alice),
        chatting(demo.ws_url, BOB) as (_, seen_by_bob),
    ):
        first = await alice.send(BOB, "over TLS")
        proxy.cut()
        second = await alice.send(BOB, "over TLS, again")
        await seen_by_bob.has({first.id, second.id})
        assert len(seen_by_alice.of(Connected)) == 2
    # Without trusting the certificate: a failed attempt, retried (not a refusal).
    async with (
        proxy_to(demo.port, tls=server_side) as proxy,
        chatting(proxy.ws_url, ALICE, **FAST) as (_, watcher),
    ):
        await watcher.until(lambda: watcher.of(Disconnected), "a failed attempt")
        failed = watcher.of(Disconnected)[0]
        assert failed.code is None and "CERTIFICATE_VERIFY_FAILED" in failed.reason
        assert failed.reconnect_in is not None


async def test_the_docs_example_runs(
    start_demo: Callable[..., Demo], capsys: pytest.CaptureFixture[str]
) -> None:
    demo = start_demo()
    example = load_doc_example("python_client")
    async with chatting(demo.ws_url, BOB) as (bob, _):
        await bob.send(ALICE, "before the example")
    contents = await example.main(demo.ws_url, session(ALICE), BOB, "from the docs")
    assert contents == ["before the example", "from the docs"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith(f"{BOB}: before the example") and printed[1] == "sent as #2"


def test_without_websockets_the_import_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "pmhub.client")
    monkeypatch.setitem(sys.modules, "websockets.client", None)
    with pytest.raises(ImportError, match=r"pip install 'pmhub\[client\]'"):
        import pmhub.client  # noqa: F401


def test_bad_arguments_raise_at_once() -> None:
    with pytest.raises(ValueError, match="ws:// or wss://"):
        Client("http://127.0.0.1:8000/ws")
    with pytest.raises(ValueError, match="either"):
        Client("ws://127.0.0.1/ws", cookie="c", headers={"cookie": "session=d"})
    with pytest.raises(ValueError, match="ping_timeout"):
        Client("ws://127.0.0.1/ws", ping_timeout=0)


# -- random faults ---------------------------------------------------------------------------


SENDERS = (ALICE, BOB)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.sampled_from(SENDERS), st.integers(1, 8)),
        st.tuples(st.just("progress"), st.sampled_from(SENDERS), st.integers(1, 4)),
        st.tuples(st.sampled_from(["cut", "down", "up"]), st.sampled_from(SENDERS)),
    ),
    min_size=1,
    max_size=12,
)


@pytest.fixture
def fault_demo(start_demo: Callable[..., Demo]) -> Demo:
    # A small burst makes every larger send step hit the rate limit; a small sync
    # page makes reconnects page through what they missed (and hit it too).
    return start_demo(Limits(message_rate=100.0, message_burst=3, sync_page_size=3))


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=steps)
async def test_random_sends_and_faults_lose_and_double_nothing(
    fault_demo: Demo, steps: list[tuple[Any, ...]]
) -> None:
    """Steps: post n messages; wait until k more are confirmed (the network is
    busy while the next fault strikes); reset a client's connection; take its
    network down (connections and new attempts reset) or bring it up."""
    token = uuid.uuid4().hex[:8]
    numbers = Counter[int]()
    start = fault_demo.last_id  # earlier examples' messages need no replay
    limited = fault_demo.errors("rate_limited")
    async with (
        proxy_to(fault_demo.port) as to_alice,
        proxy_to(fault_demo.port) as to_bob,
        chatting(to_alice.ws_url, ALICE, last_id=start, **FAST) as (alice, seen_by_alice),
        chatting(to_bob.ws_url, BOB, last_id=start, **FAST) as (bob, seen_by_bob),
    ):
        clients = {ALICE: alice, BOB: bob}
        proxies = {ALICE: to_alice, BOB: to_bob}
        sent: list[PendingSend] = []
        for action, who, *count in steps:
            client, proxy = clients[who], proxies[who]
            if action == "send":
                peer = BOB if who == ALICE else ALICE
                for _ in range(count[0]):
                    numbers[who] += 1
                    sent.append(client.post(peer, f"{token} {who} {numbers[who]}"))
            elif action == "progress" and not proxy.refusing and client.pending:
                target = client.pending[: count[0]]
                with anyio.fail_after(TIMEOUT):
                    for pending in target:
                        await pending.confirmed()
            elif action in ("cut", "down"):
                event(f"{action} with {'some' if client.pending else 'no'} sends pending")
                proxy.cut() if action == "cut" else proxy.down()
            elif action == "up":
                proxy.up()
        to_alice.up()
        to_bob.up()
        with anyio.fail_after(TIMEOUT):
            stored = [await pending.confirmed() for pending in sent]
        expected = {m.id: m for m in stored}
        assert len(expected) == len(sent), "two sends were stored as one"
        for who in SENDERS:
            ids = [m.id for m in stored if m.sender_id == who]
            assert ids == sorted(ids), "stored out of post order"
        await seen_by_alice.has(set(expected))
        await seen_by_bob.has(set(expected))
        check_conversation(alice, seen_by_alice, BOB, expected)
        check_conversation(bob, seen_by_bob, ALICE, expected)
        fault_demo.last_id = max([start, *expected])
    event(f"rate limited: {fault_demo.errors('rate_limited') > limited}")
    for message in stored:
        assert fault_demo.stored(message.content) == 1, message
