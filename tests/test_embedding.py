"""docs/embedding.md works: its examples, run as written, chat under a real uvicorn.

Each ``# example:`` block of the doc is executed as a module (see
``docblocks.load_example``), served on 127.0.0.1 with an ephemeral port, and
driven over real sockets: WebSockets under ``/chat/ws``, the HTTP API under
``/chat/api``, and the application's own routes beside them. Every wait is
for an event with a timeout that only guards against a hang.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from docblocks import load_example
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from pmhub import ContactPolicy, Identity, Request, Unauthenticated

SECRET = "test secret, long enough for HMAC"
TIMEOUT = 5.0


@pytest.fixture
def doc_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run a doc example the way a reader would: in a project folder, with its secret set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHAT_SECRET", SECRET)
    yield


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self._ready.set()


@contextmanager
def served(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1:<ephemeral port>; yield ``host:port``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", log_level="warning", ws_ping_interval=20, ws_ping_timeout=20
    )
    ready = threading.Event()
    server = _Server(config, ready)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
        finally:
            ready.set()
            sock.close()

    thread = threading.Thread(target=run, name=f"uvicorn:{port}", daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "uvicorn did not start within 10 s"
        assert server.started, f"uvicorn failed to start: {errors}"
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
    assert not thread.is_alive(), "uvicorn did not stop within 10 s"
    if errors:
        raise errors[0]


def session(cookie: str | None) -> dict[str, str]:
    """Headers that carry the ``session`` cookie (httpx deprecates per-request cookies)."""
    return {"Cookie": f"session={cookie}"} if cookie else {}


def open_ws(host: str, cookie: str | None) -> Any:
    headers = session(cookie)
    return connect(f"ws://{host}/chat/ws", additional_headers=headers, open_timeout=TIMEOUT)


async def recv(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    return frame


async def chat(host: str, cookies: dict[int, str], sender: int, recipient: int) -> dict[str, Any]:
    """Connect both users, wait for presence, send one message; return it as delivered."""
    async with open_ws(host, cookies[sender]) as first:
        assert (await recv(first))["type"] == "system"  # the welcome
        async with open_ws(host, cookies[recipient]) as second:
            assert (await recv(second))["type"] == "system"
            # The snapshot tells the newcomer who is online; the first learns it too.
            online = {"type": "user_online_status", "is_online": True}
            assert await recv(second) == {**online, "user_id": sender}
            assert await recv(first) == {**online, "user_id": recipient}

            send = {"type": "private_message", "recipient_id": recipient, "content": "Hi <b>!"}
            await first.send(json.dumps({**send, "client_id": "c-1"}))
            delivered = await recv(second)
            confirmed = await recv(first)  # the sender's copy is the confirmation
            assert delivered == confirmed
            assert delivered["type"] == "private_message"
            assert (delivered["sender_id"], delivered["recipient_id"]) == (sender, recipient)
            message: dict[str, Any] = delivered["message"]
            assert message["content"] == "Hi <b>!" and message["client_id"] == "c-1"
            return message


async def assert_refused_without_cookie(host: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with open_ws(host, None):
            pass
    assert refused.value.response.status_code == 401


def test_starlette_example(doc_app: None) -> None:
    example = load_example("starlette")
    cookies = {user: example.auth.issue(user) for user in (1, 2, 3)}

    async def scenario(host: str) -> None:
        message = await chat(host, cookies, 1, 2)
        async with httpx.AsyncClient(base_url=f"http://{host}", timeout=TIMEOUT) as http:
            answer = await http.get("/chat/api/conversations", headers=session(cookies[2]))
            assert answer.status_code == 200
            assert answer.json() == [{"peer_id": 1, "last_message": message, "unread_count": 1}]
            home = await http.get("/")
            assert (home.status_code, home.text) == (200, "the rest of your application")
            metrics = await http.get("/chat/metrics")
            assert "pmhub_messages_in_total 1.0" in metrics.text
            # A browser page from the allowlisted origin may post; another site may not.
            post = {"recipient_id": 3, "content": "from the page"}
            page = {**session(cookies[1]), "Origin": "https://www.example.com"}
            answer = await http.post("/chat/api/messages", json=post, headers=page)
            assert answer.status_code == 201
            other_site = {**page, "Origin": "https://evil.example"}
            answer = await http.post("/chat/api/messages", json=post, headers=other_site)
            assert answer.status_code == 403
        await assert_refused_without_cookie(host)

    try:
        with served(example.app) as host:
            asyncio.run(scenario(host))
        assert not example.hub.running  # the lifespan stopped the hub
    finally:
        anyio.run(example.hub.store.aclose)
    assert Path("chat.db").is_file()  # where the example said


def test_fastapi_example(doc_app: None) -> None:
    example = load_example("fastapi")
    cookies = {user: example.auth.issue(user) for user in (2, 3)}

    async def scenario(host: str) -> None:
        await chat(host, cookies, 2, 3)
        async with (
            open_ws(host, cookies[3]) as customer,
            httpx.AsyncClient(base_url=f"http://{host}", timeout=TIMEOUT) as http,
        ):
            assert (await recv(customer))["type"] == "system"
            shipped = await http.post("/orders/42/shipped", params={"customer_id": 3})
            assert shipped.status_code == 200
            frame = await recv(customer)
            assert frame["type"] == "private_message" and frame["sender_id"] == example.SHOP
            assert frame["message"]["content"] == "Your order 42 has shipped."
            assert shipped.json() == {"message_id": frame["message"]["id"]}
            # A retried request is harmless: same message, nobody notified twice.
            again = await http.post("/orders/42/shipped", params={"customer_id": 3})
            assert again.json() == shipped.json()
            # The policy's refusal comes back as the HTTP status pmhub gives it.
            refused = await http.post("/orders/43/shipped", params={"customer_id": 9})
            assert refused.status_code == 403

            rows = await http.get("/chat/api/conversations", headers=session(cookies[3]))
            assert [row["peer_id"] for row in rows.json()] == [example.SHOP, 2]
        await assert_refused_without_cookie(host)

    with served(example.app) as host:
        asyncio.run(scenario(host))
    assert not example.hub.running
    assert example.store._writer is None  # the lifespan closed the store


def test_authenticator_example() -> None:
    example: ModuleType = load_example("authenticator")

    class Sessions:
        async def user_id_for(self, token: str) -> int | None:
            return {"t-alice": 1}.get(token)

    auth = example.AppSessionAuthenticator(Sessions())

    async def check() -> None:
        request = Request("/ws", {"cookie": "app_session=t-alice; other=1"})
        assert await auth.authenticate(request) == Identity(1, session_id="t-alice")
        for headers in ({}, {"cookie": "app_session=t-expired"}):
            with pytest.raises(Unauthenticated) as refused:
                await auth.authenticate(Request("/ws", headers))
            assert refused.value.status == 401

    anyio.run(check)


def test_policy_example(tmp_path: Path) -> None:
    example = load_example("policy")
    path = str(tmp_path / "app.db")
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript(
            "CREATE TABLE users (id INTEGER PRIMARY KEY);"
            "CREATE TABLE friendships (user_id INTEGER, friend_id INTEGER);"
            "INSERT INTO users VALUES (1), (2), (3);"
            "INSERT INTO friendships VALUES (1, 2);"
        )
    policy = example.FriendsPolicy(path)

    async def check() -> None:
        assert await policy.exists(1) and not await policy.exists(4)
        assert await policy.may_converse(1, 2) and await policy.may_converse(2, 1)  # symmetric
        assert not await policy.may_converse(1, 3)
        assert not await policy.may_converse(1, 1)
        assert list(await policy.contacts(1)) == [2] and list(await policy.contacts(2)) == [1]
        assert list(await policy.contacts(3)) == []
        assert isinstance(policy, ContactPolicy)  # so presence costs O(contacts)

    anyio.run(check)
