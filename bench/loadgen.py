"""The load generator: many clients in one process, rooms, windows of messages in flight.

Every wait is bounded in time and every loop in count. Throughput runs are closed-loop per
room: a room's next message goes out only while fewer than ``window`` of its messages are
not yet delivered to every member, so no server builds an unbounded backlog and the run
measures steady broadcasting rather than queueing. Latency runs are open-loop at a fixed
rate and read the send timestamp carried in each message's text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.servers import Endpoint
from bench.wsclient import SioClient, connect, now_ns, source_address

_TEXT_MARK = b'"text":"L'
LATENCY_SAMPLE = 10  # every 10th member of a room reads the send timestamp


@dataclass
class Room:
    """The clients of one room and the deliveries they have seen."""

    members: list[SioClient] = field(default_factory=list)
    delivered: int = 0
    need: int = 0
    waiter: asyncio.Future | None = None
    latencies: list[int] | None = None

    def on_message(self, client: SioClient, payload: bytes) -> None:
        if self.latencies is not None and client.sample:
            idx = payload.find(_TEXT_MARK)
            if idx >= 0:
                start = idx + len(_TEXT_MARK)
                self.latencies.append(now_ns() - int(payload[start:payload.index(b'"', start)]))
        self.add_delivered(1)

    def add_delivered(self, count: int) -> None:
        """``count`` more messages reached a member (live, or in a welcome's history)."""
        self.delivered += count
        if self.waiter is not None and self.delivered >= self.need and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait_delivered(self, need: int, timeout: float) -> None:
        """Until at least ``need`` deliveries arrived in this room, or TimeoutError."""
        if self.delivered >= need:
            return
        self.need = need
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.waiter, timeout)
        finally:
            self.waiter = None


async def connect_rooms(endpoints: list[list[Endpoint]], *, deflate: bool = False,
                        concurrency: int = 100, timeout: float = 120.0,
                        progress: Callable[[int], None] | None = None,
                        sources: int = 0, first: int = 0,
                        client_timeout: float = 10.0) -> list[Room]:
    """Connect every member of every room (``endpoints[r][j]``), ``concurrency`` at a time.
    ``sources`` > 0 spreads the clients' source addresses over that many of 127.0.0.2-254
    (``wsclient.source_address``; client ``first`` + k takes the k-th turn), so that more
    clients than one address has ephemeral ports can reach one server port.
    ``client_timeout`` bounds each client's connect (TCP, upgrade, namespace CONNECT)."""
    rooms = [Room() for _ in endpoints]
    sem = asyncio.Semaphore(concurrency)
    done = 0

    async def one(r: int, j: int, ep: Endpoint, k: int) -> None:
        nonlocal done
        async with sem:
            client = await connect(ep.host, ep.port, ep.path, ep.namespace,
                                   {"name": f"b{r}-{j}"}, deflate=deflate,
                                   timeout=client_timeout, on_message=rooms[r].on_message,
                                   local_addr=source_address(first + k, sources))
        rooms[r].members.append(client)
        done += 1
        if progress and done % 1000 == 0:
            progress(done)

    jobs = [one(r, j, ep, k) for k, (r, j, ep) in enumerate(
        (r, j, ep) for r, eps in enumerate(endpoints) for j, ep in enumerate(eps))]
    await asyncio.wait_for(asyncio.gather(*jobs), timeout)
    return rooms


def close_all(rooms: list[Room]) -> None:
    for room in rooms:
        for c in room.members:
            c.close()


@dataclass
class TrafficResult:
    sent: int
    delivered: int
    expected: int
    acks_failed: int
    wall: float
    complete: bool


async def closed_loop(rooms: list[Room], messages: int, window: int,
                      timeout: float) -> TrafficResult:
    """Each room sends ``messages`` messages from its members in turn, at most ``window``
    not fully delivered at a time; waits until every member got every message."""
    t0 = time.perf_counter()
    base = [room.delivered for room in rooms]
    acks: list[asyncio.Future] = []
    deadline = time.monotonic() + timeout

    async def drive(r: int, room: Room) -> None:
        size = len(room.members)
        for i in range(messages):
            await room.wait_delivered(base[r] + (i - window + 1) * size,
                                      deadline - time.monotonic())
            fut = room.members[i % size].emit("message", {"text": f"m{i} of room {r}"}, ack=True)
            acks.append(fut)
        await room.wait_delivered(base[r] + messages * size, deadline - time.monotonic())

    complete = True
    try:
        await asyncio.gather(*(drive(r, room) for r, room in enumerate(rooms)))
    except TimeoutError:
        complete = False
    wall = time.perf_counter() - t0
    failed = await _count_failed(acks, max(0.5, deadline - time.monotonic()))
    delivered = sum(room.delivered - b for room, b in zip(rooms, base, strict=True))
    expected = messages * sum(len(room.members) for room in rooms)
    return TrafficResult(len(acks), delivered, expected, failed, wall, complete)


async def open_loop(rooms: list[Room], rate: float, duration: float,
                    timeout: float) -> tuple[TrafficResult, list[int]]:
    """Send ``rate`` messages per second in total, spread over the rooms, for ``duration``
    seconds; returns the traffic and every delivery's latency in nanoseconds."""
    latencies: list[int] = []
    for room in rooms:
        room.latencies = latencies
        for j, c in enumerate(room.members):  # a sample keeps the load generator light
            c.sample = j % LATENCY_SAMPLE == 0
    base = [room.delivered for room in rooms]
    count = max(1, int(rate * duration))
    acks: list[asyncio.Future] = []
    t0 = time.perf_counter()
    start = time.monotonic()
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the offered load, not synchronisation
        room = rooms[i % len(rooms)]
        sender = room.members[(i // len(rooms)) % len(room.members)]
        acks.append(sender.emit("message", {"text": f"L{now_ns()}"}, ack=True))
    per_room = [count // len(rooms) + (1 if r < count % len(rooms) else 0)
                for r in range(len(rooms))]
    complete = True
    deadline = time.monotonic() + timeout
    try:
        for r, room in enumerate(rooms):
            await room.wait_delivered(base[r] + per_room[r] * len(room.members),
                                      max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        complete = False
    wall = time.perf_counter() - t0
    for room in rooms:
        room.latencies = None
    failed = await _count_failed(acks, max(0.5, deadline - time.monotonic()))
    delivered = sum(room.delivered - b for room, b in zip(rooms, base, strict=True))
    expected = sum(n * len(room.members) for n, room in zip(per_room, rooms, strict=True))
    return TrafficResult(count, delivered, expected, failed, wall, complete), latencies


async def _count_failed(acks: list[asyncio.Future], timeout: float) -> int:
    """How many acks did not come back ``{"ok": true}`` (bounded wait)."""
    if not acks:
        return 0
    done, pending = await asyncio.wait(acks, timeout=timeout)
    for fut in pending:
        fut.cancel()
    failed = len(pending)
    for fut in done:
        if fut.cancelled() or fut.exception() is not None:
            failed += 1
            continue
        res = fut.result()
        if not (isinstance(res, list) and res and isinstance(res[0], dict) and res[0].get("ok")):
            failed += 1
    return failed
