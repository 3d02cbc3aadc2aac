"""Shared test helpers: free loopback ports, config files, real node processes.

Every test gets its own ports and data directory, so tests run in parallel (pytest-xdist).
Nodes are real ``shardchat node`` processes; waiting is always on an observable event
(an HTTP answer, a process exit) with a deadline, never a bare sleep. Sync tests wait with
``wait_until``; async tests with ``await async_wait_until(...)``, which polls with
``asyncio.sleep`` so the clients living on the event loop keep running meanwhile.

Ports. A node's ports must be in its config file before it starts, so they are picked with
``free_port()`` (bind to port 0, read the number, close): between that close and the node's
own bind, another process (the other xdist worker, another test run on this machine) may take
the port. Rather than hand bound sockets to a node (the product has no way to inherit one),
starting is retried: when a node exits during start-up because its address is in use
(``nodeproc.Exited.address_in_use``, read from its log), ``start_nodes`` stops every node it
started, gives all of them fresh ports, rewrites the config file and starts them again, up
to ``PORT_ATTEMPTS`` times. All nodes of one config start together through ``start_nodes``
(``running_nodes`` does), so no node keeps a stale view of a peer's ports. A restart of a
node that ran before keeps its ports, since its peers know them. Servers a test runs in its
own process bind port 0 and read the port back (nothing to race), and a port that must
refuse connections is held bound without listening (``refusing_port``).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shardchat.cluster import nodeproc
from shardchat.cluster.up import free_port
from shardchat.config import dump_toml
from shardchat.internal_api import auth_header

ROOT = Path(__file__).resolve().parents[1]
SECRET = "test-secret-please-change"
AUTH = auth_header(SECRET)  # what a peer sends to a node's internal listener
# Tests stop nodes with SIGTERM all the time; without the key the grace would follow the ALB
# health checks (20 s with the [aws] defaults), so every test config sets a short one.
TEST_DRAIN_GRACE = 1.0
HEALTHY_TIMEOUT = 60.0  # seconds a node may take to start: generous for a loaded 2-core box
PORT_ATTEMPTS = 5       # starts with fresh ports before a port clash fails the test


CHROMIUM = "/usr/bin/chromium"  # Debian's package: what the browser tests drive
# headless as root, and quiet: the machine's closed network refuses Chromium's own traffic
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def missing_browser() -> str | None:
    """What the browser tests need and this machine lacks, or None when they can run."""
    if not Path(CHROMIUM).exists():
        return (f"needs Debian's chromium at {CHROMIUM}: install it with "
                "`apt-get install chromium` (or run `make test`, which does)")
    if importlib.util.find_spec("playwright") is None:
        return "needs the Python package playwright: pip install -e '.[dev]'"
    return None


def in_ci() -> bool:
    """CI=true: a test that cannot run must fail there, a silent skip would pass the run."""
    return os.environ.get("CI", "").lower() == "true"


def require_browser() -> None:
    """In a browser test: go on, or skip on a laptop / fail under CI=true, saying what to
    install."""
    missing = missing_browser()
    if missing is None:
        return
    if in_ci():
        pytest.fail(f"CI=true: the browser tests must run here, but this machine {missing}",
                    pytrace=False)
    pytest.skip(missing)


def browser_api(timeout_ms: int) -> Any:
    """For a browser test module, at import: Playwright's sync API with ``expect`` waiting up
    to ``timeout_ms``; without a browser, the module is skipped on a laptop and fails to
    collect under CI=true, saying what to install."""
    missing = missing_browser()
    if missing is not None:
        if in_ci():
            pytest.fail(f"CI=true: the browser tests must run here, but this machine {missing}",
                        pytrace=False)
        pytest.skip(missing, allow_module_level=True)
    from playwright import sync_api

    sync_api.expect.set_options(timeout=timeout_ms)
    return sync_api


# Every test client comes from 127.0.0.1, so under the default per-address limits a whole
# test module would be throttled as one client. Tests of the limits set their own.
TEST_RATE_LIMITS = {"rate_limit_messages": 100_000, "rate_limit_typing": 100_000,
                    "rate_limit_history": 100_000, "rate_limit_members": 100_000,
                    "rate_limit_joins": 100_000,
                    "rate_limit_rooms": 100_000, "rate_limit_lookups": 100_000}


def write_config(path: Path, *, instances: list[dict[str, Any]], cluster: dict | None = None,
                 node: dict | None = None, aws: dict | None = None) -> Path:
    """Write a TOML config; returns its path. ``node.drain_grace_seconds`` defaults to
    ``TEST_DRAIN_GRACE`` (pass it in ``node`` to test another)."""
    node = {"drain_grace_seconds": TEST_DRAIN_GRACE, **(node or {})}
    data: dict[str, Any] = {"cluster": cluster or {}, "instances": instances}
    data.update((name, table) for name, table in (("node", node), ("aws", aws)) if table)
    path.write_text(dump_toml(data) + "\n")
    return path


def distinct_free_ports(count: int) -> list[int]:
    """``count`` different free ports: the OS may hand the same just-released port to two
    ``free_port()`` calls in a row, and a node whose two listeners share one is refused."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def make_cluster_config(tmp: Path, n: int = 1, *, node: dict | None = None,
                        aws: dict | None = None, public_url: str | None = None,
                        name: str = "test", engine: str | None = None
                        ) -> tuple[Path, list[dict[str, Any]]]:
    """A config for ``n`` loopback nodes with fresh ports; returns (path, instances).
    ``node`` settings override ``TEST_RATE_LIMITS``; ``engine`` sets ``node.engine``."""
    node = {**TEST_RATE_LIMITS, **(node or {})}
    if engine is not None:
        node["engine"] = engine
    ports = iter(distinct_free_ports(2 * n))
    instances = [{"number": i, "host": "127.0.0.1", "port": next(ports),
                  "internal_port": next(ports)} for i in range(1, n + 1)]
    cluster = {"name": name, "public_url": public_url or "http://127.0.0.1:8080",
               "secret": SECRET, "data_dir": str(tmp / "data")}
    path = write_config(tmp / "shardchat.toml", instances=instances, cluster=cluster,
                        node=node, aws=aws)
    return path, instances


