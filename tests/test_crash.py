"""Crash safety end to end: ``kill -9`` of the demo under load loses nothing confirmed.

Runs ``examples/asgi_chat.py`` in its own process (as tests/test_example.py
does) with the protocol's default limits (10 messages/s, burst 20 per user).
Three users send continuously, each on its own WebSocket, several messages
unconfirmed at a time, each with its own ``client_id``; a ``rate_limited``
answer is honoured (wait ``retry_after``, resend the same ``client_id``).

1. alice → bob and bob → alice send until both are past their burst and held
   to the rate limit (retries happening).
2. carol → alice starts and, after a few confirmations, stops reading her
   socket: what arrives from then on stands for confirmations still on their
   way when the server dies.
3. The server gets SIGKILL once alice has seen live some of carol's messages
   that carol has not confirmed (so they are committed but unconfirmed) and
   alice or bob holds a ``client_id`` answered ``rate_limited`` and not sent
   again (so never stored), with sends still in flight.
4. The script starts again on the same SQLite file and cookie secret. Every
   message whose confirmation reached its sender, and every message a
   recipient saw live, is stored exactly once with the same id and content;
   no ``client_id`` is stored twice; ids strictly increase; ``sync`` from 0
   (following ``has_more``) and the HTTP history agree.
5. Every unconfirmed ``client_id`` is sent again: one whose first attempt was
   committed is answered with the stored message (so are the confirmations
   carol finds in her socket after the kill), the others are stored once.
   Afterwards each ``client_id`` exists exactly once.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from servers import EXAMPLES, cookie_header, free_port, login, recv_json
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.anyio

SECRET = "a-test-secret-that-is-long-enough"
USERS = {"alice": 1, "bob": 2, "carol": 3}
#: Who sends to whom (one connection per sender, which also receives).
TALKS = [("alice", "bob"), ("bob", "alice"), ("carol", "alice")]
#: Messages a sender may have unconfirmed at once.
WINDOW = 10
#: Confirmations alice and bob have before carol starts: past the burst of 20.
STEADY = 25
#: Confirmations carol reads before she stops reading: inside her burst, so
#: every message she then has in flight is one the server goes on committing.
DEAF_AFTER = 5
#: carol's committed, unconfirmed messages alice must have seen before the kill.
SEEN_UNCONFIRMED = 2
#: Frames that may arrive at any time and carry nothing this test checks.
BACKGROUND = {"system", "user_online_status", "typing_indicator"}

Msg = dict[str, Any]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the clients (websockets, httpx) run on asyncio


class Demo:
    """The demo script in its own process; its stderr (uvicorn's log) is kept."""

    def __init__(self, db: Path, port: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "asgi_chat.py"), "--port", str(port), "--db", str(db)],
            env={**os.environ, "PMHUB_SECRET": SECRET},
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.log: list[str] = []
        self.serving = False
        self._settled = threading.Event()  # serving, or the log ended
        # A thread drains stderr for the whole run, so the server never blocks on
        # a full pipe and a start that hangs is bounded by a timeout.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if "Uvicorn running on" in line:
                self.serving = True
                self._settled.set()
        self._settled.set()

    async def started(self) -> None:
        await anyio.to_thread.run_sync(self._settled.wait, 30.0)
        if not self.serving:
            pytest.fail("the demo did not start serving:\n" + self.text())

    def text(self) -> str:
        return "".join(self.log)

    def finish(self) -> None:
        """Stop it (Ctrl+C) if it still runs, reap it and close its pipe."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self._reader.join(10)
            assert self.process.stderr is not None
            self.process.stderr.close()


@contextmanager
def demo(db: Path, port: int) -> Iterator[Demo]:
    server = Demo(db, port)
    try:
        yield server
    finally:
        server.finish()


@asynccontextmanager
async def sockets(
    ws_url: str, sessions: dict[str, str]
) -> AsyncIterator[dict[str, ClientConnection]]:
    """One WebSocket per user, each past its welcome frame."""
    async with AsyncExitStack() as stack:
        opened = {}
        for name, session in sessions.items():
            ws = await stack.enter_async_context(
                connect(ws_url, additional_headers=cookie_header(session), open_timeout=10)
            )
            assert (await recv_json(ws, timeout=10))["type"] == "system"
            opened[name] = ws
        yield opened


async def next_frame(ws: ClientConnection) -> Msg:
    """The next frame this test acts on (welcome and presence frames are skipped)."""
    while True:
        frame = await recv_json(ws, timeout=10)
        if frame["type"] not in BACKGROUND:
            return frame


@dataclass
class Sender:
    """One user sending to one peer, and everything it learnt about its messages."""

    name: str
    peer: str
    run: str
    contents: dict[str, str] = field(default_factory=dict)  # every client_id ever sent
    confirmed: dict[str, Msg] = field(default_factory=dict)  # read before the kill
    late: dict[str, Msg] = field(default_factory=dict)  # read after the kill
    received: dict[int, Msg] = field(default_factory=dict)  # live messages to this user
    inflight: set[str] = field(default_factory=set)  # sent, not answered yet
    retry: deque[str] = field(default_factory=deque)  # answered rate_limited
    resume_at: float = 0.0
    rate_limited: int = 0
    close_code: int | None = None

    @property
    def user_id(self) -> int:
        return USERS[self.name]

    @property
    def peer_id(self) -> int:
        return USERS[self.peer]

    def new_message(self, n: int) -> str:
        client_id = f"{self.run}-{self.name}-{n}"
        self.contents[client_id] = f"{self.name} → {self.peer} #{n} ✓ <b>&amp;</b>"
        return client_id

    def frame(self, client_id: str) -> str:
        return json.dumps(
            {
                "type": "private_message",
                "recipient_id": self.peer_id,
                "content": self.contents[client_id],
                "client_id": client_id,
            }
        )


class Watch:
    """Conditions on the senders' state, re-checked on every change; the kill."""

    def __init__(self) -> None:
        self.dead = anyio.Event()  # set the moment the server is killed
        self._waiting: list[tuple[Callable[[], bool], anyio.Event]] = []

    def check(self) -> None:
        for predicate, event in self._waiting:
            if predicate():
                event.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Return when ``predicate()`` holds as this task resumes (other tasks
        may have changed the state between the change and the wake-up)."""
        while not predicate():
            event = anyio.Event()
            self._waiting.append((predicate, event))
            try:
                await event.wait()
            finally:
                self._waiting.remove((predicate, event))

    def kill(self, process: subprocess.Popen[str]) -> None:
        """SIGKILL (no shutdown, no close frames) and wait for the death, blocking
        the loop meanwhile: no client acts between the decision and the death."""
        process.kill()
        process.wait(timeout=10)
        self.dead.set()


async def load(
    sender: Sender, ws: ClientConnection, watch: Watch, deaf_after: int | None = None
) -> None:
    """Send new messages, WINDOW unconfirmed at a time, until the connection dies.

    Confirmations read after the kill go to ``sender.late``: they were on
    their way, and are treated as lost with the server (resent, like any
    unconfirmed message). With ``deaf_after``, the client stops reading after
    that many confirmations until the server is dead.
    """
    window = anyio.Semaphore(WINDOW)
    last_id = 0  # live messages reach a connection in id order (one node)

    async def send_loop() -> None:
        counter = itertools.count(1)
        while True:
            await window.acquire()
            delay = sender.resume_at - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)  # the server's retry_after: back-off, not a sync
            client_id = (
                sender.retry.popleft() if sender.retry else sender.new_message(next(counter))
            )
            sender.inflight.add(client_id)
            try:
                await ws.send(sender.frame(client_id))
            except ConnectionClosed:
                return
            watch.check()

    def answered(client_id: str) -> None:
        sender.inflight.remove(client_id)
        window.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(send_loop)
        try:
            async for data in ws:
                if deaf_after is not None and len(sender.confirmed) >= deaf_after:
                    await watch.dead.wait()
                frame = json.loads(data)
                kind = frame["type"]
                if kind == "private_message":
                    message = frame["message"]
                    assert message["id"] > last_id, f"after id {last_id}: {frame}"
                    last_id = message["id"]
                    if message["sender_id"] != sender.user_id:
                        assert message["receiver_id"] == sender.user_id, frame
                        assert message["id"] not in sender.received, f"live twice: {frame}"
                        sender.received[message["id"]] = message
                        watch.check()
                        continue
                    client_id = message["client_id"]
                    assert client_id in sender.inflight, f"unexpected confirmation {frame}"
                    assert client_id not in sender.confirmed | sender.late, f"twice: {frame}"
                    (sender.late if watch.dead.is_set() else sender.confirmed)[client_id] = message
                    answered(client_id)
                    watch.check()
                elif kind == "error":
                    client_id = frame.get("client_id")
                    assert frame["code"] == "rate_limited" and client_id in sender.inflight, frame
                    assert frame["retry_after"] > 0, frame
                    sender.rate_limited += 1
                    sender.retry.append(client_id)
                    resume = anyio.current_time() + frame["retry_after"]
                    sender.resume_at = max(sender.resume_at, resume)
                    answered(client_id)
                    watch.check()
                else:
                    assert kind in BACKGROUND, frame
        except ConnectionClosed:
            pass
        sender.close_code = ws.close_code
        tg.cancel_scope.cancel()


async def sync_all(ws: ClientConnection) -> list[Msg]:
    """Every message of the connection's user: ``sync`` from 0, following ``has_more``."""
    messages: list[Msg] = []
    after_id = 0
    while True:
        await ws.send(json.dumps({"type": "sync", "after_id": after_id}))
        page: list[Msg] = []
        while (frame := await next_frame(ws))["type"] == "private_message":
            page.append(frame["message"])
        if frame["type"] == "error" and not page:  # a sync page costs a message token
            assert frame["code"] == "rate_limited", frame
            await anyio.sleep(frame["retry_after"])  # the server's back-off, not a sync
            continue
        assert frame["type"] == "sync_complete", frame
        assert frame["last_id"] == (page[-1]["id"] if page else after_id), frame
        messages += page
        if not frame["has_more"]:
            break
        assert page, "has_more with an empty page"
        after_id = frame["last_id"]
    ids = [m["id"] for m in messages]
    assert ids == sorted(set(ids)), f"sync ids do not strictly increase: {ids}"
    return messages


