"""``python -m bench --scenario multicore``: what a second instance process on a second core
delivers, against one process on one core, in small rooms.

Each run starts fresh shardchat nodes (``servers.ShardchatServer``, default settings, fsync
on): one node pinned to the first core, or two nodes pinned one to each of the first two
cores. Every node carries the same load, ``ROOMS`` rooms of ``ROOM_SIZE`` (a second node
brings rooms of its own, as a second process on a host does once placement spreads rooms
over it), and the load generator (at most ``WINDOW`` messages per room in flight: the
"small" scenario's shape) sends ``MESSAGES`` messages in every room. Runs alternate (1, 2,
1, 2, ...) and each side's median is reported.

**The load generator.** By default the compiled one (``bench.cloadgen``: C, epoll, one
thread; built with ``cc`` at bench time), ``--loadgen python`` for ``bench.loadgen`` on
asyncio, ``--loadgen both`` for both in turn in every round. Both run the same closed loop
over the same frames; the compiled one spends about a third of the Python one's CPU per
delivery (most of what is left is the kernel's: one read() per one or two deliveries).
Without ``cc`` the scenario says so and runs the Python one.

**The headline: deliveries per wall second, two nodes over one.** On AWS the clients are
elsewhere and a host's cores serve only its nodes. Here they share the machine, so:

* with one node the load generator is kept to the spare core (core 1): the node has core 0
  to itself, as it would with its clients on other machines;
* with two nodes there is no spare core: the load generator goes where the kernel puts it
  and takes its CPU from the nodes. So the ratio per wall second can reach 2 only if the
  load generator cost nothing; with a load generator that spends a share ``s`` of the
  nodes' CPU it is at most about 2 / (1 + s) (1.5-1.6x at the compiled one's ~30 %, 1.1x
  at the Python one's ~85 %, whose one thread cannot even take that: it reads two nodes'
  deliveries no faster than one's), less whatever else runs;
* while it measures, the load generator runs at nice ``LOADGEN_NICE`` (where allowed, i.e.
  as root; each row says which): it stands for clients elsewhere, which never wait for a
  core, so it gets one as soon as it has work and a node waits less for its input. The
  nodes keep the default priority;
* every row says where the machine's core-seconds went (``machine_cpu_s``, from /proc: the
  nodes and their kernel time, the load generator, the kernel's worker threads, idle, the
  rest: other processes of this shared machine), and the summary gives the ratio over
  the rounds whose two runs both had the machine to themselves (other processes under
  ``QUIET`` of a core), beside the median of every round.

**Beside it: deliveries per second with every node busy on its core**
(``deliveries_per_s_busy_cores``): the sum over the nodes of each node's deliveries
(counted by its own rooms) over its CPU-seconds (every thread, read from /proc). It is
what the server cores deliver, whatever the load generator took from them, and what
a host whose clients are elsewhere can expect. Its floor counts the idle time of the
nodes' cores against them (``deliveries_per_s_idle_counted``: deliveries × cores / (the
nodes' CPU + the idle time of their cores, from /proc/stat per core, ``servers_had``)):
with two nodes the cores sit idle for a few per cent of the run, when a node has nothing
to do while the load generator (one process, which must read a message's every delivery
before its room's next message goes out) works for the other node.

What the accounting cannot create: whatever two nodes cost each other on one machine (the
one disk's fsyncs, the shared caches and memory bandwidth, the kernel's network locks)
makes each delivery cost more CPU, and lowers both figures. And a node that is busy only
part of the time, as each of the two is here, tends to batch less than a fully busy one
(messages per store commit are in every row).
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

from bench import cloadgen, procstat
from bench.closedloop import CDriver, Driver, PythonDriver
from bench.servers import ServerError, ShardchatServer
from shardchat.cluster.nodeproc import ChildError
from shardchat.node import gctune

ROOMS = 200       # rooms per node: the "small" scenario's shape
ROOM_SIZE = 10
MESSAGES = 200    # per room: several seconds of traffic per run, well above the 10 ms ticks
WINDOW = 2        # the "small" scenario's: enough to keep a node alone on its core busy
QUICK_MESSAGES = 60
TARGET = 1.8      # two processes on two cores: at least this many times one process
LOADGEN_NICE = -5  # the load generator's priority while it measures (see above)
TIMEOUT = 180.0   # seconds a closed loop may take
RESULTS = ("multicore.json", "multicore.md")
LOADGENS = {"c": "C load generator (bench/cloadgen)",
            "python": "Python load generator (bench/loadgen.py)"}


# ---------------------------------------------------------------------------------------
# CPU time per core


@dataclass(frozen=True)
class CoreTimes:
    """One core's times from /proc/stat, in seconds: idle (iowait included), interrupt
    handling (irq, softirq), time the hypervisor gave to other guests (steal), and all of
    them together with user and system time (total)."""

    idle: float
    interrupts: float
    steal: float = 0.0
    total: float = 0.0


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
                                           interrupts=(v[5] + v[6]) / ticks,
                                           steal=v[7] / ticks, total=sum(v[:8]) / ticks)
    return out


def machine_split(before: dict[int, CoreTimes], after: dict[int, CoreTimes],
                  nodes_cpu: float, nodes_sys: float, loadgen_cpu: float,
                  kernel_threads: float) -> dict[str, float]:
    """Where every core-second of the machine went between two readings: the nodes (and
    how much of that was in the kernel, for their system calls), the load generator, the
    kernel's worker threads (``procstat.kernel_threads_cpu``), the interrupt handlers
    (where the kernel keeps them apart, see ``interrupts_apart``), the hypervisor's other
    guests (steal), idle, and the rest: this shared machine's other processes."""
    def delta(key: str) -> float:
        return sum(getattr(after[c], key) - getattr(before[c], key) for c in after)

    irq = delta("interrupts") if interrupts_apart() else 0.0
    total, idle, steal = delta("total"), delta("idle"), delta("steal")
    others = total - idle - steal - irq - nodes_cpu - loadgen_cpu - kernel_threads
    return {"total": round(total, 2), "nodes": round(nodes_cpu, 2),
            "nodes_kernel": round(nodes_sys, 2), "loadgen": round(loadgen_cpu, 2),
            "kernel_threads": round(kernel_threads, 2),
            "interrupts": round(irq, 2), "steal": round(steal, 2), "idle": round(idle, 2),
            "other_processes": round(max(0.0, others), 2)}


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


