"""The scenarios, and running one of them against one server.

Every run starts a fresh server, creates its rooms, connects every client, waits until the
server is idle (joins and presence fan-out are set-up, not the measurement), then measures
only the phase that matters: CPU seconds of the server processes from /proc, deliveries the
clients counted, wall time, RSS, latencies.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

from bench import joining, leaving, loadgen, manyconn, moving, procstat
from bench.servers import Server, ShardchatServer
from shardchat.node import gctune


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "throughput" | "idle" | "latency" | "move" | "drain" (bench/moving.py)
    #          | "join" (bench/joining.py) | "leave" (bench/leaving.py)
    rooms: int
    room_size: int
    messages: int = 0  # per room (throughput) or for the peak probe (latency)
    window: int = 4  # messages per room not yet delivered to everyone
    deflate: bool = False
    duration: float = 0.0  # seconds of open-loop sending (latency), of each window (drain)
    rate: float = 0.0  # messages per second sent in all (move, drain)
    # idle only: clients held by worker processes and sized to the fd limits
    # (bench/manyconn.py), source addresses spread over 127.0.0.2-254
    fleet: bool = False
    concurrency: int = 0  # joins in flight at a time, connect to welcome (join, leave)
    timeout: float = 0.0  # seconds the measured phase may take at most (join)
    servers: tuple[str, ...] = ("shardchat", "stock", "node", "rawws")
    title: str = ""

    @property
    def clients(self) -> int:
        if self.kind == "leave":  # one room of room_size, the others of one member each
            return self.room_size + self.rooms - 1
        return self.rooms * self.room_size


# Scenarios that run only when named with --scenario (they take minutes of their own).
OPT_IN_SCENARIOS = ("idle_50k",)

# Servers that run only when named with --server, in every scenario shardchat runs in:
# shardchat with node.engine = "stock", to see what the fast engine is worth.
OPT_IN = ("shardchat-stock",)


def servers_of(sc: Scenario, named: set[str]) -> list[str]:
    """The server keys ``sc`` runs: its own (those ``named``, when any are), plus the
    ``OPT_IN`` ones that are named, where shardchat itself runs."""
    keys = [k for k in sc.servers if not named or k in named]
    if "shardchat" in sc.servers:
        keys += [k for k in OPT_IN if k in named]
    return keys


# The join scenarios: one room, these many members (interleaved: shardchat then Node at
# each size), the same connect concurrency for every server.
JOIN_SIZES = (500, 1000, 2000, 5000)
JOIN_CONCURRENCY = 200
JOIN_TIMEOUT = 120.0
# The leave scenarios: the members of one room of these sizes disconnect at once, while
# other rooms of one member each stay connected, one per LEAVE_MEMBERS_PER_BYSTANDER members
# of that room (``rooms`` counts them too): 100 ... 1,000 rooms.
LEAVE_SIZES = JOIN_SIZES
LEAVE_MEMBERS_PER_BYSTANDER = 5

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("large", "throughput", rooms=1, room_size=500, messages=400, window=8,
             servers=("shardchat", "shardchat-nofsync", "stock", "node", "rawws"),
             title="one room of 500"),
    Scenario("large_deflate", "throughput", rooms=1, room_size=500, messages=400, window=8,
             deflate=True, title="one room of 500, clients offer permessage-deflate"),
    Scenario("small", "throughput", rooms=200, room_size=10, messages=60, window=2,
             title="200 rooms of 10"),
    Scenario("two_nodes", "throughput", rooms=200, room_size=10, messages=60, window=2,
             servers=("shardchat-2", "redis-2"),
             title="200 rooms of 10 on 2 nodes (Redis design: members split across nodes)"),
    Scenario("idle", "idle", rooms=250, room_size=20, title="5,000 idle connections"),
    Scenario("idle_50k", "idle", rooms=500, room_size=100, fleet=True,
             servers=("shardchat", "node"),
             title="50,000 idle connections on one server (as many as the fd limits allow)"),
    Scenario("latency", "latency", rooms=1, room_size=500, messages=150, window=8,
             duration=4.0, servers=("shardchat", "shardchat-nofsync", "stock", "node", "rawws"),
             title="one room of 500 at half the peak rate"),
    *(Scenario(f"join_{n}", "join", rooms=1, room_size=n, concurrency=JOIN_CONCURRENCY,
               timeout=JOIN_TIMEOUT, servers=("shardchat", "node"),
               title=f"{n:,} members join one room, each until its welcome")
      for n in JOIN_SIZES),
    *(Scenario(f"leave_{n}", "leave", rooms=1 + n // LEAVE_MEMBERS_PER_BYSTANDER, room_size=n,
               concurrency=JOIN_CONCURRENCY, servers=("shardchat", "node"),
               title=f"{n:,} members of one room disconnect at once "
                     f"({n // LEAVE_MEMBERS_PER_BYSTANDER:,} other rooms stay)")
      for n in LEAVE_SIZES),
    Scenario("move", "move", rooms=1, room_size=500, messages=10_000, rate=50.0,
             servers=("shardchat-2",),
             title="a room of 500 holding 10,000 messages moved to another node at 50 msg/s"),
    Scenario("drain", "drain", rooms=90, room_size=10, rate=1500.0, duration=4.0,
             servers=("shardchat-3",),
             title="90 rooms of 10 on 3 nodes at 1,500 msg/s, one node drained"),
)}


# Names that stand for several scenarios on the command line.
GROUPS: dict[str, tuple[str, ...]] = {"join": tuple(f"join_{n}" for n in JOIN_SIZES),
                                      "leave": tuple(f"leave_{n}" for n in LEAVE_SIZES)}


def quick(s: Scenario) -> Scenario:
    """The ~1 minute smoke version: same shapes, fewer clients and messages."""
    if s.kind == "join":  # a fifth of the members, named by its size: join_100 ... join_1000
        size = max(20, s.room_size // 5)
        return replace(s, name=f"join_{size}", room_size=size, timeout=min(s.timeout, 60.0))
    if s.kind == "leave":  # the same, with a fifth of the bystanders
        size = max(20, s.room_size // 5)
        return replace(s, name=f"leave_{size}", room_size=size,
                       rooms=1 + (s.rooms - 1) // 5)
    return replace(s, rooms=max(1, s.rooms // 4), room_size=min(s.room_size, 200),
                   messages=max(20, s.messages // 4), duration=min(s.duration, 1.5),
                   servers=tuple(x for x in s.servers if x != "shardchat-nofsync"))


async def run(server: Server, sc: Scenario, log: Any = print) -> dict[str, Any]:
    """Run ``sc`` against a started ``server``; returns one result row."""
    row: dict[str, Any] = {"scenario": sc.name, "server": server.label, "nodes": server.nodes,
                           "rooms": sc.rooms, "room_size": sc.room_size, "clients": sc.clients,
                           "deflate_offered": sc.deflate}
    if sc.kind == "join":
        with _Counters(server, row):  # also the node's GC over the joins
            row.update(await joining.run_join(server, sc, log))
        server.check()
        return row
    if sc.kind == "leave":
        with _Counters(server, row):
            row.update(await leaving.run_leave(server, sc, log))
        server.check()
        return row
    if sc.kind in ("move", "drain"):
        assert isinstance(server, ShardchatServer)
        runner = moving.run_move if sc.kind == "move" else moving.run_drain
        row.update(await runner(server, sc, log))
        server.check()
        return row
    if sc.fleet:
        row.update(await manyconn.run(server, sc, log))
        server.check()
        return row
    pids = server.pids
    handles = server.create_rooms(sc.rooms)
    endpoints = [[server.endpoint(h, j) for j in range(sc.room_size)] for h in handles]
    await procstat.wait_idle(pids)
    rss0 = procstat.total_rss(pids)
    t0 = time.perf_counter()
    rooms = await loadgen.connect_rooms(endpoints, deflate=sc.deflate)
    row["connect_s"] = round(time.perf_counter() - t0, 2)
    row["deflate_negotiated"] = sum(c.deflate_active for r in rooms for c in r.members)
    try:
        row["idle_before_measure"] = await procstat.wait_idle(pids, timeout=30)
        if sc.kind == "idle":
            rss1 = procstat.total_rss(pids)
            row.update(rss_before=rss0, rss_after=rss1,
                       rss_per_conn=round((rss1 - rss0) / sc.clients))
        elif sc.kind == "throughput":
            with _Counters(server, row):
                row.update(await _throughput(rooms, sc, pids))
        else:
            row.update(await _latency(rooms, sc, pids, log, server))
    finally:
        loadgen.close_all(rooms)
    server.check()
    return row


CALIBRATION_S = 1.5  # open-loop seconds that measure a server's CPU cost per message


class _Counters:
    """Around a measured phase: CPU per server thread (event loop vs helper threads) and,
    for shardchat, the store's commits per message and largest batch, GC collections."""

    def __init__(self, server: Server, row: dict[str, Any]) -> None:
        self.server, self.row = server, row

    def __enter__(self) -> None:
        self.threads0 = procstat.total_threads(self.server.pids)
        self.metrics0 = self.server.metrics()

    def __exit__(self, *exc: object) -> None:
        self.row["server_threads_cpu_s"] = procstat.diff_threads(
            self.threads0, procstat.total_threads(self.server.pids))
        after = self.server.metrics()
        if not after or len(after) != len(self.metrics0):
            return
        commits = sum(a["store"]["commits"] - b["store"]["commits"]
                      for a, b in zip(after, self.metrics0, strict=True))
        stored = sum(a["store"]["messages"] - b["store"]["messages"]
                     for a, b in zip(after, self.metrics0, strict=True))
        gcs = [sum(a["gc"]["collections"][g] - b["gc"]["collections"][g]
                   for a, b in zip(after, self.metrics0, strict=True)) for g in range(3)]
        pause = sum(a["gc"]["pause_ms_total"][g] - b["gc"]["pause_ms_total"][g]
                    for a, b in zip(after, self.metrics0, strict=True) for g in range(3))
        self.row.update(commits=commits, messages_per_commit=round(stored / commits, 2)
                        if commits else None, gc_collections=gcs,
                        gc_pause_ms=round(pause, 1),
                        gc_longest_ms=max(max(a["gc"]["pause_ms_longest"]) for a in after))


