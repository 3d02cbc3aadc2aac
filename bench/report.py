"""Results out: the printed table, results.json, results.md and results.png.

Ratios between servers are computed from rows of the same run only, and each target of the
benchmark is listed with its measured value, so a reader sees at once what was met and by
how much something was missed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SHARDCHAT = "shardchat"
STOCK = "stock python-socketio"
NODE = "node socket.io"
RAWWS = "raw ws"
REDIS2 = "redis-adapter, 2 nodes"
SHARD2 = "shardchat, 2 nodes"
MANY_TARGET = 50_000  # idle connections one node should hold in 1 GiB


def _row(rows: list[dict], scenario: str, server: str) -> dict | None:
    for r in rows:
        if r["scenario"] == scenario and r["server"] == server:
            return r
    return None


def _ratio(rows: list[dict], scenario: str, a: str, b: str, key: str) -> float | None:
    ra, rb = _row(rows, scenario, a), _row(rows, scenario, b)
    if not ra or not rb or not ra.get(key) or not rb.get(key):
        return None
    return ra[key] / rb[key]


def targets(rows: list[dict]) -> list[dict[str, Any]]:
    """Every target of the benchmark with its measured value (None: not measured)."""
    dpc = "deliveries_per_cpu_s"
    out = []

    def add(what: str, value: float | None, goal: float, higher_is_better: bool = True,
            unit: str = "x") -> None:
        met = None if value is None else (value >= goal if higher_is_better else value <= goal)
        out.append({"target": what, "value": None if value is None else round(value, 2),
                    "goal": ("≥ " if higher_is_better else "≤ ") + f"{goal:g}{unit}",
                    "met": met})

    add("large room: deliveries/CPU-s vs stock python-socketio",
        _ratio(rows, "large", SHARDCHAT, STOCK, dpc), 5)
    add("large room: deliveries/CPU-s vs Node socket.io",
        _ratio(rows, "large", SHARDCHAT, NODE, dpc), 1.5)
    add("small rooms: deliveries/CPU-s vs stock python-socketio",
        _ratio(rows, "small", SHARDCHAT, STOCK, dpc), 2)
    add("small rooms: deliveries/CPU-s vs Node socket.io",
        _ratio(rows, "small", SHARDCHAT, NODE, dpc), 1)
    add("large room: deliveries/CPU-s vs raw ws",
        _ratio(rows, "large", SHARDCHAT, RAWWS, dpc), 2)
    add("small rooms: deliveries/CPU-s vs raw ws",
        _ratio(rows, "small", SHARDCHAT, RAWWS, dpc), 1.2)
    deflate = None
    r1, r2 = _row(rows, "large_deflate", SHARDCHAT), _row(rows, "large", SHARDCHAT)
    if r1 and r2 and r1.get(dpc) and r2.get(dpc):
        deflate = r1[dpc] / r2[dpc]
    add("browser-like clients (deflate offered) vs not, shardchat large room", deflate, 0.95)
    add("memory per idle connection vs Node socket.io",
        _ratio(rows, "idle", SHARDCHAT, NODE, "rss_per_conn"), 1, higher_is_better=False)
    many = _row(rows, "idle_50k", SHARDCHAT)
    at_50k = None
    if many and many.get("rss_per_conn") is not None:  # before + per connection x 50,000
        at_50k = (many["rss_before"] + many["rss_per_conn"] * MANY_TARGET) / 2**20
    add(f"{MANY_TARGET:,} idle connections on one node: RSS in MiB (projected when the fd "
        "limits let fewer run)", at_50k, 1024, higher_is_better=False, unit=" MiB")
    add("50,000 idle connections: memory per connection vs Node socket.io",
        _ratio(rows, "idle_50k", SHARDCHAT, NODE, "rss_per_conn"), 1, higher_is_better=False)
    lat = _row(rows, "latency", SHARDCHAT)
    add("p99 delivery latency at half the peak rate (ms)", lat.get("p99_ms") if lat else None,
        25, higher_is_better=False, unit=" ms")
    add("p50 delivery latency at half the peak rate vs raw ws (fsync on)",
        _ratio(rows, "latency", SHARDCHAT, RAWWS, "p50_ms"), 1.5, higher_is_better=False)
    add("2 nodes: deliveries/CPU-s vs the Redis-adapter design",
        _ratio(rows, "two_nodes", SHARD2, REDIS2, dpc), 2)
    sizes = join_sizes(rows)
    big = sizes[-1] if sizes else 5000
    small = sizes[0] if sizes else 500
    add(f"{big:,} members join one room: time vs Node socket.io",
        _ratio(rows, f"join_{big}", SHARDCHAT, NODE, "wall_s"), JOIN_TIME_GOAL,
        higher_is_better=False)
    add(f"join CPU per member flat from {small:,} to {big:,} members "
        f"(CPU/member at {big:,} over at {small:,})", join_flatness(rows, SHARDCHAT),
        JOIN_FLAT_GOAL, higher_is_better=False)
    sizes = leave_sizes(rows)
    if sizes:
        big, small = sizes[-1], sizes[0]
        add(f"{big:,} members leave one room at once: time until it is empty vs Node "
            "socket.io", _ratio(rows, f"{LEAVE}{big}", SHARDCHAT, NODE, "empty_s"),
            LEAVE_TIME_GOAL, higher_is_better=False)
        add(f"leave CPU per member flat from {small:,} to {big:,} members "
            f"(CPU/member at {big:,} over at {small:,})",
            join_flatness(rows, SHARDCHAT, LEAVE), LEAVE_FLAT_GOAL, higher_is_better=False)
    return out


JOIN_TIME_GOAL = 1.5  # the largest join scenario's wall time, shardchat over Node socket.io
# Flat CPU per member: CPU per member at the largest join size over that at the smallest.
# A cost that grows with the room (a member list, a presence fan-out per join) makes the
# ratio the size ratio itself (10x for 500 -> 5,000) when it dominates, and 1 when there is
# none; 1.5 leaves room for noise and for bounded per-join work that fills up as the room
# grows (a welcome's member list up to node.welcome_members, batches of presence), and for
# the 10 ms ticks of /proc's CPU counts.
JOIN_FLAT_GOAL = 1.5
LEAVE = "leave_"  # the leave scenarios' names: leave_500 ... leave_5000
# The same flatness for leaves: a leave that scans the room's members or the node's rooms
# makes the ratio grow with the room; one that touches only the member's own rooms keeps it
# at 1 (1.5 for noise, /proc's 10 ms ticks and the bounded presence batches).
LEAVE_FLAT_GOAL = 1.5
# The largest leave scenario's time until the room is empty, shardchat over Node socket.io
# (Node tells nobody of a leave; shardchat's batches are part of its time).
LEAVE_TIME_GOAL = 1.5


def join_sizes(rows: list[dict], prefix: str = "join_") -> list[int]:
    """The member counts of the join (or, with ``prefix`` "leave_", leave) scenarios that
    ran, smallest first."""
    return sorted({r["members"] for r in rows
                   if r["scenario"].startswith(prefix) and "members" in r})


def leave_sizes(rows: list[dict]) -> list[int]:
    return join_sizes(rows, LEAVE)


def join_flatness(rows: list[dict], server: str, prefix: str = "join_") -> float | None:
    """CPU per member at the largest join (or leave) size over that at the smallest, for
    ``server``; None unless both ran to completion."""
    sizes = join_sizes(rows, prefix)
    if len(sizes) < 2:
        return None
    lo = _row(rows, f"{prefix}{sizes[0]}", server)
    hi = _row(rows, f"{prefix}{sizes[-1]}", server)
    if not lo or not hi or not lo.get("complete") or not hi.get("complete") \
            or not lo.get("cpu_ms_per_member") or hi.get("cpu_ms_per_member") is None:
        return None
    return hi["cpu_ms_per_member"] / lo["cpu_ms_per_member"]


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.2f}"
    return str(v)


COLUMNS = [("scenario", "scenario"), ("server", "server"), ("clients", "clients"),
           ("deliveries", "deliveries"), ("server_cpu_s", "server CPU s"),
           ("deliveries_per_cpu_s", "deliveries/CPU-s"), ("deliveries_per_s", "deliveries/s"),
           ("rss_per_conn", "RSS B/conn"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
           ("complete", "complete")]


MOVING = ("move", "drain")  # scenarios of rooms that move: tables of their own


def _own_table(row: dict) -> bool:
    """Rows shown in a table of their own, not in the fan-out table."""
    return row["scenario"] in MOVING or row["scenario"].startswith(("join_", LEAVE))

MOVE_COLUMNS = [("server", "server"), ("clients", "members"), ("history", "messages held"),
                ("rate_msgs_per_s", "msg/s sent"), ("took_ms", "took ms (node)"),
                ("frozen_ms", "frozen ms (node)"), ("rejoin_wall_ms", "call to last rejoin ms"),
                ("gap_p50_ms", "pause p50 ms"), ("gap_p99_ms", "pause p99 ms"),
                ("gap_max_ms", "pause max ms"), ("baseline_gap_max_ms", "gap without move ms"),
                ("listen_overflows", "SYNs dropped"), ("complete", "complete")]

DRAIN_COLUMNS = [("server", "server"), ("rooms", "rooms"), ("rooms_moved", "moved"),
                 ("drain_s", "drain s"), ("rate_msgs_per_s", "msg/s sent"),
                 ("before_msgs_per_s", "acked/s before"), ("during_msgs_per_s", "acked/s during"),
                 ("during_vs_before", "during / before"),
                 ("before_ack_p99_ms", "ack p99 before ms"),
                 ("during_ack_p99_ms", "ack p99 during ms"),
                 ("move_frozen_ms_max", "frozen ms max"),
                 ("moved_member_gap_p50_ms", "pause p50 ms"),
                 ("moved_member_gap_max_ms", "pause max ms"), ("complete", "complete")]


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "---|" * len(columns)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['scenario']} | {r['server']} | failed: {r['error']} |")
            continue
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """The fan-out scenarios, one row per server."""
    return _table([r for r in rows if not _own_table(r)], COLUMNS)


def join_table(rows: list[dict]) -> str:
    """The join scenarios, one line per room size: both servers side by side (empty when
    none ran)."""
    sizes = join_sizes(rows)
    if not sizes:
        return ""
    lines = ["| members | shardchat s | Node socket.io s | ratio | shardchat s to last presence "
             "batch | shardchat CPU ms/member | Node CPU ms/member | shardchat CPU s | Node "
             "CPU s | shardchat RSS MB after | Node RSS MB after | SYN retries (shardchat / "
             "Node) |",
             "|" + "---|" * 12]
    for n in sizes:
        a, b = _row(rows, f"join_{n}", SHARDCHAT), _row(rows, f"join_{n}", NODE)
        cells = [f"{n:,}"]
        for key in ("wall_s",):
            cells += [_join_cell(a, key), _join_cell(b, key)]
        cells.append(_side_by_side(rows, f"join_{n}", a, b, "wall_s"))
        cells.append(_join_cell(a, "presence_out_s"))
        for key in ("cpu_ms_per_member", "server_cpu_s"):
            cells += [_join_cell(a, key), _join_cell(b, key)]
        cells += [_fmt(round(r["rss_after"] / 2**20, 1)) if r and r.get("rss_after") else "-"
                  for r in (a, b)]
        cells.append(" / ".join(_fmt(r.get("syn_retransmits")) if r else "-" for r in (a, b)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leave_table(rows: list[dict]) -> str:
    """The leave scenarios, one line per room size: both servers side by side (empty when
    none ran)."""
    sizes = leave_sizes(rows)
    if not sizes:
        return ""
    lines = ["| members | shardchat s to empty | Node socket.io s to empty | ratio | shardchat "
             "CPU ms/member | Node CPU ms/member | shardchat CPU s | Node CPU s | bystander "
             "rooms |", "|" + "---|" * 9]
    for n in sizes:
        a, b = _row(rows, f"{LEAVE}{n}", SHARDCHAT), _row(rows, f"{LEAVE}{n}", NODE)
        cells = [f"{n:,}", _join_cell(a, "empty_s"), _join_cell(b, "empty_s")]
        cells.append(_side_by_side(rows, f"{LEAVE}{n}", a, b, "empty_s"))
        for key in ("cpu_ms_per_member", "server_cpu_s"):  # tens of us: three decimals
            cells += [_join_cell(a, key, 3), _join_cell(b, key, 3)]
        cells.append(_fmt((a or b or {}).get("bystanders")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _side_by_side(rows: list[dict], scenario: str, a: dict | None, b: dict | None,
                  key: str) -> str:
    """The ratio cell of a size table: shardchat's ``key`` over Node's, when both ran to
    the end ("-" otherwise)."""
    ratio = _ratio(rows, scenario, SHARDCHAT, NODE, key)
    both = a and b and a.get("complete") and b.get("complete")
    return f"{ratio:.2f}x" if ratio is not None and both else "-"


def _join_cell(row: dict | None, key: str, decimals: int = 2) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "failed"
    if not row.get("complete"):
        if "left" in row:
            return "incomplete"
        return f"incomplete ({row.get('joined', 0):,} joined)"
    value = row.get(key)
    return f"{value:,.{decimals}f}" if isinstance(value, float) else _fmt(value)


def moving_tables(rows: list[dict]) -> str:
    """The move and drain rows (empty when neither ran). No peer has moves, so the move's
    figures stand alone; the drain's ratios compare the same cluster before and during."""
    out = []
    move = [r for r in rows if r["scenario"] == "move"]
    drain = [r for r in rows if r["scenario"] == "drain"]
    if move:
        out += ["Move: one room moved to another node while it sends (no peer moves rooms; "
                "pause = the longest gap between two deliveries at a member)", "",
                _table(move, MOVE_COLUMNS), ""]
    if drain:
        out += ["Drain: one node of three emptied by `shardchat drain` while every room sends "
                "(ratio: the same cluster before the drain, same run)", "",
                _table(drain, DRAIN_COLUMNS), ""]
    return "\n".join(out)


