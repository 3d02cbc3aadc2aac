"""The join scenario: N members join one room, each until its ``welcome``.

What a large room costs at its start (a lecture, a launch: everyone arrives within seconds)
is the joins themselves, so the measured phase is from the first connect to the last
welcome: the upgrade, the Engine.IO open, the namespace CONNECT and the welcome of every
member. At most ``concurrency`` joins are in flight at a time (connect to welcome), the same
number for every server, so the servers see the same offered load; the figure is how fast a
server gets through the queue, and what it spends on each member.

The server's CPU is read over the whole phase and until it is idle again after the last
welcome, so work a server does after a welcome (announcing the joiner to the others) counts
too; the CPU at the moment of the last welcome is in the row beside it. A shardchat node
tells the joins of a large room once per tick (up to ``node.presence_tick_max``, 5 s), so
when the last welcome is out its last batch may still be waiting for its tick, and the
server looks idle meanwhile: the CPU is therefore read only once the node reports no
batch pending (``presence.pending_batches`` in its metrics) and it is idle after that, so
the last batch, the largest of the run, is paid for too. When that happened is in the row
(``presence_out_s``). The time compared (``wall_s``) is to the last welcome, the end state
both servers reach: Node's peer tells nobody of anyone's join, so it has no such batch,
and the tick is a delay the node chooses, not work it is slow at.

The load generator must not be what is measured: a member looks at its events only until
its welcome came (one ``startswith``); after that, ``presence`` events, batched or not, are
only counted by the client (``other_events``), never parsed.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import procstat
from bench.servers import Endpoint, Server
from bench.wsclient import HandshakeError, SioClient, connect

MEMBER_TIMEOUT = 30.0  # seconds one member may take from its connect to its welcome
SETTLE_TIMEOUT = 30.0  # seconds the server may stay busy after the last welcome
PRESENCE_POLL = 0.05  # seconds between two looks at a node's pending presence batches
_WELCOME = b'["welcome"'


@dataclass
class JoinResult:
    """What the joins of one run did, as the load generator saw them."""

    clients: list[SioClient] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)  # connect to welcome, seconds
    failed: int = 0
    first_error: str | None = None
    last_welcome: bytes = b""
    last_at: float = 0.0  # perf_counter of the last welcome
    complete: bool = False

    def fail(self, exc: BaseException) -> None:
        self.failed += 1
        if self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {str(exc)[:200]}"


async def join_members(endpoints: list[Endpoint], concurrency: int, timeout: float,
                       member_timeout: float = MEMBER_TIMEOUT) -> JoinResult:
    """Join every endpoint's member, ``concurrency`` at a time from connect to welcome; the
    whole phase bounded by ``timeout`` (``complete`` says whether every member got its
    welcome in time)."""
    loop = asyncio.get_running_loop()
    res = JoinResult()
    sem = asyncio.Semaphore(concurrency)

    async def one(j: int, ep: Endpoint) -> None:
        welcomed: asyncio.Future[bytes] = loop.create_future()

        def on_event(client: SioClient, packet: bytes) -> None:
            if packet.startswith(_WELCOME, len(client.event_prefix)) and not welcomed.done():
                client.on_event = None  # from now on its events are only counted
                welcomed.set_result(packet)

        async with sem:
            t0 = time.perf_counter()
            try:
                client = await connect(ep.host, ep.port, ep.path, ep.namespace,
                                       {"name": f"j{j}"}, timeout=member_timeout,
                                       on_event=on_event)
            except (HandshakeError, OSError, TimeoutError) as exc:
                res.fail(exc)
                return
            res.clients.append(client)
            try:
                packet = await asyncio.wait_for(welcomed, member_timeout)
            except TimeoutError as exc:
                res.fail(exc)
                return
            res.last_at = time.perf_counter()
            res.waits.append(res.last_at - t0)
            res.last_welcome = packet

    try:
        await asyncio.wait_for(asyncio.gather(*(one(j, ep) for j, ep in enumerate(endpoints))),
                               timeout)
    except TimeoutError as exc:
        res.fail(exc)
    res.complete = len(res.waits) == len(endpoints)
    return res


async def run_join(server: Server, sc: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """``sc.room_size`` members join one new room of ``server``; one result row's figures."""
    pids = server.pids
    (handle,) = server.create_rooms(1)
    endpoints = [server.endpoint(handle, j) for j in range(sc.room_size)]
    await procstat.wait_idle(pids)
    rss0 = procstat.total_rss(pids)
    drops0, retries0 = procstat.listen_overflows(), procstat.syn_retransmits()
    waits0 = procstat.total_runqueue_wait(pids), procstat.runqueue_wait(os.getpid())
    # the scheduler's nanoseconds, not /proc's 10 ms ticks: a small room's joins take a
    # few ms (the server's threads stay for the whole phase, as total_exec needs)
    cpu0, own0 = procstat.total_exec(pids), time.process_time()
    t0 = time.perf_counter()
    res = await join_members(endpoints, sc.concurrency, sc.timeout)
    try:
        end = res.last_at if res.complete else time.perf_counter()
        cpu_at_last = procstat.total_exec(pids) - cpu0
        own = time.process_time() - own0
        queued = (procstat.total_runqueue_wait(pids) - waits0[0],
                  procstat.runqueue_wait(os.getpid()) - waits0[1])
        out = await presence_out(server, SETTLE_TIMEOUT)
        presence_out_s = time.perf_counter() - t0 if out else None
        settled = out is not False and await procstat.wait_idle(pids, timeout=SETTLE_TIMEOUT)
        cpu = procstat.total_exec(pids) - cpu0
        drops1, retries1 = procstat.listen_overflows(), procstat.syn_retransmits()
        rss1 = procstat.total_rss(pids)
        wall = end - t0
        joined = len(res.waits)
        waits = sorted(res.waits)
        welcome = _welcome_summary(res.last_welcome)
        row: dict[str, Any] = {
            "members": sc.room_size, "concurrency": sc.concurrency, "joined": joined,
            "failed": res.failed, "complete": res.complete,
            "wall_s": round(wall, 3), "joins_per_s": round(joined / wall) if wall > 0 else None,
            "server_cpu_s": round(cpu, 3), "cpu_at_last_welcome_s": round(cpu_at_last, 3),
            "cpu_ms_per_member": round(cpu / joined * 1000, 3) if joined else None,
            "settled": settled,
            # first connect to the moment no presence batch was pending any more: every
            # join told to every member (None: the server has no batches to wait for)
            "presence_out_s": round(presence_out_s, 3) if presence_out_s else None,
            # the server's share of its core over the phase: well below 1 with a server
            # that waits for something, or for its core on a shared machine
            "server_busy": round(cpu_at_last / wall, 2) if wall > 0 else None,
            "join_p50_ms": round(_pct(waits, 50) * 1000, 1) if waits else None,
            "join_p99_ms": round(_pct(waits, 99) * 1000, 1) if waits else None,
            "rss_before": rss0, "rss_after": rss1,
            "rss_per_member": round((rss1 - rss0) / joined) if joined else None,
            "listen_overflows": _diff(drops0, drops1),
            "syn_retransmits": _diff(retries0, retries1),
            "events_after_welcome": sum(c.other_events for c in res.clients) - joined,
            # bytes the members read over the phase: upgrades, welcomes and presence
            "bytes_received": sum(c.received for c in res.clients),
            "loadgen_busy": round(own / wall, 2) if wall > 0 else None,
            # time the server's and the load generator's threads were runnable but waited
            # for their core: on a shared machine, what other processes took from the run
            "server_runqueue_wait_s": round(queued[0], 3),
            "loadgen_runqueue_wait_s": round(queued[1], 3),
            **welcome}
        if res.first_error:
            row["first_error"] = res.first_error
        log(f"    {joined:,}/{sc.room_size:,} welcomed in {wall:.2f} s, "
            f"{cpu:.2f} CPU-s, {row['listen_overflows']} SYNs dropped")
        return row
    finally:
        for c in res.clients:
            c.close()


async def presence_out(server: Server, timeout: float) -> bool | None:
    """Wait until none of the server's processes has a presence batch pending: True once
    so, False when ``timeout`` passed first, None when the server reports no such thing
    (a peer without batches). Polled from a thread: the members keep reading meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = await asyncio.to_thread(server.metrics)
        pending = [m["presence"]["pending_batches"] for m in metrics if "presence" in m]
        if not pending:
            return None
        if not any(pending):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(PRESENCE_POLL)


def _welcome_summary(packet: bytes) -> dict[str, Any]:
    """The size of the last welcome and what its member list held (one parse per run)."""
    if not packet:
        return {"welcome_bytes_last": None, "welcome_members_last": None,
                "welcome_member_count_last": None}
    body = json.loads(packet[packet.index(b"["):])[1]
    return {"welcome_bytes_last": len(packet),
            "welcome_members_last": len(body.get("members", ())),
            "welcome_member_count_last": body.get("member_count")}


def _diff(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


def _pct(sorted_values: list[float], p: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[idx]