def http_json(method: str, url: str, body: Any = None, headers: dict | None = None,
              timeout: float = 5.0) -> tuple[int, Any]:
    """A plain blocking HTTP call returning (status, parsed JSON or text)."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
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


class GiveUp(Exception):
    """Raised by a predicate to end a wait at once: the condition can never come true."""


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns truthy; raise with ``what`` after ``timeout``.

    A predicate that raises is asked again (the thing may not be up yet), except for
    ``GiveUp``, which ends the wait. Blocking: async tests use ``async_wait_until``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except GiveUp:
            raise
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(_timed_out(timeout, what, last_exc))


async def async_wait_until(predicate: Callable[[], Any | Awaitable[Any]],
                           timeout: float = 10.0, interval: float = 0.05,
                           what: str = "condition") -> Any:
    """``wait_until`` for async tests: ``predicate`` may be a plain or an async callable,
    and the polling sleeps with ``asyncio.sleep``, so the event loop (and every client on
    it) keeps running. A predicate that blocks (a plain HTTP call) goes to a thread via
    ``in_thread``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_exc: Exception | None = None
    while loop.time() < deadline:
        try:
            value = predicate()
            if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
                value = await value
            if value:
                return value
        except GiveUp:
            raise
        except Exception as exc:
            last_exc = exc
        await asyncio.sleep(interval)
    raise TimeoutError(_timed_out(timeout, what, last_exc))


def in_thread(fn: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    """A blocking predicate as an async one (for ``async_wait_until``)."""
    return lambda: asyncio.to_thread(fn)


def _timed_out(timeout: float, what: str, last_exc: Exception | None) -> str:
    return (f"timed out after {timeout}s waiting for {what}"
            + (f" (last error: {last_exc!r})" if last_exc else ""))


@contextlib.contextmanager
def refusing_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port that refuses connections for as long as the block runs: bound (so nobody
    else can take it) but never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        yield s.getsockname()[1]


def bound_port(runner: Any) -> int:
    """The port an aiohttp runner started on port 0 actually listens on."""
    return runner.addresses[0][1]


class NodeProcess(nodeproc.NodeProcess):
    """A real ``shardchat node`` subprocess (``shardchat/cluster/nodeproc.py``) with what
    tests add: its ports are read from the ``instance`` dict, which ``start_nodes`` updates
    when it had to pick fresh ports, and a first start retries a port clash."""

    def __init__(self, config_path: Path, instance: dict[str, Any], log_dir: Path,
                 env: dict[str, str] | None = None):
        super().__init__(config_path, instance["number"], host="127.0.0.1",
                         port=instance["port"],
                         log_path=log_dir / f"node-{instance['number']}.log", env=env, cwd=ROOT)
        self.instance = instance

    @property
    def port(self) -> int:
        return self.instance["port"]

    @property
    def internal_port(self) -> int:
        return self.instance["internal_port"]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self.internal_port}"

    def start(self, wait: bool = True) -> NodeProcess:
        """Start the node (and wait until healthy). A first start retries a port clash
        with fresh ports (``start_nodes``); a restart keeps the ports its peers know."""
        if wait and self.proc is None:
            start_nodes([self])
            return self
        self.spawn()
        if wait:
            self.wait_ready(HEALTHY_TIMEOUT)
        return self

    def healthz(self) -> tuple[int, Any]:
        return http_json("GET", f"{self.base_url}/i{self.number}/healthz", timeout=2)

    def log(self) -> str:
        """The end of the log file (every run of the node)."""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def start_nodes(nodes: Iterable[NodeProcess], timeout: float = HEALTHY_TIMEOUT,
                repicked: Callable[[], None] | None = None) -> None:
    """Start nodes of one config together and wait until each is healthy. When one lost a
    port to another process, all of them get fresh ports (every config file of the group
    is rewritten, then ``repicked`` runs, for a caller whose configs differ on purpose)
    and start again; see the module docstring."""
    nodes = list(nodes)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        for node in nodes:
            node.spawn()
        try:
            for node in nodes:
                node.wait_ready(timeout)
            for node in nodes:  # a ready check may have reached whatever took its port
                node.check()
            return
        except (nodeproc.Exited, nodeproc.NotReady) as exc:
            if not _lost_a_port(nodes, exc):
                raise
            for node in nodes:
                node.stop()
            if attempt == PORT_ATTEMPTS:
                raise
            repick_ports(nodes)
            if repicked is not None:
                repicked()


