"""Run every scenario against every server: ``python -m benchmarks [--smoke] ...``.

Repetitions are interleaved (repetition 1 of every scenario and server, then
repetition 2, ...) because the machine is shared and noisy; each run gets a
fresh server process on an ephemeral port and its own load-generator
process. Prints a table, writes ``benchmarks/results/<stamp>.json`` (raw
results) and ``.png`` (plot). Exits 1 if a server failed to start or a
scenario delivered nothing. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec

from . import report
from .common import SECRET_ENV

RESULTS = Path(__file__).with_name("results")
BASE_SERVERS = ["websockets", "starlette", "socketio", "pmhub-memory", "pmhub-sqlite"]
#: server name → (servers.py kind, extra server arguments)
SERVERS: dict[str, tuple[str, list[str]]] = {
    **{name: (name, []) for name in BASE_SERVERS},
    "pmhub-memory-allowall": ("pmhub-memory", ["--policy", "allowall"]),
    # pmhub on its websockets adapter (no uvicorn), beside the ASGI runs.
    "pmhub-memory-ws": ("pmhub-memory", ["--adapter", "websockets"]),
    "pmhub-sqlite-ws": ("pmhub-sqlite", ["--adapter", "websockets"]),
    # SQLiteStore(synchronous="normal"): no flush per commit (see docs/performance.md).
    "pmhub-sqlite-normal-ws": (
        "pmhub-sqlite",
        ["--adapter", "websockets", "--synchronous", "normal"],
    ),
}
WS_SERVERS = ["pmhub-memory-ws", "pmhub-sqlite-ws"]


@dataclass
class Scenario:
    """One scenario: which servers, and the load generator's sizes (full and smoke)."""

    name: str
    title: str
    servers: list[str]
    full: dict[str, float] = field(default_factory=dict)
    smoke: dict[str, float] = field(default_factory=dict)
    placeholder: str | None = None


SCENARIOS = [
    Scenario(
        "closed",
        "(a) closed loop: {users:,g} users, {inflight:g} messages each awaiting confirmation,"
        " {duration:g} s measured",
        [*BASE_SERVERS, *WS_SERVERS],
        {"users": 200, "inflight": 4, "warmup": 2, "duration": 10},
        {"users": 20, "inflight": 4, "warmup": 0.3, "duration": 1},
    ),
    Scenario(
        "open",
        "(b) open loop: {users:,g} users, {rate:,g} msg/s offered in total,"
        " {duration:g} s measured",
        [*BASE_SERVERS, *WS_SERVERS, "pmhub-sqlite-normal-ws"],
        {"users": 1000, "rate": 2000, "warmup": 2, "duration": 10},
        {"users": 50, "rate": 200, "warmup": 0.3, "duration": 1},
    ),
    Scenario(
        "idle",
        "(c) {connections:,g} idle connections, {concurrency:g} handshakes at a time",
        [*BASE_SERVERS, "pmhub-memory-allowall", *WS_SERVERS],
        {"connections": 2000, "concurrency": 100, "settle": 30},
        {"connections": 100, "concurrency": 50, "settle": 3},
    ),
    Scenario(
        "sync",
        "(d) a client away for {preload:,g} messages syncs them (pmhub only)",
        ["pmhub-memory", "pmhub-sqlite", *WS_SERVERS],
        {"preload": 10000},
        {"preload": 1000},
    ),
    Scenario(
        "redis",
        "(e) two pmhub nodes on Redis",
        [],
        placeholder="not yet: needs the Redis broker",
    ),
]


class Processes:
    """Every child process, so that all of them die with the runner, whatever ends it."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.live: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], log: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        stderr = (self.logs / log).open("wb")
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl+C reaches the runner, which stops them in order
            preexec_fn=_die_with_parent,
        )
        stderr.close()
        self.live.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if proc in self.live:
            self.live.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.live):
            self.stop(proc, grace=2.0)

    def tail(self, log: str, lines: int = 3) -> str:
        text = (self.logs / log).read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL if the runner dies without cleaning up."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def wait_ready(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The port from the server's ``READY <port>`` line (no fixed sleep)."""
    assert proc.stdout is not None
    stdout: IO[bytes] = proc.stdout
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                break
            line = stdout.readline()
            if not line:
                raise RuntimeError(f"exited with {proc.wait()} before it was ready")
            if line.startswith(b"READY "):
                return int(line.split()[1])
    raise RuntimeError(f"not ready within {timeout:g} s")


def sizes_of(scenario: Scenario, args: argparse.Namespace) -> dict[str, float]:
    sizes = dict(scenario.smoke if args.smoke else scenario.full)
    if args.duration is not None and "duration" in sizes:
        sizes["duration"] = args.duration
    return sizes


