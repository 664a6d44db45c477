"""The load generator: ``python -m benchmarks.loadgen SCENARIO --kind K --port P ...``.

It runs in its own process (so the server's CPU counters are the server's
alone), opens real WebSocket clients to 127.0.0.1 with the ``websockets``
library (on uvloop when installed; the same client code for every server,
socket.io spoken as its Engine.IO v4 text protocol), uses a fixed random
seed, bounds every phase in time, and prints one JSON object of results on
stdout. Permessage-deflate is off: compression would dominate the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psutil  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .common import CONTENT, SECRET_ENV, Body, Frame, Send, contacts, raise_nofile

_decode = msgspec.json.Decoder(Frame).decode
_decode_event = msgspec.json.Decoder(tuple[str, Frame]).decode
_encode = msgspec.json.encode


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


class Client:
    """One WebSocket connection of one user, speaking the server's dialect."""

    def __init__(self, user: int, ws: ClientConnection, kind: str, stats: Stats) -> None:
        self.user, self.ws, self.kind, self.stats = user, ws, kind, stats
        self.count = 0
        self.on_frame: Callable[[Client, Frame], Awaitable[None]] | None = None
        self.reader: asyncio.Task[None] | None = None

    async def send(self, recipient: int) -> None:
        """Send one message to ``recipient``, remembering when (for latency)."""
        self.count += 1
        client_id = f"{self.user}-{self.count}"
        data = _encode(Send(recipient, CONTENT, client_id))
        if self.kind == "socketio":
            data = b'42["private_message",' + data + b"]"
        self.stats.sent_at[client_id] = time.perf_counter()
        if self.stats.measuring:
            self.stats.sent += 1
        await self.ws.send(data, text=True)

    async def send_raw(self, frame: dict[str, Any]) -> None:
        data = _encode(frame)
        if self.kind == "socketio":
            data = b'42["' + frame["type"].encode() + b'",' + data + b"]"
        await self.ws.send(data, text=True)

    async def read(self) -> None:
        """Decode every frame until the connection closes; note unexpected closes."""
        stats = self.stats
        try:
            while True:
                data = await self.ws.recv(decode=False)
                if self.kind == "socketio":
                    if data == b"2":  # Engine.IO ping
                        await self.ws.send("3")
                        continue
                    if not data.startswith(b"42"):
                        stats.frames[f"eio:{data[:2].decode()}"] += 1
                        continue
                    frame = _decode_event(data[2:])[1]
                else:
                    frame = _decode(data)
                stats.frames[frame.type] += 1
                if frame.type == "private_message" and isinstance(frame.message, Body):
                    message = frame.message
                    if message.receiver_id == self.user and message.client_id is not None:
                        sent = stats.sent_at.pop(message.client_id, None)
                        if stats.measuring and sent is not None:
                            stats.delivered += 1
                            stats.latencies.append(time.perf_counter() - sent)
                elif frame.type == "error":
                    stats.errors[frame.code or "?"] += 1
                if self.on_frame is not None:
                    await self.on_frame(self, frame)
        except ConnectionClosed as exc:
            if not stats.stopping:
                stats.close_codes[str(exc.rcvd.code if exc.rcvd else 1006)] += 1
        except (msgspec.DecodeError, ValueError) as exc:  # a frame we do not understand
            stats.errors[f"client: {type(exc).__name__}"] += 1