MANY_COLUMNS = [("server", "server"), ("clients_asked", "asked"), ("clients", "run"),
                ("loadgen_processes", "load generator processes"),
                ("connect_s", "connect s"), ("connects_per_s", "connects/s"),
                ("rss_before_mib", "RSS before MiB"), ("rss_after_mib", "RSS after MiB"),
                ("rss_per_conn", "RSS B/conn"), ("rss_at_asked_mib", "RSS at asked MiB"),
                ("how", "at asked"), ("rss_at_asked_fits", "within 1 GiB"),
                ("limited_by", "fewer because")]


def many_table(rows: list[dict]) -> str:
    """The fleet scenarios (``idle_50k``): asked, run, why fewer, RSS measured and at the
    asked count (empty when none ran)."""
    many = []
    for r in rows:
        if r.get("clients_asked") is None:
            continue
        many.append({**r, "rss_before_mib": r["rss_before"] / 2**20,
                     "rss_after_mib": r["rss_after"] / 2**20,
                     "rss_at_asked_mib": r["rss_at_asked"] / 2**20,
                     "how": "measured" if r["rss_at_asked_measured"] else "projected"})
    if not many:
        return ""
    return ("Many idle connections on one server (RSS at asked = before + per connection "
            "x asked when the fd limits let fewer run)\n\n" + _table(many, MANY_COLUMNS))


