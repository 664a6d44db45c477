"""The load generator: ``python -m benchmarks.loadgen SCENARIO --kind K --port P ...``.

It runs in its own process (so the server's CPU counters are the server's
alone), opens real WebSocket clients to 127.0.0.1 with ``picows`` (a Cython
WebSocket client; on uvloop when installed; the same client code for every
server, socket.io spoken as its Engine.IO v4 text protocol), uses a fixed
random seed, bounds every phase in time, and prints one JSON object of results
on stdout. Permessage-deflate is off (not offered): compression would dominate
the figures.

picows calls :meth:`Client.on_ws_frame` synchronously for every frame, so the
per-frame work is kept small: one msgspec decode of only the fields read, a
few counters, and the latency looked up by ``client_id``. Sends are
synchronous writes to the transport. Server pings are answered by picows
(``enable_auto_pong``); fragmented messages are reassembled here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psutil  # type: ignore[import-untyped]
from picows import (
    WSCloseCode,
    WSFrame,
    WSInvalidStatusError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

from .common import CONTENT, SECRET_ENV, Body, Frame, Send, contacts, raise_nofile

_decode = msgspec.json.Decoder(Frame).decode
_decode_event = msgspec.json.Decoder(tuple[str, Frame]).decode
_encode = msgspec.json.Encoder().encode
_TEXT, _BINARY, _CONTINUATION = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION
_CLOSE = WSMsgType.CLOSE
#: Time for one connection to be open (TCP, HTTP upgrade, Engine.IO/socket.io connect).
OPEN_TIMEOUT = 20.0
MAX_MESSAGE = 4 * 2**20


@dataclass
class Stats:
    """Counters of one run; only deliveries inside the measured window count."""

    measuring: bool = False
    delivered: int = 0
    sent: int = 0
    latencies: list[float] = field(default_factory=list)
    frames: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    close_codes: Counter[str] = field(default_factory=Counter)
    connect_failures: Counter[str] = field(default_factory=Counter)
    sent_at: dict[str, float] = field(default_factory=dict)
    stopping: bool = False


FrameHandler = Callable[["Client", Frame], None]


class Client(WSListener):
    """One WebSocket connection of one user, speaking the server's dialect.

    picows calls :meth:`on_ws_frame` for every frame, synchronously: no task
    and no queue per connection."""

    def __init__(self, user: int, socketio: bool, stats: Stats) -> None:
        super().__init__()
        self.user, self.socketio, self.stats = user, socketio, stats
        self.count = 0
        self.on_frame: FrameHandler | None = None
        self.transport: WSTransport | None = None
        #: Done once the client may send (after socket.io's CONNECT, for socket.io).
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready.add_done_callback(_retrieve)  # a failed handshake is counted, not logged
        self.opened = False  # in Load.clients: its unexpected close is counted
        self.handshake_frames = 0  # socket.io: frames seen before its CONNECT answer
        self.fragments: list[bytes] | None = None
        self.close_received = False

    # -- sending ------------------------------------------------------------------

    def send(self, recipient: int) -> None:
        """Send one message to ``recipient``, remembering when (for latency)."""
        self.count += 1
        client_id = f"{self.user}-{self.count}"
        data = _encode(Send(recipient, CONTENT, client_id))
        if self.socketio:
            data = b'42["private_message",' + data + b"]"
        stats = self.stats
        stats.sent_at[client_id] = time.perf_counter()
        if stats.measuring:
            stats.sent += 1
        self._write(data)

    def send_raw(self, frame: dict[str, Any]) -> None:
        data = _encode(frame)
        if self.socketio:
            data = b'42["' + frame["type"].encode() + b'",' + data + b"]"
        self._write(data)

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_disconnected:
            transport.send(_TEXT, data)

    # -- picows callbacks ---------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if not self.socketio and not self.ready.done():
            self.ready.set_result(None)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == _TEXT and frame.fin:  # the usual case first
            self.received(frame.get_payload_as_bytes())
        elif msg_type in (_TEXT, _BINARY):
            if frame.fin:
                self.received(frame.get_payload_as_bytes())
            else:  # the first fragment of a message
                self.fragments = [frame.get_payload_as_bytes()]
        elif msg_type == _CONTINUATION:
            if self.fragments is None:
                self.stats.errors["client: stray continuation frame"] += 1
                return
            self.fragments.append(frame.get_payload_as_bytes())
            if sum(map(len, self.fragments)) > MAX_MESSAGE:
                self.fragments = None
                self.stats.errors["client: message too big"] += 1
                transport.send_close(WSCloseCode.MESSAGE_TOO_BIG)
                transport.disconnect()
            elif frame.fin:
                data, self.fragments = b"".join(self.fragments), None
                self.received(data)
        elif msg_type == _CLOSE:
            self.close_received = True
            if not self.stats.stopping:
                payload = frame.get_payload_as_bytes()
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.stats.close_codes[str(code)] += 1
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode.OK)  # complete the closing handshake
            transport.disconnect()
        # PING is answered by picows itself (enable_auto_pong); PONG needs nothing.

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during the handshake"))
        elif self.opened and not self.close_received and not self.stats.stopping:
            self.stats.close_codes["1006"] += 1  # closed without a close frame

    # -- frames -------------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        """One whole message: decode it, count it, take latency, call ``on_frame``."""
        stats = self.stats
        try:
            if self.socketio:
                if data == b"2":  # Engine.IO ping
                    self._write(b"3")
                    return
                if not self.ready.done():
                    self._socketio_handshake(data)
                    return
                if not data.startswith(b"42"):
                    stats.frames[f"eio:{data[:2].decode(errors='replace')}"] += 1
                    return
                frame = _decode_event(memoryview(data)[2:])[1]
            else:
                frame = _decode(data)
            kind = frame.type
            frames = stats.frames
            frames[kind] = frames.get(kind, 0) + 1  # faster than Counter's +=
            if kind == "private_message":
                message = frame.message
                if (
                    isinstance(message, Body)
                    and message.receiver_id == self.user
                    and message.client_id is not None
                ):
                    sent = stats.sent_at.pop(message.client_id, None)
                    if stats.measuring and sent is not None:
                        stats.delivered += 1
                        stats.latencies.append(time.perf_counter() - sent)
            elif kind == "error":
                stats.errors[frame.code or "?"] += 1
            if self.on_frame is not None:
                self.on_frame(self, frame)
        except (msgspec.DecodeError, ValueError) as exc:  # a frame we do not understand
            stats.errors[f"client: {type(exc).__name__}"] += 1

    def _socketio_handshake(self, data: bytes) -> None:
        """Engine.IO open (``0{...}``), then socket.io CONNECT of ``/`` (``40``)."""
        self.handshake_frames += 1
        if self.handshake_frames == 1:
            if not data.startswith(b"0"):
                self.ready.set_exception(
                    ConnectionError(f"unexpected Engine.IO open packet {data[:40]!r}")
                )
                return
            self._write(b"40")
        elif data.startswith(b"40"):
            self.ready.set_result(None)
        elif self.handshake_frames > 10:
            self.ready.set_exception(ConnectionError("no socket.io CONNECT answer"))


class Load:
    """Opens clients for one scenario and reads the server's CPU and memory."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stats = Stats()
        self.server = psutil.Process(args.server_pid)
        self.clients: list[Client] = []
        self.auth: Any = None
        if args.kind.startswith("pmhub"):
            from pmhub import MemoryStore, SessionAuthenticator

            # Only issues cookies: the server checks them against its own store.
            self.auth = SessionAuthenticator(os.environ[SECRET_ENV], MemoryStore())

    def server_cpu(self) -> float:
        times = self.server.cpu_times()
        return float(times.user + times.system)

    def server_rss(self) -> int:
        return int(self.server.memory_info().rss)

    async def open(self, user: int) -> Client:
        port, kind = self.args.port, self.args.kind
        headers: dict[str, str] = {}
        if self.auth is not None:
            url = f"ws://127.0.0.1:{port}/ws"
            headers["Cookie"] = f"session={self.auth.issue(user)}"
        elif kind == "socketio":
            url = f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket&user={user}"
        else:
            url = f"ws://127.0.0.1:{port}/ws?user={user}"
        client = Client(user, kind == "socketio", self.stats)

        async def handshake() -> None:
            await ws_connect(
                lambda: client,
                url,
                extra_headers=headers,
                websocket_handshake_timeout=OPEN_TIMEOUT,
                enable_auto_ping=False,
                enable_auto_pong=True,  # uvicorn and websockets ping every 20 s
                max_frame_size=MAX_MESSAGE,
                max_redirects=0,
                logger_name="loadgen",
            )
            await client.ready  # socket.io: its CONNECT answer; others: already done

        try:
            await asyncio.wait_for(handshake(), OPEN_TIMEOUT)
        except BaseException:
            if client.transport is not None:
                client.transport.disconnect(graceful=False)
            raise
        return client

    async def connect_all(self, users: list[int], on_frame: FrameHandler | None = None) -> None:
        """Open a client per user, ``--concurrency`` handshakes at a time; each
        reads from the moment it is open (presence floods are drained)."""
        gate = asyncio.Semaphore(self.args.concurrency)

        async def one(user: int) -> None:
            async with gate:
                try:
                    client = await self.open(user)
                except Exception as exc:
                    self.stats.connect_failures[_describe(exc)] += 1
                    return
            client.on_frame, client.opened = on_frame, True
            self.clients.append(client)

        await asyncio.gather(*(one(user) for user in users))

    async def close_all(self) -> None:
        """Close every client (closing handshake, 10 s at most, then abort)."""
        self.stats.stopping = True
        transports = [c.transport for c in self.clients if c.transport is not None]
        for transport in transports:
            if not transport.is_disconnected and not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode.OK)
        waiting = [t.wait_disconnected() for t in transports if not t.is_disconnected]
        closing = asyncio.gather(*waiting, return_exceptions=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(closing, 10)
        for transport in transports:
            transport.disconnect(graceful=False)

    async def measure(self, seconds: float) -> dict[str, Any]:
        """Count deliveries and server CPU over a window of ``seconds``."""
        self.stats.measuring = True
        cpu0, gen0, t0 = self.server_cpu(), time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)  # the window itself, not a synchronisation
        cpu1, gen1, t1 = self.server_cpu(), time.process_time(), time.perf_counter()
        self.stats.measuring = False
        elapsed, delivered = t1 - t0, self.stats.delivered
        lat = sorted(self.stats.latencies)
        return {
            "elapsed_s": elapsed,
            "delivered": delivered,
            "delivered_per_s": delivered / elapsed,
            "sent_per_s": self.stats.sent / elapsed,
            "p50_ms": _percentile(lat, 0.50) * 1000,
            "p99_ms": _percentile(lat, 0.99) * 1000,
            "server_cpu_us_per_msg": (cpu1 - cpu0) * 1e6 / delivered if delivered else None,
            "server_cpu_pct": (cpu1 - cpu0) / elapsed * 100,
            "gen_cpu_pct": (gen1 - gen0) / elapsed * 100,
        }


