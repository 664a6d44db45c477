"""Real servers for end-to-end tests, and the small clients that talk to them.

:class:`LiveServer` runs an ASGI application under a real uvicorn server on
``127.0.0.1`` with an ephemeral port, in a background thread with its own
event loop, so tests talk to it over real sockets exactly as a browser or a
Python client would. :func:`running` is the context-manager form for fixtures.

The client helpers log in over HTTP (httpx), open WebSockets
(``websockets.asyncio.client``) and read JSON frames with a timeout that only
guards against a hang: every wait is for an event, never a sleep.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, closing, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import anyio
import httpx
import pytest
import uvicorn
from anyio.abc import Process
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

__all__ = [
    "EXAMPLES",
    "DemoProcess",
    "LiveServer",
    "cookie_header",
    "free_port",
    "load_example",
    "login",
    "open_ws",
    "recv_json",
    "running",
    "websockets_server",
]

T = TypeVar("T")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (once per process) without touching ``sys.path``."""
    module = sys.modules.get(name)
    if module is not None and Path(getattr(module, "__file__", "")).resolve().parent == EXAMPLES:
        return module
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


class _Server(uvicorn.Server):
    """uvicorn's server, telling :class:`LiveServer` when it is up and going down."""

    def __init__(self, config: uvicorn.Config, live: LiveServer) -> None:
        super().__init__(config)
        self._live = live

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._live._loop = asyncio.get_running_loop()
            self._live._ready.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._live.before_shutdown is not None:
            await self._live.before_shutdown()
        await super().shutdown(sockets=sockets)


