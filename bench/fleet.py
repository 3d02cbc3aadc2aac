"""Idle clients held by worker processes: more connections than one process may open.

Each worker is ``python -m bench.fleet`` with its share of the rooms on stdin (one JSON
line); it raises its open-files soft limit to the hard one, connects every member of its
rooms with the load generator's raw client (source addresses spread over 127.0.0.2-254
when asked), says ``{"connected": n, "seconds": s}`` (or ``{"error": ...}``) on stdout,
then holds the connections until its stdin says ``close`` or closes, or ``hold`` seconds
have passed, and exits. Every wait is bounded; a worker stops by itself.

``Fleet`` is the parent side: start the workers, wait until each has connected (or one
failed), close them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench import loadgen
from bench.servers import Endpoint

HOLD_LIMIT = 900.0  # seconds a worker keeps its connections at most
EXIT_TIMEOUT = 30.0  # seconds a worker may take to close and exit when told
# Seconds one client may take to connect and join: with many joins queued at once a node
# answers each late (rooms of 100: every join tells up to 99 members), not never.
CLIENT_TIMEOUT = 60.0
SPEC_LIMIT = 64 << 20  # bytes of the one JSON line that tells a worker its rooms


@dataclass
class Share:
    """What one worker connects: its rooms' endpoints, and its first client's turn in the
    source-address rotation (so that the workers' clients share it out evenly)."""

    rooms: list[list[Endpoint]]
    first: int = 0

    @property
    def clients(self) -> int:
        return sum(len(r) for r in self.rooms)


def split(rooms: list[list[Endpoint]], per_process: list[int]) -> list[Share]:
    """Whole rooms to each worker, ``per_process[i]`` clients at most for worker i."""
    shares, start, first = [], 0, 0
    for cap in per_process:
        take, count = [], 0
        while start < len(rooms) and count + len(rooms[start]) <= cap:
            take.append(rooms[start])
            count += len(rooms[start])
            start += 1
        shares.append(Share(take, first))
        first += count
    if start < len(rooms):
        raise ValueError(f"{len(rooms) - start} rooms fit in no worker")
    return [s for s in shares if s.rooms]


class Fleet:
    """The workers of one run; ``async with`` closes them whatever happens."""

    def __init__(self, shares: list[Share], *, sources: int, concurrency: int = 100,
                 connect_timeout: float = 300.0) -> None:
        self.shares = shares
        self.sources = sources
        self.concurrency = concurrency
        self.connect_timeout = connect_timeout
        self.procs: list[asyncio.subprocess.Process] = []

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> dict[str, Any]:
        """Start every worker and wait until all are connected: {"connected", "seconds"
        (wall, first start to last report), "per_process": [...]}; RuntimeError when a
        worker failed (ConnectionError), TimeoutError past ``connect_timeout``."""
        t0 = time.perf_counter()
        for share in self.shares:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.fleet", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE)
            self.procs.append(proc)
            spec = {"rooms": [[[e.host, e.port, e.path, e.namespace] for e in room]
                              for room in share.rooms],
                    "first": share.first, "sources": self.sources,
                    "concurrency": self.concurrency, "timeout": self.connect_timeout}
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(spec).encode() + b"\n")
            await proc.stdin.drain()
        reports = await asyncio.wait_for(
            asyncio.gather(*(self._report(p) for p in self.procs)), self.connect_timeout + 30)
        failed = [r["error"] for r in reports if "error" in r]
        if failed:
            raise ConnectionError(f"a load generator process failed: {failed[0]}")
        return {"connected": sum(r["connected"] for r in reports),
                "seconds": round(time.perf_counter() - t0, 2), "per_process": reports}

    @staticmethod
    async def _report(proc: asyncio.subprocess.Process) -> dict[str, Any]:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line:
            return {"error": f"exited with {await proc.wait()} before reporting"}
        return json.loads(line)

    async def close(self) -> None:
        """Tell every worker to close its connections; kill one that takes too long."""
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.is_closing():
                with contextlib.suppress(OSError, RuntimeError):  # it exited meanwhile
                    proc.stdin.write(b"close\n")
                    proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.procs = []


# -- the worker ---------------------------------------------------------------------------


def raise_own_limit() -> int:
    """The soft open-files limit raised to the hard one; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def worker() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=SPEC_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await asyncio.wait_for(reader.readline(), 60))
    rooms = [[Endpoint(*e) for e in room] for room in spec["rooms"]]
    limit = raise_own_limit()
    t0 = time.perf_counter()
    try:
        connected = await loadgen.connect_rooms(
            rooms, concurrency=spec["concurrency"], timeout=spec["timeout"],
            sources=spec["sources"], first=spec["first"], client_timeout=CLIENT_TIMEOUT)
    except Exception as exc:  # reported, then this worker exits
        print(json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:300]} "
                                   f"(open-files limit {limit})"}), flush=True)
        return 1
    count = sum(len(r.members) for r in connected)
    print(json.dumps({"connected": count, "seconds": round(time.perf_counter() - t0, 2),
                      "fd_limit": limit}), flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader.readline(), HOLD_LIMIT)  # "close", or EOF
    loadgen.close_all(connected)
    await asyncio.sleep(0.2)  # lets the transports hand their FINs to the kernel
    return 0


def main() -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(worker())
    return uvloop.run(worker())


if __name__ == "__main__":
    sys.exit(main())