async def closed_loop(load: Load) -> dict[str, Any]:
    """(a) Each user keeps ``--inflight`` messages unconfirmed: a confirmation
    (the sender's own copy) or an error frees a slot for the next one."""
    args = load.args
    rng = random.Random(args.seed)
    users = list(range(1, args.users + 1))
    peers = {user: contacts(user, args.users) for user in users}
    stats = load.stats

    def on_frame(client: Client, frame: Frame) -> None:
        if stats.stopping:
            return
        kind = frame.type
        if kind == "private_message":
            message = frame.message
            if isinstance(message, Body) and message.sender_id == client.user:
                client.send(rng.choice(peers[client.user]))
        elif kind == "error":
            client.send(rng.choice(peers[client.user]))

    await load.connect_all(users, on_frame)
    for client in load.clients:
        for _ in range(args.inflight):
            client.send(rng.choice(peers[client.user]))
    await asyncio.sleep(args.warmup)  # warm-up period
    return await load.measure(args.duration)


async def open_loop(load: Load) -> dict[str, Any]:
    """(b) ``--rate`` messages/s offered in total, round-robin over the users,
    whatever the server answers: shows whether it keeps up and at what latency."""
    args = load.args
    rng = random.Random(args.seed)
    await load.connect_all(list(range(1, args.users + 1)))
    clients = sorted(load.clients, key=lambda c: c.user)
    if not clients:
        return {"delivered": 0}
    peers = {c.user: contacts(c.user, args.users) for c in clients}
    loop = asyncio.get_running_loop()

    async def pace(until: float) -> None:
        # Ticks of at least 1 ms (uvloop's timer resolution; a shorter sleep would
        # spin): each tick sends what is due, so the average rate is exact.
        start, n = time.perf_counter(), 0
        while (now := time.perf_counter()) < until:
            due = int((now - start) * args.rate) + 1
            for _ in range(min(due - n, 1000)):  # catch up, in bounded batches
                client = clients[n % len(clients)]
                client.send(rng.choice(peers[client.user]))
                n += 1
            await asyncio.sleep(max(0.001, start + n / args.rate - time.perf_counter()))

    pacer = loop.create_task(pace(time.perf_counter() + args.warmup + args.duration + 0.5))
    await asyncio.sleep(args.warmup)
    result = await load.measure(args.duration)
    pacer.cancel()
    result["offered_per_s"] = args.rate
    result["kept_up"] = result["delivered_per_s"] >= 0.95 * args.rate
    return result


