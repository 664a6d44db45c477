"""A terminal chat with one user, on :mod:`pmhub.client`.

    pip install 'pmhub[client]' httpx
    python examples/asgi_chat.py --port 8000 &
    python examples/terminal_chat.py --url http://127.0.0.1:8000 \
        --user alice --password alice --to bob

Logs in through the demo's ``POST /api/login`` (the answer sets the ``session``
cookie), then prints the conversation (its history first, through ``sync``),
typing and presence, and sends each line you type. Messages the peer sends are
marked read as they are shown. Lost connections are retried by the client, and
lines typed meanwhile go out on reconnect. End of input (Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import anyio
import httpx

from pmhub.client import Client, Disconnected, PendingSend, Synced
from pmhub.errors import PmhubError
from pmhub.frames import Error, MessagesRead, PrivateMessage, TypingIndicator, UserOnlineStatus


def clean(text: str) -> str:
    """Message text as it is safe to print: control characters (escape
    sequences that could rewrite your terminal) shown as ``\\x..``."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


async def login(url: str, username: str, password: str) -> tuple[str, int, dict[str, int]]:
    """The session cookie, your id, and the ids of the users you may talk to."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        answer = await http.post("/api/login", json={"username": username, "password": password})
        if answer.status_code != 200:
            sys.exit(f"login failed: {answer.json()['error']['message']}")
        cookie = answer.cookies["session"]
        users = (await http.get("/api/users", cookies={"session": cookie})).json()
    return cookie, answer.json()["id"], {user["username"]: user["id"] for user in users}


async def show(chat: Client, me: int, peer: int, name: str) -> None:
    """Print what happens in the conversation with ``peer``."""
    conversation = {me, peer}
    async for event in chat:
        match event:
            case PrivateMessage(message=m) if {m.sender_id, m.receiver_id} == conversation:
                who = "you" if m.sender_id == me else name
                print(f"[{m.created_at:%H:%M}] {who}: {clean(m.content)}")
                if m.sender_id == peer and not m.is_read:
                    await chat.mark_read(peer, m.id)
            case TypingIndicator(user_id=user_id, is_typing=typing) if user_id == peer:
                print(f"* {name} is typing…" if typing else f"* {name} stopped typing")
            case UserOnlineStatus(user_id=user_id, is_online=online) if user_id == peer:
                print(f"* {name} is {'online' if online else 'offline'}")
            case MessagesRead(reader_id=reader_id, up_to_id=up_to_id) if reader_id == peer:
                print(f"* {name} read your messages up to #{up_to_id}")
            case Synced(last_id=last_id):
                print(f"* connected, up to date (message #{last_id})")
            case Disconnected(reason=reason, reconnect_in=delay) if delay is not None:
                print(f"* disconnected ({reason}); trying again in {delay:.1f} s")
            case Error(message=message):
                print(f"* error: {message}")


async def confirm(pending: PendingSend) -> None:
    try:
        await pending.confirmed()
    except PmhubError as exc:  # e.g. forbidden, too_long
        print(f"* not sent ({exc}): {clean(pending.content)}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the demo's address")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--to", required=True, help="the user to talk to")
    args = parser.parse_args()

    cookie, me, users = await login(args.url, args.user, args.password)
    if args.to not in users or users[args.to] == me:
        sys.exit(f"you cannot talk to {args.to!r}; try one of {sorted(set(users) - {args.user})}")
    peer = users[args.to]
    ws_url = args.url.replace("http", "ws", 1).rstrip("/") + "/ws"

    async with Client(ws_url, cookie=cookie, user_id=me) as chat, anyio.create_task_group() as tg:

        async def watch() -> None:
            try:
                await show(chat, me, peer, args.to)
            except PmhubError as exc:  # the session was refused or logged out
                print(f"* stopped: {exc}")
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        while line := await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True):
            if line.strip():
                tg.start_soon(confirm, chat.post(peer, line.rstrip("\n")))
        with anyio.move_on_after(10):  # end of input: let the outbox go out first
            for pending in chat.pending:
                with contextlib.suppress(PmhubError):
                    await pending.confirmed()
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main)