def run_one(
    procs: Processes, scenario: Scenario, server: str, rep: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Start ``server``, run the load generator against it, stop the server."""
    sizes = sizes_of(scenario, args)
    kind, extra = SERVERS[server]
    users = int(sizes.get("users", sizes.get("connections", 200)))
    argv = [sys.executable, "-m", "benchmarks.servers", kind, "--users", str(users), *extra]
    argv += ["--db", str(procs.logs / f"{server}-{scenario.name}-{rep}.db")]
    if "preload" in sizes:
        argv += ["--preload", str(int(sizes.pop("preload")))]
    if args.uvloop:
        argv.append("--uvloop")
    row: dict[str, Any] = {"scenario": scenario.name, "server": server, "rep": rep}
    tag = f"{scenario.name}-{server}-{rep}"
    proc = procs.spawn(argv, f"{tag}.server.log", args.env)
    try:
        try:
            port = wait_ready(proc, 20 if args.smoke else 60)
        except RuntimeError as exc:
            row.update(error=f"server failed to start: {exc} ({procs.tail(tag + '.server.log')})")
            row["failed_to_start"] = True
            return row
        budget = (
            (30 if args.smoke else 120)
            + sizes.get("warmup", 0)
            + sizes.get("duration", 0)
            + sizes.get("settle", 0)
        )
        gen = [sys.executable, "-m", "benchmarks.loadgen", scenario.name, "--kind", server]
        gen += ["--port", str(port), "--server-pid", str(proc.pid), "--timeout", str(budget)]
        for key, value in sizes.items():
            gen += [f"--{key}", str(value)]
        loadgen = procs.spawn(gen, f"{tag}.loadgen.log", args.env)
        try:
            out, _ = loadgen.communicate(timeout=budget + 30)
        except subprocess.TimeoutExpired:
            row["error"] = "the load generator did not stop in time"
            return row
        finally:
            procs.stop(loadgen)
        if loadgen.returncode != 0 or not out.strip():
            row["error"] = f"load generator failed: {procs.tail(tag + '.loadgen.log')}"
            return row
        row.update(msgspec.json.decode(out.strip().splitlines()[-1]))
        if proc.poll() is not None:
            row["error"] = f"server exited with {proc.returncode} during the run"
        return row
    finally:
        procs.stop(proc)


def pmhub_version() -> str:
    """Which pmhub the servers import, and its commit (results say what they measured)."""
    try:
        import pmhub
    except Exception as exc:  # the pmhub servers will fail to start, and say why
        return f"not importable: {exc!r}"
    where = Path(pmhub.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = "not a git checkout"
    return f"{pmhub.__version__} from {where} ({head})"


def summary(row: dict[str, Any]) -> str:
    keys = ("delivered_per_s", "server_cpu_us_per_msg", "p99_ms", "kib_per_conn", "connect_s")
    parts = [f"{k}={row[k]:.1f}" for k in keys if isinstance(row.get(k), (int, float))]
    if row.get("error"):
        parts.append(f"ERROR {row['error']}")
    return " ".join(parts) or "no figures"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="small and about 1 s per run (CI)")
    parser.add_argument("--reps", type=int, help="repetitions (default 3, smoke 1)")
    parser.add_argument("--duration", type=float, help="measured seconds per run (closed/open)")
    parser.add_argument(
        "--scenarios", help="comma-separated: " + ",".join(s.name for s in SCENARIOS)
    )
    parser.add_argument("--servers", help="comma-separated: " + ",".join(SERVERS))
    parser.add_argument("--uvloop", action="store_true", help="uvloop + httptools for every server")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for JSON and PNG")
    args = parser.parse_args()
    reps = args.reps or (1 if args.smoke else 3)
    chosen = set((args.scenarios or ",".join(s.name for s in SCENARIOS)).split(","))
    wanted = set((args.servers or ",".join(SERVERS)).split(","))
    unknown = (chosen - {s.name for s in SCENARIOS}) | (wanted - set(SERVERS))
    if unknown:
        parser.error(f"unknown scenario or server: {', '.join(sorted(unknown))}")
    scenarios = [s for s in SCENARIOS if s.name in chosen]
    mode = ("uvloop+httptools" if args.uvloop else "asyncio+h11") + (" smoke" if args.smoke else "")
    args.env = {**os.environ, SECRET_ENV: secrets.token_hex(32), "PYTHONUNBUFFERED": "1"}
    # Run from the repo root: make the benchmarks package importable in the children.
    root = str(Path(__file__).resolve().parent.parent)
    args.env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    # Ctrl+C (even where a shell started us with SIGINT ignored) and SIGTERM both
    # unwind through the cleanup below, which stops every child process.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    results: list[dict[str, Any]] = []
    started, interrupted = time.monotonic(), False
    with tempfile.TemporaryDirectory(prefix="pmhub-bench-") as tmp:
        procs = Processes(Path(tmp))
        try:
            for rep in range(1, reps + 1):
                for scenario in scenarios:
                    if scenario.placeholder:
                        continue
                    for server in [s for s in scenario.servers if s in wanted]:
                        row = run_one(procs, scenario, server, rep, args)
                        results.append(row)
                        print(
                            f"[rep {rep}/{reps}] {scenario.name:6} {server:22} {summary(row)}",
                            file=sys.stderr,
                            flush=True,
                        )
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted: reporting what was measured", file=sys.stderr)
        finally:
            procs.stop_all()

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = ("-uvloop" if args.uvloop else "") + ("-smoke" if args.smoke else "")
    machine = f"{os.cpu_count()} cores, Python {platform.python_version()}"
    title = f"pmhub benchmarks {stamp} — {mode} — {reps} rep(s) — {machine}"
    titles = {s.name: s.title.format(**sizes_of(s, args)) for s in SCENARIOS}
    print(f"\n## {title}\n\npmhub: {pmhub_version()}\n")
    print(report.table(results, titles))
    for scenario in scenarios:
        if scenario.placeholder:
            print(f"\n### {scenario.title}\n\n{scenario.placeholder}")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = {"title": title, "mode": mode, "reps": reps, "pmhub": pmhub_version(), "results": results}
    json_path = args.out / f"bench-{stamp}{suffix}.json"
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(raw)))
    png_path = json_path.with_suffix(".png")
    if results:
        report.plot(results, png_path, title)
    print(
        f"\n{len(results)} runs in {time.monotonic() - started:.0f} s; wrote {json_path}"
        + (f" and {png_path}" if results else "")
    )

    failed = [r for r in results if r.get("failed_to_start") or not r.get("delivered")]
    for row in failed:
        print(
            f"FAILED {row['scenario']} {row['server']} rep {row['rep']}: "
            f"{row.get('error') or 'delivered nothing'}",
            file=sys.stderr,
        )
    if interrupted:
        return 130
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
