"""The scenarios of rooms that move: one large room moved while it is busy (``move``), and
one instance of three drained by ``shardchat drain``'s orchestration while every room keeps
sending (``drain``).

Members are ``follow.Member`` clients: they follow ``moved`` to the room's new node and
rejoin there with ``last_seq``, as the room page does, and check that every seq reaches
them once. Every loop is bounded in count (``SEND_CAP_S``) and every wait in
time.

What a move costs a member is its pause: the longest gap between two deliveries while the
room moves. It is the freeze (new messages wait at the old node while the last ones are
copied, the forward is written and the new node activates the room), the ``moved`` event,
and the member's reconnect to the new node with its welcome (which brings what the member
missed). The copy of the history runs before the freeze, while the room still serves.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import follow, procstat
from bench.follow import FollowingRoom, Outgoing
from bench.servers import ServerError, ShardchatServer
from bench.wsclient import connect
from shardchat import config, urls
from shardchat.cluster import moves

WARM_S = 1.0  # steady sending before anything is measured
BASELINE_S = 2.0  # move: the gaps members see without a move, just before it
AFTER_S = 1.0  # move: deliveries on the new node still inside the watched window
REJOIN_TIMEOUT = 60.0  # seconds from the move's start until every member is back
SETTLE_TIMEOUT = 60.0  # seconds for the last acks and deliveries after sending stops
SEND_CAP_S = 300.0  # no sender sends for longer than this (count cap = rate x this)
FILL_WINDOW = 64  # messages in flight while a room's history is filled


Log = Callable[[str], None]


@dataclass
class Senders:
    """The messages of a run: each one's outcome, and the counts a verdict needs."""

    sent: list[Outgoing] = field(default_factory=list)
    by_room: dict[int, list[Outgoing]] = field(default_factory=dict)  # id(room) -> its own
    stop: bool = False

    def add(self, room: FollowingRoom, o: Outgoing) -> None:
        self.sent.append(o)
        self.by_room.setdefault(id(room), []).append(o)

    async def settle(self, timeout: float) -> None:
        """Until every message has its final ack (bounded)."""
        pending = [o.done for o in self.sent if not o.done.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    def acked(self, room: FollowingRoom) -> list[Outgoing]:
        return [o for o in self.by_room.get(id(room), ()) if _ok(o)]

    def sent_between(self, t0: float, t1: float) -> int:
        return sum(1 for o in self.sent if t0 <= o.sent_at < t1)

    def ack_waits(self, t0: float, t1: float) -> list[float]:
        """Send to ack, in seconds, of the messages acked that were sent in [t0, t1)."""
        return [o.acked_at - o.sent_at for o in self.sent
                if t0 <= o.sent_at < t1 and o.acked_at is not None and _ok(o)]

    def acked_between(self, t0: float, t1: float) -> int:
        return sum(1 for o in self.sent
                   if _ok(o) and o.acked_at is not None and t0 <= o.acked_at < t1)


def _ok(o: Outgoing) -> bool:
    return o.done.done() and not o.done.cancelled() and bool(o.done.result().get("ok"))


# -- shared checks -------------------------------------------------------------------------------


def verdict(rooms: list[FollowingRoom], senders: Senders, start: list[int]) -> dict[str, Any]:
    """Completeness as the other scenarios check it, and more: each room's acked seqs run
    from its first seq of the run to its last without a gap or a repeat (every stored
    message was acked once, none twice), and every member received every one of them once."""
    out: dict[str, Any] = {"messages": len(senders.sent), "acked": 0, "acks_failed": 0,
                           "seq_gaps_or_repeats": 0, "duplicates": 0, "missing": 0,
                           "unrecovered": 0, "members_behind": 0, "members_failed": 0,
                           "resent": 0, "follows": 0}
    failed = [o for o in senders.sent if not _ok(o)]
    out["acks_failed"] = len(failed)
    reasons: dict[str, int] = {}
    for o in failed:
        why = "none" if not o.done.done() or o.done.cancelled() else \
            str(o.done.result().get("error"))
        reasons[why] = reasons.get(why, 0) + 1
    out["ack_failures"] = reasons
    expected = delivered = 0
    for room, first in zip(rooms, start, strict=True):
        seqs = sorted(o.done.result()["seq"] for o in senders.acked(room))
        out["acked"] += len(seqs)
        if seqs != list(range(first + 1, first + 1 + len(seqs))):
            out["seq_gaps_or_repeats"] += 1
        top = seqs[-1] if seqs else first
        for m in room.followers:
            out["duplicates"] += m.duplicates
            out["missing"] += m.missing
            out["unrecovered"] += m.unrecovered
            out["resent"] += m.resent
            out["follows"] += m.follows
            out["members_behind"] += (m.last_seq or 0) != top
            out["members_failed"] += m.error is not None
        expected += len(seqs) * len(room.followers)
        delivered += room.delivered
    out.update(deliveries=delivered, expected=expected)
    out["complete"] = (expected == delivered and not failed and not any(
        out[k] for k in ("seq_gaps_or_repeats", "duplicates", "missing", "unrecovered",
                         "members_behind", "members_failed")))
    errors = [m.error for r in rooms for m in r.followers if m.error]
    if errors:
        out["member_errors"] = errors[:5]
    return out


async def settle_deliveries(rooms: list[FollowingRoom], senders: Senders,
                            timeout: float) -> None:
    """Until every member of every room got every acked message (bounded)."""
    deadline = time.monotonic() + timeout
    for room in rooms:
        need = len(senders.acked(room)) * len(room.followers)
        try:
            await room.wait_delivered(need, max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            continue


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def spread(seconds: list[float], prefix: str) -> dict[str, Any]:
    """p50, p99 and max of per-member durations, in ms."""
    return {f"{prefix}_p50_ms": _ms(_pct(seconds, 50)), f"{prefix}_p99_ms": _ms(_pct(seconds, 99)),
            f"{prefix}_max_ms": _ms(max(seconds)) if seconds else None}


def gap_figures(gaps: list[float], prefix: str) -> dict[str, Any]:
    """The longest gap at any member and the p50/p99 of each member's longest, in ms."""
    return spread(gaps, prefix)


# -- the move ------------------------------------------------------------------------------------


async def fill(server: ShardchatServer, handle: Any, count: int, timeout: float = 120.0) -> int:
    """Give a room ``count`` stored messages: one member sends them, ``FILL_WINDOW`` in
    flight, before anyone else joins (so the history costs no fan-out). Returns the last
    seq."""
    ep = server.endpoint(handle, 0)
    client = await connect(ep.host, ep.port, ep.path, ep.namespace, {"name": "filler"})
    last = 0
    try:
        deadline = time.monotonic() + timeout
        window: list[asyncio.Future] = []
        for i in range(count):
            window.append(client.emit("message", {"text": f"history {i}"}, ack=True))
            if len(window) >= FILL_WINDOW or i == count - 1:
                done = await asyncio.wait_for(asyncio.gather(*window),
                                              max(0.1, deadline - time.monotonic()))
                for res in done:
                    if not (isinstance(res, list) and res and res[0].get("ok")):
                        raise ServerError(f"filling the room's history failed: {res!r}")
                    last = max(last, res[0]["seq"])
                window = []
    finally:
        client.close()
    return last


async def _send_open_loop(rooms: list[FollowingRoom], senders: Senders, rate: float) -> None:
    """``rate`` messages per second in all, the rooms in turn and in each room its members
    in turn, evenly spaced, until told to stop (or ``SEND_CAP_S`` has passed)."""
    start = time.monotonic()
    for i in range(int(rate * SEND_CAP_S)):
        if senders.stop:
            return
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the offered load, not synchronisation
        room = rooms[i % len(rooms)]
        k = i // len(rooms)
        senders.add(room, room.followers[k % len(room.followers)].send(f"steady {k}", f"s{k}"))


async def run_move(server: ShardchatServer, sc: Any, log: Log) -> dict[str, Any]:
    """One room with ``sc.messages`` stored and ``sc.room_size`` members, ``sc.rate``
    messages a second, moved from instance 1 to instance 2 (module docstring)."""
    pids = server.pids
    [handle] = server.create_rooms(1)
    address = urls.parse_room_namespace(handle[2])
    assert address is not None
    source, target = address.instance, 2
    t_fill = time.monotonic()
    first = await fill(server, handle, sc.messages)
    row: dict[str, Any] = {"history": first, "fill_s": round(time.monotonic() - t_fill, 2),
                           "rate_msgs_per_s": sc.rate, "from": source, "to": target}
    room = FollowingRoom()
    t_join = time.monotonic()
    try:
        await follow.join_room(room, [server.endpoint(handle, j) for j in range(sc.room_size)],
                               server.resolve, "mv")
        row["connect_s"] = round(time.monotonic() - t_join, 2)
        row["idle_before_measure"] = await procstat.wait_idle(pids, timeout=30)
        senders = Senders()
        sending = asyncio.get_running_loop().create_task(
            _send_open_loop([room], senders, sc.rate))
        await asyncio.sleep(WARM_S)  # pacing: the steady load runs before the move
        room.watch(True)
        await asyncio.sleep(BASELINE_S)
        row.update(gap_figures([m.max_gap for m in room.followers], "baseline_gap"))
        room.watch(True)
        log(f"    moving room {address.room_id} ({first:,} messages, {sc.room_size} members, "
            f"{sc.rate:g} msg/s) from instance {source} to {target}")
        cpu0 = [procstat.cpu_seconds(pid) for pid in pids]  # instance 1, 2 in order
        drops0 = procstat.listen_overflows()
        t0 = time.monotonic()
        status, answer = await server.move(address.room_id, source, target)
        t_answer = time.monotonic()
        if status != 200 or not isinstance(answer, dict):
            raise ServerError(f"the move was refused: {status} {answer}")
        try:
            await room.wait_rejoined(sc.room_size, REJOIN_TIMEOUT)
        except TimeoutError:
            row["rejoin_timeout"] = True
        t_back = room.last_rejoin_at or time.monotonic()
        cpu = [procstat.cpu_seconds(pid) - c for pid, c in zip(pids, cpu0, strict=True)]
        row["move_server_cpu_s"] = round(sum(cpu), 2)  # from the call to the last rejoin
        row["move_cpu_s_source"], row["move_cpu_s_target"] = round(cpu[0], 2), round(cpu[1], 2)
        drops = procstat.listen_overflows()
        row["listen_overflows"] = None if drops is None or drops0 is None else drops - drops0
        await asyncio.sleep(AFTER_S)  # pacing: deliveries on the new node, still watched
        room.watch(False)
        gaps = [m.max_gap for m in room.followers]
        senders.stop = True
        await asyncio.wait_for(sending, 5.0)
        await senders.settle(SETTLE_TIMEOUT)
        await settle_deliveries([room], senders, SETTLE_TIMEOUT)
        moved_msgs = [o for o in senders.sent if t0 <= o.sent_at <= t_back]
        waits = [o.acked_at - o.sent_at for o in moved_msgs if o.acked_at is not None]
        row.update(
            took_ms=answer.get("took_ms"), frozen_ms=answer.get("frozen_ms"),
            copied=answer.get("messages"), last_seq_at_move=answer.get("last_seq"),
            activated=answer.get("activated"),
            answer_ms=_ms(t_answer - t0), rejoin_wall_ms=_ms(t_back - t0),
            rejoined=room.rejoined,
            on_target=sum(1 for m in room.followers
                          if m.instance_history and m.instance_history[-1] == target),
            **gap_figures(gaps, "gap"),
            **spread([m.moved_at - t0 for m in room.followers if m.moved_at], "told"),
            **spread([m.rejoined_at - m.moved_at for m in room.followers
                      if m.rejoined_at and m.moved_at], "reconnect"),
            longest_ack_wait_ms=_ms(max(waits)) if waits else None,
            sent_during_move=len(moved_msgs))
        row.update(verdict([room], senders, [first]))
    finally:
        follow.close_rooms([room])
    return row


# -- the drain -----------------------------------------------------------------------------------


async def drain(server: ShardchatServer, instance: int, timeout: float = 300.0
                ) -> dict[str, Any]:
    """``cluster/moves.py``'s drain, what ``shardchat drain --instance N`` runs (its default
    concurrency, 4 moves at once), called in this process: a subprocess would add its
    interpreter's start to the drain's window."""
    t0 = time.monotonic()
    report = await asyncio.wait_for(
        moves.drain(config.load(server.config_path), instance, deadline=timeout), timeout + 30)
    seconds = time.monotonic() - t0
    out = report.to_json()
    return {"how": "shardchat drain (cluster/moves.py)", "seconds": seconds,
            "moves": out.get("moves", []), "moved": out.get("moved"),
            "remaining": out.get("remaining")}


async def run_drain(server: ShardchatServer, sc: Any, log: Log) -> dict[str, Any]:
    """``sc.rooms`` rooms of ``sc.room_size`` over 3 instances, ``sc.rate`` messages a
    second between them, evenly spread; the rate acked over ``sc.duration`` seconds before,
    then while instance 1 is drained (until the last member of a moved room is back), then
    as long again after, and how long the acks took in each."""
    pids = server.pids
    handles = server.create_rooms(sc.rooms)
    rooms = [FollowingRoom() for _ in handles]
    instance = 1
    row: dict[str, Any] = {"drained_instance": instance, "rate_msgs_per_s": sc.rate}
    try:
        t_join = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(
            follow.join_room(room, [server.endpoint(h, j) for j in range(sc.room_size)],
                             server.resolve, f"d{r}", concurrency=max(1, 100 // len(rooms)))
            for r, (room, h) in enumerate(zip(rooms, handles, strict=True)))), 120)
        row["connect_s"] = round(time.monotonic() - t_join, 2)
        row["idle_before_measure"] = await procstat.wait_idle(pids, timeout=30)
        start = [m.last_seq or 0 for m in (room.followers[0] for room in rooms)]
        senders = Senders()
        sending = asyncio.get_running_loop().create_task(
            _send_open_loop(rooms, senders, sc.rate))
        moving_rooms = [room for room, h in zip(rooms, handles, strict=True)
                        if (a := urls.parse_room_namespace(h[2])) and a.instance == instance]
        row["rooms_moved_expected"] = len(moving_rooms)
        await asyncio.sleep(WARM_S)  # pacing: the rooms send steadily before the measure
        windows: dict[str, tuple[float, ...]] = {}

        def commits() -> int:
            """Store commits of every node so far: moves commit too, between messages."""
            return sum(m["store"]["commits"] for m in server.metrics())

        def reading() -> tuple[float, ...]:
            """Now: time, deliveries, server CPU, own CPU, commits, server run-queue wait."""
            return (time.monotonic(), sum(r.delivered for r in rooms), procstat.total_cpu(pids),
                    time.process_time(), commits(), procstat.total_runqueue_wait(pids))

        def window_start() -> tuple[float, ...]:
            return reading()

        def window_end(name: str, began: tuple[float, ...]) -> None:
            now = reading()
            windows[name] = (began[0], now[0],
                             *(a - b for a, b in zip(now[1:], began[1:], strict=True)))

        began = window_start()
        await asyncio.sleep(sc.duration)  # pacing: the measured window before the drain
        window_end("before", began)
        log(f"    draining instance {instance} ({len(moving_rooms)} of {len(rooms)} rooms)")
        for room in moving_rooms:
            room.watch(True)
        began = window_start()
        report = await drain(server, instance)
        t_drained = time.monotonic()
        for room in moving_rooms:
            try:
                await room.wait_rejoined(sc.room_size, max(0.1, REJOIN_TIMEOUT
                                                           - (time.monotonic() - began[0])))
            except TimeoutError:
                row["rejoin_timeout"] = True
        window_end("during", began)
        for room in moving_rooms:
            room.watch(False)
        began = window_start()
        await asyncio.sleep(sc.duration)  # pacing: the measured window after the drain
        window_end("after", began)
        senders.stop = True
        await asyncio.wait_for(sending, 5.0)
        await senders.settle(SETTLE_TIMEOUT)
        await settle_deliveries(rooms, senders, SETTLE_TIMEOUT)
        for name, (t0, t1, delivered, cpu, own, commit, waited) in windows.items():
            secs = t1 - t0
            acked = senders.acked_between(t0, t1)
            row[f"{name}_s"] = round(secs, 2)
            row[f"{name}_msgs_per_s"] = round(acked / secs, 1)
            row[f"{name}_sent_per_s"] = round(senders.sent_between(t0, t1) / secs, 1)
            row.update(spread(senders.ack_waits(t0, t1), f"{name}_ack"))
            row[f"{name}_commits_per_s"] = round(commit / secs, 1)
            row[f"{name}_msgs_per_commit"] = round(acked / commit, 2) if commit else None
            row[f"{name}_deliveries_per_s"] = round(delivered / secs)
            row[f"{name}_server_busy"] = round(cpu / secs, 2)
            row[f"{name}_loadgen_busy"] = round(own / secs, 2)
            # the share of the window the nodes were runnable but another process had the
            # core: on a shared machine, what makes one window slower than another
            row[f"{name}_server_waited"] = round(waited / secs, 2)
        before = row["before_msgs_per_s"]
        row["during_vs_before"] = round(row["during_msgs_per_s"] / before, 2) if before else None
        row["after_vs_before"] = round(row["after_msgs_per_s"] / before, 2) if before else None
        moves = report["moves"]
        took = [m["took_ms"] for m in moves if m.get("ok") and m.get("took_ms") is not None]
        frozen = [m["frozen_ms"] for m in moves if m.get("ok") and m.get("frozen_ms") is not None]
        row.update(drain_how=report["how"], drain_s=round(report["seconds"], 2),
                   drain_wall_s=round(t_drained - windows["during"][0], 2),
                   rooms_moved=report["moved"],
                   rooms_not_moved=sum(1 for m in moves if not m.get("ok")),
                   rooms_remaining=report.get("remaining"),
                   move_took_ms_median=round(statistics.median(took), 1) if took else None,
                   move_took_ms_max=max(took) if took else None,
                   move_frozen_ms_median=round(statistics.median(frozen), 1) if frozen else None,
                   move_frozen_ms_max=max(frozen) if frozen else None,
                   **gap_figures([m.max_gap for r in moving_rooms for m in r.followers],
                                 "moved_member_gap"))
        row.update(verdict(rooms, senders, start))
    finally:
        follow.close_rooms(rooms)
    return row
