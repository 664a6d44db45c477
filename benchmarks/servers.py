"""The servers under test, one per process: ``python -m benchmarks.servers KIND``.

Every server listens on an ephemeral 127.0.0.1 port, prints ``READY <port>``
on stdout once it accepts connections (the runner waits for that line, not for
a timer) and relays the same frames: a client sends
``{"type":"private_message","recipient_id":R,"content":...,"client_id":...}``
and every connection of R and of the sender gets a frame shaped like pmhub's.

* ``websockets``: bare ``websockets.asyncio.server`` + msgspec, no storage.
* ``starlette``: a Starlette WebSocket route on uvicorn, no storage.
* ``socketio``: python-socketio's AsyncServer (ASGI) on uvicorn, no storage.
* ``pmhub-memory`` / ``pmhub-sqlite``: ``PmhubApp`` on uvicorn with the full
  protocol (session cookies, a contacts policy, confirmations, persistence).

The three relays take the user id from the query (``/ws?user=5``). All uvicorn
servers use ``ws="websockets-sansio"``, and ``loop="asyncio", http="h11"``
unless ``--uvloop`` (then ``uvloop`` and ``httptools``, and the bare server
runs on uvloop too), so that each comparison is like with like.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import socket
import sys
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import msgspec
import uvicorn

from .common import CONTENT, SECRET_ENV, Send, contacts, is_contact, raise_nofile

KINDS = ("websockets", "starlette", "socketio", "pmhub-memory", "pmhub-sqlite")


# -- the relay frame shared by the three storage-less servers ---------------------------


class _Body(msgspec.Struct):
    id: int
    content: str
    sender_id: int
    receiver_id: int
    created_at: datetime
    is_read: bool
    client_id: str | None


class _Delivered(msgspec.Struct, tag="private_message", tag_field="type"):
    sender_id: int
    recipient_id: int
    message: _Body


_decode_send = msgspec.json.Decoder(Send).decode
_ids = itertools.count(1)


def relay_frame(sender_id: int, data: str | bytes) -> tuple[int, str]:
    """The recipient and the JSON text of the frame that delivers ``data``."""
    sent = _decode_send(data)
    now = datetime.now(timezone.utc)
    body = _Body(next(_ids), sent.content, sender_id, sent.recipient_id, now, False, sent.client_id)
    frame = _Delivered(sender_id, sent.recipient_id, body)
    return sent.recipient_id, msgspec.json.encode(frame).decode()


def _query_user(query: str) -> int:
    return int(parse_qs(query)["user"][0])


# -- servers ------------------------------------------------------------------------


async def run_websockets(sock: socket.socket) -> None:
    """The bare relay: websockets' own server, ``broadcast`` (no awaiting per peer)."""
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    registry: dict[int, set[ServerConnection]] = {}

    async def handler(ws: ServerConnection) -> None:
        user = _query_user(urlsplit(ws.request.path if ws.request else "").query)
        registry.setdefault(user, set()).add(ws)
        try:
            async for data in ws:
                recipient, text = relay_frame(user, data)
                broadcast([*registry.get(recipient, ()), *registry.get(user, ())], text)
        finally:
            registry[user].discard(ws)

    async with serve(handler, sock=sock, compression=None, ping_interval=20, ping_timeout=20):
        ready(sock)
        await asyncio.Future()  # until the runner terminates the process


def starlette_app() -> Any:
    """A Starlette WebSocket route, written the way its docs show."""
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    registry: dict[int, set[WebSocket]] = {}

    async def endpoint(ws: WebSocket) -> None:
        user = int(ws.query_params["user"])
        await ws.accept()
        registry.setdefault(user, set()).add(ws)
        try:
            while True:
                recipient, text = relay_frame(user, await ws.receive_text())
                for peer in [*registry.get(recipient, ()), *registry.get(user, ())]:
                    # A peer going away is cleaned up by its own handler.
                    with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
                        await peer.send_text(text)
        except WebSocketDisconnect:
            pass
        finally:
            registry[user].discard(ws)

    return Starlette(routes=[WebSocketRoute("/ws", endpoint)])


def socketio_app() -> Any:
    """python-socketio: one room per user, one ``emit`` to both rooms."""
    import socketio  # type: ignore[import-untyped]

    sio = socketio.AsyncServer(async_mode="asgi")
    users: dict[str, int] = {}

    async def connect(sid: str, environ: dict[str, Any], auth: object = None) -> None:
        users[sid] = _query_user(environ.get("QUERY_STRING", ""))
        await sio.enter_room(sid, f"u{users[sid]}")

    async def disconnect(sid: str, reason: object = None) -> None:
        users.pop(sid, None)

    async def private_message(sid: str, data: dict[str, Any]) -> None:
        user, recipient = users[sid], int(data["recipient_id"])
        message = {
            "id": next(_ids),
            "content": data["content"],
            "sender_id": user,
            "receiver_id": recipient,
            "created_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "is_read": False,
            "client_id": data.get("client_id"),
        }
        frame = {
            "type": "private_message",
            "sender_id": user,
            "recipient_id": recipient,
            "message": message,
        }
        await sio.emit("private_message", frame, to=[f"u{recipient}", f"u{user}"])

    sio.on("connect", connect)
    sio.on("disconnect", disconnect)
    sio.on("private_message", private_message)
    return socketio.ASGIApp(sio)