async def run_once(nodes: int, messages: int, make_driver: Callable[[], Driver],
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """``nodes`` shardchat nodes, one per core, each with its own ``ROOMS`` rooms; one
    closed loop over all of them, by the load generator ``make_driver`` makes. Returns the
    row of figures."""
    cores = sorted(os.sched_getaffinity(0))[:nodes]
    server = ShardchatServer(set(cores), nodes)
    driver = make_driver()
    row: dict[str, Any] = {"nodes": nodes, "server_cores": cores, "rooms": ROOMS * nodes,
                           "room_size": ROOM_SIZE, "messages_per_room": messages,
                           "loadgen": driver.name}
    step = "starting the nodes"
    try:
        server.start()
        pids = server.pids
        step = "creating the rooms"
        handles = server.create_rooms(ROOMS * nodes)  # alternate between the nodes
        endpoints = [[server.endpoint(h, j) for j in range(ROOM_SIZE)] for h in handles]
        step = "connecting the clients"
        await driver.connect(endpoints)
        step = "measuring"
        try:
            row["idle_before_measure"] = await procstat.wait_idle(pids, timeout=30)
            per_node0 = [procstat.cpu_seconds(p) for p in pids]
            sys0 = sum(procstat.cpu_split(p)[1] for p in pids)
            threads0, switches0 = procstat.total_threads(pids), preemptions(pids)
            metrics0 = server.metrics()
            cores0, kthreads0 = core_times(), procstat.kernel_threads_cpu()
            spare = set(os.sched_getaffinity(0)) - set(cores)
            res = await driver.run(LOADGEN_NICE, spare or None)
            cores1, kthreads1 = core_times(), procstat.kernel_threads_cpu()
            per_node = [procstat.cpu_seconds(p) - c for p, c in zip(pids, per_node0,
                                                                      strict=True)]
            nodes_sys = sum(procstat.cpu_split(p)[1] for p in pids) - sys0
            # room r lives on node r % nodes (ShardchatServer alternates them)
            node_deliveries = [sum(d for r, d in enumerate(res.per_room) if r % nodes == i)
                               for i in range(nodes)]
            row["server_threads_cpu_s"] = procstat.diff_threads(
                threads0, procstat.total_threads(pids))
            row["server_preemptions"] = preemptions(pids) - switches0
            row["messages_per_commit"] = _per_commit(metrics0, server.metrics())
        finally:
            driver.close()
        server.check()
    except (ServerError, ChildError, OSError, TimeoutError, cloadgen.LoadgenError) as exc:
        row["error"] = f"{step}: {type(exc).__name__}: {str(exc)[:300]}"
        row["error_logs"] = {proc.name: proc.log_tail(15) for proc in server.procs}
        return row
    finally:
        driver.close()
        server.stop()
    server_cpu = sum(per_node)
    had = servers_had(cores0, cores1, set(cores), server_cpu)
    busy_cores = sum(d / c for d, c in zip(node_deliveries, per_node, strict=True) if c > 0)
    row.update(
        deliveries=res.delivered, deliveries_per_node=node_deliveries, expected=res.expected,
        complete=res.complete, acks_failed=res.acks_failed, wall_s=round(res.wall, 2),
        server_cpu_s=round(server_cpu, 2),
        server_cpu_per_node_s=[round(c, 2) for c in per_node],
        node_busy=[round(c / res.wall, 2) for c in per_node],
        server_cores_idle_s=round(had - server_cpu, 2),
        other_cpu_on_server_cores_s=round(max(0.0, len(cores) * res.wall - had), 2),
        loadgen_cpu_s=round(res.cpu_s, 2), loadgen_nice=res.nice, loadgen_cores=res.cores,
        loadgen_us_per_delivery=round(1e6 * res.cpu_s / res.delivered, 2)
        if res.delivered else None,
        loadgen_share_of_nodes=round(res.cpu_s / server_cpu, 3) if server_cpu else None,
        machine_cpu_s=machine_split(cores0, cores1, server_cpu, nodes_sys, res.cpu_s,
                                    kthreads1 - kthreads0),
        deliveries_per_s=round(res.delivered / res.wall),
        deliveries_per_cpu_s=round(res.delivered / server_cpu) if server_cpu else None,
        deliveries_per_s_busy_cores=round(busy_cores),
        deliveries_per_s_idle_counted=round(res.delivered * len(cores) / had) if had else None,
        **res.extra)
    log(f"  {nodes} node(s), {driver.name} load generator: {row['deliveries_per_s']:,} "
        f"deliveries per wall second ({row['deliveries_per_s_busy_cores']:,}/s with every "
        f"node busy on its core, {row['deliveries_per_s_idle_counted']:,} counting idle; "
        f"nodes busy {row['node_busy']}, their cores idle {row['server_cores_idle_s']} s; "
        f"load generator {row['loadgen_cpu_s']} CPU-s, {row['loadgen_us_per_delivery']} us "
        f"per delivery, at nice {row['loadgen_nice']}; {row['wall_s']} s)")
    return row


# ---------------------------------------------------------------------------------------
# rounds, the verdict, the files


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and "error" not in r]
    return statistics.median(values) if values else None


