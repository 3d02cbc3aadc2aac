"""Soak: one shardchat node, 2,000 connections with churn for minutes, then an audit.

    python -m bench --scenario soak --soak-seconds 300

What the clients do, all at once and all bounded (see ``SoakPlan``):

* **join / leave / reconnect**: every second ``churn_per_s`` connections leave (half of
  them politely with a Socket.IO DISCONNECT, half by dropping TCP) and as many come back
  with the member token of their first welcome, so a reconnect is the same member;
* **messages with acks and client_ids**: ``send_per_s`` messages a second, each with a
  unique ``client_id``; now and then a sender repeats an earlier message (same name, room,
  client_id) after reconnecting, as a client retrying an unacknowledged send would;
* **slow readers**: websocket clients that stop reading for 5-30 s, then read again, and
  long-polling clients that stop polling for a while;
* **hostile input**: malformed frames (bad JSON, 5,000-deep nesting, lone surrogates,
  binary junk) and packets over ``node.max_packet_bytes``.

What is recorded every ``sample_s`` seconds: the node's RSS (VmRSS) and its open file
descriptors (``/proc/<pid>/fd``), with the number of connected clients and acked messages.

The audit at the end: all clients leave and the fd count must return to the baseline taken
before any client connected; the node is stopped (SIGTERM) and its SQLite store opened
read-only: every acked message must be there exactly once, with the seq its ack gave and
its text, and every room's seqs must run 1, 2, 3 ... without a gap. RSS must stay within
``rss_tolerance`` of the RSS at the warm point (``warm_s`` into the run) for the rest of
it. Results go to bench/results/soak.{json,md,png}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sqlite3
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import aiohttp

from bench import procstat
from bench.servers import ShardchatServer, affinity
from bench.wsclient import SioClient
from shardchat.config import NodeSettings

MAX_PACKET_BYTES = NodeSettings().max_packet_bytes


@dataclass(frozen=True)
class SoakPlan:
    seconds: float = 300.0
    clients: int = 2000  # websocket and long-polling together
    polling_clients: int = 20
    big_room: int = 400  # members of the one busy room; the rest in rooms of ``room_size``
    room_size: int = 20
    send_per_s: float = 40.0  # messages a second in all, half of them to the busy room
    churn_per_s: float = 10.0  # leaves (and as many rejoins) a second
    retry_share: float = 0.05  # share of sends that repeat an earlier client_id
    slow_per_s: float = 1.0  # websocket readers that pause, a second
    slow_pause_s: tuple[float, float] = (5.0, 30.0)
    polling_pause_s: tuple[float, float] = (10.0, 30.0)
    hostile_per_s: float = 2.0  # malformed or oversized frames a second
    warm_s: float = 60.0
    sample_s: float = 5.0
    rss_tolerance: float = 0.10
    fd_slack: int = 2  # fds above the baseline still counted as "returned"
    seed: int = 7

    @property
    def rooms(self) -> int:
        return 1 + -(-(self.clients - self.big_room) // self.room_size)


def quick_plan(seconds: float) -> SoakPlan:
    """The ~1 minute smoke version: 500 clients, a 20 s warm-up."""
    return SoakPlan(seconds=min(seconds, 60.0), clients=500, polling_clients=5, big_room=100,
                    warm_s=20.0, sample_s=2.0)


@dataclass
class Slot:
    """One member: a fixed name in a fixed room, connected or not at any moment. Its
    member token (from its first welcome) goes with every reconnect, so a retry after a
    reconnect is recognised as the same member's (SPEC 4, member identity)."""

    index: int
    room: int
    name: str
    client: SioClient | None = None
    busy: bool = False  # connecting, pausing or leaving: leave it alone
    sent: int = 0
    token: str | None = None

    def auth(self) -> dict[str, Any]:
        return {"name": self.name, **({"token": self.token} if self.token else {})}


class SoakClient(SioClient):
    """The load generator's client, also reading its ``welcome`` for the member token."""

    slot: Slot | None = None

    def _sio_packet(self, p: bytes) -> None:
        if self.slot is not None and self.slot.token is None and p[1:2] == b"2":
            head = b"42" + self._ns_part() + b'["welcome",'
            if p.startswith(head):
                with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
                    token = json.loads(p[len(head) - 11:])[1]["you"].get("token")
                    self.slot.token = token if isinstance(token, str) else None
        super()._sio_packet(p)


@dataclass
class Acked:
    room: int
    name: str
    client_id: str
    text: str
    seq: int


