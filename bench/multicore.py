"""``python -m bench --scenario multicore``: what a second instance process on a second core
delivers, against one process on one core, in small rooms.

Each run starts fresh shardchat nodes (``servers.ShardchatServer``): one node pinned to the
first core, or two nodes pinned one to each of the first two cores. Every node gets the same
load, ``ROOMS`` rooms of ``ROOM_SIZE`` (a second node brings rooms of its own, as a second
process on a host does once placement spreads rooms over it), and the load generator
(``loadgen.closed_loop``, at most ``WINDOW`` messages per room in flight) sends ``MESSAGES``
messages in every room. Runs alternate (1, 2, 1, 2, ...) and each side's median is reported.

**Why the figure needs accounting, on a 2-core machine.** On AWS the clients are elsewhere;
here the load generator shares the machine with the servers. With one node, the node has
core 0 and the load generator core 1. With two nodes, the load generator (roughly as busy
as a node, since it reads every delivery) has no core left, so it takes its CPU from the two
nodes: deliveries per wall second alone would measure the load generator's cost as much as
the second process. So the load generator is *not pinned* in either run (the kernel puts it
where there is room), and the figure is

    deliveries per second with the server cores to themselves
        = deliveries × server cores / core-seconds the servers had,

where the core-seconds the servers had are those of the server cores that no other process
used: the servers' own CPU plus the time those cores sat idle, read from ``/proc/stat`` per
core (``servers_had``). The load generator's time on those cores, any other process's (the
machine is shared) and time the hypervisor stole do not count; idle time does, against the
servers. With one node and
nothing else on core 0 it is plain deliveries per wall second. The ratio of the two figures
is the "x" this module reports; deliveries per wall second, the load generator's CPU and the
other processes' CPU on the server cores are reported beside it, so the accounting can be
checked. What the accounting cannot create: if the two nodes slowed each other down (a
shared disk's fsyncs, memory bandwidth, the kernel's locks), their deliveries per
core-second would fall, and so would the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import loadgen, procstat
from bench.servers import ServerError, ShardchatServer
from shardchat.cluster.nodeproc import ChildError
from shardchat.node import gctune

ROOMS = 200       # rooms per node: the "small" scenario's shape
ROOM_SIZE = 10
MESSAGES = 200    # per room: several seconds of traffic per run, well above the 10 ms ticks
WINDOW = 2        # the "small" scenario's: enough to keep a node alone on its core busy
QUICK_MESSAGES = 60
TARGET = 1.8      # two processes on two cores: at least this many times one process
TIMEOUT = 180.0   # seconds a closed loop may take
RESULTS = ("multicore.json", "multicore.md")


# ---------------------------------------------------------------------------------------
# CPU time per core


@dataclass(frozen=True)
class CoreTimes:
    """One core's times from /proc/stat, in seconds: idle (iowait included) and interrupt
    handling (irq, softirq)."""

    idle: float
    interrupts: float


def core_times() -> dict[int, CoreTimes]:
    """Every core's ``CoreTimes`` now."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            v = [int(x) for x in fields]  # user nice system idle iowait irq softirq steal
            out[int(name[3:])] = CoreTimes(idle=(v[3] + v[4]) / ticks,
                                           interrupts=(v[5] + v[6]) / ticks)
    return out


def interrupts_apart() -> bool:
    """Whether the kernel keeps interrupt time apart from the interrupted process's
    (CONFIG_IRQ_TIME_ACCOUNTING). Without it, as on most distribution kernels, a tick that
    lands in an interrupt is charged to the process it interrupted. Unknown: assume apart,
    which counts interrupt time on the server cores against the servers."""
    import gzip

    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return any(line.strip() == "CONFIG_IRQ_TIME_ACCOUNTING=y" for line in f)
    except OSError:
        return True


def servers_had(before: dict[int, CoreTimes], after: dict[int, CoreTimes],
                cores: set[int], server_cpu: float) -> float:
    """Core-seconds of ``cores`` that no process but the servers used between two
    readings: the servers' own CPU (pinned there, all of it is on those cores) plus the
    time those cores were idle, plus their interrupt time where the kernel charges it to
    no process (see ``interrupts_apart``). What another process ran there, and what the
    hypervisor stole, is not counted."""
    idle = sum(after[c].idle - before[c].idle for c in cores)
    irq = (sum(after[c].interrupts - before[c].interrupts for c in cores)
           if interrupts_apart() else 0.0)
    return server_cpu + idle + irq


