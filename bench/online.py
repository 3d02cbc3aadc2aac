"""Replication side by side: off, Litestream (off the machine), async and sync followers.
Not part of ``python -m bench``; run it on its own:

    python -m bench.online              2 rounds of every mode, 8 s each (~3 minutes)
    python -m bench.online --rounds 3   what bench/results/online.md holds (~4 minutes)
    python -m bench.online --quick      1 round, 4 s each
    python -m bench.online --mode sync --mode async

Each run: a cluster of two nodes (instance 2 follows instance 1), one room on instance 1
with ``--members`` members listening and ``--senders`` of them sending one message after the
other (each waits for its ack) for ``--seconds``. Measured: acked messages, deliveries (each
message received by each member), deliveries per CPU-second of every server process of the
run (both nodes, and Litestream where it runs), ack latency p50/p99.

Then, for async and sync, the loss window and the time to adopt: the senders go on, instance
1 is SIGKILLed at a random moment (its disk counts as lost), ``shardchat adopt --instance 1``
is timed, then a client looks the room up (``GET /api/rooms/<id>``), connects where it
says and sends: the times from the start of the adoption to its welcome and to that first
ack are the RTO of a client that retries at once (sync refuses that message here, since
the adopter's follower is the lost instance in a cluster of two). Every acked
``client_id`` is looked for in the adopter's store. Modes run alternating, so the
machine's noise falls on all of them. Results go to bench/results/online.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import socketio

from shardchat.cluster.nodeproc import NodeProcess
from shardchat.cluster.up import free_port
from shardchat.config import dump_toml
from shardchat.names import storage_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SECRET = "bench-secret-not-for-production"
AUTH = {"Authorization": f"Bearer {SECRET}"}
MODES = ("off", "litestream", "async", "sync")
READY_TIMEOUT = 60.0
ACK_TIMEOUT = 10.0


@dataclass
class Run:
    mode: str
    seconds: float
    acked: int
    deliveries: int
    cpu_seconds: float
    deliveries_per_cpu_second: float
    p50_ms: float
    p99_ms: float
    refused: int  # acks that were not ok
    lost: int | None = None  # acked messages missing on the adopter (async, sync)
    kill_acked: int | None = None  # acked messages of the burst the kill cut
    adopt_seconds: float | None = None  # `shardchat adopt` end to end
    # from the start of `shardchat adopt` until a client that finds the room by lookup is
    # welcomed on the adopter, and until its first message is acked there (None when it is
    # refused: in sync mode with two nodes the adopter's follower is the lost instance)
    back_seconds: float | None = None
    first_ack_seconds: float | None = None


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http(method: str, port: int, path: str, body: Any = None) -> Any:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={**AUTH, "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


class Cluster:
    def __init__(self, workdir: Path, mode: str, n: int) -> None:
        self.workdir = workdir / f"{mode}-{n}"
        self.workdir.mkdir()
        node: dict[str, Any] = {"drain_grace_seconds": 0.5, "rate_limit_messages": 1_000_000,
                                "rate_limit_window": 1.0}
        if mode == "litestream":
            node["replicate_to"] = str(workdir / f"replica-{n}")
        elif mode != "off":
            node["replication"] = mode
        ports = [free_port() for _ in range(4)]
        self.ports = ports
        data = {"cluster": {"name": "bench", "secret": SECRET,
                            "data_dir": str(self.workdir / "data")},
                "instances": [{"number": i + 1, "host": "127.0.0.1", "port": ports[2 * i],
                               "internal_port": ports[2 * i + 1]} for i in range(2)],
                "node": node}
        self.config = self.workdir / "online.toml"
        self.config.write_text(dump_toml(data) + "\n")
        self.nodes = [NodeProcess(self.config, i + 1, host="127.0.0.1", port=ports[2 * i],
                                  log_path=self.workdir / f"node-{i + 1}.log", cwd=ROOT)
                      for i in range(2)]

    def start(self) -> None:
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node.wait_ready(READY_TIMEOUT)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def pids(self) -> list[int]:
        pids = [n.pid for n in self.nodes if n.pid is not None]
        for port in (self.ports[1], self.ports[3]):
            with contextlib.suppress(Exception):
                litestream = http("GET", port, "/internal/metrics").get("replication") or {}
                if litestream.get("pid"):
                    pids.append(litestream["pid"])
        return pids


async def member(base: str, room: dict[str, Any], name: str, counter: list[int]
                 ) -> socketio.AsyncClient:
    sio = socketio.AsyncClient(reconnection=False)
    welcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    sio.on("welcome", lambda data: welcome.done() or welcome.set_result(data),
           namespace=room["namespace"])

    def got(_data: Any) -> None:
        counter[0] += 1

    sio.on("message", got, namespace=room["namespace"])
    await sio.connect(base, namespaces=[room["namespace"]], transports=["websocket"],
                      socketio_path=room["socketio_path"], auth={"name": name})
    await asyncio.wait_for(welcome, ACK_TIMEOUT)
    return sio


async def send_loop(sio: socketio.AsyncClient, room: dict[str, Any], prefix: str,
                    until: asyncio.Event, latencies: list[float], acked: dict[str, int],
                    refused: list[Any]) -> None:
    n = 0
    while not until.is_set():
        n += 1
        cid = f"{prefix}-{n}"
        sent = time.perf_counter()
        try:
            ack = await sio.call("message", {"text": cid, "client_id": cid},
                                 namespace=room["namespace"], timeout=ACK_TIMEOUT)
        except Exception:
            return  # the node is gone
        latencies.append(time.perf_counter() - sent)
        if isinstance(ack, dict) and ack.get("ok"):
            acked[cid] = ack["seq"]
        else:
            refused.append(ack)


async def measure(cluster: Cluster, mode: str, seconds: float, members: int,
                  senders: int) -> Run:
    one_port, one_internal = cluster.ports[0], cluster.ports[1]
    room = await asyncio.to_thread(http, "POST", one_internal, "/internal/rooms",
                                   {"name": "online"})
    base = f"http://127.0.0.1:{one_port}"
    counter = [0]
    clients = [await member(base, room, f"m{i}", counter) for i in range(members)]
    pids = await asyncio.to_thread(cluster.pids)
    before = sum(cpu_seconds(p) for p in pids)
    stop = asyncio.Event()
    latencies: list[float] = []
    acked: dict[str, int] = {}
    refused: list[Any] = []
    tasks = [asyncio.create_task(send_loop(clients[i], room, f"s{i}", stop, latencies, acked,
                                           refused)) for i in range(senders)]
    await asyncio.sleep(seconds)  # the measured period itself
    stop.set()
    await asyncio.gather(*tasks)
    cpu = sum(cpu_seconds(p) for p in pids) - before
    deliveries = counter[0]
    ms = sorted(x * 1000 for x in latencies)
    run = Run(mode, seconds, len(acked), deliveries, round(cpu, 2),
              round(deliveries / cpu, 1) if cpu else 0.0,
              round(statistics.median(ms), 2), round(ms[int(0.99 * (len(ms) - 1))], 2),
              len(refused))
    if mode in ("async", "sync"):
        await lose_and_adopt(cluster, run, room, clients[:senders])
    for c in clients:
        with contextlib.suppress(Exception):
            await c.disconnect()
    return run


async def lose_and_adopt(cluster: Cluster, run: Run, room: dict[str, Any],
                         senders: list[socketio.AsyncClient]) -> None:
    """Senders go on; instance 1 is killed at a random moment; adopt; count what is lost."""
    stop = asyncio.Event()
    acked: dict[str, int] = {}
    tasks = [asyncio.create_task(send_loop(s, room, f"k{i}", stop, [], acked, []))
             for i, s in enumerate(senders)]
    await asyncio.sleep(1.0 + random.uniform(0, 1.0))  # a random moment of the burst
    cluster.nodes[0].kill()
    stop.set()
    await asyncio.gather(*tasks)
    t0 = time.monotonic()
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "shardchat", "adopt", "--config",
                         str(cluster.config), "--instance", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    run.adopt_seconds = round(time.monotonic() - t0, 2)
    if done.returncode != 0:
        raise RuntimeError(f"adopt failed: {done.stdout}{done.stderr}")
    public = cluster.ports[2]  # instance 2's public listener
    found = await asyncio.to_thread(http, "GET", public, f"/api/rooms/{room['id']}")
    back = await member(f"http://127.0.0.1:{public}", found, "back", [0])
    run.back_seconds = round(time.monotonic() - t0, 2)
    try:
        ack = await back.call("message", {"text": "back", "client_id": "back"},
                              namespace=found["namespace"], timeout=ACK_TIMEOUT)
    finally:
        await back.disconnect()
    if isinstance(ack, dict) and ack.get("ok"):
        run.first_ack_seconds = round(time.monotonic() - t0, 2)
    store = cluster.workdir / "data" / storage_name(2) / "store.sqlite3"
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        held = {cid for (cid,) in conn.execute(
            "SELECT client_id FROM messages WHERE room_id = ?", (room["id"],))}
    finally:
        conn.close()
    run.kill_acked = len(acked)
    run.lost = sum(cid not in held for cid in acked)


def report(runs: list[Run], members: int, senders: int, command: str) -> str:
    out = ["# Replication side by side: off, Litestream, async, sync", "",
           f"Command: `{command}`", "",
           f"Two nodes (instance 2 follows 1), one room on instance 1, {members} members, "
           f"{senders} of them sending one message after the other. CPU: every server "
           "process of the run (both nodes, Litestream where it runs). Loss and adopt: "
           "instance 1 SIGKILLed mid burst, `shardchat adopt` timed, acked messages "
           "looked for on the adopter.", "",
           "| mode | s | acked | deliveries | CPU s | deliveries / CPU s | ack p50 ms | "
           "ack p99 ms | refused | acked in kill burst | lost | adopt s | adopt to welcome s | "
           "adopt to first ack s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        out.append(f"| {r.mode} | {r.seconds:g} | {r.acked} | {r.deliveries} | "
                   f"{r.cpu_seconds} | {r.deliveries_per_cpu_second} | {r.p50_ms} | "
                   f"{r.p99_ms} | {r.refused} | {_v(r.kill_acked)} | {_v(r.lost)} | "
                   f"{_v(r.adopt_seconds)} | {_v(r.back_seconds)} | "
                   f"{_v(r.first_ack_seconds)} |")
    out += ["", "Medians per mode:", ""]
    for mode in dict.fromkeys(r.mode for r in runs):
        rs = [r for r in runs if r.mode == mode]
        out.append(f"- {mode}: {statistics.median(r.deliveries_per_cpu_second for r in rs):g}"
                   f" deliveries per CPU-second, ack p50 "
                   f"{statistics.median(r.p50_ms for r in rs):g} ms, p99 "
                   f"{statistics.median(r.p99_ms for r in rs):g} ms")
    return "\n".join(out) + "\n"


def command_line(argv: list[str]) -> str:
    """The command that gives these figures, so that a reader can run it again."""
    return " ".join(["python -m bench.online", *argv])


def _v(value: object) -> str:
    return "-" if value is None else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mode", action="append", choices=MODES)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--senders", type=int, default=4)
    args = parser.parse_args()
    modes = args.mode or list(MODES)
    rounds = 1 if args.quick else args.rounds
    seconds = 4.0 if args.quick else args.seconds
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="shardchat-online-") as tmp:
        for n in range(rounds):
            for mode in modes:
                cluster = Cluster(Path(tmp), mode, n)
                cluster.start()
                try:
                    runs.append(asyncio.run(measure(cluster, mode, seconds, args.members,
                                                    args.senders)))
                    print(runs[-1], flush=True)
                finally:
                    cluster.stop()
    text = report(runs, args.members, args.senders, command_line(sys.argv[1:]))
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "online.md").write_text(text)
        (RESULTS / "online.json").write_text(json.dumps(
            {"members": args.members, "senders": args.senders,
             "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
