"""Shared test helpers: free loopback ports, config files, real node processes.

Every test gets its own ports and data directory, so tests run in parallel (pytest-xdist).
Nodes are real ``shardchat node`` processes; waiting is always on an observable event
(an HTTP answer, a process exit) with a deadline, never a bare sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shardchat.cluster.up import free_port
from shardchat.config import dump_toml

ROOT = Path(__file__).resolve().parents[1]
SECRET = "test-secret-please-change"
# Tests stop nodes with SIGTERM all the time; without the key the grace would follow the ALB
# health checks (20 s with the [aws] defaults), so every test config sets a short one.
TEST_DRAIN_GRACE = 1.0


# Every test client comes from 127.0.0.1, so under the default per-address limits a whole
# test module would be throttled as one client. Tests of the limits set their own.
TEST_RATE_LIMITS = {"rate_limit_messages": 100_000, "rate_limit_typing": 100_000,
                    "rate_limit_history": 100_000, "rate_limit_joins": 100_000,
                    "rate_limit_rooms": 100_000}


def write_config(path: Path, *, instances: list[dict[str, Any]], cluster: dict | None = None,
                 node: dict | None = None, aws: dict | None = None) -> Path:
    """Write a TOML config; returns its path. ``node.drain_grace_seconds`` defaults to
    ``TEST_DRAIN_GRACE`` (pass it in ``node`` to test another)."""
    node = {"drain_grace_seconds": TEST_DRAIN_GRACE, **(node or {})}
    data: dict[str, Any] = {"cluster": cluster or {}, "instances": instances}
    data.update((name, table) for name, table in (("node", node), ("aws", aws)) if table)
    path.write_text(dump_toml(data) + "\n")
    return path


def make_cluster_config(tmp: Path, n: int = 1, *, node: dict | None = None,
                        aws: dict | None = None, public_url: str | None = None,
                        name: str = "test") -> tuple[Path, list[dict[str, Any]]]:
    """A config for ``n`` loopback nodes with fresh ports; returns (path, instances).
    ``node`` settings override ``TEST_RATE_LIMITS``."""
    node = {**TEST_RATE_LIMITS, **(node or {})}
    instances = [{"number": i, "host": "127.0.0.1", "port": free_port(),
                  "internal_port": free_port()} for i in range(1, n + 1)]
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


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns truthy; raise with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}"
                       + (f" (last error: {last_exc!r})" if last_exc else ""))


class NodeProcess:
    """A real ``shardchat node`` subprocess."""

    def __init__(self, config_path: Path, instance: dict[str, Any], log_dir: Path,
                 env: dict[str, str] | None = None):
        self.config_path = config_path
        self.instance = instance
        self.number = instance["number"]
        self.port = instance["port"]
        self.internal_port = instance["internal_port"]
        self.log_path = log_dir / f"node-{self.number}.log"
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self.internal_port}"

    def start(self, wait: bool = True) -> NodeProcess:
        env = dict(os.environ)
        env.update(self.env or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardchat", "node", "--config", str(self.config_path),
             "--instance", str(self.number)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        log.close()
        if wait:
            self.wait_healthy()
        return self

    def healthz(self) -> tuple[int, Any]:
        return http_json("GET", f"{self.base_url}/i{self.number}/healthz", timeout=2)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        def ok():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.number} exited with {self.proc.returncode}:\n"
                                   + self.log())
            return self.healthz()[0] == 200
        wait_until(ok, timeout, what=f"node {self.number} healthy")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait for the graceful exit; returns the exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout=timeout)
        return self.proc.returncode if self.proc else 0

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.terminate(timeout=10)
        self.kill()


@contextlib.contextmanager
def running_nodes(tmp: Path, n: int = 1, **kwargs) -> Iterator[list[NodeProcess]]:
    """Start ``n`` nodes on fresh loopback ports; stop them on exit."""
    cfg_path, instances = make_cluster_config(tmp, n, **kwargs)
    nodes = [NodeProcess(cfg_path, inst, tmp) for inst in instances]
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_healthy()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
