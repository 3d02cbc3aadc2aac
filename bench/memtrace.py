"""Where a node's memory per idle connection goes: a tracemalloc diff, per file:line.

    python -m bench.memtrace                      2,000 idle websocket clients, top 40 lines
    python -m bench.memtrace --clients 1000 --top 80 --engine stock
    python -m bench.memtrace --frames 6           group by the allocating call chain

One shardchat node runs under tracemalloc (this module is its ``python -m`` wrapper, the way
``--profile`` wraps it in cProfile); the load generator connects the clients from this
process, so its own allocations are not in the figures. A snapshot is taken (after a full
collection) before the clients connect and once they are idle, on SIGUSR1; the difference,
divided by the clients, is what each idle connection holds on the Python heap. RSS also
holds what tracemalloc does not see (uvloop's and the kernel's per-socket state, allocator
slack), which is why ``python -m bench --scenario idle`` stays the figure that counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import runpy
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench import loadgen, procstat
from bench.servers import ShardchatServer

SNAP_TIMEOUT = 60.0  # seconds a traced node may take to write one snapshot


class TracedNode(ShardchatServer):
    """One shardchat node run under this module's tracemalloc wrapper."""

    def __init__(self, snap_dir: Path, frames: int, settings: dict[str, Any]) -> None:
        super().__init__(None, 1, settings)
        self.snap_dir = snap_dir
        self.frames = frames

    def _profiler(self, number: int) -> list[str]:
        return ["-m", "bench.memtrace", "--child", str(self.snap_dir), str(self.frames)]


def child(argv: list[str]) -> None:
    """In the node's process: trace, dump a snapshot on each SIGUSR1, run ``-m MODULE``."""
    snap_dir, frames, flag, module, *rest = argv
    if flag != "-m":
        raise SystemExit("usage: python -m bench.memtrace --child DIR FRAMES -m MODULE ...")
    tracemalloc.start(int(frames))
    count = 0

    def dump(signum: int, frame: Any) -> None:
        nonlocal count
        count += 1
        gc.collect()
        target = Path(snap_dir) / f"snap-{count}.bin"
        tracemalloc.take_snapshot().dump(str(target) + ".tmp")
        os.replace(str(target) + ".tmp", target)  # the parent waits for the final name

    signal.signal(signal.SIGUSR1, dump)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


async def snapshot(node: TracedNode, n: int) -> tracemalloc.Snapshot:
    """Ask the node for snapshot ``n`` and load it (bounded wait for the file)."""
    target = node.snap_dir / f"snap-{n}.bin"
    os.kill(node.pids[0], signal.SIGUSR1)
    deadline = time.monotonic() + SNAP_TIMEOUT
    while not target.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the node wrote no snapshot within {SNAP_TIMEOUT:g} s")
        await asyncio.sleep(0.1)  # polling a file the node writes; bounded above
    return tracemalloc.Snapshot.load(str(target))


def _where(stat: tracemalloc.StatisticDiff, root: str) -> str:
    frames = [f"{f.filename.replace(root, '')}:{f.lineno}" for f in stat.traceback]
    return " <- ".join(frames)


def report(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, clients: int,
           top: int, key: str) -> str:
    """The lines that grew most, in bytes and blocks per client, and the total."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = before.filter_traces(ignore), after.filter_traces(ignore)
    stats = after.compare_to(before, key)
    total = sum(s.size_diff for s in stats)
    root = str(Path(sys.prefix)) + "/lib/"
    lines = [f"{'B/conn':>8} {'blocks/conn':>11}  where",
             *(f"{s.size_diff / clients:8.1f} {s.count_diff / clients:11.2f}  "
               f"{_where(s, root)}" for s in stats[:top] if s.size_diff > 0),
             f"{total / clients:8.1f} {'':11}  total over {clients:,} connections"]
    by_file = after.compare_to(before, "filename")
    lines += ["", "per file:", *(f"{s.size_diff / clients:8.1f}  "
                                 f"{s.traceback[0].filename.replace(root, '')}"
                                 for s in by_file[:20] if s.size_diff > 0)]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> str:
    node = TracedNode(args.out, args.frames, {"engine": args.engine})
    node.start()
    try:
        rooms = max(1, args.clients // args.room_size)
        handles = node.create_rooms(rooms)
        endpoints = [[node.endpoint(h, j) for j in range(args.room_size)] for h in handles]
        clients = rooms * args.room_size
        await procstat.wait_idle(node.pids)
        rss0 = procstat.total_rss(node.pids)
        before = await snapshot(node, 1)
        connected = await loadgen.connect_rooms(endpoints)
        try:
            await procstat.wait_idle(node.pids, timeout=30)
            rss1 = procstat.total_rss(node.pids)
            after = await snapshot(node, 2)
        finally:
            loadgen.close_all(connected)
        node.check()
    finally:
        node.stop()
    text = report(before, after, clients, args.top, "traceback" if args.frames > 1
                  else "lineno")
    return (f"{text}\n\nRSS of the traced node: {(rss1 - rss0) / clients:,.0f} B/conn "
            f"(tracemalloc's own bookkeeping included)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.memtrace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--room-size", type=int, default=20)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--frames", type=int, default=1,
                        help="frames per allocation (more than 1: grouped by call chain)")
    parser.add_argument("--engine", choices=("fast", "stock"), default="fast")
    parser.add_argument("--out", help="where the snapshots go (default: a /tmp directory)")
    args = parser.parse_args(argv)
    args.out = Path(args.out or os.path.join("/tmp", f"memtrace-{os.getpid()}"))
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(ImportError):
        import uvloop
        uvloop.install()
    print(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
