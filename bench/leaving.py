"""The leave scenario: N members of one room disconnect at once.

What a large room costs at its end (a deploy, a drain that closes every session, a network
blip: every connection of the room gone within a moment) is the leaves themselves: each
Engine.IO session closing, its namespaces disconnected, the member taken out of the room
and its leave told to the others (in a large room, in presence batches). The members join
first (``joining.join_members``, the same connect concurrency for every server) and the
server is left to go idle; then every member's connection is closed in one loop, with no
Socket.IO DISCONNECT first, as a lost connection ends.

The measured phase runs from the first close until the server counts none of them any more
(``Server.connected``, polled every ``EMPTY_POLL`` seconds): ``empty_s``. The server's CPU
is read from the first close until it is idle again (``_settle``: the start of the first
0.3 s in which it spent under 3 ms), from the scheduler's per-thread counters
(``procstat.total_exec``, nanoseconds: the 10 ms ticks of /proc/<pid>/stat are as large as
500 leaves cost in all). ``cpu_ms_per_member`` is that CPU over the members that left. A
cost per leave that grows with the room (a scan of the room's members, of the node's rooms)
shows as a figure that grows from 500 to 5,000 members; work bounded per member keeps it
flat. A presence batch still pending when the room is empty has nobody to go to: a node
drops it then; one that waits for its tick instead sends it to nobody after the phase.

``bystanders`` other rooms of one member each stay connected throughout, one for every
``scenarios.LEAVE_MEMBERS_PER_BYSTANDER`` members of the room that empties: a node serves
many rooms, more the more members it holds, and a leave that visits every room of the node
costs in proportion to them (so n leaves cost O(n^2) there).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from bench import procstat
from bench.joining import JoinResult, join_members, presence_out
from bench.servers import Server

EMPTY_POLL = 0.02  # seconds between two looks at the server's connection count
QUIET, QUIET_CPU = 0.3, 0.003  # idle: less than 3 ms of CPU over 0.3 s
SETTLE_STEP = 0.05  # seconds between two CPU readings while waiting for that
EMPTY_TIMEOUT = 60.0  # seconds the room may take to empty after the closes
SETTLE_TIMEOUT = 30.0  # seconds the server may stay busy after that
SETUP_TIMEOUT = 120.0  # seconds the joins before the measurement may take


async def run_leave(server: Server, sc: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """``sc.room_size`` members join one room of ``server``, then all disconnect at once;
    one result row's figures. ``sc.rooms - 1`` bystander rooms of one member stay."""
    pids = server.pids
    handles = server.create_rooms(sc.rooms)
    big, others = handles[0], handles[1:]
    bystanders = await join_members([server.endpoint(h, 0) for h in others],
                                    sc.concurrency, SETUP_TIMEOUT)
    res = await join_members([server.endpoint(big, j) for j in range(sc.room_size)],
                             sc.concurrency, SETUP_TIMEOUT)
    try:
        if not res.complete or not bystanders.complete:
            return _setup_failed(sc, res, bystanders)
        await presence_out(server, SETTLE_TIMEOUT)
        await procstat.wait_idle(pids, timeout=SETTLE_TIMEOUT)
        before = await asyncio.to_thread(server.connected)
        return await _measure(server, sc, res, before, log)
    finally:
        for c in res.clients + bystanders.clients:
            c.close()


async def _measure(server: Server, sc: Any, res: JoinResult, before: int | None,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """Close every member of the room at once; the figures until the server is idle."""
    pids = server.pids
    leaving = len(res.clients)
    target = None if before is None else before - leaving
    waits0 = procstat.total_runqueue_wait(pids), procstat.runqueue_wait(os.getpid())
    cpu0, own0 = procstat.total_exec(pids), time.process_time()
    t0 = time.perf_counter()
    for c in res.clients:
        c.close()
    closed_s = time.perf_counter() - t0
    empty = await _wait_connected(server, target, EMPTY_TIMEOUT)
    empty_s = time.perf_counter() - t0
    cpu_at_empty = procstat.total_exec(pids) - cpu0
    own = time.process_time() - own0
    settled, busy_until = await _settle(pids, SETTLE_TIMEOUT)
    cpu = busy_until - cpu0
    queued = (procstat.total_runqueue_wait(pids) - waits0[0],
              procstat.runqueue_wait(os.getpid()) - waits0[1])
    after = await asyncio.to_thread(server.connected)
    row: dict[str, Any] = {
        "members": sc.room_size, "bystanders": sc.rooms - 1, "concurrency": sc.concurrency,
        "left": leaving, "complete": empty, "settled": settled,
        "connected_before": before, "connected_after": after,
        "close_loop_s": round(closed_s, 3),
        # first close to the moment the server counted none of the room's members
        "empty_s": round(empty_s, 3) if empty else None,
        "leaves_per_s": round(leaving / empty_s) if empty and empty_s > 0 else None,
        "server_cpu_s": round(cpu, 6), "cpu_at_empty_s": round(cpu_at_empty, 6),
        "cpu_ms_per_member": round(cpu / leaving * 1000, 4) if leaving else None,
        "server_busy": round(cpu_at_empty / empty_s, 2) if empty and empty_s > 0 else None,
        # time the server's and the load generator's threads were runnable but waited
        # for their core: on a shared machine, what other processes took from the run
        "server_runqueue_wait_s": round(queued[0], 3),
        "loadgen_busy": round(own / empty_s, 2) if empty_s > 0 else None,
        "loadgen_runqueue_wait_s": round(queued[1], 3)}
    log(f"    {leaving:,} left, room empty after {row['empty_s']} s, {cpu:.3f} CPU-s "
        f"({row['cpu_ms_per_member']} ms/member)")
    return row


async def _settle(pids: list[int], timeout: float) -> tuple[bool, float]:
    """Wait until the server spends less than ``QUIET_CPU`` over ``QUIET`` seconds;
    (whether it did within ``timeout``, its CPU reading when that quiet stretch began).
    The quiet stretch's own CPU (the load generator's polls, timers) is left out."""
    deadline = time.monotonic() + timeout
    readings = [procstat.total_exec(pids)]
    steps = round(QUIET / SETTLE_STEP)
    while time.monotonic() < deadline:
        await asyncio.sleep(SETTLE_STEP)
        readings.append(procstat.total_exec(pids))
        if len(readings) > steps and readings[-1] - readings[-1 - steps] < QUIET_CPU:
            return True, readings[-1 - steps]
    return False, readings[-1]


async def _wait_connected(server: Server, target: int | None, timeout: float) -> bool:
    """Poll the server's connection count until it is down to ``target``: True once so,
    False when ``timeout`` passed first or the server does not count (``target`` None).
    From a thread: the load generator's loop keeps reading meanwhile."""
    if target is None:
        return False
    deadline = time.monotonic() + timeout
    while True:
        now = await asyncio.to_thread(server.connected)
        if now is not None and now <= target:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(EMPTY_POLL)


def _setup_failed(sc: Any, res: JoinResult, bystanders: JoinResult) -> dict[str, Any]:
    """The row of a run whose joins did not all get in: nothing was measured."""
    return {"members": sc.room_size, "bystanders": sc.rooms - 1, "left": 0,
            "complete": False, "joined": len(res.waits),
            "first_error": res.first_error or bystanders.first_error
            or "not every member was welcomed"}
