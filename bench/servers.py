"""The servers under test: start, address, stop.

Each kind answers the same questions: which processes to measure (``pids``), where member
``j`` of room ``r`` connects (``endpoint``), and how to make rooms (``create_rooms``). Every
process is pinned to the server cores (see ``affinity``) so the load generator's core stays
its own; everything listens on 127.0.0.1 ports chosen free at start.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardchat.cluster.nodeproc import ChildProcess, NodeProcess
from shardchat.cluster.up import free_port
from shardchat.config import dump_toml
from shardchat.internal_api import (
    METRICS_PATH,
    ROOMS_PATH,
    STATS_PATH,
    auth_header,
    move_path,
)

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-" + secrets.token_hex(8)


class ServerError(RuntimeError):
    """A server under test failed to start or answer."""


START_TIMEOUT = 30.0  # seconds a server process may take to answer its health check
PORT_TIMEOUT = 15.0   # seconds redis-server may take to listen
MOVE_TIMEOUT = 120.0  # seconds one move of a room may take (a large room copies many pages)


def port_open(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:``port``."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


@dataclass(frozen=True)
class Endpoint:
    """Where one client connects: host, port, Engine.IO path and Socket.IO namespace."""

    host: str
    port: int
    path: str
    namespace: str


def affinity() -> tuple[set[int] | None, set[int] | None]:
    """(server cores, load generator cores): the last core for the load generator, the rest
    for servers. (None, None) on a single-core machine: nothing to separate."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    return set(cores[:-1]), {cores[-1]}


def _http(method: str, url: str, body: Any = None, headers: dict | None = None,
          timeout: float = 5.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


class Server:
    """Base of every server kind; subclasses fill ``start`` and the addressing."""

    label = "server"
    nodes = 1

    def __init__(self, cores: set[int] | None) -> None:
        self.cores = cores
        self.procs: list[ChildProcess] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def _cores(self, index: int) -> set[int] | None:
        """The cores of process ``index``: the processes of one design are spread over the
        server cores, one core each."""
        cores = self.cores
        if cores and len(cores) > 1:
            ordered = sorted(cores)
            cores = {ordered[index % len(ordered)]}
        return cores

    def _spawn(self, name: str, argv: list[str], index: int,
               ready_url: str | None = None) -> ChildProcess:
        proc = ChildProcess(name, argv, self.tmp / f"{name}.log", cwd=ROOT,
                            ready_url=ready_url, cores=self._cores(index))
        return self._started(proc)

    def _started(self, proc: ChildProcess) -> ChildProcess:
        proc.spawn()
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        raise NotImplementedError

    def create_rooms(self, count: int) -> list[Any]:
        """``count`` new rooms; returns opaque handles for ``endpoint``."""
        return [f"r{i}-{secrets.token_hex(4)}" for i in range(count)]

    def endpoint(self, room: Any, member: int) -> Endpoint:
        raise NotImplementedError

    def metrics(self) -> list[dict[str, Any]]:
        """Internal counters of each server process, where the server has them."""
        return []

    def connected(self) -> int | None:
        """Clients connected to the server now, as it counts them (None: it does not say).
        The leave scenario polls it to see when a room has emptied."""
        return None

    def check(self) -> None:
        """Raise ``nodeproc.Exited`` (a ``ChildError``) if a server process has exited."""
        for p in self.procs:
            p.check()

    def stop(self) -> None:
        """Stop every process: a short grace, then SIGKILL (nothing of a benchmark server
        needs a clean exit, except a node writing its profile)."""
        grace = 30.0 if getattr(self, "profile_dir", None) else 2.0
        for p in reversed(self.procs):
            p.stop(grace)
        shutil.rmtree(self.tmp, ignore_errors=True)


class StockServer(Server):
    """Stock python-socketio on aiohttp + uvloop (bench/peers/stock_sio.py)."""

    label = "stock python-socketio"

    def start(self) -> None:
        self.port = free_port()
        p = self._spawn("stock", [sys.executable, "-m", "bench.peers.stock_sio",
                                  "--port", str(self.port)], 0,
                        ready_url=f"http://127.0.0.1:{self.port}/healthz")
        p.wait_ready(START_TIMEOUT)

    def endpoint(self, room: Any, member: int) -> Endpoint:
        return Endpoint("127.0.0.1", self.port, "/socket.io", f"/room/{room}")


class NodeJsServer(Server):
    """Node socket.io 4 from the project's node_modules (bench/peers/node_sio.js)."""

    label = "node socket.io"

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("node")) and (ROOT / "node_modules" / "socket.io").is_dir()

    def start(self) -> None:
        self.port = free_port()
        p = self._spawn("node", [shutil.which("node") or "node",
                                 str(ROOT / "bench" / "peers" / "node_sio.js"), str(self.port)], 0,
                        ready_url=f"http://127.0.0.1:{self.port}/healthz")
        p.wait_ready(START_TIMEOUT)

    def endpoint(self, room: Any, member: int) -> Endpoint:
        return Endpoint("127.0.0.1", self.port, "/socket.io", f"/room/{room}")

    def connected(self) -> int | None:
        """Members of every room the peer holds now (its ``/stats``)."""
        status, body = _http("GET", f"http://127.0.0.1:{self.port}/stats")
        return body.get("members") if status == 200 and isinstance(body, dict) else None