async def _throughput(rooms: list[loadgen.Room], sc: Scenario, pids: list[int]
                      ) -> dict[str, Any]:
    window, own0 = procstat.CpuWindow(pids), time.process_time()
    res = await loadgen.closed_loop(rooms, sc.messages, sc.window, timeout=120)
    cpu = window.seconds()
    own = time.process_time() - own0
    return {"messages": res.sent, "deliveries": res.delivered, "expected": res.expected,
            "complete": res.complete, "acks_failed": res.acks_failed,
            "server_cpu_s": round(cpu, 3), "cpu_counter": window.counter,
            "wall_s": round(res.wall, 2),
            "deliveries_per_cpu_s": round(res.delivered / cpu) if cpu > 0 else None,
            "deliveries_per_s": round(res.delivered / res.wall) if res.wall > 0 else None,
            "loadgen_busy": round(own / res.wall, 2) if res.wall > 0 else None}


async def _latency(rooms: list[loadgen.Room], sc: Scenario, pids: list[int],
                   log: Any, server: Server) -> dict[str, Any]:
    """Find the server's peak rate for evenly spaced messages, then send open-loop at half
    of it and read each delivery's latency from the send timestamp in the text.

    The closed-loop probe alone overstates that peak: with ``window`` messages in flight a
    server may coalesce several messages into one write per client, which evenly spaced
    messages do not allow, so "half" of it had servers 70-90 % busy. The peak is therefore
    the closed-loop figure capped by the server's CPU cost per message in a short open-loop
    calibration at a quarter of it (the rate at which one core would be fully busy)."""
    probe = await loadgen.closed_loop(rooms, sc.messages, sc.window, timeout=60)
    closed_peak = probe.sent / probe.wall if probe.wall > 0 else 0.0
    await procstat.wait_idle(pids)
    cpu0 = procstat.total_cpu(pids)
    calib, _ = await loadgen.open_loop(rooms, max(1.0, closed_peak / 4), CALIBRATION_S,
                                       timeout=60)
    per_msg = (procstat.total_cpu(pids) - cpu0) / max(1, calib.sent)
    peak = min(closed_peak, 1 / per_msg) if per_msg > 0 else closed_peak
    rate = max(1.0, peak / 2)
    await procstat.wait_idle(pids)
    log(f"    peak {peak:.0f} msg/s (closed loop {closed_peak:.0f}), measuring latency at "
        f"{rate:.0f} msg/s")
    counters: dict[str, Any] = {}
    own_gc = gctune.WATCH.stats()
    with _Counters(server, counters):
        window, own0 = procstat.CpuWindow(pids), time.process_time()
        waits0 = procstat.total_runqueue_wait(pids), procstat.runqueue_wait(os.getpid())
        res, lat = await loadgen.open_loop(rooms, rate, sc.duration, timeout=60)
        counters["server_runqueue_wait_ms"] = round(
            (procstat.total_runqueue_wait(pids) - waits0[0]) * 1000, 1)
        counters["loadgen_runqueue_wait_ms"] = round(
            (procstat.runqueue_wait(os.getpid()) - waits0[1]) * 1000, 1)
        cpu = window.seconds()
        own = time.process_time() - own0
    gc_after = gctune.WATCH.stats()
    counters["loadgen_gc_collections"] = [a - b for a, b in zip(
        gc_after["collections"], own_gc["collections"], strict=True)]
    counters["loadgen_gc_pause_ms"] = round(sum(gc_after["pause_ms_total"])
                                            - sum(own_gc["pause_ms_total"]), 1)
    ms = sorted(x / 1e6 for x in lat)
    return {"peak_msgs_per_s": round(peak, 1), "closed_loop_peak_msgs_per_s": round(closed_peak, 1),
            "calibration_cpu_ms_per_msg": round(per_msg * 1000, 3),
            "rate_msgs_per_s": round(rate, 1),
            "messages": res.sent, "deliveries": res.delivered, "expected": res.expected,
            "complete": res.complete, "acks_failed": res.acks_failed,
            "server_cpu_s": round(cpu, 3), "cpu_counter": window.counter,
            "wall_s": round(res.wall, 2),
            "p50_ms": round(_pct(ms, 50), 2), "p99_ms": round(_pct(ms, 99), 2),
            "max_ms": round(ms[-1], 2) if ms else None,
            "mean_ms": round(statistics.fmean(ms), 2) if ms else None,
            "server_busy": round(cpu / res.wall, 2) if res.wall > 0 else None,
            **counters,
            "loadgen_busy": round(own / res.wall, 2) if res.wall > 0 else None}


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[idx]