def preemptions(pids: list[int]) -> int:
    """Times the kernel took the CPU from these processes' threads while they could have
    gone on (nonvoluntary context switches): how much other processes got in the way."""
    total = 0
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("nonvoluntary_ctxt_switches:"):
                            total += int(line.split()[1])
            except OSError:  # the thread ended meanwhile
                continue
    return total


def _per_commit(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float | None:
    """Messages per store commit over the measured phase, all nodes together."""
    if not before or len(before) != len(after):
        return None
    commits = sum(a["store"]["commits"] - b["store"]["commits"]
                  for a, b in zip(after, before, strict=True))
    stored = sum(a["store"]["messages"] - b["store"]["messages"]
                 for a, b in zip(after, before, strict=True))
    return round(stored / commits, 2) if commits else None


# ---------------------------------------------------------------------------------------
# one run


async def run_once(nodes: int, messages: int, log: Callable[[str], None] = print
                   ) -> dict[str, Any]:
    """``nodes`` shardchat nodes, one per core, each with its own ``ROOMS`` rooms; one
    closed loop over all of them. Returns the row of figures."""
    cores = sorted(os.sched_getaffinity(0))[:nodes]
    server = ShardchatServer(set(cores), nodes)
    row: dict[str, Any] = {"nodes": nodes, "server_cores": cores, "rooms": ROOMS * nodes,
                           "room_size": ROOM_SIZE, "messages_per_room": messages}
    try:
        server.start()
        pids = server.pids
        handles = server.create_rooms(ROOMS * nodes)  # alternate between the nodes
        endpoints = [[server.endpoint(h, j) for j in range(ROOM_SIZE)] for h in handles]
        rooms = await loadgen.connect_rooms(endpoints)
        try:
            row["idle_before_measure"] = await procstat.wait_idle(pids, timeout=30)
            per_node0 = [procstat.cpu_seconds(p) for p in pids]
            threads0, switches0 = procstat.total_threads(pids), preemptions(pids)
            metrics0 = server.metrics()
            cores0, own0 = core_times(), time.process_time()
            res = await loadgen.closed_loop(rooms, messages, WINDOW, timeout=TIMEOUT)
            cores1, own1 = core_times(), time.process_time()
            per_node = [round(procstat.cpu_seconds(p) - c, 2) for p, c in zip(pids, per_node0,
                                                                                strict=True)]
            row["server_threads_cpu_s"] = procstat.diff_threads(
                threads0, procstat.total_threads(pids))
            row["server_preemptions"] = preemptions(pids) - switches0
            row["messages_per_commit"] = _per_commit(metrics0, server.metrics())
        finally:
            loadgen.close_all(rooms)
        server.check()
    except (ServerError, ChildError, OSError, TimeoutError) as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return row
    finally:
        server.stop()
    server_cpu = sum(per_node)
    had = servers_had(cores0, cores1, set(cores), server_cpu)
    row.update(
        deliveries=res.delivered, expected=res.expected, complete=res.complete,
        acks_failed=res.acks_failed, wall_s=round(res.wall, 2),
        server_cpu_s=round(server_cpu, 2), server_cpu_per_node_s=per_node,
        server_cores_had_s=round(had, 2),
        server_cores_idle_s=round(sum(cores1[c].idle - cores0[c].idle for c in cores), 2),
        other_cpu_on_server_cores_s=round(len(cores) * res.wall - had, 2),
        loadgen_cpu_s=round(own1 - own0, 2),
        deliveries_per_s=round(res.delivered / res.wall),
        deliveries_per_cpu_s=round(res.delivered / server_cpu) if server_cpu else None,
        deliveries_per_s_own_cores=round(res.delivered * len(cores) / had) if had else None)
    log(f"  {nodes} node(s): {row['deliveries_per_s_own_cores']:,} deliveries/s with the "
        f"server cores to themselves ({row['deliveries_per_s']:,}/s wall; servers "
        f"{server_cpu:.2f} CPU-s of {had:.2f} core-s they had, load generator "
        f"{row['loadgen_cpu_s']} CPU-s, {row['wall_s']} s)")
    return row


# ---------------------------------------------------------------------------------------
# rounds, the verdict, the files


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and "error" not in r]
    return statistics.median(values) if values else None