class RawWsServer(Server):
    """A raw ``ws`` server (Node, the ws package) speaking just enough Engine.IO/Socket.IO
    framing for the load generator and broadcasting each frame encoded once, with nothing
    stored (bench/peers/raw_ws.js): what a team would write if it rewrote its chat on ws."""

    label = "raw ws"

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("node")) and (ROOT / "node_modules" / "ws").is_dir()

    def start(self) -> None:
        self.port = free_port()
        p = self._spawn("rawws", [shutil.which("node") or "node",
                                  str(ROOT / "bench" / "peers" / "raw_ws.js"), str(self.port)],
                        0, ready_url=f"http://127.0.0.1:{self.port}/healthz")
        p.wait_ready(START_TIMEOUT)

    def endpoint(self, room: Any, member: int) -> Endpoint:
        return Endpoint("127.0.0.1", self.port, "/socket.io", f"/room/{room}")


class RedisServer(Server):
    """The Redis-adapter design: 2 python-socketio nodes with AsyncRedisManager and one
    redis-server (its CPU counts: it is part of that design's server side). Members of a
    room alternate between the two nodes."""

    label = "redis-adapter, 2 nodes"
    nodes = 2

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("redis-server"))

    def start(self) -> None:
        rport = free_port()
        redis = self._spawn("redis", [shutil.which("redis-server") or "redis-server",
                                      "--port", str(rport), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"], 2)
        redis.wait_ready(PORT_TIMEOUT, probe=lambda: port_open(rport))
        url = f"redis://127.0.0.1:{rport}/0"
        self.ports = [free_port(), free_port()]
        nodes = [self._spawn(f"redis-node{i + 1}", [sys.executable, "-m", "bench.peers.redis_sio",
                                                    "--port", str(port), "--redis", url], i,
                             ready_url=f"http://127.0.0.1:{port}/healthz")
                 for i, port in enumerate(self.ports)]
        for node in nodes:
            node.wait_ready(START_TIMEOUT)

    def endpoint(self, room: Any, member: int) -> Endpoint:
        return Endpoint("127.0.0.1", self.ports[member % 2], "/socket.io", f"/room/{room}")


UNLIMITED = {f"rate_limit_{kind}": 1_000_000
             for kind in ("messages", "typing", "history", "joins", "rooms")}


BENCH_ROOM_CAPACITY = 10_000  # members per room: above the largest join scenario


class ShardchatServer(Server):
    """shardchat nodes (``python -m shardchat node``) with the default node settings, except
    the rate limits, raised so the load generator's senders (thousands of clients on one
    loopback address) are never refused, the room capacity, raised for the join scenarios'
    rooms of up to 5,000 (``BENCH_ROOM_CAPACITY``), and a short drain grace (no load
    balancer waits on it), so that a stop is quick and a profile is written.
    Each room lives on one node: rooms alternate between the nodes."""

    label = "shardchat"

    def __init__(self, cores: set[int] | None, nodes: int = 1,
                 node_settings: dict[str, Any] | None = None,
                 profile_dir: Path | None = None) -> None:
        super().__init__(cores)
        self.profile_dir = profile_dir
        self.nodes = nodes
        self.label = "shardchat" if nodes == 1 else f"shardchat, {nodes} nodes"
        if not self.node_settings_fsync(node_settings):
            self.label += " (fsync off)"
        if (node_settings or {}).get("engine", "fast") != "fast":
            self.label += f" ({node_settings['engine']} engine)"
        self.node_settings = {**UNLIMITED, "room_capacity": BENCH_ROOM_CAPACITY,
                              "drain_grace_seconds": 0.5, **(node_settings or {})}

    @staticmethod
    def node_settings_fsync(settings: dict[str, Any] | None) -> bool:
        return bool((settings or {}).get("fsync", True))

    def _write_config(self) -> Path:
        self.instances = [{"number": i, "host": "127.0.0.1", "port": free_port(),
                           "internal_port": free_port()} for i in range(1, self.nodes + 1)]
        data = {"cluster": {"name": "bench", "secret": SECRET,
                            "data_dir": str(self.tmp / "data")},
                "instances": self.instances, "node": self.node_settings}
        path = self.tmp / "shardchat.toml"
        path.write_text(dump_toml(data) + "\n")
        self.config_path = path
        return path

    def start(self) -> None:
        cfg = self._write_config()
        procs = [self._started(NodeProcess(
                     cfg, inst["number"], host="127.0.0.1", port=inst["port"],
                     log_path=self.tmp / f"shardchat-i{inst['number']}.log", cwd=ROOT,
                     cores=self._cores(idx), python_args=self._profiler(inst["number"])))
                 for idx, inst in enumerate(self.instances)]
        for proc in procs:
            proc.wait_ready(START_TIMEOUT)

    def _profiler(self, number: int) -> list[str]:
        """cProfile arguments when profiling (``--profile DIR``): the profile of node N is
        written to DIR when it exits cleanly."""
        if self.profile_dir is None:
            return []
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        slug = "".join(ch if ch.isalnum() else "-" for ch in self.label)
        out = self.profile_dir / f"{slug}-i{number}-{secrets.token_hex(3)}.prof"
        return ["-m", "cProfile", "-o", str(out)]

    def create_rooms(self, count: int) -> list[Any]:
        rooms = []
        for i in range(count):
            inst = self.instances[i % len(self.instances)]
            status, body = _http("POST", f"http://127.0.0.1:{inst['internal_port']}{ROOMS_PATH}",
                                 {"name": f"bench room {i}", "private": False},
                                 auth_header(SECRET))
            if status != 201 or not isinstance(body, dict):
                raise ServerError(f"creating a room on instance {inst['number']} failed: "
                                  f"{status} {body}")
            rooms.append((inst["port"], body["socketio_path"], body["namespace"]))
        return rooms

    def metrics(self) -> list[dict[str, Any]]:
        out = []
        for inst in self.instances:
            status, body = _http("GET", f"http://127.0.0.1:{inst['internal_port']}{METRICS_PATH}",
                                 headers=auth_header(SECRET))
            if status == 200 and isinstance(body, dict):
                out.append(body)
        return out

    def connected(self) -> int | None:
        """Members connected to every node (SPEC section 5's ``connections``), or None when
        a node did not answer."""
        total = 0
        for inst in self.instances:
            status, body = _http("GET", f"http://127.0.0.1:{inst['internal_port']}{STATS_PATH}",
                                 headers=auth_header(SECRET))
            if status != 200 or not isinstance(body, dict):
                return None
            total += body["connections"]
        return total

    def endpoint(self, room: Any, member: int) -> Endpoint:
        port, path, namespace = room
        return Endpoint("127.0.0.1", port, path, namespace)

    def resolve(self, number: int) -> tuple[str, int]:
        """(host, port) of instance ``number``'s public listener: what a router in front of
        the cluster does for ``/i<N>/`` paths, for clients that follow a moved room."""
        for inst in self.instances:
            if inst["number"] == number:
                return "127.0.0.1", inst["port"]
        raise ServerError(f"there is no instance {number} in this cluster")

    def internal_url(self, number: int) -> str:
        return f"http://127.0.0.1:{self.instances[number - 1]['internal_port']}"

    async def move(self, room_id: str, source: int, to: int,
                   timeout: float = MOVE_TIMEOUT) -> tuple[int, Any]:
        """``POST /internal/rooms/<id>/move {"to": N}`` on the owner: (status, answer)."""
        import aiohttp

        url = self.internal_url(source) + move_path(room_id)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
                s.post(url, json={"to": to}, headers=auth_header(SECRET)) as resp:
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, await resp.text()