def targets_table(tg: list[dict]) -> str:
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for t in tg:
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {t['goal']} | "
                     f"{_fmt(t['met'])} |")
    return "\n".join(lines)


def write(out_dir: Path, meta: dict[str, Any], rows: list[dict]) -> dict[str, Path]:
    """Write results.json, results.md and results.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tg = targets(rows)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md",
             "png": out_dir / "results.png"}
    if join_sizes(rows):
        paths["join_png"] = out_dir / "join.png"
    if leave_sizes(rows):
        paths["leave_png"] = out_dir / "leave.png"
    paths["json"].write_text(json.dumps({"meta": meta, "results": rows, "targets": tg},
                                        indent=2) + "\n")
    md = [f"# Benchmark results ({meta.get('mode', 'full')} run)", "",
          f"Command: `{meta.get('command', 'python -m bench')}`  ",
          f"Machine: {meta.get('machine', '')}  ",
          f"Started: {meta.get('started', '')}, took {meta.get('duration_s', 0):.0f} s  ",
          f"Throughput, join and leave rows: the median of {meta.get('rounds', 1)} interleaved "
          "round(s) per server (every round's figure is in results.json under `rounds`)", "",
          markdown_table(rows), "", "## Targets", "", targets_table(tg), ""]
    joins = join_table(rows)
    if joins:
        md += ["## Joining one room", "",
               "N members join one room, at most "
               f"{_join_concurrency(rows)} joins in flight (connect to welcome); time from "
               "the first connect to the last welcome, server CPU until no presence batch "
               "is pending and the server is idle after it (ratio: shardchat's time over "
               "Node socket.io's, same run; Node's peer sends no presence)", "", joins, "",
               "![joining](join.png)", ""]
    leaves = leave_table(rows)
    if leaves:
        md += ["## Leaving one room", "",
               "N members of one room disconnect at once (their connections closed in one "
               "loop), other rooms of one member each staying; time from the first close "
               "until the server counts none of them, server CPU until no presence batch is "
               "pending and the server is idle after it (ratio: shardchat's time over Node "
               "socket.io's, same run; Node's peer sends no presence)", "", leaves, "",
               "![leaving](leave.png)", ""]
    many = many_table(rows)
    if many:
        md += ["## Many connections", "", many, ""]
    moving = moving_tables(rows)
    if moving:
        md += ["## Rooms that move", "", moving]
    paths["md"].write_text("\n".join(md))
    plot(paths["png"], rows)
    if "join_png" in paths:
        plot_join(paths["join_png"], rows)
    if "leave_png" in paths:
        plot_leave(paths["leave_png"], rows)
    return paths


def _join_concurrency(rows: list[dict]) -> str:
    values = sorted({r["concurrency"] for r in rows if r.get("concurrency")})
    return " / ".join(f"{v:,}" for v in values) or "-"


def plot_join(path: Path, rows: list[dict]) -> None:
    """Joining one room: CPU per member and wall time against the room's size, per server
    (log-log: a flat line is a constant cost per member, a slope of 1 a quadratic total)."""
    _plot_sizes(path, rows, "join_", [("cpu_ms_per_member", "server CPU per member, ms"),
                                      ("wall_s", "first connect to last welcome, s")],
                "members joining one room",
                "N members join one room, each until its welcome (lower is better; "
                "incomplete runs are left out)")


def plot_leave(path: Path, rows: list[dict]) -> None:
    """Leaving one room: CPU per leaving member and the time until the room is empty."""
    _plot_sizes(path, rows, LEAVE, [("cpu_ms_per_member", "server CPU per leaving member, ms"),
                                    ("empty_s", "first close until the room is empty, s")],
                "members of one room disconnecting at once",
                "N members of one room disconnect at once (lower is better; incomplete runs "
                "are left out)")


def _plot_sizes(path: Path, rows: list[dict], prefix: str, panels: list[tuple[str, str]],
                xlabel: str, title: str) -> None:
    """Two panels against the room's size, one line per server: CPU per member (linear)
    and a time (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    sizes = join_sizes(rows, prefix)
    for ax, (key, panel) in zip(axes, panels, strict=True):
        series = {server: [(n, r[key]) for n in sizes
                           if (r := _row(rows, f"{prefix}{n}", server)) and r.get("complete")
                           and r.get(key)] for server in (SHARDCHAT, NODE)}
        for server, color, marker in ((SHARDCHAT, "#2a7ab9", "o"), (NODE, "#808080", "s")):
            pts = series[server]
            if not pts:
                continue
            other = dict(series[NODE if server == SHARDCHAT else SHARDCHAT])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                    label=server)
            for x, y in pts:  # the higher of the two points labelled above, the lower below
                dy = 6 if y >= other.get(x, 0) else -12
                label = f"{y:.3f}" if y < 0.1 else f"{y:.2f}" if y < 10 else f"{y:.0f}"
                ax.annotate(label, (x, y),
                            textcoords="offset points", xytext=(0, dy), ha="center",
                            fontsize=8)
        ax.set_xscale("log")
        if key != "cpu_ms_per_member":  # CPU per member stays within a decade: linear reads better
            ax.set_yscale("log")
            values = [y for pts in series.values() for _, y in pts]
            ticks = [t for t in (0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200)
                     if values and min(values) / 2 <= t <= max(values) * 2]
            ax.set_yticks(ticks)
            ax.set_yticklabels([f"{t:g}" for t in ticks])
        else:
            ax.set_ylim(bottom=0)
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{n:,}" for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_title(panel, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(path: Path, rows: list[dict]) -> None:
    """One panel per figure: deliveries per CPU-second per scenario, memory, latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("large", "deliveries_per_cpu_s", "one room of 500\ndeliveries per CPU-second"),
              ("large_deflate", "deliveries_per_cpu_s", "one room of 500, deflate offered\n"
               "deliveries per CPU-second"),
              ("small", "deliveries_per_cpu_s", "200 rooms of 10\ndeliveries per CPU-second"),
              ("two_nodes", "deliveries_per_cpu_s", "200 rooms of 10 on 2 nodes\n"
               "deliveries per CPU-second"),
              ("idle", "rss_per_conn", "5,000 idle connections\nRSS bytes per connection"),
              ("latency", "p99_ms", "one room of 500 at half peak\np99 latency, ms")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (scenario, key, title) in zip(axes.flat, panels, strict=True):
        data = [(r["server"], r.get(key)) for r in rows
                if r["scenario"] == scenario and r.get(key) is not None]
        ax.set_title(title, fontsize=10)
        if not data:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        names = [d[0] for d in data]
        values = [d[1] for d in data]
        colors = ["#2a7ab9" if n.startswith("shardchat") else "#a0a0a0" for n in names]
        bars = ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels([n.replace(", ", ",\n").replace(" (", "\n(") for n in names],
                           fontsize=8)
        for b, v in zip(bars, values, strict=True):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.1f}",
                        (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.margins(y=0.15)
    fig.suptitle("shardchat fan-out vs peers (server CPU from /proc; higher is better "
                 "except memory and latency)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
