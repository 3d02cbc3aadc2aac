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
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardchat import urls
from shardchat.cluster.up import free_port
from shardchat.config import dump_toml
from shardchat.internal_api import METRICS_PATH, ROOMS_PATH, auth_header

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-" + secrets.token_hex(8)


class ServerError(RuntimeError):
    """A server under test failed to start or answer."""


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


class Proc:
    """One pinned server process with its log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, cores: set[int] | None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}

        def pin() -> None:
            if cores:
                os.sched_setaffinity(0, cores)

        self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                      cwd=str(ROOT), preexec_fn=pin)
        log.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ServerError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def wait_http(self, url: str, timeout: float = 30.0) -> None:
        """Wait (bounded) until ``url`` answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            with contextlib.suppress(OSError):
                if _http("GET", url, timeout=1.0)[0] == 200:
                    return
            time.sleep(0.05)
        raise ServerError(f"{self.name} did not answer {url} within {timeout:g} s")

    def wait_port(self, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return
            time.sleep(0.05)
        raise ServerError(f"{self.name} did not listen on {port} within {timeout:g} s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


class Server:
    """Base of every server kind; subclasses fill ``start`` and the addressing."""

    label = "server"
    nodes = 1

    def __init__(self, cores: set[int] | None) -> None:
        self.cores = cores
        self.procs: list[Proc] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _spawn(self, name: str, argv: list[str], index: int, **kw: Any) -> Proc:
        cores = self.cores
        if cores and len(cores) > 1:  # spread the processes of one design over its cores
            ordered = sorted(cores)
            cores = {ordered[index % len(ordered)]}
        proc = Proc(name, argv, self.tmp, cores, **kw)
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

    def check(self) -> None:
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
                                  "--port", str(self.port)], 0)
        p.wait_http(f"http://127.0.0.1:{self.port}/healthz")

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
                                 str(ROOT / "bench" / "peers" / "node_sio.js"), str(self.port)], 0)
        p.wait_http(f"http://127.0.0.1:{self.port}/healthz")

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
        redis.wait_port(rport)
        url = f"redis://127.0.0.1:{rport}/0"
        self.ports = [free_port(), free_port()]
        nodes = [self._spawn(f"redis-node{i + 1}", [sys.executable, "-m", "bench.peers.redis_sio",
                                                    "--port", str(port), "--redis", url], i)
                 for i, port in enumerate(self.ports)]
        for node, port in zip(nodes, self.ports, strict=True):
            node.wait_http(f"http://127.0.0.1:{port}/healthz")

    def endpoint(self, room: Any, member: int) -> Endpoint:
        return Endpoint("127.0.0.1", self.ports[member % 2], "/socket.io", f"/room/{room}")


UNLIMITED = {f"rate_limit_{kind}": 1_000_000
             for kind in ("messages", "typing", "history", "joins", "rooms")}


class ShardchatServer(Server):
    """shardchat nodes (``python -m shardchat node``) with the default node settings, except
    the rate limits, raised so the load generator's senders (thousands of clients on one
    loopback address) are never refused, and a short drain grace (no load balancer waits on
    it), so that a stop is quick and a profile is written.
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
        self.node_settings = {**UNLIMITED, "drain_grace_seconds": 0.5, **(node_settings or {})}

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
        return path

    def start(self) -> None:
        cfg = self._write_config()
        procs = [self._spawn(f"shardchat-i{inst['number']}",
                             [sys.executable, *self._profiler(inst["number"]), "-m", "shardchat",
                              "node", "--config", str(cfg), "--instance", str(inst["number"])],
                             idx)
                 for idx, inst in enumerate(self.instances)]
        for proc, inst in zip(procs, self.instances, strict=True):
            proc.wait_http(f"http://127.0.0.1:{inst['port']}{urls.healthz_path(inst['number'])}")

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

    def endpoint(self, room: Any, member: int) -> Endpoint:
        port, path, namespace = room
        return Endpoint("127.0.0.1", port, path, namespace)
