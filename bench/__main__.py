"""``python -m bench``: run the scenarios against every server, print a table, write
bench/results/results.{json,md,png}.

    python -m bench                       full run (under 10 minutes on 2 cores)
    python -m bench --quick               ~1 minute smoke run, smaller everything
    python -m bench --scenario large      one scenario (repeatable)
    python -m bench --scenario join       N members join one room, N = 500 ... 5,000
    python -m bench --scenario leave      N members of one room disconnect at once
    python -m bench --server shardchat    only some servers (repeatable)
    python -m bench --profile DIR         also write a cProfile of each shardchat node
    python -m bench --scenario soak       the soak (bench/soak.py, 5 minutes; not in the
                                          default run): --soak-seconds, --soak-clients
    python -m bench --scenario multicore  1 node vs 2 nodes on 2 cores (bench/multicore.py;
                                          not in the default run), with the compiled load
                                          generator (--loadgen c, python or both)
    python -m bench --scenario idle_50k   50,000 idle connections on one server, or as many
                                          as the fd limits allow (bench/manyconn.py; not in
                                          the default run)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench import multicore, report, scenarios, soak
from bench.follow import FollowError
from bench.servers import (
    NodeJsServer,
    RawWsServer,
    RedisServer,
    Server,
    ServerError,
    ShardchatServer,
    StockServer,
    affinity,
)
from shardchat.cluster.nodeproc import ChildError
from shardchat.node import gctune

RESULTS = Path(__file__).resolve().parent / "results"
SERVER_KEYS = ("shardchat", "shardchat-nofsync", "shardchat-2", "shardchat-3",
               "shardchat-stock", "stock", "node", "rawws", "redis-2")


def make_server(key: str, cores: set[int] | None, profile: Path | None) -> Server | None:
    """A server by key, or None when its runtime is missing on this machine."""
    if key == "shardchat":
        return ShardchatServer(cores, 1, profile_dir=profile)
    if key == "shardchat-nofsync":
        return ShardchatServer(cores, 1, {"fsync": False}, profile_dir=profile)
    if key == "shardchat-2":
        return ShardchatServer(cores, 2, profile_dir=profile)
    if key == "shardchat-3":
        return ShardchatServer(cores, 3, profile_dir=profile)
    if key == "shardchat-stock":  # node.engine = "stock": what the fast paths are worth
        return ShardchatServer(cores, 1, {"engine": "stock"}, profile_dir=profile)
    if key == "stock":
        return StockServer(cores)
    if key == "node":
        return NodeJsServer(cores) if NodeJsServer.available() else None
    if key == "rawws":
        return RawWsServer(cores) if RawWsServer.available() else None
    if key == "redis-2":
        return RedisServer(cores) if RedisServer.available() else None
    raise ValueError(f"unknown server {key!r}")


def raise_fd_limit(need: int, everything: bool = False) -> None:
    """Thousands of sockets: lift the soft open-files limit (children inherit it), to the
    hard limit when ``everything``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if everything:
        need = max(need, hard if hard != resource.RLIM_INFINITY else need)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    if min(hard, need) < need:
        print(f"warning: open-files limit {hard} is below the {need} this run needs",
              file=sys.stderr)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
            f"Python {platform.python_version()}")


async def run_all(plan: list[scenarios.Scenario], servers: set[str] | None,
                  profile: Path | None, rounds: int = 1) -> list[dict[str, Any]]:
    """Run every scenario against every server; throughput scenarios ``rounds`` times.

    The rounds are interleaved (A, B, C, A, B, C, ...) and each server's median round is
    reported: this machine is shared, and a neighbour's burst that lands on one server's only
    run would otherwise decide a ratio."""
    server_cores, loadgen_cores = affinity()
    if loadgen_cores:
        os.sched_setaffinity(0, loadgen_cores)
    rows: list[dict[str, Any]] = []
    for sc in plan:
        print(f"== {sc.name}: {sc.title} ({sc.clients:,} clients)", flush=True)
        keys = scenarios.servers_of(sc, servers or set())
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
        n = rounds if sc.kind in MEDIAN_OF else 1
        for r in range(n):
            if n > 1:
                print(f"  round {r + 1} of {n}", flush=True)
            for key in keys:
                row = await run_one(key, sc, server_cores, profile)
                if row is not None:
                    runs[key].append(row)
        rows.extend(median_row(runs[k], MEDIAN_OF.get(sc.kind, "deliveries_per_cpu_s"))
                    for k in keys if runs[k])
    return rows