async def idle(load: Load) -> dict[str, Any]:
    """(c) Open ``--connections`` idle clients: time to connect, and server RSS
    per connection once the presence frames they cause have stopped arriving."""
    args = load.args
    await load.connect_all(list(range(1, 21)))  # warm-up: the server's first handshakes
    await load.close_all()
    load.clients, load.stats.stopping = [], False
    load.stats.frames.clear()
    rss0, cpu0, t0 = load.server_rss(), load.server_cpu(), time.perf_counter()
    gen0 = time.process_time()
    await load.connect_all(list(range(1, args.connections + 1)))
    connect_s = time.perf_counter() - t0
    gen_connect = time.process_time() - gen0
    # Settled once no frame arrived for 0.5 s (bounded): AllowAll presence takes long.
    settled, last, deadline = False, -1, time.perf_counter() + args.settle
    while time.perf_counter() < deadline:
        total = sum(load.stats.frames.values())
        if total == last:
            settled = True
            break
        last = total
        await asyncio.sleep(0.5)
    rss1, cpu1 = load.server_rss(), load.server_cpu()
    connected = len(load.clients)
    return {
        "connected": connected,
        "delivered": connected,
        "connect_s": connect_s,
        "connects_per_s": connected / connect_s,
        "settle_s": time.perf_counter() - t0 - connect_s,
        "settled": settled,
        "kib_per_conn": (rss1 - rss0) / 1024 / connected if connected else None,
        "server_cpu_us_per_conn": (cpu1 - cpu0) * 1e6 / connected if connected else None,
        "frames_per_conn": sum(load.stats.frames.values()) / connected if connected else None,
        "gen_cpu_pct": gen_connect / connect_s * 100,  # while connecting
    }