def summarise(runs: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """The medians of each side and the ratios the target is judged on."""
    one, two = runs[1], runs[2]
    own1, own2 = (_median(one, "deliveries_per_s_own_cores"),
                  _median(two, "deliveries_per_s_own_cores"))
    wall1, wall2 = _median(one, "deliveries_per_s"), _median(two, "deliveries_per_s")
    ratio = round(own2 / own1, 2) if own1 and own2 else None
    complete = all(r.get("complete") and not r.get("error") for r in (*one, *two))
    return {"one_node_deliveries_per_s": own1, "two_nodes_deliveries_per_s": own2,
            "ratio": ratio, "target": TARGET,
            "met": bool(ratio is not None and ratio >= TARGET and complete),
            "wall_ratio": round(wall2 / wall1, 2) if wall1 and wall2 else None,
            "one_node_deliveries_per_cpu_s": _median(one, "deliveries_per_cpu_s"),
            "two_nodes_deliveries_per_cpu_s": _median(two, "deliveries_per_cpu_s"),
            "rounds": {"1": [r.get("deliveries_per_s_own_cores") for r in one],
                       "2": [r.get("deliveries_per_s_own_cores") for r in two]},
            "complete": complete}


def markdown(summary: dict[str, Any], runs: dict[int, list[dict[str, Any]]],
             meta: dict[str, Any]) -> str:
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Started: {meta['started']}, took {meta['duration_s']:.0f} s  ", "",
             "| nodes | deliveries/s, server cores to themselves | deliveries/s wall | "
             "deliveries/CPU-s | server CPU-s + idle = core-s they had | load generator CPU-s | "
             "core-s others took from the server cores | complete |",
             "|---|---|---|---|---|---|---|---|"]
    for nodes, rows in runs.items():
        for r in rows:
            if "error" in r:
                lines.append(f"| {nodes} | FAILED: {r['error']} | | | | | | no |")
                continue
            lines.append(f"| {nodes} | {r['deliveries_per_s_own_cores']:,} | "
                         f"{r['deliveries_per_s']:,} | {r['deliveries_per_cpu_s']:,} | "
                         f"{r['server_cpu_s']} + {r['server_cores_idle_s']} = "
                         f"{r['server_cores_had_s']} | "
                         f"{r['loadgen_cpu_s']} | {r['other_cpu_on_server_cores_s']} | "
                         f"{'yes' if r['complete'] else 'NO'} |")
    lines += ["", f"Two processes / one, server cores to themselves (medians): "
              f"**{summary['ratio']}x** (target ≥ {TARGET}x: "
              f"{'met' if summary['met'] else 'NOT met'}); per wall second, with the load "
              f"generator on the same two cores: {summary['wall_ratio']}x.", ""]
    return "\n".join(lines)


async def run_rounds(rounds: int, messages: int, log: Callable[[str], None] = print
                     ) -> dict[int, list[dict[str, Any]]]:
    """``rounds`` interleaved rounds of one node, then two. This process, the load
    generator, stays unpinned (see the module docstring)."""
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("the multicore scenario needs at least 2 cores")
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for r in range(rounds):
        log(f"  round {r + 1} of {rounds}")
        for nodes in (1, 2):
            runs[nodes].append(await run_once(nodes, messages, log))
    return runs


def main(args: argparse.Namespace, argv: list[str] | None, machine: str,
         raise_fd_limit: Callable[[int], None]) -> int:
    """The scenario from ``python -m bench``: exit 0 when the target is met."""
    rounds = 1 if args.quick else max(1, args.rounds)
    messages = QUICK_MESSAGES if args.quick else MESSAGES
    raise_fd_limit(2 * 2 * ROOMS * ROOM_SIZE + 1024)
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    gctune.install(tune=True)  # as a node's: the load generator's pauses would slow it
    print(f"== multicore: {ROOMS} rooms of {ROOM_SIZE} per node, 1 node vs 2 nodes on 2 "
          "cores", flush=True)
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.monotonic()
    runs = asyncio.run(run_rounds(rounds, messages, lambda s: print(s, flush=True)))
    summary = summarise(runs)
    meta = {"command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine, "started": started, "rounds": rounds,
            "duration_s": round(time.monotonic() - t0, 1)}
    text = markdown(summary, runs, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / RESULTS[0]).write_text(json.dumps(
        {"meta": meta, "summary": summary, "runs": runs}, indent=2) + "\n")
    (args.out / RESULTS[1]).write_text(text)
    print()
    print(text)
    print(f"wrote {', '.join(str(args.out / name) for name in RESULTS)}")
    return 0 if summary["met"] else 1