def _ratio(one: list[dict[str, Any]], two: list[dict[str, Any]], key: str) -> float | None:
    a, b = _median(one, key), _median(two, key)
    return round(b / a, 2) if a and b else None


SPLIT = ("nodes", "nodes_kernel", "loadgen", "kernel_threads", "interrupts", "steal", "idle",
         "other_processes", "total")  # machine_split's keys, in the table's order


def _median_split(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The median of each ``machine_cpu_s`` entry over the rows, per second of wall time
    (core-seconds per second: 2 is the whole machine)."""
    rows = [r for r in rows if "error" not in r and r.get("wall_s")]
    out: dict[str, float | None] = {}
    for key in SPLIT:
        values = [r["machine_cpu_s"][key] / r["wall_s"] for r in rows]
        out[key] = round(statistics.median(values), 2) if values else None
    return out


QUIET = 0.05  # core-seconds per wall second other processes may take in a quiet run


def _quiet(row: dict[str, Any]) -> bool:
    return row["machine_cpu_s"]["other_processes"] <= QUIET * row["wall_s"]


def quiet_rounds(one: list[dict[str, Any]], two: list[dict[str, Any]]) -> list[float]:
    """Per wall second, two nodes over one, in each round whose two runs (a few seconds
    apart) both had the machine to themselves: this machine is shared, and a run that
    other processes' work lands on says little."""
    ones = [r for r in one if "error" not in r]
    twos = [r for r in two if "error" not in r]
    return [round(b["deliveries_per_s"] / a["deliveries_per_s"], 2)
            for a, b in zip(ones, twos, strict=False) if _quiet(a) and _quiet(b)]


def summarise(runs: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """The medians of each side and the ratios of one load generator's runs. The headline,
    and the target, is deliveries per wall second (``ratio``), judged with every measured
    run complete (a run that failed before it measured anything, and was tried again, is
    counted in ``failed_runs``); the per-busy-core figure and its floor are beside it."""
    one, two = runs[1], runs[2]
    ratio = _ratio(one, two, "deliveries_per_s")
    busy = _ratio(one, two, "deliveries_per_s_busy_cores")
    measured = [r for r in (*one, *two) if "error" not in r]
    complete = bool(measured) and all(r.get("complete") for r in measured)
    quiet = quiet_rounds(one, two)
    return {"ratio": ratio, "target": TARGET,
            "ratio_quiet_rounds": statistics.median(quiet) if quiet else None,
            "quiet_rounds": quiet,
            "met": bool(ratio is not None and ratio >= TARGET and complete),
            "ratio_busy_cores": busy,
            "met_busy_cores": bool(busy is not None and busy >= TARGET and complete),
            "ratio_idle_counted": _ratio(one, two, "deliveries_per_s_idle_counted"),
            "failed_runs": sum(1 for r in (*one, *two) if "error" in r),
            "medians": {str(n): {k: _median(rows, k) for k in (
                "deliveries_per_s", "deliveries_per_s_busy_cores",
                "deliveries_per_s_idle_counted", "deliveries_per_cpu_s", "loadgen_cpu_s",
                "loadgen_us_per_delivery", "loadgen_share_of_nodes")}
                for n, rows in runs.items()},
            "machine_cpu_per_s": {str(n): _median_split(rows) for n, rows in runs.items()},
            "complete": complete}


def _row_line(nodes: int, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {nodes} | FAILED: {r['error']} |" + " |" * 10 + " no |"
    return (f"| {nodes} | {r['deliveries_per_s']:,} | {r['deliveries_per_s_busy_cores']:,} | "
            f"{r['deliveries_per_s_idle_counted']:,} | "
            f"{', '.join(f'{b:.0%}' for b in r['node_busy'])} | "
            f"{r['server_cores_idle_s']} | {r['loadgen_cpu_s']} ({r['loadgen_nice']}) | "
            f"{r['loadgen_us_per_delivery']} | {r['loadgen_share_of_nodes']:.0%} | "
            f"{r['machine_cpu_s']['other_processes']} | {r['messages_per_commit']} | "
            f"{'yes' if r['complete'] else 'NO'} |")


def _verdict(name: str, summary: dict[str, Any]) -> str:
    return (f"With the {LOADGENS[name]}: two processes / one (medians) **{summary['ratio']}x "
            f"deliveries per wall second** (target ≥ {TARGET}x: "
            f"{'met' if summary['met'] else 'NOT met'}), the load generator on the same two "
            f"cores ({_quiet_text(summary)}); {summary['ratio_busy_cores']}x with every "
            "node busy on its core "
            f"({'met' if summary['met_busy_cores'] else 'not met'}), "
            f"{summary['ratio_idle_counted']}x counting their cores' idle time against them.")


def _quiet_text(summary: dict[str, Any]) -> str:
    rounds = summary["quiet_rounds"]
    if not rounds:
        return "no round had the machine to itself"
    return (f"{summary['ratio_quiet_rounds']}x in the {len(rounds)} round(s) with the "
            f"machine to itself: {', '.join(f'{x}x' for x in rounds)}")


def markdown(summaries: dict[str, dict[str, Any]],
             runs: dict[str, dict[int, list[dict[str, Any]]]], meta: dict[str, Any]) -> str:
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Started: {meta['started']}, took {meta['duration_s']:.0f} s  "]
    for name, by_nodes in runs.items():
        lines += ["", f"**{LOADGENS[name]}**", "",
                  "| nodes | deliveries per wall second | every node busy on its core | "
                  "counting idle | nodes busy | idle core-s | load generator CPU-s (nice) | "
                  "load generator µs per delivery | load generator / nodes' CPU | core-s "
                  "other processes took | messages per commit | complete |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_row_line(nodes, r) for nodes, rows in by_nodes.items() for r in rows]
    lines += ["", "Where the machine's two cores went (core-seconds per wall second, medians; "
              "nodes' kernel time is part of nodes):", "",
              "| load generator | nodes | " + " | ".join(SPLIT) + " |",
              "|---|---|" + "---|" * len(SPLIT)]
    for name, summary in summaries.items():
        for n, split in summary["machine_cpu_per_s"].items():
            lines.append(f"| {name} | {n} | " + " | ".join(str(split[k]) for k in SPLIT)
                         + " |")
    lines += [""] + [_verdict(name, summary) for name, summary in summaries.items()] + [""]
    return "\n".join(lines)


async def run_rounds(rounds: int, messages: int, drivers: dict[str, Callable[[], Driver]],
                     log: Callable[[str], None] = print
                     ) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """``rounds`` interleaved rounds: in each, one node then two with every load generator
    of ``drivers`` in turn. The load generator stays unpinned (see the module docstring).
    A run that fails (this machine is shared: a start-up or a request can time out) is
    tried once more, and both rows are kept."""
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("the multicore scenario needs at least 2 cores")
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {name: {1: [], 2: []}
                                                        for name in drivers}
    for r in range(rounds):
        log(f"  round {r + 1} of {rounds}")
        for name, make in drivers.items():
            for nodes in (1, 2):
                row = await run_once(nodes, messages, make, log)
                if "error" in row:
                    log(f"  {nodes} node(s): failed ({row['error']}); once more")
                    runs[name][nodes].append(row)
                    row = await run_once(nodes, messages, make, log)
                runs[name][nodes].append(row)
    return runs


def drivers_for(choice: str, messages: int, log: Callable[[str], None] = print
                ) -> dict[str, Callable[[], Driver]]:
    """The load generators to run for ``--loadgen`` (c, python or both): the compiled one
    is built first; without a C compiler the scenario says so and uses the Python one."""
    names = ["c", "python"] if choice == "both" else [choice]
    out: dict[str, Callable[[], Driver]] = {}
    if "c" in names:
        try:
            binary = cloadgen.build()
        except cloadgen.CompilerMissing as exc:
            log(f"  {exc}: the C load generator cannot be built; using the Python one")
            names = ["python"]
        else:
            log(f"  C load generator: {binary}")
            out["c"] = lambda: CDriver(binary, messages, WINDOW, TIMEOUT)
    if "python" in names:
        out["python"] = lambda: PythonDriver(messages, WINDOW, TIMEOUT)
    return out


def main(args: argparse.Namespace, argv: list[str] | None, machine: str,
         raise_fd_limit: Callable[[int], None]) -> int:
    """The scenario from ``python -m bench``: exit 0 when the target is met (per wall
    second, with the first load generator run)."""
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
          f"cores, load generator: {args.loadgen}", flush=True)
    drivers = drivers_for(args.loadgen, messages, lambda s: print(s, flush=True))
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.monotonic()
    runs = asyncio.run(run_rounds(rounds, messages, drivers, lambda s: print(s, flush=True)))
    summaries = {name: summarise(by_nodes) for name, by_nodes in runs.items()}
    meta = {"command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine, "started": started, "rounds": rounds,
            "duration_s": round(time.monotonic() - t0, 1)}
    text = markdown(summaries, runs, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / RESULTS[0]).write_text(json.dumps(
        {"meta": meta, "summary": summaries, "runs": runs}, indent=2) + "\n")
    (args.out / RESULTS[1]).write_text(text)
    print()
    print(text)
    print(f"wrote {', '.join(str(args.out / name) for name in RESULTS)}")
    return 0 if next(iter(summaries.values()))["met"] else 1