def _lost_a_port(nodes: list[NodeProcess], exc: Exception) -> bool:
    """Whether a start failed because a node could not bind: said by its own exit, or, when
    another node timed out waiting for it (a node that fences waits for its peers), by the
    exit of any node of the group. A node whose port another test's node holds can even
    pass its ready check against that node, and die later."""
    if isinstance(exc, nodeproc.Exited):
        return exc.address_in_use
    for node in nodes:
        try:
            node.check()
        except nodeproc.Exited as exited:
            if exited.address_in_use:
                return True
    return False


def repick_ports(nodes: Iterable[NodeProcess]) -> None:
    """Fresh ports for ``nodes``, written to their instance dicts and to every config file
    of the group (each file names every instance, so each gets all the new ports)."""
    nodes = list(nodes)
    for node in nodes:
        node.instance["port"], node.instance["internal_port"] = distinct_free_ports(2)
    ports = {n.number: n.instance for n in nodes}
    for path in dict.fromkeys(n.config_path for n in nodes):
        data = tomllib.loads(path.read_text())
        for inst in data.get("instances", []):
            if inst.get("number") in ports:
                inst["port"] = ports[inst["number"]]["port"]
                inst["internal_port"] = ports[inst["number"]]["internal_port"]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(dump_toml(data) + "\n")
        tmp.replace(path)


@contextlib.contextmanager
def running_nodes(tmp: Path, n: int = 1, **kwargs) -> Iterator[list[NodeProcess]]:
    """Start ``n`` nodes on fresh loopback ports; stop them on exit."""
    cfg_path, instances = make_cluster_config(tmp, n, **kwargs)
    nodes = [NodeProcess(cfg_path, inst, tmp) for inst in instances]
    try:
        start_nodes(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@contextlib.contextmanager
def running_up(tmp: Path, nodes: int = 2) -> Iterator[str]:
    """``shardchat up --nodes N --port P`` in ``tmp``; yields its URL once its ready file
    says it serves, and stops it with SIGINT (SIGKILL if it does not exit in time)."""
    port = free_port()
    log_path = tmp / "up.log"
    ready_path = tmp / "up-ready.json"
    # cwd is the cluster's own directory, so this tree goes on the path explicitly: the
    # router and its nodes must run the code under test, not whichever copy is installed.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shardchat", "up", "--nodes", str(nodes), "--port", str(port),
             "--ready-file", str(ready_path)],
            cwd=str(tmp), stdout=log, stderr=subprocess.STDOUT, env=env)

    def ready() -> str | None:
        if proc.poll() is not None:
            raise GiveUp(f"shardchat up exited with {proc.returncode}:\n"
                         + log_path.read_text(errors="replace")[-4000:])
        info = json.loads(ready_path.read_text())  # absent until written whole
        return info["url"] if info["pid"] == proc.pid else None

    try:
        yield wait_until(ready, timeout=90, interval=0.1, what="shardchat up's ready file")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


class JsClient:
    """One run of a Node script of ``tests/js/`` (a client built on the official
    socket.io-client) that prints one JSON event per line; its events in order."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.events: list[dict[str, Any]] = []

    async def next(self, kind: str, timeout: float = 15.0) -> dict[str, Any]:
        """Read lines until an event of ``kind`` arrives (all lines are kept)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(1000):
            line = await asyncio.wait_for(self.proc.stdout.readline(),
                                          max(deadline - loop.time(), 0.01))
            if not line:
                stderr = (await self.proc.stderr.read()).decode(errors="replace")
                raise AssertionError(f"JS client ended before {kind!r}: {self.events}\n"
                                     f"{stderr}")
            event = json.loads(line)
            self.events.append(event)
            if event["event"] == kind:
                return event
        raise AssertionError(f"too many lines before {kind!r}")

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    async def stop(self) -> None:
        """End the script once its outcome is read.

        Over polling the script would otherwise live on: the Engine.IO server answers the
        client's last pending long-poll GET only after ping_interval + ping_timeout.
        """
        if self.proc.returncode is None:
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 15)


def page_redirect(base: str, path: str) -> tuple[int, str | None]:
    """GET a page without following redirects: (status, Location)."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Location")
    finally:
        conn.close()