@dataclass
class Tally:
    sent: int = 0
    acked: int = 0
    refused: int = 0  # acked {"ok": false}
    unanswered: int = 0  # connection lost or no ack in time: may or may not be stored
    retries: int = 0
    retries_same_seq: int = 0
    retries_new_seq: int = 0
    joins: int = 0
    join_failures: int = 0
    leaves: int = 0
    drops_by_node: int = 0
    slow_pauses: int = 0
    polling_pauses: int = 0
    hostile: int = 0
    oversized: int = 0
    deliveries: int = 0


class Soak:
    def __init__(self, plan: SoakPlan, cores: set[int] | None = None, log: Any = print
                 ) -> None:
        self.plan = plan
        self.log = log
        self.rng = random.Random(plan.seed)
        self.server = ShardchatServer(cores, 1, generous_limits())
        self.rooms: list[tuple[int, str, str]] = []  # (port, socketio path, namespace)
        self.slots: list[Slot] = []
        self.acked: dict[tuple[int, str, str], Acked] = {}
        self.tally = Tally()
        self.samples: list[dict[str, Any]] = []
        self.pending: set[asyncio.Future] = set()
        self.stop = asyncio.Event()
        self.t0 = 0.0
        self.gc_collections: list[int] | None = None

    # -- set-up ---------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.server.pids[0]

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def start(self) -> None:
        self.server.start()
        self.rooms = self.server.create_rooms(self.plan.rooms)
        ws = self.plan.clients - self.plan.polling_clients
        for i in range(ws):
            room = 0 if i < self.plan.big_room - self.plan.polling_clients else \
                1 + (i - self.plan.big_room + self.plan.polling_clients) // self.plan.room_size
            self.slots.append(Slot(i, min(room, len(self.rooms) - 1), f"s{i}"))

    # -- one websocket member -------------------------------------------------------------

    def _count(self, client: SioClient, payload: bytes) -> None:
        self.tally.deliveries += 1

    async def join(self, slot: Slot) -> None:
        port, path, ns = self.rooms[slot.room]
        slot.busy = True
        try:
            slot.client = await self._connect(slot, port, path, ns)
            self.tally.joins += 1
        except (OSError, TimeoutError, RuntimeError):
            self.tally.join_failures += 1
            slot.client = None
        finally:
            slot.busy = False

    async def _connect(self, slot: Slot, port: int, path: str, ns: str) -> SioClient:
        """``wsclient.connect`` with a ``SoakClient`` that keeps the slot's token."""
        loop = asyncio.get_running_loop()

        def make() -> SoakClient:
            client = SoakClient("127.0.0.1", port, path, ns, slot.auth(),
                                on_message=self._count)
            client.slot = slot
            return client

        _, client = await asyncio.wait_for(loop.create_connection(make, "127.0.0.1", port), 15)
        try:
            await asyncio.wait_for(asyncio.shield(client.connected), 15)
        except BaseException:
            client.close()
            raise
        return client

    def alive(self, slot: Slot) -> bool:
        c = slot.client
        if c is None:
            return False
        if c.closed.done():
            slot.client = None
            self.tally.drops_by_node += 1
            return False
        return True

    def leave(self, slot: Slot) -> None:
        c = slot.client
        slot.client = None
        if c is None:
            return
        self.tally.leaves += 1
        if self.rng.random() < 0.5:
            c.send_text(c._ns_prefix.replace(b"4", b"41", 1))  # Socket.IO DISCONNECT
        c.close()

    def send(self, slot: Slot) -> None:
        """A message with an ack and a client_id; sometimes a repeat of an acked one."""
        client = slot.client
        retry = None
        if self.acked and self.rng.random() < self.plan.retry_share:
            retry = self._earlier_of(slot)
        if retry is not None:
            client_id, text = retry.client_id, retry.text
            self.tally.retries += 1
        else:
            slot.sent += 1
            client_id, text = f"{slot.name}-{slot.sent}", f"soak {slot.name} #{slot.sent}"
        fut = client.emit("message", {"text": text, "client_id": client_id}, ack=True)
        self.tally.sent += 1
        self.pending.add(fut)
        fut.add_done_callback(lambda f: self._acked(f, slot, client_id, text, retry))

    def _earlier_of(self, slot: Slot) -> Acked | None:
        key = (slot.room, slot.name, f"{slot.name}-{self.rng.randint(1, max(1, slot.sent))}")
        return self.acked.get(key)

    def _acked(self, fut: asyncio.Future, slot: Slot, client_id: str, text: str,
               retry: Acked | None) -> None:
        self.pending.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            self.tally.unanswered += 1
            return
        res = fut.result()
        ack = res[0] if isinstance(res, list) and res and isinstance(res[0], dict) else {}
        if ack.get("ok") is not True:
            self.tally.refused += 1
            return
        if retry is not None:
            if ack["seq"] == retry.seq:
                self.tally.retries_same_seq += 1
            else:
                self.tally.retries_new_seq += 1  # stored twice: the audit will say so too
            return
        self.tally.acked += 1
        key = (slot.room, slot.name, client_id)
        self.acked.setdefault(key, Acked(slot.room, slot.name, client_id, text, ack["seq"]))

    async def pause_reading(self, slot: Slot, seconds: float) -> None:
        """A slow reader: stop reading the socket (the node's writes back up), then go on."""
        client = slot.client
        if client is None or client.transport is None:
            return
        slot.busy = True
        self.tally.slow_pauses += 1
        try:
            client.transport.pause_reading()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(client.closed), seconds)
            if not client.closed.done():
                client.transport.resume_reading()
        finally:
            slot.busy = False

    def hostile(self, slot: Slot) -> None:
        """A malformed or oversized frame from a member (the node may drop it)."""
        client = slot.client
        ns = client._ns_prefix[1:]
        self.tally.hostile += 1
        choice = self.rng.randrange(7)
        if choice == 0:
            self.tally.oversized += 1
            client.send_text(b"42" + ns + b'["message",{"text":"' + b"x" *
                             (MAX_PACKET_BYTES + 1000) + b'"}]')
        elif choice == 1:
            client.send_text(b"42" + ns + b'["message",' + b"[" * 5000 + b"]" * 5000 + b"]")
        elif choice == 2:
            client.send_text(b"42" + ns + b'["message",{"text":')
        elif choice == 3:
            client.send_text(b"42" + ns + b'["message",{"text":"\\ud800 lone"}]')
        elif choice == 4:
            client._send_raw(os.urandom(self.rng.randint(1, 64)), 0x2)  # binary junk
        elif choice == 5:
            client.send_text(b"4" + bytes([self.rng.randrange(48, 58)]) + ns + b"{]")
        else:
            client.send_text(b"42" + ns + b'["history",{"before":' + b"9" * 40 + b"}]")

    # -- long-polling members that stop polling --------------------------------------------

    async def polling_member(self, index: int) -> None:
        """Joins the busy room over long-polling; polls, stops for a while, polls again."""
        port, path, ns = self.rooms[0]
        base = f"http://127.0.0.1:{port}{path.rstrip('/')}/?EIO=4&transport=polling"
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for _ in range(10_000):
                if self.stop.is_set():
                    return
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    await self._poll_session(http, base, ns, index)

    async def _poll_session(self, http: aiohttp.ClientSession, base: str, ns: str,
                            index: int) -> None:
        async with http.get(base) as resp:
            sid = json.loads((await resp.text())[1:])["sid"]
        url = f"{base}&sid={sid}"
        auth = json.dumps({"name": f"p{index}"})
        async with http.post(url, data=f"40{ns},{auth}".encode()) as resp:
            if resp.status != 200:
                return
        self.tally.joins += 1
        loop = asyncio.get_running_loop()
        next_pause = loop.time() + self.rng.uniform(5, 20)
        try:
            for _ in range(100_000):
                if self.stop.is_set():
                    return
                if loop.time() >= next_pause:
                    self.tally.polling_pauses += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(),
                                               self.rng.uniform(*self.plan.polling_pause_s))
                    next_pause = loop.time() + self.rng.uniform(5, 20)
                async with http.get(url) as resp:
                    if resp.status != 200:
                        self.tally.drops_by_node += 1
                        return
                    body = await resp.read()
                for packet in body.split(b"\x1e"):
                    if packet == b"2":
                        async with http.post(url, data=b"3"):
                            pass
                    elif packet.startswith(b"42"):
                        self.tally.deliveries += packet.startswith(b"42" + ns.encode() +
                                                                   b',["message"')
        finally:
            with contextlib.suppress(Exception):
                async with http.post(url, data=f"41{ns},".encode() + b"\x1e1"):
                    pass

    # -- the run --------------------------------------------------------------------------

    async def connect_all(self) -> None:
        sem = asyncio.Semaphore(100)

        async def one(slot: Slot) -> None:
            async with sem:
                await self.join(slot)

        await asyncio.wait_for(asyncio.gather(*(one(s) for s in self.slots)), 180)

    def sample(self) -> None:
        connected = sum(1 for s in self.slots if s.client is not None)
        self.samples.append({"t": round(time.monotonic() - self.t0, 1),
                             "rss": procstat.rss_bytes(self.pid), "fds": self.fds(),
                             "connected_ws": connected, "acked": self.tally.acked,
                             "sent": self.tally.sent, "deliveries": self.tally.deliveries,
                             "gc_collections": self.gc_collections})

    async def watch_gc(self) -> None:
        """The node's collector counts (``/internal/metrics``) every sample period: RSS
        that grows between full collections is cyclic garbage not yet collected, RSS that
        grows across them is kept."""
        for _ in range(100_000):
            if self.stop.is_set():
                return
            with contextlib.suppress(Exception):
                metrics = await asyncio.to_thread(self.server.metrics)
                if metrics:
                    self.gc_collections = metrics[0]["gc"]["collections"]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.plan.sample_s)

    async def drive(self) -> None:
        """The traffic of the whole run: a tick every 50 ms, each doing its share."""
        plan, rng = self.plan, self.rng
        tick = 0.05
        tasks: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        end = loop.time() + plan.seconds
        next_sample = loop.time()
        credit = {"send": 0.0, "churn": 0.0, "slow": 0.0, "hostile": 0.0}
        rates = {"send": plan.send_per_s, "churn": plan.churn_per_s, "slow": plan.slow_per_s,
                 "hostile": plan.hostile_per_s}
        for _ in range(int(plan.seconds / tick) + 10):
            now = loop.time()
            if now >= end:
                break
            if now >= next_sample:
                self.sample()
                next_sample += plan.sample_s
            for key, rate in rates.items():
                credit[key] += rate * tick
            while credit["send"] >= 1:
                credit["send"] -= 1
                slot = self._pick(busy_room=rng.random() < 0.5)
                if slot is not None:
                    self.send(slot)
            while credit["churn"] >= 1:
                credit["churn"] -= 1
                slot = self._pick()
                if slot is not None:
                    self.leave(slot)
                gone = [s for s in rng.sample(self.slots, min(50, len(self.slots)))
                        if not s.busy and not self.alive(s)]
                if gone:
                    self._spawn(tasks, self.join(gone[0]))
            while credit["slow"] >= 1:
                credit["slow"] -= 1
                slot = self._pick(busy_room=True)
                if slot is not None:
                    self._spawn(tasks, self.pause_reading(slot, rng.uniform(*plan.slow_pause_s)))
            while credit["hostile"] >= 1:
                credit["hostile"] -= 1
                slot = self._pick()
                if slot is not None:
                    self.hostile(slot)
            await asyncio.sleep(tick)  # pacing the offered load, not synchronisation
        self.stop.set()
        self.sample()
        if tasks:
            await asyncio.wait(tasks, timeout=40)

    def _spawn(self, tasks: set[asyncio.Task], coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _pick(self, busy_room: bool | None = None) -> Slot | None:
        """A random connected, idle member (of the busy room, of the others, or anyone)."""
        for _ in range(20):
            slot = self.rng.choice(self.slots)
            if busy_room is not None and (slot.room == 0) != busy_room:
                continue
            if not slot.busy and self.alive(slot):
                return slot
        return None

    async def settle(self) -> None:
        """Wait (bounded) for outstanding acks, then every client leaves."""
        if self.pending:
            await asyncio.wait(set(self.pending), timeout=15)
        for slot in self.slots:
            self.leave(slot)

    async def wait_fds(self, baseline: int, timeout: float = 60.0) -> tuple[int, float]:
        """The node's fd count once it is back within ``fd_slack`` of ``baseline``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        count = self.fds()
        while loop.time() < deadline:
            count = self.fds()
            if count <= baseline + self.plan.fd_slack:
                break
            await asyncio.sleep(0.5)  # polling /proc: there is no event to wait on
        return count, round(timeout - (deadline - loop.time()), 1)

    # -- the audit ------------------------------------------------------------------------

    def audit_store(self) -> dict[str, Any]:
        """Stop the node and read its store: every acked message once, seqs gap-free."""
        proc = self.server.procs[0]
        proc.stop(grace=30)
        db = self.server.tmp / "data" / "i1" / "store.sqlite3"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            ids = {room[2].rsplit("/", 1)[-1]: r for r, room in enumerate(self.rooms)}
            rows = conn.execute("SELECT room_id, seq, sender_name, text, client_id "
                                "FROM messages").fetchall()
        finally:
            conn.close()
        by_key: dict[tuple[int, str, str], list[tuple[int, str]]] = {}
        seqs: dict[int, list[int]] = {}
        for room_id, seq, name, text, client_id in rows:
            r = ids.get(room_id, -1)
            seqs.setdefault(r, []).append(seq)
            if client_id is not None:
                by_key.setdefault((r, name, client_id), []).append((seq, text))
        lost = [a for k, a in self.acked.items() if k not in by_key]
        twice = [k for k, v in by_key.items() if len(v) > 1]
        wrong = [a for k, a in self.acked.items()
                 if k in by_key and by_key[k][0] != (a.seq, a.text)]
        gaps = [r for r, s in seqs.items() if sorted(s) != list(range(1, len(s) + 1))]
        return {"stored_messages": len(rows), "acked_messages": len(self.acked),
                "acked_verified": len(self.acked) - len(lost) - len(wrong),
                "acked_lost": len(lost), "stored_twice": len(twice),
                "acked_with_other_seq_or_text": len(wrong), "rooms_with_seq_gaps": len(gaps),
                "examples_lost": [asdict(a) for a in lost[:5]]}


def generous_limits() -> dict[str, Any]:
    """Every rate limit this node knows, out of reach (2,000 clients share one address),
    and a short drain grace: the audit stops the node, and no load balancer is watching."""
    limits: dict[str, Any] = {f.name: 1_000_000_000 for f in fields(NodeSettings)
                              if f.name.startswith("rate_limit_")
                              and f.name != "rate_limit_window"}
    limits["drain_grace_seconds"] = 0.5
    return limits


def rss_verdict(samples: list[dict[str, Any]], plan: SoakPlan) -> dict[str, Any]:
    warm = [s for s in samples if s["t"] >= plan.warm_s]
    if not warm:
        return {"rss_ok": None}
    ref = warm[0]["rss"]
    top, low = max(s["rss"] for s in warm), min(s["rss"] for s in warm)
    return {"rss_warm": ref, "rss_warm_max": top, "rss_warm_min": low,
            "rss_end": samples[-1]["rss"], "rss_growth_after_warm": round(top / ref - 1, 4),
            "rss_ok": top <= ref * (1 + plan.rss_tolerance)
            and low >= ref * (1 - plan.rss_tolerance)}


async def run(plan: SoakPlan, log: Any = print) -> dict[str, Any]:
    """The whole soak; returns its result (figures and verdicts)."""
    server_cores, loadgen_cores = affinity()
    if loadgen_cores:
        os.sched_setaffinity(0, loadgen_cores)
    soak = Soak(plan, server_cores, log)
    row: dict[str, Any] = {"plan": {**asdict(plan), "rooms": plan.rooms}}
    try:
        soak.start()
        await procstat.wait_idle(soak.server.pids)
        base = {"rss": procstat.rss_bytes(soak.pid), "fds": soak.fds()}
        row["baseline"] = base
        log(f"soak: node pid {soak.pid}, baseline RSS {base['rss'] / 2**20:.1f} MiB, "
            f"{base['fds']} fds; connecting {plan.clients:,} clients to {plan.rooms} rooms")
        t0 = time.monotonic()
        await soak.connect_all()
        row["connect_s"] = round(time.monotonic() - t0, 1)
        soak.t0 = time.monotonic()
        pollers = [asyncio.ensure_future(soak.polling_member(i))
                   for i in range(plan.polling_clients)]
        pollers.append(asyncio.ensure_future(soak.watch_gc()))
        log(f"soak: connected in {row['connect_s']} s; {plan.seconds:g} s of churn")
        await soak.drive()
        await soak.settle()
        await asyncio.wait(pollers, timeout=70)
        for task in pollers:
            task.cancel()
        await procstat.wait_idle(soak.server.pids, timeout=30)
        fds_after, fd_wait = await soak.wait_fds(base["fds"])
        row["after_leave"] = {"fds": fds_after, "fd_wait_s": fd_wait,
                              "rss": procstat.rss_bytes(soak.pid)}
        soak.server.check()
        row["store"] = soak.audit_store()
    finally:
        soak.server.stop()
    row["tally"] = asdict(soak.tally)
    row["samples"] = soak.samples
    row.update(rss_verdict(soak.samples, plan))
    row["fds_peak"] = max((s["fds"] for s in soak.samples), default=None)
    row["fd_ok"] = row["after_leave"]["fds"] <= base["fds"] + plan.fd_slack
    st = row["store"]
    row["store_ok"] = (st["acked_lost"] == 0 and st["stored_twice"] == 0
                       and st["acked_with_other_seq_or_text"] == 0
                       and st["rooms_with_seq_gaps"] == 0 and soak.tally.retries_new_seq == 0)
    row["ok"] = bool(row["rss_ok"] is not False and row["fd_ok"] and row["store_ok"])
    return row


# ---------------------------------------------------------------------------------------
# report


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def markdown(row: dict[str, Any], meta: dict[str, Any]) -> str:
    plan, tally, st = row["plan"], row["tally"], row["store"]
    yes = {True: "yes", False: "NO", None: "-"}
    lines = [
        "# Soak results", "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Started: {meta['started']}, took {meta['duration_s']:.0f} s", "",
        "| figure | value |", "|---|---|",
        f"| clients | {plan['clients']:,} ({plan['polling_clients']} long-polling) in "
        f"{plan['rooms']} rooms |",
        f"| churn duration | {plan['seconds']:g} s (warm after {plan['warm_s']:g} s) |",
        f"| RSS: baseline / warm / warm max / end | {_mib(row['baseline']['rss'])} / "
        f"{_mib(row.get('rss_warm'))} / {_mib(row.get('rss_warm_max'))} / "
        f"{_mib(row.get('rss_end'))} |",
        f"| RSS growth after warm (limit {plan['rss_tolerance']:.0%}) | "
        f"{row.get('rss_growth_after_warm', 0):.1%} |",
        f"| open fds: baseline / peak / after everyone left | {row['baseline']['fds']} / "
        f"{row['fds_peak']} / {row['after_leave']['fds']} "
        f"(after {row['after_leave']['fd_wait_s']} s) |",
        f"| messages sent / acked / refused / unanswered | {tally['sent']:,} / "
        f"{tally['acked']:,} / {tally['refused']:,} / {tally['unanswered']:,} |",
        f"| retries (same client_id) / got the first seq | {tally['retries']:,} / "
        f"{tally['retries_same_seq']:,} |",
        f"| acked messages verified in the store | {st['acked_verified']:,} of "
        f"{st['acked_messages']:,} (lost {st['acked_lost']}, stored twice "
        f"{st['stored_twice']}, rooms with seq gaps {st['rooms_with_seq_gaps']}) |",
        f"| joins / failed joins / leaves / dropped by the node | {tally['joins']:,} / "
        f"{tally['join_failures']:,} / {tally['leaves']:,} / {tally['drops_by_node']:,} |",
        f"| slow-reader pauses (websocket / polling) | {tally['slow_pauses']:,} / "
        f"{tally['polling_pauses']:,} |",
        f"| hostile frames (of them oversized) | {tally['hostile']:,} "
        f"({tally['oversized']:,}) |",
        f"| deliveries counted by clients | {tally['deliveries']:,} |", "",
        "| verdict | |", "|---|---|",
        f"| RSS within {plan['rss_tolerance']:.0%} once warm | {yes[row['rss_ok']]} |",
        f"| fds back to baseline after clients left | {yes[row['fd_ok']]} |",
        f"| every acked message stored exactly once | {yes[row['store_ok']]} |", ""]
    return "\n".join(lines)


def plot(path: Path, row: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = row["samples"]
    t = [x["t"] for x in s]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    a.plot(t, [x["rss"] / 2**20 for x in s], color="#2a7ab9")
    a.axvline(row["plan"]["warm_s"], color="#a0a0a0", linestyle="--", linewidth=1)
    a.set_title("node RSS (MiB)")
    a.set_xlabel("seconds")
    b.plot(t, [x["fds"] for x in s], color="#2a7ab9", label="open fds")
    b.plot(t, [x["connected_ws"] for x in s], color="#a0a0a0", label="connected (websocket)")
    b.axhline(row["baseline"]["fds"], color="#d08020", linestyle=":", linewidth=1,
              label="fd baseline")
    b.set_title("node open file descriptors")
    b.set_xlabel("seconds")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out_dir: Path, meta: dict[str, Any], row: dict[str, Any]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "soak.json", out_dir / "soak.md", out_dir / "soak.png"]
    paths[0].write_text(json.dumps({"meta": meta, "result": row}, indent=2) + "\n")
    paths[1].write_text(markdown(row, meta))
    plot(paths[2], row)
    return paths