async def sync(load: Load) -> dict[str, Any]:
    """(d) User 1 comes back to ``--preload`` stored messages and pages through
    ``sync`` until ``has_more`` is false."""
    args = load.args
    done = asyncio.Event()
    received = 0

    def on_frame(client: Client, frame: Frame) -> None:
        nonlocal received
        if frame.type == "private_message":
            received += 1
        elif frame.type == "sync_complete":
            if frame.has_more and not done.is_set():
                client.send_raw({"type": "sync", "after_id": frame.last_id})
            else:
                done.set()

    async def full_sync() -> tuple[float, float, float]:
        nonlocal received
        done.clear()
        received = 0
        cpu0, gen0, t0 = load.server_cpu(), time.process_time(), time.perf_counter()
        load.clients[0].send_raw({"type": "sync", "after_id": 0})
        await asyncio.wait_for(done.wait(), args.timeout)
        elapsed = time.perf_counter() - t0
        return elapsed, load.server_cpu() - cpu0, time.process_time() - gen0

    await load.connect_all([1], on_frame)
    if not load.clients:
        return {"delivered": 0}
    await full_sync()  # warm-up: the first replay loads what the second measures
    elapsed, cpu, gen = await full_sync()
    return {
        "delivered": received,
        "sync_s": elapsed,
        "delivered_per_s": received / elapsed,
        "server_cpu_us_per_msg": cpu * 1e6 / received if received else None,
        "server_cpu_pct": cpu / elapsed * 100,
        "gen_cpu_pct": gen / elapsed * 100,
    }


SCENARIOS = {"closed": closed_loop, "open": open_loop, "idle": idle, "sync": sync}


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, WSInvalidStatusError) and exc.response is not None:
        return f"HTTP {int(exc.response.status)}"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "handshake timeout"
    return type(exc).__name__


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load = Load(args)
    try:
        result = await asyncio.wait_for(SCENARIOS[args.scenario](load), args.timeout)
    except asyncio.TimeoutError:
        # Keep what was reached: a server that is slow is a result, not a crash.
        connected = len(load.clients)
        result = {
            "error": f"the scenario did not finish within {args.timeout:g} s",
            "connected": connected,
            "delivered": connected if args.scenario == "idle" else load.stats.delivered,
        }
    finally:
        await load.close_all()
    stats = load.stats
    result.update(
        errors=dict(stats.errors),
        close_codes=dict(stats.close_codes),
        connect_failures=dict(stats.connect_failures),
        frames=dict(stats.frames),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--kind", required=True, help="the server's name (its dialect)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-pid", type=int, required=True, help="whose CPU/RSS to read")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--rate", type=float, default=2000.0, help="open loop: msg/s in total")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100, help="handshakes at a time")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=30.0, help="idle: max wait for quiet")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0, help="hard limit, seconds")
    args = parser.parse_args()
    raise_nofile()
    # Every run is bounded and its objects are freed by reference counting; the
    # cyclic collector only stalls the loop (>10% of the connect phase, profiled).
    gc.disable()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(run(args))
    result["scenario"] = args.scenario
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")


if __name__ == "__main__":
    main()
