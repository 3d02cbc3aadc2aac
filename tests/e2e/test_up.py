"""`shardchat up` end to end: start, chat, Ctrl-C, start again, the history is still there.

Readiness is the JSON of ``--ready-file`` (the URL, the supervisor's pid, each node's pid and
ports), never the lines printed for people. The output is still collected, to show when a
run fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import psutil
import socketio

from shardchat.cluster.nodeproc import ADDRESS_IN_USE
from tests.support import (
    PORT_ATTEMPTS,
    ROOT,
    GiveUp,
    free_port,
    http_json,
    page_redirect,
    wait_until,
)

START_TIMEOUT = 90.0  # seconds for every node and the router: the machine may be loaded
PORT_TAKEN = "is in use"  # how `shardchat up` reports a port it cannot have


class UpProcess:
    """A `shardchat up` subprocess in ``cwd``, with ``--ready-file`` in that directory."""

    def __init__(self, cwd: Path, nodes: int, port: int):
        self.cwd = cwd
        self.port = port
        self.ready_path = cwd / "up-ready.json"
        self.ready_path.unlink(missing_ok=True)
        # cwd is the cluster's own directory, so this tree goes first on the path: the
        # supervisor and its nodes must run the code under test, not another copy.
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardchat", "up", "--nodes", str(nodes), "--port", str(port),
             "--ready-file", str(self.ready_path)],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        self._reader.join(timeout=5 if self.proc.poll() is not None else 0)
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """The ready file's JSON once this process wrote it; raises GiveUp if it exits."""
        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise GiveUp(f"`shardchat up` exited with {self.proc.returncode} before it "
                             f"was ready:\n{self.output()}")
            info = json.loads(self.ready_path.read_text())  # absent until written whole
            return info if info["pid"] == self.proc.pid else None
        try:
            return wait_until(ready, timeout, interval=0.1, what="shardchat up's ready file")
        except TimeoutError:
            raise AssertionError(f"`shardchat up` wrote no {self.ready_path.name} within "
                                 f"{timeout}s:\n{self.output()}") from None

    def interrupt(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_up(cwd: Path, nodes: int) -> tuple[UpProcess, dict[str, Any]]:
    """A first `shardchat up` in ``cwd``, ready. Its ports are picked before it starts; when
    another process took one meanwhile, it starts over in a clean directory with new ones."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        up = UpProcess(cwd, nodes, free_port())
        try:
            return up, up.wait_ready()
        except GiveUp as exc:
            up.kill()
            lost_a_port = PORT_TAKEN in str(exc) or ADDRESS_IN_USE in str(exc).lower()
            if not lost_a_port or attempt == PORT_ATTEMPTS:
                raise AssertionError(str(exc)) from None
            shutil.rmtree(cwd / ".shardchat", ignore_errors=True)
        except BaseException:
            up.kill()
            raise
    raise AssertionError("unreachable")


async def _join(base: str, room: dict, *, send: str | None = None) -> tuple[dict, dict | None]:
    """Join the room through the router; optionally send one message. (welcome, ack)"""
    sio = socketio.AsyncClient(reconnection=False)
    ns = room["namespace"]
    welcome: asyncio.Future = asyncio.get_running_loop().create_future()
    sio.on("welcome", lambda data: welcome.done() or welcome.set_result(data), namespace=ns)
    await sio.connect(base, socketio_path=room["socketio_path"], namespaces=[ns],
                      transports=["websocket"], auth={"name": "ada"}, wait_timeout=10)
    try:
        data = await asyncio.wait_for(welcome, 10)
        ack = None
        if send is not None:
            ack = await sio.call("message", {"text": send, "client_id": "m1"}, namespace=ns,
                                 timeout=10)
        return data, ack
    finally:
        await sio.disconnect()


def assert_describes_the_cluster(info: dict[str, Any], up: UpProcess, nodes: int) -> None:
    """The ready file names the URL and every node, each a live child on its own ports."""
    assert info["url"] == f"http://127.0.0.1:{up.port}"
    assert [n["instance"] for n in info["nodes"]] == list(range(1, nodes + 1))
    children = {p.pid for p in psutil.Process(up.proc.pid).children()}
    for node in info["nodes"]:
        assert node["pid"] in children, (node, children)
        status, body = http_json("GET", f"http://127.0.0.1:{node['port']}/i{node['instance']}"
                                 "/healthz")
        assert status == 200 and body["instance"] == node["instance"], body


async def test_up_runs_a_cluster_stops_cleanly_and_keeps_history(tmp_path):
    up, info = await asyncio.to_thread(start_up, tmp_path, 2)
    try:
        await asyncio.to_thread(assert_describes_the_cluster, info, up, 2)
        base = info["url"]
        status, room = await asyncio.to_thread(http_json, "POST", f"{base}/api/rooms",
                                               {"name": "kept"})
        assert status == 201, room
        assert room["url"].startswith(base + room["path"])
        _, ack = await _join(base, room, send="remember me")
        assert ack["ok"] is True
        seq = ack["seq"]
        assert await asyncio.to_thread(up.interrupt) == 0, up.output()
        assert not up.ready_path.exists(), "the ready file outlived the cluster"
    finally:
        up.kill()

    config_text = (tmp_path / ".shardchat" / "shardchat.toml").read_text()
    up = UpProcess(tmp_path, 2, up.port)  # the same ports again: no fresh pick here
    try:
        info = await asyncio.to_thread(up.wait_ready)
        await asyncio.to_thread(assert_describes_the_cluster, info, up, 2)
        assert (tmp_path / ".shardchat" / "shardchat.toml").read_text() == config_text
        welcome, _ = await _join(info["url"], room)
        texts = [(m["seq"], m["text"]) for m in welcome["history"]]
        assert (seq, "remember me") in texts
        assert await asyncio.to_thread(up.interrupt) == 0, up.output()
    finally:
        up.kill()


async def test_up_shrinks_by_moving_the_rooms_off_and_grows_again(tmp_path):
    """3 -> 2 nodes over a data directory with rooms on node 3: its rooms are moved to the
    kept instances (nothing lost, the old links still lead there), node 3 is stopped and
    leaves the config; then 2 -> 3 adds an instance again."""
    up, info = await asyncio.to_thread(start_up, tmp_path, 3)
    config_path = tmp_path / ".shardchat" / "shardchat.toml"
    secret = tomllib.loads(config_path.read_text())["cluster"]["secret"]
    auth = {"Authorization": f"Bearer {secret}"}
    third = info["nodes"][2]
    rooms, seqs = [], {}
    try:
        for i in range(6):
            status, room = await asyncio.to_thread(
                http_json, "POST", f"http://127.0.0.1:{third['internal_port']}/internal/rooms",
                {"name": f"on three {i}", "private": False}, auth)
            assert status == 201 and room["instance"] == 3, room
            _, ack = await _join(info["url"], room, send=f"hello {i}")
            assert ack["ok"] is True
            rooms.append(room)
            seqs[room["id"]] = ack["seq"]
        assert await asyncio.to_thread(up.interrupt) == 0, up.output()
    finally:
        up.kill()

    up = UpProcess(tmp_path, 2, up.port)
    try:
        info = await asyncio.to_thread(up.wait_ready, START_TIMEOUT * 2)
        output = up.output()
        assert [n["instance"] for n in info["nodes"]] == [1, 2], output
        assert "removed instance 3" in output, output
        moved_lines = [line for line in output.splitlines()
                       if line.strip().startswith("moved ") and "instance 3 ->" in line]
        assert len(moved_lines) == len(rooms), output
        print("\n" + "\n".join(line for line in output.splitlines()
                               if "moved" in line or "removed" in line))
        numbers = [i["number"] for i in tomllib.loads(config_path.read_text())["instances"]]
        assert numbers == [1, 2]
        for room in rooms:
            owner = None
            for node in info["nodes"]:
                status, state = await asyncio.to_thread(
                    http_json, "GET",
                    f"http://127.0.0.1:{node['internal_port']}/internal/rooms/{room['id']}",
                    None, auth)
                if status == 200 and state["state"] == "owner":
                    owner = state["room"]
            assert owner is not None, room
            welcome, _ = await _join(info["url"], owner)
            assert [(m["seq"], m["text"]) for m in welcome["history"]] == \
                [(seqs[room["id"]], f"hello {rooms.index(room)}")]
            # the old link reaches the default rule, and is sent where the room is now
            status, location = await asyncio.to_thread(
                page_redirect, info["url"], room["path"])
            assert status == 308 and location == owner["path"], (status, location)
        assert await asyncio.to_thread(up.interrupt) == 0, up.output()
    finally:
        up.kill()

    up = UpProcess(tmp_path, 3, up.port)
    try:
        info = await asyncio.to_thread(up.wait_ready)
        assert [n["instance"] for n in info["nodes"]] == [1, 2, 3]
        assert "added  instance 3" in up.output(), up.output()
        numbers = [i["number"] for i in tomllib.loads(config_path.read_text())["instances"]]
        assert numbers == [1, 2, 3]
        assert await asyncio.to_thread(up.interrupt) == 0, up.output()
    finally:
        up.kill()


