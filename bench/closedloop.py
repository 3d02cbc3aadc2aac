"""The multicore scenario's two load generators behind one interface: connect every member,
run one closed loop at a given priority, report what it cost.

``CDriver`` runs the compiled program (``bench.cloadgen``) in a process of its own;
``PythonDriver`` runs ``loadgen.connect_rooms`` + ``loadgen.closed_loop`` in this process.
Both count the same things (messages sent, deliveries per room, failed acks) over the same
loop, so a run can use either and the rows compare; each reports its own CPU over the
loop, so what the load generator takes from the machine is in every row.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench import cloadgen, loadgen
from bench.servers import Endpoint


@dataclass
class LoopRun(loadgen.TrafficResult):
    """One closed loop's figures, whichever load generator ran it."""

    per_room: list[int]      # deliveries of each room, in the endpoints' order
    cpu_s: float             # the load generator's CPU over the loop (user + system)
    nice: int                # the priority it ran at
    cores: list[int] | None  # the cores it was kept to (None: wherever the kernel put it)
    extra: dict[str, Any] = field(default_factory=dict)


class Driver(Protocol):
    name: str

    async def connect(self, endpoints: list[list[Endpoint]]) -> None: ...

    async def run(self, nice: int, cores: set[int] | None) -> LoopRun: ...

    def close(self) -> None: ...


@contextlib.contextmanager
def placement(nice: int, cores: set[int] | None, pid: int = 0
              ) -> Iterator[tuple[int, list[int] | None]]:
    """Process ``pid`` (0: this thread) at ``nice``, and kept to ``cores`` unless None, for
    the block; yields (the nice value it runs at, its cores). Raising a priority needs
    root: elsewhere it runs at the priority it has, and says so."""
    nice_before = os.getpriority(os.PRIO_PROCESS, pid)
    cores_before = os.sched_getaffinity(pid)
    used = nice_before
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, nice)
        used = nice
    if cores:
        os.sched_setaffinity(pid, cores)
    try:
        yield used, sorted(cores) if cores else None
    finally:
        with contextlib.suppress(OSError):  # a child may have exited meanwhile
            os.setpriority(os.PRIO_PROCESS, pid, nice_before)
            os.sched_setaffinity(pid, cores_before)


class PythonDriver:
    """``bench.loadgen`` in this process (asyncio, uvloop where installed)."""

    name = "python"

    def __init__(self, messages: int, window: int, timeout: float) -> None:
        self.messages, self.window, self.timeout = messages, window, timeout
        self.rooms: list[loadgen.Room] = []

    async def connect(self, endpoints: list[list[Endpoint]]) -> None:
        self.rooms = await loadgen.connect_rooms(endpoints)

    async def run(self, nice: int, cores: set[int] | None) -> LoopRun:
        seen0 = [room.delivered for room in self.rooms]
        own0 = time.process_time()
        with placement(nice, cores) as (used, kept):
            res = await loadgen.closed_loop(self.rooms, self.messages, self.window,
                                            timeout=self.timeout)
        cpu = time.process_time() - own0
        return LoopRun(res.sent, res.delivered, res.expected, res.acks_failed, res.wall,
                       res.complete, [room.delivered - s for room, s in
                                      zip(self.rooms, seen0, strict=True)], cpu, used, kept)

    def close(self) -> None:
        loadgen.close_all(self.rooms)


class CDriver:
    """The compiled load generator (``bench.cloadgen``), one process, one thread."""

    name = "c"

    def __init__(self, binary: Path, messages: int, window: int, timeout: float) -> None:
        self.binary, self.messages, self.window, self.timeout = (binary, messages, window,
                                                                 timeout)
        self.loop: cloadgen.ClosedLoop | None = None

    async def connect(self, endpoints: list[list[Endpoint]]) -> None:
        self.loop = cloadgen.ClosedLoop(self.binary, endpoints, self.messages, self.window,
                                        self.timeout)
        await self.loop.connect()

    async def run(self, nice: int, cores: set[int] | None) -> LoopRun:
        assert self.loop is not None
        with placement(nice, cores, self.loop.pid) as (used, kept):
            out = await self.loop.run()
        if out.error:
            raise cloadgen.LoadgenError(out.error)
        return LoopRun(out.sent, out.delivered, out.expected, out.acks_failed, out.wall,
                       out.complete, out.delivered_per_room, out.cpu_s, used, kept,
                       {"loadgen_sys_s": round(out.cpu_sys_s, 2),
                        "loadgen_frames_per_read": round(out.frames / out.reads, 2)
                        if out.reads else None})

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()
