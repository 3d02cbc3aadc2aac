"""Many idle connections on one server (the ``idle_50k`` scenario), sized to the fd limits.

The target is 50,000 idle websocket connections over 500 rooms of 100 on one node in at
most 1 GiB of RSS. Each connection is a file descriptor in the server and another in the
load generator, and neither may hold more than its open-files limit, which only a
privileged process can raise past the hard limit. So the run asks for the scenario's
count, and runs the largest count that fits, in whole rooms of the scenario's size:

* the server: its own soft limit once started (a shardchat node raises it to the hard
  limit itself; Node inherits the load generator's, which ``python -m bench`` raises to the
  hard limit), minus ``SERVER_RESERVE`` for its listeners, store and logs;
* the load generator: worker processes (``bench/fleet.py``), each with at most its own
  limit minus ``LOADGEN_RESERVE`` connections, as many as needed up to ``MAX_PROCESSES``;
* source addresses: every client binds one of 127.0.0.2-254 in turn, since one source
  address has only ~28,000 ephemeral ports towards one server port.

The row says how many connections were asked and run and, when fewer, which limit
decided; the RSS per connection measured (VmRSS after minus before, as in ``idle``); and
the RSS projected at the asked count, ``before + per connection x asked``, against 1 GiB.
A projection is labelled as one: nothing here claims a count that did not run.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procstat
from bench.fleet import Fleet, split
from bench.servers import Server
from bench.wsclient import SOURCE_COUNT

SERVER_RESERVE = 1000  # descriptors a server keeps for itself under its limit
LOADGEN_RESERVE = 200  # the same for each load generator process
MAX_PROCESSES = 8  # load generator processes at most
RSS_TARGET = 1 << 30  # 1 GiB
CONNECT_TIMEOUT = 600.0  # seconds for every connection of a run to be up


@dataclass(frozen=True)
class Plan:
    """How many connections run, in how many load generator processes, and why."""

    asked: int
    rooms: int
    room_size: int
    per_process: tuple[int, ...]
    server_limit: int
    loadgen_limit: int
    limited_by: str | None  # None: the asked count runs

    @property
    def clients(self) -> int:
        return self.rooms * self.room_size


def plan(asked_rooms: int, room_size: int, server_limit: int, loadgen_limit: int,
         max_processes: int = MAX_PROCESSES) -> Plan:
    """The largest whole-room count both sides' limits allow (see the module docstring)."""
    asked = asked_rooms * room_size
    server_fit = max(0, server_limit - SERVER_RESERVE) // room_size
    per_worker = max(0, loadgen_limit - LOADGEN_RESERVE) // room_size * room_size
    loadgen_fit = per_worker * max_processes // room_size
    rooms = min(asked_rooms, server_fit, loadgen_fit)
    why = None
    if rooms < asked_rooms:
        if server_fit <= loadgen_fit:
            why = (f"the server's open-files limit is {server_limit:,}: {asked:,} connections "
                   f"need {asked + SERVER_RESERVE:,} (with {SERVER_RESERVE:,} for itself)")
        else:
            why = (f"the load generator's open-files limit is {loadgen_limit:,} per process "
                   f"and {max_processes} processes at most hold {loadgen_fit * room_size:,}")
    clients = rooms * room_size
    processes = max(1, math.ceil(clients / per_worker)) if per_worker else 1
    shares = [per_worker] * (processes - 1) + [clients - per_worker * (processes - 1)]
    return Plan(asked, rooms, room_size, tuple(shares), server_limit, loadgen_limit, why)


def open_files_limit(pid: int) -> int:
    """The soft open-files limit of a running process (/proc/<pid>/limits)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return 1 << 30 if soft == "unlimited" else int(soft)
    raise RuntimeError(f"no open-files limit in /proc/{pid}/limits")


def own_limit() -> int:
    """What a load generator process may raise its soft limit to: the hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 30 if hard == resource.RLIM_INFINITY else hard


async def run(server: Server, sc: Any, log: Any = print, loadgen_limit: int | None = None,
              max_processes: int = MAX_PROCESSES) -> dict[str, Any]:
    """The scenario against a started ``server``: plan, rooms, connect, measure, close.
    ``loadgen_limit`` stands for the load generator's limit (a test spreading a few
    clients over several processes)."""
    pids = server.pids
    p = plan(sc.rooms, sc.room_size, min(open_files_limit(pid) for pid in pids),
             loadgen_limit or own_limit(), max_processes)
    row: dict[str, Any] = {
        "clients_asked": p.asked, "clients": p.clients, "rooms": p.rooms,
        "room_size": p.room_size, "server_fd_limit": p.server_limit,
        "loadgen_fd_limit": p.loadgen_limit, "loadgen_processes": len(p.per_process),
        "source_addresses": SOURCE_COUNT, "limited_by": p.limited_by}
    if p.limited_by:
        log(f"    running {p.clients:,} of {p.asked:,} connections: {p.limited_by}")
    if not p.clients:
        raise ConnectionError(f"no connection fits: {p.limited_by}")
    handles = server.create_rooms(p.rooms)
    rooms = [[server.endpoint(h, j) for j in range(p.room_size)] for h in handles]
    await procstat.wait_idle(pids)
    rss0 = procstat.total_rss(pids)
    async with Fleet(split(rooms, list(p.per_process)), sources=SOURCE_COUNT,
                     connect_timeout=CONNECT_TIMEOUT) as fleet:
        done = await fleet.connect()
        row["connect_s"] = done["seconds"]
        row["connects_per_s"] = round(done["connected"] / done["seconds"]) if done[
            "seconds"] > 0 else None
        t0 = time.perf_counter()
        row["idle_before_measure"] = await procstat.wait_idle(pids, timeout=60)
        row["settle_s"] = round(time.perf_counter() - t0, 2)
        rss1 = procstat.total_rss(pids)
        if done["connected"] != p.clients:
            raise ConnectionError(f"{done['connected']:,} of {p.clients:,} connected")
    per_conn = (rss1 - rss0) / p.clients
    projected = rss0 + per_conn * p.asked
    row.update(rss_before=rss0, rss_after=rss1, rss_per_conn=round(per_conn),
               rss_at_asked=round(projected), rss_at_asked_measured=p.clients == p.asked,
               rss_at_asked_fits=projected <= RSS_TARGET)
    return row