async def run_one(key: str, sc: scenarios.Scenario, cores: set[int] | None,
                  profile: Path | None) -> dict[str, Any] | None:
    server = make_server(key, cores, profile)
    if server is None:
        print(f"  {key}: skipped (not installed on this machine)", flush=True)
        return None
    t0 = time.monotonic()
    try:
        server.start()
        row = await scenarios.run(server, sc, log=print)
    except (ServerError, ChildError, OSError, TimeoutError, FollowError) as exc:
        row = {"scenario": sc.name, "server": server.label,
               "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        server.stop()
    row["run_s"] = round(time.monotonic() - t0, 1)
    print("  " + summary(row), flush=True)
    return row


# The kinds of scenario that run in rounds, and the figure that picks the median round.
MEDIAN_OF = {"throughput": "deliveries_per_cpu_s", "join": "wall_s",
             "leave": "cpu_ms_per_member"}


def median_row(runs: list[dict[str, Any]], key: str = "deliveries_per_cpu_s"
               ) -> dict[str, Any]:
    """The run with the median ``key``, carrying every round's figure (``rounds``). A join
    run that did not complete counts as the slowest."""
    def value(r: dict[str, Any]) -> float:
        slowest = key in ("wall_s", "cpu_ms_per_member") and not r.get("complete", True)
        return float("inf") if slowest else r[key]

    ok = [r for r in runs if "error" not in r and r.get(key) is not None]
    if len(ok) < 2:
        return runs[-1] if not ok else ok[0]
    ok.sort(key=value)
    row = dict(ok[(len(ok) - 1) // 2])
    row["rounds"] = [r[key] for r in runs if "error" not in r]
    return row


def summary(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['server']}: FAILED {row['error']}"
    parts = [f"{row['server']}:"]
    if row.get("deliveries_per_cpu_s") is not None:
        parts.append(f"{row['deliveries_per_cpu_s']:,} deliveries/CPU-s "
                     f"({row['deliveries']:,} in {row['server_cpu_s']} CPU-s, "
                     f"{row['wall_s']} s wall)")
    if row.get("rss_per_conn") is not None:
        parts.append(f"{row['rss_per_conn']:,} B RSS/connection")
    if row.get("clients_asked") is not None:
        how = "measured" if row["rss_at_asked_measured"] else "projected"
        parts.append(f"({row['clients']:,} of {row['clients_asked']:,} connections, "
                     f"connected in {row['connect_s']} s; RSS at {row['clients_asked']:,}: "
                     f"{row['rss_at_asked'] / 2**20:,.0f} MiB {how}, "
                     f"{'within' if row['rss_at_asked_fits'] else 'OVER'} 1 GiB)")
        if row.get("limited_by"):
            parts.append(f"fewer because {row['limited_by']}")
    if row.get("p99_ms") is not None:
        parts.append(f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms at "
                     f"{row['rate_msgs_per_s']} msg/s")
    if row.get("took_ms") is not None:
        parts.append(f"moved in {row['took_ms']:,.0f} ms ({row['frozen_ms']:,.0f} ms frozen), "
                     f"last member back after {row['rejoin_wall_ms']:,.0f} ms, pause p50 "
                     f"{row['gap_p50_ms']} / p99 {row['gap_p99_ms']} / max {row['gap_max_ms']} ms")
    if row.get("during_vs_before") is not None:
        parts.append(f"{row['rooms_moved']} rooms moved in {row['drain_s']} s; "
                     f"{row['before_msgs_per_s']:,.0f} msg/s before, "
                     f"{row['during_msgs_per_s']:,.0f} during ({row['during_vs_before']}x)")
    if row.get("joins_per_s") is not None:
        parts.append(f"{row['joined']:,} joined in {row['wall_s']} s, {row['server_cpu_s']} "
                     f"CPU-s ({row['cpu_ms_per_member']} ms/member), "
                     f"{row['listen_overflows']} SYNs dropped")
    if row.get("leaves_per_s") is not None:
        parts.append(f"{row['left']:,} left, room empty after {row['empty_s']} s, "
                     f"{row['server_cpu_s']} CPU-s ({row['cpu_ms_per_member']} ms/member)")
    if row.get("complete") is False and "left" in row:
        parts.append(f"INCOMPLETE ({row.get('first_error') or 'the room did not empty'})")
    elif row.get("complete") is False and "joined" in row:
        parts.append(f"INCOMPLETE ({row['joined']}/{row['members']}: {row.get('first_error')})")
    elif row.get("complete") is False:
        parts.append(f"INCOMPLETE ({row['deliveries']}/{row['expected']})")
    if row.get("acks_failed"):
        parts.append(f"{row['acks_failed']} acks failed")
    if row.get("deflate_negotiated"):
        parts.append(f"deflate on {row['deflate_negotiated']} connections")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    parser.add_argument("--scenario", action="append",
                        choices=[*sorted(scenarios.SCENARIOS), *sorted(scenarios.GROUPS),
                                 "soak", "multicore"],
                        help="run only this scenario (repeatable; join = every join_* size); "
                             "soak, multicore and idle_50k run only when named")
    parser.add_argument("--server", action="append", choices=SERVER_KEYS,
                        help="run only this server (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of each throughput and join scenario; the "
                             "median is reported (default 3, 1 with --quick)")
    parser.add_argument("--loadgen", choices=["c", "python", "both"], default="c",
                        help="the multicore scenario's load generator: the compiled one "
                             "(bench/cloadgen, default; built with cc), the Python one, or "
                             "both in turn in every round")
    parser.add_argument("--profile", type=Path, default=None,
                        help="write a cProfile of each shardchat node into this directory")
    parser.add_argument("--soak-seconds", type=float, default=300.0,
                        help="seconds of churn in the soak (default 300; 60 with --quick)")
    parser.add_argument("--soak-clients", type=int, default=2000,
                        help="connections in the soak (default 2000; 500 with --quick)")
    args = parser.parse_args(argv)
    if args.scenario and "soak" in args.scenario:
        code = run_soak(args, argv)
        args.scenario = [n for n in args.scenario if n != "soak"]
        if not args.scenario:
            return code
    if args.scenario and "multicore" in args.scenario:
        code = multicore.main(args, argv, machine(), raise_fd_limit)
        args.scenario = [n for n in args.scenario if n != "multicore"]
        if not args.scenario:
            return code
    names = [n for name in args.scenario or [k for k in scenarios.SCENARIOS
                                             if k not in scenarios.OPT_IN_SCENARIOS]
             for n in scenarios.GROUPS.get(name, (name,))]
    plan = [scenarios.SCENARIOS[n] for n in names]
    if args.quick:
        plan = [scenarios.quick(s) for s in plan]
    # a fleet scenario sizes itself to whatever limit there is (bench/manyconn.py)
    raise_fd_limit(max((2 * s.clients + 1024 for s in plan if not s.fleet), default=1024),
                   everything=any(s.fleet for s in plan))
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    # The load generator's own collector pauses would count as delivery latency; time them
    # (``loadgen_gc_*`` in the latency rows) and tune them like a node's
    # (BENCH_LOADGEN_GC_TUNE=0 leaves Python's defaults, for comparison).
    gctune.install(tune=os.environ.get("BENCH_LOADGEN_GC_TUNE", "1") != "0")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.monotonic()
    server_cores, loadgen_cores = affinity()  # before run_all pins this process
    rounds = 1 if args.quick else max(1, args.rounds)
    rows = asyncio.run(run_all(plan, set(args.server or ()), args.profile, rounds))
    meta = {"command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "mode": "quick" if args.quick else "full", "rounds": rounds, "machine": machine(),
            "started": started, "duration_s": round(time.monotonic() - t0, 1),
            "affinity": {"server_cores": sorted(server_cores or []),
                         "loadgen_cores": sorted(loadgen_cores or [])}}
    paths = report.write(args.out, meta, rows)
    print()
    print(report.markdown_table(rows))
    print()
    print(report.targets_table(report.targets(rows)))
    joins = report.join_table(rows)
    if joins:
        print()
        print(joins)
    leaves = report.leave_table(rows)
    if leaves:
        print()
        print(leaves)
    many = report.many_table(rows)
    if many:
        print()
        print(many)
    moving = report.moving_tables(rows)
    if moving:
        print()
        print(moving)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} "
          f"({meta['duration_s']:.0f} s)")
    return 1 if any("error" in r for r in rows) else 0


def run_soak(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The soak scenario: its own plan, results in soak.{json,md,png}; 1 if a verdict failed."""
    from dataclasses import replace

    plan = soak.SoakPlan(seconds=args.soak_seconds, clients=args.soak_clients)
    if args.quick:
        plan = soak.quick_plan(args.soak_seconds)
    raise_fd_limit(2 * plan.clients + 1024)
    if plan.big_room > plan.clients:
        plan = replace(plan, big_room=plan.clients // 2)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.monotonic()
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    row = asyncio.run(soak.run(plan, log=print))
    meta = {"command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(), "started": started,
            "duration_s": round(time.monotonic() - t0, 1)}
    paths = soak.write(args.out, meta, row)
    print()
    print(soak.markdown(row, meta))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0 if row["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
