"""Off-machine copies (Litestream, ``node.replicate_to``): what a lost machine loses, and how
long bringing it back takes. Not part of ``python -m bench``; run it on its own:

    python -m bench.offsite                 both measures, a directory and moto S3 replica
    python -m bench.offsite --quick         fewer runs, a smaller store (~1 minute)
    python -m bench.offsite --target file   one kind of replica only
    python -m bench.offsite --measure latency   one measure only (loss, restore, latency)

Loss window (RPO): one member sends messages one after the other, each waiting for its ack,
at ``--rate`` per second; at a random moment Litestream and the node are SIGKILLed together
(the machine is gone: nothing more is uploaded), the replica is restored and its highest
seq read. Every acked message above it is lost; the window is the time from the ack of the
oldest lost message to the kill. Each run is one kill; the table gives each run.

Restore time (RTO): a store of ``--messages`` messages is written offline, a node replicates
it (Litestream's first snapshot) until the replica holds all of it, the node and Litestream
are killed, the data directory deleted, and ``shardchat restore`` is timed end to end (its
Python start, the download, the integrity check, the rename).

Ack latency: the same steady sender for ``--latency-seconds`` on a node without replication
(its own checkpoint thread) and on one replicating to the first ``--target`` (Litestream's
checkpoints, which take a short write lock), runs alternating; Litestream's checkpoints in
the run are counted from its log (``/internal/metrics``).

Results go to bench/results/offsite.{json,md}. Loopback only: the S3 is a local moto server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import boto3
import socketio

from shardchat.cluster.nodeproc import NodeProcess
from shardchat.cluster.up import free_port
from shardchat.config import dump_toml
from shardchat.node.replication import litestream
from shardchat.node.store import Store
from shardchat.node.store.records import RoomRecord

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SECRET = "bench-secret-not-for-production"
REGION = "us-east-1"
BUCKET = "shardchat-bench"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_REGION": REGION,
           "AWS_CONFIG_FILE": "/nonexistent/aws-config",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials"}
READY_TIMEOUT = 60.0
CATCH_UP_TIMEOUT = 120.0  # seconds the replica may take to hold a whole store
ACK_TIMEOUT = 10.0


@dataclass
class LossRun:
    target: str
    sync_interval: float
    acked: int
    restored_top: int
    lost: int
    window: float  # seconds from the oldest lost ack to the kill (0 when nothing was lost)
    newest_age: float  # seconds from the newest restored ack to the kill
    rate: float  # acked messages per second the member achieved
    litestream_cpu: float  # Litestream's CPU seconds per second of sending
    node_cpu: float  # the node's, for comparison
    litestream_rss_mb: float  # Litestream's resident memory at the kill


@dataclass
class LatencyRun:
    target: str  # "off": no replication, the node checkpoints its own WAL
    seconds: float
    acked: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    checkpoints: int  # Litestream's WAL checkpoints during the run (0 when off)


@dataclass
class RestoreRun:
    target: str
    messages: int
    store_bytes: int
    replicate_seconds: float  # start to "the replica holds it all" (first snapshot)
    restore_seconds: float  # `shardchat restore`, end to end


class Moto:
    """A moto server on a loopback port with the bench bucket."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = open(workdir / "moto.log", "ab")  # noqa: SIM115 - handed to the process
        exe = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = boto3.client("s3", region_name=REGION, endpoint_url=self.url,
                              aws_access_key_id="bench", aws_secret_access_key="bench")
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Bench:
    """One working directory, one config, one node; each run its own prefix."""

    def __init__(self, workdir: Path, moto: Moto | None) -> None:
        self.workdir = workdir
        self.moto = moto
        self.runs = 0

    def config(self, target: str, sync_interval: float) -> tuple[Path, int, int]:
        """A config replicating to ``target`` ("file", "s3"; "off": no replication)."""
        self.runs += 1
        port, internal = free_port(), free_port()
        node: dict[str, Any] = {"drain_grace_seconds": 0.5, "rate_limit_messages": 1_000_000,
                                "rate_limit_window": 1.0, "history_retention": 10_000_000,
                                "replicate_sync_interval": sync_interval}
        if target == "off":
            del node["replicate_sync_interval"]
        elif target == "file":
            node["replicate_to"] = str(self.workdir / f"replica-{self.runs}")
        else:
            assert self.moto is not None
            node.update(replicate_to=f"s3://{BUCKET}/run-{self.runs}",
                        replicate_endpoint=self.moto.url, replicate_region=REGION)
        data = {"cluster": {"name": "bench", "secret": SECRET,
                            "data_dir": str(self.workdir / f"data-{self.runs}")},
                "instances": [{"number": 1, "host": "127.0.0.1", "port": port,
                               "internal_port": internal}],
                "node": node}
        path = self.workdir / f"offsite-{self.runs}.toml"
        path.write_text(dump_toml(data) + "\n")
        return path, port, internal

    def node(self, cfg: Path, port: int) -> NodeProcess:
        return NodeProcess(cfg, 1, host="127.0.0.1", port=port,
                           log_path=self.workdir / f"node-{self.runs}.log",
                           env=AWS_ENV, cwd=ROOT)


