"""`shardchat up` end to end: start, chat, Ctrl-C, start again, the history is still there."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import socketio

from tests.support import ROOT, free_port, http_json

URL_LINE = re.compile(r"open\s+(http://\S+?)/?$")


class UpProcess:
    """A `shardchat up` subprocess whose output lines are read as they come."""

    def __init__(self, cwd: Path, nodes: int, port: int):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardchat", "up", "--nodes", str(nodes), "--port", str(port)],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        """The first output line (from here on) matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            m = pattern.search(line)
            if m:
                return m
        raise AssertionError(f"`shardchat up` printed no {pattern.pattern!r} within "
                             f"{timeout}s:\n" + "\n".join(self.seen))

    def wait_for_url(self) -> str:
        url = self.wait_for(URL_LINE).group(1)
        self.wait_for(re.compile("Ctrl-C to stop"), timeout=5)
        return url

    def interrupt(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


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


async def test_up_runs_a_cluster_stops_cleanly_and_keeps_history(tmp_path):
    port = free_port()
    up = UpProcess(tmp_path, 2, port)
    try:
        base = up.wait_for_url()
        assert base == f"http://127.0.0.1:{port}"
        status, room = http_json("POST", f"{base}/api/rooms", {"name": "kept"})
        assert status == 201, room
        assert room["url"].startswith(base + room["path"])
        _, ack = await _join(base, room, send="remember me")
        assert ack["ok"] is True
        seq = ack["seq"]
        assert up.interrupt() == 0
    finally:
        up.kill()

    config_text = (tmp_path / ".shardchat" / "shardchat.toml").read_text()
    up = UpProcess(tmp_path, 2, port)
    try:
        base = up.wait_for_url()
        assert (tmp_path / ".shardchat" / "shardchat.toml").read_text() == config_text
        welcome, _ = await _join(base, room)
        texts = [(m["seq"], m["text"]) for m in welcome["history"]]
        assert (seq, "remember me") in texts
        assert up.interrupt() == 0
    finally:
        up.kill()