class Load:
    """Opens clients for one scenario and reads the server's CPU and memory."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stats = Stats()
        self.server = psutil.Process(args.server_pid)
        self.clients: list[Client] = []
        self.auth: Any = None
        if args.kind.startswith("pmhub"):
            from pmhub import SessionAuthenticator

            self.auth = SessionAuthenticator(os.environ[SECRET_ENV])

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
        ws = await connect(
            url,
            additional_headers=headers,
            compression=None,
            proxy=None,
            ping_interval=None,
            open_timeout=20,
            close_timeout=2,
            max_size=4 * 2**20,
        )
        if kind == "socketio":  # Engine.IO open, then the socket.io CONNECT of "/"
            opened = await asyncio.wait_for(ws.recv(), 20)
            if not str(opened).startswith("0"):
                raise ConnectionError(f"unexpected Engine.IO open packet {opened!r}")
            await ws.send("40")
            for _ in range(10):
                if str(await asyncio.wait_for(ws.recv(), 20)).startswith("40"):
                    break
            else:
                raise ConnectionError("no socket.io CONNECT answer")
        return Client(user, ws, kind, self.stats)

    async def connect_all(
        self, users: list[int], on_frame: Callable[[Client, Frame], Awaitable[None]] | None = None
    ) -> None:
        """Open a client per user, ``--concurrency`` handshakes at a time; each
        starts reading as soon as it is open (presence floods are drained)."""
        gate = asyncio.Semaphore(self.args.concurrency)

        async def one(user: int) -> None:
            async with gate:
                try:
                    client = await self.open(user)
                except Exception as exc:
                    self.stats.connect_failures[_describe(exc)] += 1
                    return
            client.on_frame = on_frame
            client.reader = asyncio.create_task(client.read())
            self.clients.append(client)

        await asyncio.gather(*(one(user) for user in users))

    async def close_all(self) -> None:
        self.stats.stopping = True
        closing = asyncio.gather(*(c.ws.close() for c in self.clients), return_exceptions=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(closing, 10)
        for client in self.clients:
            if client.reader is not None:
                client.reader.cancel()

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

    async def on_frame(client: Client, frame: Frame) -> None:
        if load.stats.stopping:
            return
        mine = isinstance(frame.message, Body) and frame.message.sender_id == client.user
        if (frame.type == "private_message" and mine) or frame.type == "error":
            await client.send(rng.choice(peers[client.user]))

    await load.connect_all(users, on_frame)
    for client in load.clients:
        for _ in range(args.inflight):
            await client.send(rng.choice(peers[client.user]))
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
        start, n = loop.time(), 0
        while (now := loop.time()) < until:
            due = int((now - start) * args.rate) + 1
            for _ in range(min(due - n, 1000)):  # catch up, in bounded batches
                client = clients[n % len(clients)]
                await client.send(rng.choice(peers[client.user]))
                n += 1
            await asyncio.sleep(max(0.0, start + n / args.rate - loop.time()))

    pacer = asyncio.create_task(pace(loop.time() + args.warmup + args.duration + 0.5))
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
    await load.connect_all(list(range(1, args.connections + 1)))
    connect_s = time.perf_counter() - t0
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
    }


async def sync(load: Load) -> dict[str, Any]:
    """(d) User 1 comes back to ``--preload`` stored messages and pages through
    ``sync`` until ``has_more`` is false."""
    args = load.args
    done = asyncio.Event()
    received = 0

    async def on_frame(client: Client, frame: Frame) -> None:
        nonlocal received
        if frame.type == "private_message":
            received += 1
        elif frame.type == "sync_complete":
            if frame.has_more and not done.is_set():
                await client.send_raw({"type": "sync", "after_id": frame.last_id})
            else:
                done.set()

    async def full_sync() -> tuple[float, float]:
        nonlocal received
        done.clear()
        received = 0
        cpu0, t0 = load.server_cpu(), time.perf_counter()
        await load.clients[0].send_raw({"type": "sync", "after_id": 0})
        await asyncio.wait_for(done.wait(), args.timeout)
        return time.perf_counter() - t0, load.server_cpu() - cpu0

    await load.connect_all([1], on_frame)
    if not load.clients:
        return {"delivered": 0}
    await full_sync()  # warm-up: the first replay loads what the second measures
    elapsed, cpu = await full_sync()
    return {
        "delivered": received,
        "sync_s": elapsed,
        "delivered_per_s": received / elapsed,
        "server_cpu_us_per_msg": cpu * 1e6 / received if received else None,
    }


SCENARIOS = {"closed": closed_loop, "open": open_loop, "idle": idle, "sync": sync}


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, ConnectionClosed):
        return f"close {exc.rcvd.code if exc.rcvd else 1006}"
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
