"""Turns raw results (one dict per scenario, server and repetition) into a table and a plot.

Every figure is the median over repetitions; the headline (server CPU per
message, KiB per connection) also shows min-max, and its ratios to the bare
``websockets`` relay and to python-socketio.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Row = dict[str, Any]
BARE, SIO = "websockets", "socketio"


def values(runs: list[Row], key: str) -> list[float]:
    return [float(r[key]) for r in runs if isinstance(r.get(key), (int, float))]


def median(runs: list[Row], key: str) -> float | None:
    found = values(runs, key)
    return statistics.median(found) if found else None


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:,.{digits}f}"


def spread(runs: list[Row], key: str, digits: int = 0) -> str:
    """``median [min-max]`` (just the value for a single repetition)."""
    found = values(runs, key)
    if not found:
        return "-"
    mid = fmt(statistics.median(found), digits)
    if len(found) == 1:
        return mid
    return f"{mid} [{fmt(min(found), digits)}-{fmt(max(found), digits)}]"


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "-"


def notes(runs: list[Row]) -> str:
    """Errors, close codes, failed connects and failures, summed over repetitions."""
    seen: Counter[str] = Counter()
    for run in runs:
        for label, key in (("error", "errors"), ("close", "close_codes"), ("", "connect_failures")):
            for what, count in (run.get(key) or {}).items():
                seen[f"{label} {what}".strip()] += count
        if run.get("error"):  # in short: the JSON and the runner's FAILED lines have it all
            seen[str(run["error"]).split(" (")[0][:60]] += 1
        if run.get("kept_up") is False:
            seen["fell behind"] += 1
        if run.get("settled") is False:
            seen["not settled"] += 1
    return "; ".join(f"{what} x{count}" for what, count in seen.most_common()) or "ok"


Column = tuple[str, Callable[[list[Row], dict[str, list[Row]]], str]]


def _headline(title: str, key: str, digits: int = 0) -> list[Column]:
    """The figure with min-max, then its ratios to the bare relay and to socket.io."""

    def against(base: str) -> Callable[[list[Row], dict[str, list[Row]]], str]:
        return lambda runs, by: ratio(median(runs, key), median(by.get(base, []), key))

    return [
        (title, lambda runs, by: spread(runs, key, digits)),
        ("vs bare", against(BARE)),
        ("vs sio", against(SIO)),
    ]


def _col(title: str, key: str, digits: int = 0) -> Column:
    return title, lambda runs, by: fmt(median(runs, key), digits)


COLUMNS: dict[str, list[Column]] = {
    "closed": [
        _col("msg/s", "delivered_per_s"),
        _col("p50 ms", "p50_ms", 1),
        _col("p99 ms", "p99_ms", 1),
        *_headline("CPU µs/msg [min-max]", "server_cpu_us_per_msg"),
        _col("srv CPU%", "server_cpu_pct"),
        _col("gen CPU%", "gen_cpu_pct"),
    ],
    "open": [
        _col("sent/s", "sent_per_s"),
        _col("msg/s", "delivered_per_s"),
        _col("p50 ms", "p50_ms", 1),
        _col("p99 ms", "p99_ms", 1),
        *_headline("CPU µs/msg [min-max]", "server_cpu_us_per_msg"),
        _col("srv CPU%", "server_cpu_pct"),
        _col("gen CPU%", "gen_cpu_pct"),
    ],
    "idle": [
        _col("conns", "connected"),
        _col("connect s", "connect_s", 2),
        _col("quiet after s", "settle_s", 1),
        _col("conn/s", "connects_per_s"),
        *_headline("KiB/conn [min-max]", "kib_per_conn", 1),
        _col("CPU µs/conn", "server_cpu_us_per_conn"),
        _col("frames/conn", "frames_per_conn", 1),
    ],
    "sync": [
        _col("messages", "delivered"),
        _col("sync s", "sync_s", 2),
        _col("msg/s", "delivered_per_s"),
        _col("CPU µs/msg", "server_cpu_us_per_msg", 1),
    ],
}


def group(results: Iterable[Row]) -> dict[str, dict[str, list[Row]]]:
    """scenario → server → its repetitions, in the order first seen."""
    out: dict[str, dict[str, list[Row]]] = {}
    for row in results:
        out.setdefault(row["scenario"], {}).setdefault(row["server"], []).append(row)
    return out


def table(results: list[Row], titles: dict[str, str]) -> str:
    """One block per scenario, one row per server, as Markdown (reads as plain text too)."""
    blocks = []
    for scenario, by_server in group(results).items():
        columns = COLUMNS.get(scenario, [])
        header = ["server", *(title for title, _ in columns), "notes"]
        rows = [
            [server, *(cell(runs, by_server) for _, cell in columns), notes(runs)]
            for server, runs in by_server.items()
        ]
        widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
        lines = [f"### {titles.get(scenario, scenario)}", ""]
        for n, line in enumerate([header, *rows]):
            lines.append(
                "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
            )
            if n == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


COLORS = {"closed": "tab:blue", "open": "tab:orange", "idle": "tab:purple", "sync": "tab:green"}
#: (heading, result key, scenarios drawn side by side, log scale)
PANELS = [
    (
        "Server CPU per delivered message (µs), lower is better",
        "server_cpu_us_per_msg",
        ["closed", "open"],
        False,
    ),
    ("p99 latency, send to recipient (ms, log scale)", "p99_ms", ["closed", "open"], True),
    (
        "Delivered messages/s (closed loop; sync replay)",
        "delivered_per_s",
        ["closed", "sync"],
        False,
    ),
    ("Server memory per idle connection (KiB)", "kib_per_conn", ["idle"], False),
    ("Time to open the idle connections (s, log scale)", "connect_s", ["idle"], True),
    ("Server CPU per idle connection (µs, log scale)", "server_cpu_us_per_conn", ["idle"], True),
]


def plot(results: list[Row], path: Path, title: str) -> None:
    """Bars of the medians with min-max whiskers, one panel per figure of PANELS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = group(results)
    fig, axes = plt.subplots(3, 2, figsize=(15, 13))
    for ax, (heading, key, scenarios, log) in zip(axes.flat, PANELS, strict=True):
        servers = list(dict.fromkeys(s for sc in scenarios for s in grouped.get(sc, {})))
        drawn = [
            v
            for sc in scenarios
            for runs in grouped.get(sc, {}).values()
            for v in values(runs, key)
        ]
        if not any(v > 0 for v in drawn):
            ax.set_title(heading, fontsize=10)
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        height = 0.8 / len(scenarios)
        for i, scenario in enumerate(scenarios):
            by_server = grouped.get(scenario, {})
            ys, mids, lows, highs = [], [], [], []
            for y, server in enumerate(servers):
                found = values(by_server.get(server, []), key)
                if found:
                    mid = statistics.median(found)
                    ys.append(y + (i - (len(scenarios) - 1) / 2) * height)
                    mids.append(mid)
                    lows.append(mid - min(found))
                    highs.append(max(found) - mid)
            bars = ax.barh(
                ys,
                mids,
                height=height,
                xerr=[lows, highs],
                capsize=3,
                label=scenario,
                color=COLORS.get(scenario),
            )
            labels = [fmt(m, 1 if m < 100 else 0) for m in mids]
            ax.bar_label(bars, labels=labels, padding=4, fontsize=8)
        ax.set_yticks(range(len(servers)), servers)
        ax.invert_yaxis()
        ax.set_title(heading, fontsize=10)
        if log:
            ax.set_xscale("log")
            ax.margins(x=0.3)
        else:
            ax.margins(x=0.22)
        ax.grid(axis="x", alpha=0.3)
        if len(scenarios) > 1:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=100)
    plt.close(fig)