class ContactsPolicy:
    """pmhub policy with contacts: each user may converse with their ring neighbours."""

    def __init__(self, users: int) -> None:
        self.users = users

    async def exists(self, user_id: int) -> bool:
        return 1 <= user_id <= self.users

    async def may_converse(self, user_id: int, peer_id: int) -> bool:
        return is_contact(user_id, peer_id, self.users)

    async def contacts(self, user_id: int) -> Collection[int]:
        return contacts(user_id, self.users)


def pmhub_app(
    store_kind: str,
    users: int,
    policy_kind: str,
    preload: int,
    db: str,
    synchronous: str = "full",
) -> tuple[Any, Any]:
    """``PmhubApp`` as a user builds it, with rate limits raised by configuration."""
    from pmhub import AllowAll, Draft, Hub, Limits, MemoryStore, SessionAuthenticator, SQLiteStore
    from pmhub.adapters.asgi import PmhubApp

    make_store: Callable[[], Any] = (
        MemoryStore
        if store_kind == "memory"
        else (lambda: SQLiteStore(db, synchronous=synchronous))  # type: ignore[arg-type]
    )
    store = make_store()
    if preload:
        # The away user (1) gets `preload` messages from their contacts, written
        # through the store's public API before the server starts.
        async def fill() -> None:
            target = make_store() if store_kind == "sqlite" else store
            senders = contacts(1, users)
            drafts = [
                Draft(senders[n % len(senders)], 1, CONTENT, f"pre-{n}") for n in range(preload)
            ]
            for start in range(0, preload, 500):
                await target.save_many(drafts[start : start + 500])
            if target is not store:
                await target.aclose()

        anyio.run(fill)
    policy = AllowAll() if policy_kind == "allowall" else ContactsPolicy(users)
    limits = Limits(message_rate=1e6, message_burst=1_000_000)
    hub = Hub(store, policy, limits=limits)
    return PmhubApp(hub, SessionAuthenticator(os.environ[SECRET_ENV], store)), hub


def run_uvicorn(app: Any, sock: socket.socket, fast: bool, hub: Any = None) -> None:
    """uvicorn directly (not ``pmhub.adapters.asgi.serve``, which picks loop and
    http itself): the same settings as ``serve()`` for every ASGI server."""

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            ready(sock)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if hub is not None:
                await hub.close_all()  # as pmhub's serve() does
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(
        app,
        loop="uvloop" if fast else "asyncio",
        http="httptools" if fast else "h11",
        ws="websockets-sansio",
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        ws_max_size=256 * 1024 + 1024,
        lifespan="on" if hub is not None else "auto",
        log_level="warning",
        backlog=4096,
    )
    Server(config).run(sockets=[sock])


async def run_pmhub_websockets(app: Any, hub: Any, sock: socket.socket) -> None:
    """pmhub on its ``websockets`` adapter, with the hub and authenticator of ``app``."""
    from pmhub.adapters.websockets import PmhubServer

    async with hub:
        server = PmhubServer(hub, app.authenticator)
        async with server.listen(None, None, sock=sock):
            ready(sock)
            await asyncio.Future()  # until the runner terminates the process


def ready(sock: socket.socket) -> None:
    """Tell the runner we accept connections (it waits for this line)."""
    print(f"READY {sock.getsockname()[1]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="one benchmark server")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--users", type=int, default=2000, help="user ids 1..N exist")
    parser.add_argument("--policy", choices=("contacts", "allowall"), default="contacts")
    parser.add_argument("--preload", type=int, default=0, help="messages stored for user 1")
    parser.add_argument("--uvloop", action="store_true", help="uvloop + httptools")
    parser.add_argument("--db", default="bench.db", help="SQLite file (pmhub-sqlite)")
    parser.add_argument(
        "--synchronous", choices=("full", "normal"), default="full", help="SQLiteStore's"
    )
    parser.add_argument(
        "--adapter", choices=("asgi", "websockets"), default="asgi", help="pmhub's adapter"
    )
    args = parser.parse_args()
    raise_nofile()
    # Name IPPROTO_TCP: asyncio turns TCP_NODELAY on only for sockets that do, and
    # without it a small frame can wait ~40 ms for the peer's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    if args.kind == "websockets":
        if args.uvloop:
            import uvloop

            uvloop.run(run_websockets(sock))
        else:
            asyncio.run(run_websockets(sock))
    elif args.kind == "starlette":
        run_uvicorn(starlette_app(), sock, args.uvloop)
    elif args.kind == "socketio":
        run_uvicorn(socketio_app(), sock, args.uvloop)
    else:
        store = args.kind.removeprefix("pmhub-")
        app, hub = pmhub_app(
            store, args.users, args.policy, args.preload, args.db, args.synchronous
        )
        if args.adapter == "asgi":
            run_uvicorn(app, sock, args.uvloop, hub)
        elif args.uvloop:
            import uvloop

            uvloop.run(run_pmhub_websockets(app, hub, sock))
        else:
            asyncio.run(run_pmhub_websockets(app, hub, sock))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