class LiveServer:
    """An ASGI app served by uvicorn on ``127.0.0.1:<ephemeral port>`` in a thread.

    * ``before_shutdown`` runs on the server's loop when it is asked to stop,
      before uvicorn closes connections (what ``pmhub.adapters.asgi.serve``
      does with ``hub.close_all()``); ``after_exit`` runs on that loop once
      uvicorn has stopped (e.g. to close a store).
    * ``sndbuf`` sets ``SO_SNDBUF`` on the listening socket (accepted sockets
      inherit it): a small one makes back-pressure reach the app quickly.
    """

    def __init__(
        self,
        app: Any,
        *,
        before_shutdown: Callable[[], Awaitable[object]] | None = None,
        after_exit: Callable[[], Awaitable[object]] | None = None,
        ws_ping_interval: float | None = 20.0,
        ws_ping_timeout: float | None = 20.0,
        ws_max_size: int = 16 * 1024 * 1024,
        sndbuf: int | None = None,
        websockets: Any = None,
    ) -> None:
        self.app = app
        #: A ``pmhub.adapters.websockets.PmhubServer`` served beside uvicorn, on
        #: the same loop (so on the same hub), at ``websockets_url``.
        self.websockets = websockets
        self.websockets_port = 0
        self.before_shutdown = before_shutdown
        self.after_exit = after_exit
        self.config = uvicorn.Config(
            app,
            lifespan="on",
            ws_ping_interval=ws_ping_interval,
            ws_ping_timeout=ws_ping_timeout,
            ws_max_size=ws_max_size,
            log_level="warning",
        )
        self.sndbuf = sndbuf
        self.port = 0
        self._server = _Server(self.config, self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """The ``Host`` header clients send (``host:port``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def websockets_url(self) -> str:
        return f"ws://127.0.0.1:{self.websockets_port}"

    def _socket(self) -> socket.socket:
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose
        # ``proto`` says TCP, and without it every HTTP answer waits ~40 ms for a
        # delayed ACK (Nagle).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        if self.sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        sock.bind(("127.0.0.1", 0))
        return sock

    def start(self, timeout: float = 15.0) -> None:
        sock = self._socket()
        self.port = sock.getsockname()[1]
        ws_sock = self._socket() if self.websockets is not None else None
        if ws_sock is not None:
            self.websockets_port = ws_sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._run, args=(sock, ws_sock), name=f"uvicorn:{self.port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            self._server.should_exit = True
            raise TimeoutError(f"uvicorn did not start within {timeout} s")
        if self._error is not None or not self._server.started:
            self._thread.join(timeout)
            raise RuntimeError("uvicorn failed to start") from self._error

    def _run(self, sock: socket.socket, ws_sock: socket.socket | None) -> None:
        async def main() -> None:
            try:
                async with AsyncExitStack() as stack:
                    if ws_sock is not None:
                        ws_sock.listen()
                        await stack.enter_async_context(
                            self.websockets.listen(None, None, sock=ws_sock)
                        )
                    await self._server.serve(sockets=[sock])
            finally:
                if self.after_exit is not None:
                    await self.after_exit()

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()  # unblock start() if startup failed
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            sock.close()
            if ws_sock is not None:
                ws_sock.close()

    def stop(self, timeout: float = 15.0) -> None:
        """Ask uvicorn to exit (as on SIGTERM) and wait for the thread to end."""
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
            raise TimeoutError(f"uvicorn did not stop within {timeout} s")
        self._thread = None
        if self._error is not None:
            raise RuntimeError("the server thread failed") from self._error

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 15.0) -> T:
        """Run ``fn()`` on the server's loop and wait for its result (blocking)."""
        assert self._loop is not None, "the server is not running"
        return asyncio.run_coroutine_threadsafe(_coro(fn), self._loop).result(timeout)

    async def acall(self, fn: Callable[[], Awaitable[T]], timeout: float = 15.0) -> T:
        """Run ``fn()`` on the server's loop, awaiting it from the caller's loop."""
        assert self._loop is not None, "the server is not running"
        future = asyncio.run_coroutine_threadsafe(_coro(fn), self._loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    async def until(
        self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
    ) -> None:
        """Wait until ``predicate()``, evaluated on the server's loop, holds.

        For server state that no frame announces (e.g. a connection the server
        has let go of); it re-checks after each turn of the server's loop.
        """

        async def check() -> bool:
            return predicate()

        deadline = asyncio.get_running_loop().time() + timeout
        while not await self.acall(check):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.01)  # poll interval only; the wait is on the predicate


async def _coro(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


@contextmanager
def running(app: Any, **options: Any) -> Iterator[LiveServer]:
    """Serve ``app`` for the duration of the block (see :class:`LiveServer`)."""
    server = LiveServer(app, **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def websockets_server(hub: Any, secret: str) -> Any:
    """A ``websockets`` adapter for ``hub``, served beside its ASGI app (``LiveServer``).

    Its own authenticator on the hub's store, as another process would have,
    reading revocations on every handshake so a logout through the ASGI demo
    holds here at once.
    """
    from pmhub import SessionAuthenticator
    from pmhub.adapters.websockets import PmhubServer

    return PmhubServer(hub, SessionAuthenticator(secret, hub.store, refresh_interval=0))


# -- clients -------------------------------------------------------------------------


def cookie_header(session: str) -> dict[str, str]:
    """The ``Cookie`` header carrying a ``session`` cookie value."""
    return {"Cookie": f"session={session}"}


async def login(base_url: str, username: str, password: str | None = None) -> str:
    """Log in through the demo's ``POST /api/login``; return the ``session`` cookie value."""
    async with httpx.AsyncClient(base_url=base_url) as http:
        response = await http.post(
            "/api/login",
            json={"username": username, "password": username if password is None else password},
        )
    response.raise_for_status()
    value = response.cookies.get("session")
    assert value, f"no session cookie in {response.headers!r}"
    return value


def open_ws(
    url: str,
    session: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    **options: Any,
) -> connect:
    """``websockets.asyncio.client.connect`` with the session cookie set (use ``async with``)."""
    extra = dict(headers or {})
    if session is not None:
        extra.update(cookie_header(session))
    options.setdefault("open_timeout", 10)
    options.setdefault("close_timeout", 5)
    return connect(url, additional_headers=extra, **options)


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame, which must be a JSON object in a text frame."""
    data = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(data, str), f"expected a text frame, got {data!r}"
    frame = json.loads(data)
    assert isinstance(frame, dict), f"expected a JSON object, got {data!r}"
    return frame


async def close_code_after(ws: ClientConnection, timeout: float = 5.0) -> int | None:
    """Read (and drop) frames until the server closes; its close code."""
    with pytest.raises(ConnectionClosed):
        while True:
            await recv_json(ws, timeout)
    return ws.close_code


def send_invalid_utf8(ws: ClientConnection) -> None:
    """A text frame that is not UTF-8 (the client library would refuse to send it)."""
    ws.protocol.send_frame(Frame(Opcode.TEXT, b'{"type": "sync", "after_id": "\xff"}'))
    ws.send_data()


#: Generous bounds for the demo process to start and stop (slow CI machines).
START_TIMEOUT = STOP_TIMEOUT = 30.0


class DemoProcess:
    """An example server (``examples/asgi_chat.py`` by default) run as a user runs it.

    Started and stopped at will. With ``secret`` it gets that ``PMHUB_SECRET``;
    without, every start signs cookies with a new random secret, as the
    README's command does. Its log (uvicorn's stderr) goes to a file, so a
    full pipe can never block the server.
    """

    def __init__(
        self,
        db: Path,
        port: int,
        log: Path,
        secret: str | None = None,
        script: str = "asgi_chat.py",
    ) -> None:
        self.db, self.port, self.log, self.script = db, port, log, script
        # What the server logs once it listens (uvicorn, or the websockets adapter).
        self.ready = "Uvicorn running on" if script == "asgi_chat.py" else "pmhub serving on"
        self.url = f"http://127.0.0.1:{port}/"
        self.env = {k: v for k, v in os.environ.items() if k != "PMHUB_SECRET"}
        if secret is not None:
            self.env["PMHUB_SECRET"] = secret
        self.process: Process | None = None

    async def start(self) -> None:
        assert self.process is None
        serving = self.text().count(self.ready)
        script, port, db = str(EXAMPLES / self.script), str(self.port), str(self.db)
        with self.log.open("ab") as log:
            self.process = await anyio.open_process(
                [sys.executable, script, "--port", port, "--db", db],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        with anyio.fail_after(START_TIMEOUT):
            while self.text().count(self.ready) == serving:
                if self.process.returncode is not None:
                    await self.stop()
                    pytest.fail("the demo exited before serving:\n" + self.text())
                await anyio.sleep(0.05)  # poll interval only; the wait is on the log line

    async def stop(self) -> int:
        """SIGTERM, as a service manager stops it; wait for it to exit; its exit status."""
        process, self.process = self.process, None
        if process is None:
            return 0
        async with process:  # closes its pipes; kills it if still running at exit
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(STOP_TIMEOUT):
                return await process.wait()
            pytest.fail(f"the demo did not stop within {STOP_TIMEOUT} s:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stored(self, content: str | None = None) -> int:
        """How many rows of the SQLite file hold exactly ``content`` (or at all)."""
        query, args = "SELECT count(*) FROM messages", []
        if content is not None:
            query, args = query + " WHERE content = ?", [content]
        with closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as db:
            (count,) = db.execute(query, args).fetchone()
        return int(count)
