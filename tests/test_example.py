"""The demo as a user runs it: ``python examples/asgi_chat.py`` in its own process.

Starts the script, chats over real sockets, stops it with Ctrl+C (SIGINT) and
starts it again on the same database: connections close with 1001, the
process exits cleanly, and nothing confirmed is lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from servers import EXAMPLES, DemoProcess, cookie_header, free_port, login, recv_json
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.anyio

SECRET = "a-test-secret-that-is-long-enough"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the clients (websockets, httpx) run on asyncio


@contextmanager
def demo_process(db: Path, port: int) -> Iterator[subprocess.Popen[str]]:
    """Run the demo script until its server says it is up; stop it with SIGINT."""
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "asgi_chat.py"), "--port", str(port), "--db", str(db)],
        env={**os.environ, "PMHUB_SECRET": SECRET},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stderr is not None
        seen = []
        for line in process.stderr:  # uvicorn logs its progress to stderr
            seen.append(line)
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail("the demo exited before serving:\n" + "".join(seen))
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise


async def test_the_demo_chats_stops_with_1001_and_keeps_its_messages(tmp_path: Path) -> None:
    db, port = tmp_path / "demo.db", free_port()
    base, ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws"
    with demo_process(db, port) as process:
        async with httpx.AsyncClient(base_url=base) as http:
            page = await http.get("/")
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            assert (await http.get("/healthz")).json()["status"] == "ok"
        alice, bob = await login(base, "alice"), await login(base, "bob")
        async with connect(ws_url, additional_headers=cookie_header(alice)) as a_ws:
            assert (await recv_json(a_ws))["type"] == "system"
            async with connect(ws_url, additional_headers=cookie_header(bob)) as b_ws:
                assert (await recv_json(b_ws))["type"] == "system"
                await recv_json(b_ws)  # alice is online
                await recv_json(a_ws)  # bob is online
                frame = {"type": "private_message", "recipient_id": 2, "content": "Hi bob"}
                await a_ws.send(json.dumps(frame))
                sent = await recv_json(a_ws)
                assert await recv_json(b_ws) == sent

                process.send_signal(signal.SIGINT)  # Ctrl+C
                for ws in (a_ws, b_ws):
                    with pytest.raises(ConnectionClosed):
                        await recv_json(ws, timeout=10)
                    assert ws.close_code == 1001
        assert process.wait(timeout=20) == 0
        assert process.stderr is not None
        assert "Traceback" not in process.stderr.read()

    with demo_process(db, port):  # the same database and secret: sessions still valid
        async with connect(ws_url, additional_headers=cookie_header(bob)) as b_ws:
            assert (await recv_json(b_ws))["type"] == "system"
            await b_ws.send(json.dumps({"type": "sync", "after_id": 0}))
            replayed = await recv_json(b_ws)
            assert replayed["message"] == sent["message"]
            done = await recv_json(b_ws)
            assert done == {
                "type": "sync_complete",
                "last_id": sent["message"]["id"],
                "has_more": False,
            }


async def test_the_websockets_demo_takes_the_asgi_demos_cookies_and_stops_with_1001(
    tmp_path: Path,
) -> None:
    """``examples/websockets_chat.py`` beside the ASGI demo, on one file and secret."""
    db, log = tmp_path / "demo.db", tmp_path / "demo.log"
    asgi = DemoProcess(db, free_port(), log, SECRET)
    ws_demo = DemoProcess(db, free_port(), tmp_path / "ws.log", SECRET, "websockets_chat.py")
    await asgi.start()
    await ws_demo.start()
    try:
        alice, bob = await login(asgi.url, "alice"), await login(asgi.url, "bob")
        url = f"ws://127.0.0.1:{ws_demo.port}/ws"
        async with httpx.AsyncClient() as http:
            health = await http.get(f"http://127.0.0.1:{ws_demo.port}/healthz")
        assert health.json()["status"] == "ok"
        async with (
            connect(url, additional_headers=cookie_header(alice)) as a_ws,
            connect(url, additional_headers=cookie_header(bob)) as b_ws,
        ):
            assert (await recv_json(a_ws))["type"] == "system"
            assert (await recv_json(b_ws))["type"] == "system"
            frame = {
                "type": "private_message",
                "recipient_id": 2,
                "content": "hi",
                "client_id": "w",
            }
            await a_ws.send(json.dumps(frame))
            while (got := await recv_json(b_ws))["type"] != "private_message":
                pass
            assert got["message"]["content"] == "hi" and got["sender_id"] == 1
            assert await ws_demo.stop() == 0  # SIGTERM: every connection closed with 1001
            with pytest.raises(ConnectionClosed):
                while True:
                    await recv_json(a_ws)
            assert a_ws.close_code == 1001
        assert asgi.stored("hi") == 1
    finally:
        await ws_demo.stop()
        await asgi.stop()
    assert "Traceback" not in ws_demo.text() + asgi.text()