def metrics(internal: int) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{internal}/internal/metrics",
                                 headers={"Authorization": f"Bearer {SECRET}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())["replication"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def lose_machine(node: NodeProcess, internal: int) -> float:
    """SIGKILL Litestream and the node; the moment of the kill (time.time())."""
    pid = metrics(internal)["pid"]
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    node.kill()
    return killed


def restored_top(cfg_dir: Path, room: str, scratch: Path) -> int:
    """Restore the replica described by the node's litestream.yml; the room's highest seq."""
    ls_config = cfg_dir / litestream.CONFIG_NAME
    scratch.unlink(missing_ok=True)
    env = {**litestream.child_env(), **AWS_ENV}
    done = subprocess.run(litestream.restore_argv(litestream.find_binary(), ls_config,
                                                  (cfg_dir / "store.sqlite3").absolute(),
                                                  scratch),
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    if not scratch.exists():
        return 0
    conn = sqlite3.connect(scratch)
    try:
        (top,) = conn.execute("SELECT MAX(seq) FROM messages WHERE room_id = ?",
                              (room,)).fetchone()
        return top or 0
    finally:
        conn.close()


async def sender(base: str, room: dict[str, Any], rate: float, seconds: float,
                 latencies: list[float] | None = None) -> list[tuple[int, float]]:
    """Send one message after the other at ``rate``/s for ``seconds``: [(seq, ack time)];
    each send-to-ack time goes into ``latencies``."""
    sio = socketio.AsyncClient(reconnection=False)
    welcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    sio.on("welcome", lambda data: welcome.done() or welcome.set_result(data),
           namespace=room["namespace"])
    await sio.connect(base, namespaces=[room["namespace"]], transports=["websocket"],
                      socketio_path=room["socketio_path"], auth={"name": "bench"})
    await asyncio.wait_for(welcome, ACK_TIMEOUT)
    acks: list[tuple[int, float]] = []
    gap = 1.0 / rate
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
        sent = time.perf_counter()
        ack = await sio.call("message", {"text": f"m{n}", "client_id": f"c{n}"},
                             namespace=room["namespace"], timeout=ACK_TIMEOUT)
        acks.append((ack["seq"], time.time()))
        if latencies is not None:
            latencies.append(time.perf_counter() - sent)
        await asyncio.sleep(max(0.0, gap - 0.0005))
    await sio.disconnect()
    return acks


def create_room(port: int) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/rooms", method="POST",
                                 data=b'{"name": "offsite"}',
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def loss_run(bench: Bench, target: str, sync_interval: float, rate: float) -> LossRun:
    cfg, port, internal = bench.config(target, sync_interval)
    node = bench.node(cfg, port)
    node.spawn()
    try:
        node.wait_ready(READY_TIMEOUT)
        room = create_room(port)
        seconds = 3.0 + random.uniform(0, 2 * sync_interval)
        ls_pid, node_pid = metrics(internal)["pid"], node.pid
        assert node_pid is not None
        ls_cpu, node_cpu, t0 = cpu_seconds(ls_pid), cpu_seconds(node_pid), time.monotonic()
        acks = asyncio.run(sender(f"http://127.0.0.1:{port}", room, rate, seconds))
        took = time.monotonic() - t0
        ls_cpu, node_cpu = cpu_seconds(ls_pid) - ls_cpu, cpu_seconds(node_pid) - node_cpu
        memory = rss_mb(ls_pid)
        killed = lose_machine(node, internal)
    finally:
        node.stop()
    data = bench.workdir / f"data-{bench.runs}"
    top = restored_top(data / "i1", room["id"], bench.workdir / "scratch.sqlite3")
    lost = [t for seq, t in acks if seq > top]
    kept = [t for seq, t in acks if seq <= top]
    return LossRun(target, sync_interval, len(acks), top, len(lost),
                   round(killed - lost[0], 3) if lost else 0.0,
                   round(killed - kept[-1], 3) if kept else float("nan"),
                   round(len(acks) / took, 1), round(ls_cpu / took, 3),
                   round(node_cpu / took, 3), round(memory, 1))


async def fill_store(directory: Path, messages: int) -> None:
    """``messages`` messages in one room, written by the store itself (group commits)."""
    store = Store(directory, fsync=False, retention=messages + 1)
    await store.open()
    room = RoomRecord("benchroomoffsite0000a", "offsite", False, int(time.time() * 1000))
    await store.create_room(room)
    text = "x" * 200
    batch = 2000
    for start in range(0, messages, batch):
        await asyncio.gather(*(
            store.append_message(room.id, sender_sid="s", sender_name="bench",
                                 sender_member="member", text=text, client_id=f"c{i}",
                                 ts=int(time.time() * 1000))
            for i in range(start, min(messages, start + batch))))
    await store.close()


def restore_run(bench: Bench, target: str, messages: int) -> RestoreRun:
    cfg, port, internal = bench.config(target, 1.0)
    data = bench.workdir / f"data-{bench.runs}" / "i1"
    asyncio.run(fill_store(data, messages))
    node = bench.node(cfg, port)
    started = time.monotonic()
    node.spawn()
    try:
        node.wait_ready(READY_TIMEOUT)
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        while True:  # the first snapshot uploaded, then a restore that holds it all
            m = metrics(internal)
            if m["uploads"] and m["replica_txid"] >= m["local_txid"] > 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replica did not catch up: {m}")
            time.sleep(0.2)
        replicated = time.monotonic() - started
        lose_machine(node, internal)
    finally:
        node.stop()
    size = (data / "store.sqlite3").stat().st_size + (
        (data / "store.sqlite3-wal").stat().st_size
        if (data / "store.sqlite3-wal").exists() else 0)
    shutil.rmtree(data)
    env = {**os.environ, **AWS_ENV, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "shardchat", "restore", "--config", str(cfg),
                           "--instance", "1"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=3600, check=False)
    took = time.monotonic() - t0
    if done.returncode != 0 or f"{messages} messages" not in done.stdout:
        raise RuntimeError(f"restore failed ({done.returncode}): {done.stdout}{done.stderr}")
    return RestoreRun(target, messages, size, round(replicated, 2), round(took, 2))


def latency_run(bench: Bench, target: str, seconds: float, rate: float) -> LatencyRun:
    """Ack latency of a steady sender for ``seconds``, replicated or not."""
    cfg, port, internal = bench.config(target, 1.0)
    node = bench.node(cfg, port)
    node.spawn()
    try:
        node.wait_ready(READY_TIMEOUT)
        room = create_room(port)
        before = metrics(internal)["checkpoints"] if target != "off" else 0
        latencies: list[float] = []
        acks = asyncio.run(sender(f"http://127.0.0.1:{port}", room, rate, seconds, latencies))
        ran = (metrics(internal)["checkpoints"] - before) if target != "off" else 0
    finally:
        node.stop()
    ms = sorted(x * 1000 for x in latencies)

    def pct(q: float) -> float:
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 2)
    return LatencyRun(target, seconds, len(acks), pct(0.5), pct(0.99), pct(0.999),
                      round(ms[-1], 2), ran)


def report(loss: list[LossRun], restores: list[RestoreRun], rate: float,
           latency: list[LatencyRun] | None = None) -> str:
    out = ["# Off-machine copies: loss window and restore time", "",
           f"Loss window: one member sending acked messages one after the other (at most "
           f"{rate:g}/s), Litestream and the node SIGKILLed together at a random moment, the "
           "replica restored. CPU is CPU-seconds per second of sending (1.0 = one core).",
           "", "| replica | sync interval s | msg/s | acked | lost | window s (oldest lost "
           "ack -> kill) | newest kept ack -> kill s | litestream CPU | node CPU | "
           "litestream RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r.target} | {r.sync_interval:g} | {r.rate:g} | {r.acked} | {r.lost} | "
            f"{r.window:.3f} | {r.newest_age:.3f} | {r.litestream_cpu:.3f} | "
            f"{r.node_cpu:.3f} | {r.litestream_rss_mb:.1f} |" for r in loss]
    for target in sorted({r.target for r in loss}):
        for si in sorted({r.sync_interval for r in loss if r.target == target}):
            w = [r.window for r in loss if r.target == target and r.sync_interval == si]
            out.append(f"\n{target}, sync interval {si:g} s: window median "
                       f"{statistics.median(w):.2f} s, max {max(w):.2f} s over {len(w)} runs")
    out += ["", "Restore time: `shardchat restore` end to end after the replica held the "
            "whole store.", "", "| replica | messages | store MB | first replication s | "
            "restore s |", "|---|---|---|---|---|"]
    out += [f"| {r.target} | {r.messages} | {r.store_bytes / 1e6:.1f} | "
            f"{r.replicate_seconds:.2f} | {r.restore_seconds:.2f} |" for r in restores]
    if latency:
        out += ["", "Ack latency of one steady sender, replication off (the node "
                "checkpoints) and on (Litestream checkpoints), runs alternating.", "",
                "| replication | seconds | acked | p50 ms | p99 ms | p99.9 ms | max ms | "
                "Litestream checkpoints |", "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r.target} | {r.seconds:g} | {r.acked} | {r.p50_ms} | {r.p99_ms} | "
                f"{r.p999_ms} | {r.max_ms} | {r.checkpoints} |" for r in latency]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--target", action="append", choices=("file", "s3"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--sync-interval", type=float, action="append")
    parser.add_argument("--messages", type=int, action="append")
    parser.add_argument("--measure", action="append", choices=("loss", "restore", "latency"))
    parser.add_argument("--latency-seconds", type=float, default=45.0)
    args = parser.parse_args()
    measures = set(args.measure or ("loss", "restore", "latency"))
    targets = args.target or ["file", "s3"]
    runs = 2 if args.quick else args.runs
    intervals = args.sync_interval or [1.0]
    sizes = args.messages or ([20_000] if args.quick else [100_000, 500_000])
    with tempfile.TemporaryDirectory(prefix="shardchat-offsite-") as tmp:
        workdir = Path(tmp)
        moto = Moto(workdir) if "s3" in targets else None
        bench = Bench(workdir, moto)
        loss: list[LossRun] = []
        restores: list[RestoreRun] = []
        latency: list[LatencyRun] = []
        try:
            for target in targets:
                for si in intervals if "loss" in measures else ():
                    for _ in range(runs):
                        loss.append(loss_run(bench, target, si, args.rate))
                        print(loss[-1], flush=True)
                for n in sizes if "restore" in measures else ():
                    restores.append(restore_run(bench, target, n))
                    print(restores[-1], flush=True)
            if "latency" in measures:
                seconds = 10.0 if args.quick else args.latency_seconds
                for _ in range(1 if args.quick else 2):
                    for target in ("off", targets[0]):
                        latency.append(latency_run(bench, target, seconds, args.rate))
                        print(latency[-1], flush=True)
        finally:
            if moto is not None:
                moto.stop()
    text = report(loss, restores, args.rate, latency)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "offsite.md").write_text(text)
        (RESULTS / "offsite.json").write_text(json.dumps(
            {"rate": args.rate, "loss": [asdict(r) for r in loss],
             "restore": [asdict(r) for r in restores],
             "latency": [asdict(r) for r in latency]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