async def history(base: str, session: str, peer_id: int) -> list[Msg]:
    """The whole conversation with ``peer_id`` over HTTP, paging back with ``before_id``."""
    pages: list[list[Msg]] = []
    params: dict[str, int] = {"limit": 16}
    async with httpx.AsyncClient(base_url=base, headers=cookie_header(session)) as http:
        while True:
            response = await http.get(f"/api/messages/{peer_id}", params=params)
            assert response.status_code == 200, response.text
            body = response.json()
            pages.append(body["messages"])
            if not body["has_more"]:
                break
            assert body["messages"], "has_more with an empty page"
            params["before_id"] = body["messages"][0]["id"]
    messages = [m for page in reversed(pages) for m in page]
    ids = [m["id"] for m in messages]
    assert ids == sorted(set(ids)), f"history ids do not strictly increase: {ids}"
    return messages


async def stored(
    base: str, ws_url: str, sessions: dict[str, str], senders: list[Sender]
) -> dict[str, dict[str, Msg]]:
    """Each sender's stored messages by client_id, after checking that none is
    stored twice or unknown, that every confirmation and live delivery is
    stored as it was seen, and that ``sync`` agrees with the HTTP history."""
    async with sockets(ws_url, sessions) as conns:
        synced = {name: await sync_all(ws) for name, ws in conns.items()}
    state: dict[str, dict[str, Msg]] = {}
    for sender in senders:
        everything = synced[sender.name]
        mine = [m for m in everything if m["sender_id"] == sender.user_id]
        twice = {c: n for c, n in Counter(m["client_id"] for m in mine).items() if n > 1}
        assert not twice, f"{sender.name}: client_ids stored more than once: {twice}"
        for m in mine:
            assert m["client_id"] in sender.contents, f"a message nobody sent: {m}"
            assert m["content"] == sender.contents[m["client_id"]], m
            assert m["receiver_id"] == sender.peer_id, m
        mine_by_cid = state[sender.name] = {m["client_id"]: m for m in mine}
        for client_id, message in (sender.confirmed | sender.late).items():
            assert mine_by_cid.get(client_id) == message, (
                f"{sender.name}: confirmed {message}, stored {mine_by_cid.get(client_id)}"
            )
        by_id = {m["id"]: m for m in everything}
        for id_, message in sender.received.items():
            assert by_id.get(id_) == message, f"delivered {message}, stored {by_id.get(id_)}"
        peers = {m["sender_id"] + m["receiver_id"] - sender.user_id for m in everything}
        for peer_id in peers:
            conversation = [m for m in everything if peer_id in (m["sender_id"], m["receiver_id"])]
            assert await history(base, sessions[sender.name], peer_id) == conversation
    return state


async def resend(sender: Sender, ws: ClientConnection, client_ids: list[str]) -> dict[str, Msg]:
    """Send ``client_ids`` again, all pipelined; the answers by client_id."""
    answers: dict[str, Msg] = {}
    pending = list(client_ids)
    while pending:
        for client_id in pending:
            await ws.send(sender.frame(client_id))
        retry, wait = [], 0.0
        for _ in pending:
            frame = await next_frame(ws)
            while frame["type"] == "private_message" and frame["sender_id"] != sender.user_id:
                frame = await next_frame(ws)  # another sender's message: the final sync checks it
            if frame["type"] == "error":
                assert frame["code"] == "rate_limited", frame
                retry.append(frame["client_id"])
                wait = max(wait, frame["retry_after"])
                continue
            assert frame["type"] == "private_message", frame
            message = frame["message"]
            assert message["client_id"] in pending and message["client_id"] not in answers, frame
            answers[message["client_id"]] = message
        if wait:
            await anyio.sleep(wait)  # the server's retry_after: back-off, not a sync
        pending = retry
    return answers


async def test_kill_9_under_load_loses_no_confirmed_message(tmp_path: Path) -> None:
    db, port = tmp_path / "demo.db", free_port()
    base, ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws"
    senders = [Sender(name, peer, uuid.uuid4().hex[:8]) for name, peer in TALKS]
    alice, bob, carol = senders
    watch = Watch()

    def seen_unconfirmed() -> list[Msg]:
        """carol's messages alice got live whose confirmation carol has not read."""
        return [
            m
            for m in alice.received.values()
            if m["sender_id"] == carol.user_id and m["client_id"] in carol.inflight
        ]

    with demo(db, port) as first:
        await first.started()
        sessions = {name: await login(base, name) for name in USERS}
        with anyio.fail_after(30):  # guards a hang only
            async with sockets(ws_url, sessions) as conns, anyio.create_task_group() as tg:
                for sender in (alice, bob):
                    tg.start_soon(load, sender, conns[sender.name], watch)
                await watch.until(
                    lambda: all(len(s.confirmed) >= STEADY and s.rate_limited for s in (alice, bob))
                )
                tg.start_soon(load, carol, conns[carol.name], watch, DEAF_AFTER)
                await watch.until(
                    lambda: (
                        len(seen_unconfirmed()) >= SEEN_UNCONFIRMED
                        and bool(alice.retry or bob.retry)
                    )
                )
                # No await from the check to the kill: these hold at the moment of death.
                never_stored = set(alice.retry) | set(bob.retry)  # rate_limited, not resent
                committed = {m["client_id"]: m for m in seen_unconfirmed()}
                watch.kill(first.process)
                assert never_stored and len(committed) >= SEEN_UNCONFIRMED
            # every load() has returned: each connection saw the server die
        assert first.process.returncode == -signal.SIGKILL
    assert "Traceback" not in first.text(), first.text()
    for sender in senders:
        assert sender.close_code == 1006, (sender.name, sender.close_code)  # no close frame

    with demo(db, port) as second:  # same database and secret: the sessions still hold
        await second.started()
        with anyio.fail_after(30):  # guards a hang only
            before = await stored(base, ws_url, sessions, senders)
            last_id = max(m["id"] for mine in before.values() for m in mine.values())
            for client_id, message in committed.items():
                assert before[carol.name][client_id] == message
            for client_id in never_stored:
                assert not any(client_id in mine for mine in before.values()), client_id

            unconfirmed = {s.name: [c for c in s.contents if c not in s.confirmed] for s in senders}
            assert set(committed) <= set(unconfirmed[carol.name])
            answers: dict[str, dict[str, Msg]] = {}
            async with sockets(ws_url, sessions) as conns:

                async def resend_all(sender: Sender) -> None:
                    client_ids = unconfirmed[sender.name]
                    answers[sender.name] = await resend(sender, conns[sender.name], client_ids)

                async with anyio.create_task_group() as tg:
                    for sender in senders:
                        tg.start_soon(resend_all, sender)

            new_ids = []
            for sender in senders:
                for client_id in unconfirmed[sender.name]:
                    answer = answers[sender.name][client_id]
                    if client_id in before[sender.name]:  # the first attempt was committed
                        assert answer == before[sender.name][client_id]
                    else:
                        assert answer["content"] == sender.contents[client_id], answer
                        assert answer["id"] > last_id, (answer, last_id)
                        new_ids.append(answer["id"])
                    if client_id in sender.late:
                        assert answer == sender.late[client_id]
            assert len(new_ids) == len(set(new_ids)) >= len(never_stored) > 0

            after = await stored(base, ws_url, sessions, senders)
            for sender in senders:
                assert set(after[sender.name]) == set(sender.contents), sender.name
                for client_id, message in before[sender.name].items():
                    assert after[sender.name][client_id] == message
                for client_id, answer in answers[sender.name].items():
                    assert after[sender.name][client_id] == answer
    assert second.process.returncode == 0, second.text()
    assert "Traceback" not in second.text(), second.text()
