"""Stopping: a node always stops, within its bounds, and its clients come back by themselves.

* SIGTERM after official JS clients were refused and went away (or vanished, or went
  silent mid-session) exits 0 within a bound, and the clients' own processes end too;
* a drained client (official JS client, python-socketio) sees a lost transport, not a final
  disconnect, and reconnects by itself with ``last_seq`` once the node is back;
* ``shardchat up`` takes its nodes with it: killed with SIGKILL, its nodes exit; Ctrl-C
  finishes within a bound.

A relay (a TCP forwarder the test can cut, as a load balancer whose target is down) sits
between the reconnecting clients and the node, so the test decides when they can get back
in: after messages they missed were sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio

from shardchat import lifecycle, urls
from shardchat.cluster.up import port_free
from shardchat.node import shutdown
from tests.conftest import acreate_room, open_client
from tests.e2e.test_up import start_up
from tests.support import (
    ROOT,
    NodeProcess,
    async_wait_until,
    http_json,
    in_thread,
    make_cluster_config,
)

pytestmark = pytest.mark.timeout(120)

SCRIPT = Path(__file__).parent / "js" / "client_session.mjs"
HAS_JS = (shutil.which("node") is not None
          and (ROOT / "node_modules" / "socket.io-client" / "package.json").exists())
needs_js = pytest.mark.skipif(not HAS_JS, reason="needs node and node_modules/socket.io-client")

STOP_BOUND = 10.0  # seconds: drain grace (1 s in tests) plus the steps, with a wide margin
# The official client's disconnect reason when a drain closes its session, by transport
LOST_TRANSPORT = {"websocket": "transport close", "polling": "transport error"}


# ---------------------------------------------------------------------------------------
# helpers


class JsSession:
    """One run of client_session.mjs: commands on stdin, events from stdout, in order."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self._taken = 0  # events before this index have been looked at by ``next``

    @classmethod
    async def start(cls, base_url: str, namespace: str, path: str, transport: str,
                    auth: dict, **options: Any) -> JsSession:
        spec = {"url": base_url, "namespace": namespace, "path": path,
                "transports": [transport], "auth": auth, "timeout_ms": 60000, **options}
        proc = await asyncio.create_subprocess_exec(
            "node", str(SCRIPT), json.dumps(spec), cwd=str(ROOT),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def next(self, kind: str, timeout: float = 15.0) -> dict[str, Any]:
        """The next event of ``kind`` after the one ``next`` returned last, reading more
        events until it arrives (every event is kept, in order)."""
        for index in range(self._taken, len(self.events)):
            if self.events[index]["event"] == kind:
                self._taken = index + 1
                return self.events[index]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(1000):
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(),
                                              max(deadline - loop.time(), 0.01))
            except TimeoutError:
                raise AssertionError(f"no {kind!r} from the JS client within {timeout}s: "
                                     f"{self.events}") from None
            if not line:
                err = (await self.proc.stderr.read()).decode(errors="replace")
                raise AssertionError(f"JS client ended before {kind!r}: {self.events}\n{err}")
            event = json.loads(line)
            self.events.append(event)
            if event["event"] == kind:
                self._taken = len(self.events)
                return event
        raise AssertionError(f"too many events before {kind!r}")

    async def command(self, cmd: str, **fields: Any) -> None:
        self.proc.stdin.write((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
        await self.proc.stdin.drain()

    async def exited(self, timeout: float) -> int | None:
        """The exit code once the process ended by itself, or None after ``timeout``."""
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return None

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 10)


class Relay:
    """A loopback TCP forwarder to ``port``; while cut it resets every new connection."""

    def __init__(self, port: int):
        self.port = port
        self.cut = False
        self.server: asyncio.base_events.Server | None = None
        self.pipes: set[asyncio.Task] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.transport.abort()
            return
        pipes = {asyncio.ensure_future(_pipe(reader, up_writer)),
                 asyncio.ensure_future(_pipe(up_reader, writer))}
        self.pipes |= pipes
        await asyncio.wait(pipes)
        self.pipes -= pipes

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.pipes):
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def silent_polling_session(session: aiohttp.ClientSession, base_url: str,
                                 number: int) -> str:
    """Open a long-polling Engine.IO session, get a room refused, then say nothing more:
    a client that went away between two polls. Returns the CONNECT_ERROR it got."""
    url = f"{base_url}{urls.socketio_path(number)}/?EIO=4&transport=polling"
    async with session.get(url) as r:
        opening = await r.text()
    assert opening.startswith("0{"), opening
    sid_url = f"{url}&sid={json.loads(opening[1:])['sid']}"
    ns = urls.room_namespace(number, "gone-away")
    async with session.post(sid_url, data=f'40{ns},{{"name":"quiet"}}') as r:
        assert r.status == 200, await r.text()
    async with session.get(sid_url) as r:
        answer = await r.text()
    assert answer.startswith(f"44{ns},"), answer
    return answer


def sigterm_and_wait(node: NodeProcess, timeout: float) -> tuple[int | None, float]:
    """(exit code or None if still running after ``timeout``, seconds it took)."""
    started = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    try:
        code = node.proc.wait(timeout=timeout)
    except Exception:
        code = None
    return code, time.monotonic() - started


# ---------------------------------------------------------------------------------------
# a node always stops


@needs_js
async def test_sigterm_exits_after_official_clients_were_refused_and_left(tmp_path):
    """The reported hang: official clients over polling and websocket are refused
    (forbidden, not_found, bad_request) and leave; others vanish without a word. SIGTERM
    must still end the node, with 0, within the bound."""
    cfg_path, instances = make_cluster_config(tmp_path, 1)
    node = NodeProcess(cfg_path, instances[0], tmp_path)
    await asyncio.to_thread(node.start)
    try:
        room = await acreate_room(node, "Locked", private=True)
        cases = {"forbidden": (room["namespace"], {"name": "js"}),
                 "not_found": (urls.room_namespace(1, "no-such-room"), {"name": "js"}),
                 "bad_request": (room["namespace"], {"name": "n" * 41,
                                                     "invite": room["invite"]})}
        leaving, vanishing = [], []
        for transport in ("polling", "websocket"):
            for code, (ns, auth) in cases.items():
                js = await JsSession.start(node.base_url, ns, room["socketio_path"],
                                           transport, auth)
                refused = await js.next("connect_error")
                assert refused["data"] == {"code": code}, refused
                if code == "not_found":
                    await js.command("vanish")
                    vanishing.append(js)
                else:
                    await js.command("close")
                    await js.next("closed")
                    leaving.append(js)
        async with aiohttp.ClientSession() as session:
            await silent_polling_session(session, node.base_url, 1)
        # A client that left ends by itself: no long-poll of it is left open on the node
        # (engineio would answer it only after ping_interval + ping_timeout, 40 s).
        codes = await asyncio.gather(*(js.exited(10) for js in leaving))
        assert codes == [0] * len(leaving), [js.events for js in leaving]
        for js in vanishing:
            assert await js.exited(10) == 0

        code, took = await asyncio.to_thread(sigterm_and_wait, node, STOP_BOUND)
        assert code == 0, f"SIGTERM: still running after {took:.1f}s\n{node.log()}"
        assert "stopped cleanly" in node.log()
    finally:
        node.stop()


async def test_sigterm_is_bounded_by_clients_that_never_read(tmp_path, transport):
    """Sessions that never answer (a WebSocket that ignores the close handshake, a long-poll
    nobody collects, a joined member gone quiet) cannot hold the stop past its bound."""
    cfg_path, instances = make_cluster_config(tmp_path, 1)
    node = NodeProcess(cfg_path, instances[0], tmp_path)
    await asyncio.to_thread(node.start)
    try:
        room = await acreate_room(node)
        member = await open_client(node, room, name="member", transport=transport)
        async with aiohttp.ClientSession() as session:
            url = (f"ws://127.0.0.1:{node.port}{urls.socketio_path(1)}/"
                   "?EIO=4&transport=websocket")
            deaf = await session.ws_connect(url, autoclose=False, autoping=False)
            await deaf.send_str(f'40{room["namespace"]},{{"name":"deaf"}}')
            await silent_polling_session(session, node.base_url, 1)
            # deaf never reads again, so it never answers the server's close frame
            code, took = await asyncio.to_thread(sigterm_and_wait, node, STOP_BOUND)
            assert code == 0, f"still running after {took:.1f}s\n{node.log()}"
            await deaf.close()
        await member.close()
    finally:
        node.stop()


async def test_a_second_sigterm_cuts_the_grace_period_short(tmp_path):
    cfg_path, instances = make_cluster_config(tmp_path, 1, node={"drain_grace_seconds": 60})
    node = NodeProcess(cfg_path, instances[0], tmp_path)
    await asyncio.to_thread(node.start)
    try:
        node.proc.send_signal(signal.SIGTERM)
        await async_wait_until(in_thread(lambda: node.healthz()[0] == 503), 10,
                               what="healthz to say draining")
        assert node.proc.poll() is None, "the first SIGTERM starts the 60 s grace period"
        code, took = await asyncio.to_thread(sigterm_and_wait, node, STOP_BOUND)
        assert code == 0, f"still running {took:.1f}s after the second SIGTERM\n{node.log()}"
    finally:
        node.stop()


async def test_a_step_that_ignores_cancellation_is_left_behind_at_its_bound():
    """engineio's long-poll turns a CancelledError into a normal return; a step waiting on
    such code must still end at its bound."""
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await shutdown.run_step("stubborn", stubborn(), 0.2) is False
    assert loop.time() - started < 2
    release.set()


def test_the_final_bound_ends_a_stuck_process_and_says_what_was_open():
    script = textwrap.dedent("""
        import logging, time
        from shardchat.lifecycle import Watchdog
        logging.basicConfig(level="INFO")
        Watchdog(0.5, lambda: "2 Engine.IO sessions", lambda: 0).arm()
        time.sleep(60)  # a stop stuck for good
    """)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 20
    assert "did not finish within 0.5 s" in proc.stderr, proc.stderr
    assert "Still open: 2 Engine.IO sessions" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------
# drained clients come back by themselves


async def restart_on_same_ports(node: NodeProcess) -> None:
    """Start the node again; its ports may take a moment to be free to bind."""
    await async_wait_until(lambda: port_free("127.0.0.1", node.port)
                           and port_free("127.0.0.1", node.internal_port), 10,
                           what="the node's ports to be free")
    await asyncio.to_thread(node.start)


async def send_missed(node: NodeProcess, room: dict, texts: list[str]) -> list[int]:
    """Messages sent while the drained client is away; returns their seqs."""
    sender = await open_client(node, room, name="sender", transport=["websocket"])
    try:
        return [(await sender.send_ok(text))["seq"] for text in texts]
    finally:
        await sender.close()


@needs_js
@pytest.mark.parametrize("js_transport", ["websocket", "polling"])
async def test_official_client_reconnects_after_a_drain_and_recovers(tmp_path, js_transport):
    cfg_path, instances = make_cluster_config(tmp_path, 1)
    node = NodeProcess(cfg_path, instances[0], tmp_path)
    await asyncio.to_thread(node.start)
    relay = Relay(node.port)
    base = await relay.start()
    js = None
    try:
        room = await acreate_room(node, "Comes back")
        js = await JsSession.start(base, room["namespace"], room["socketio_path"],
                                   js_transport, {"name": "js"}, reconnection_delay_ms=200,
                                   reconnection_delay_max_ms=1000)
        await js.next("welcome")
        await js.command("emit", event="message", data={"text": "before", "client_id": "b"})
        assert (await js.next("ack"))["data"]["seq"] == 1

        relay.cut = True  # its reconnects fail until the test lets it back in
        code, took = await asyncio.to_thread(sigterm_and_wait, node, STOP_BOUND)
        assert code == 0, f"still running after {took:.1f}s\n{node.log()}"
        gone = await js.next("disconnect")
        # a lost transport, after which the client reconnects by itself ("active")
        assert gone["reason"] == LOST_TRANSPORT[js_transport], gone
        assert gone["active"] is True, gone

        await restart_on_same_ports(node)
        assert await send_missed(node, room, ["missed 1", "missed 2"]) == [2, 3]
        relay.cut = False
        back = await js.next("welcome", timeout=20)
        connecting = [e for e in js.events if e["event"] == "connecting"]
        assert connecting[-1]["auth"] == {"name": "js", "last_seq": 1}, connecting
        assert back["data"]["recovered"] is True, back
        assert [(m["seq"], m["text"]) for m in back["data"]["history"]] == [
            (2, "missed 1"), (3, "missed 2")]
        await js.command("close")
    finally:
        if js is not None:
            await js.kill()
        await relay.close()
        node.stop()


async def test_python_client_reconnects_after_a_drain_and_recovers(tmp_path, transport):
    cfg_path, instances = make_cluster_config(tmp_path, 1)
    node = NodeProcess(cfg_path, instances[0], tmp_path)
    await asyncio.to_thread(node.start)
    relay = Relay(node.port)
    base = await relay.start()
    sio = socketio.AsyncClient(reconnection=True, reconnection_delay=0.2,
                               reconnection_delay_max=1, handle_sigint=False)
    try:
        room = await acreate_room(node, "Comes back")
        ns = room["namespace"]
        seen: list[int] = []
        welcomes: asyncio.Queue = asyncio.Queue()
        reasons: asyncio.Queue = asyncio.Queue()
        auths: list[dict] = []

        def auth() -> dict:
            data = {"name": "py", **({"last_seq": max(seen)} if seen else {})}
            auths.append(data)
            return data

        def on_welcome(data: dict) -> None:
            seen.extend([data["last_seq"], *(m["seq"] for m in data["history"])])
            welcomes.put_nowait(data)

        sio.on("welcome", on_welcome, namespace=ns)
        sio.on("message", lambda m: seen.append(m["seq"]), namespace=ns)
        sio.on("disconnect", lambda reason=None: reasons.put_nowait(reason), namespace=ns)
        await sio.connect(base, namespaces=[ns], socketio_path=room["socketio_path"],
                          transports=transport, auth=auth, wait_timeout=10)
        await asyncio.wait_for(welcomes.get(), 10)
        ack = await sio.call("message", {"text": "before"}, namespace=ns, timeout=10)
        assert ack["seq"] == 1

        relay.cut = True
        code, took = await asyncio.to_thread(sigterm_and_wait, node, STOP_BOUND)
        assert code == 0, f"still running after {took:.1f}s\n{node.log()}"
        reason = await asyncio.wait_for(reasons.get(), 10)
        # not "server disconnect", after which python-socketio would not reconnect
        assert reason == sio.reason.TRANSPORT_ERROR, reason

        await restart_on_same_ports(node)
        assert await send_missed(node, room, ["missed 1", "missed 2"]) == [2, 3]
        relay.cut = False
        back = await asyncio.wait_for(welcomes.get(), 20)
        assert auths[-1] == {"name": "py", "last_seq": 1}, auths
        assert back["recovered"] is True, back
        assert [m["text"] for m in back["history"]] == ["missed 1", "missed 2"]
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sio.disconnect(), 10)
        await relay.close()
        node.stop()


# ---------------------------------------------------------------------------------------
# `shardchat up` and its nodes


def node_pids(up_pid: int) -> list[int]:
    """The pids of the processes whose parent is ``up_pid`` (its nodes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == up_pid:
                pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped has stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def up_node_ports(cwd: Path) -> list[int]:
    data = tomllib.loads((cwd / ".shardchat" / "shardchat.toml").read_text())
    return [p for inst in data["instances"] for p in (inst["port"], inst["internal_port"])]


async def open_silent_sessions(base: str, nodes: int) -> None:
    """One silent long-polling session on every node, through the router."""
    async with aiohttp.ClientSession() as session:
        for n in range(1, nodes + 1):
            await silent_polling_session(session, base, n)


def test_a_node_whose_supervisor_is_already_gone_stops_by_itself(tmp_path):
    """The supervisor died before the node could ask for the parent-death signal: the node
    sees that its parent is not the pid it was given, drains and exits 0."""
    cfg_path, instances = make_cluster_config(tmp_path, 1)
    # the node's parent is this process; any other pid is a supervisor it no longer has
    gone = os.getppid()
    node = NodeProcess(cfg_path, instances[0], tmp_path,
                       env={lifecycle.PARENT_PID_ENV: str(gone)})
    node.start(wait=False)
    try:
        assert node.proc.wait(timeout=30) == 0, node.log()
        assert f"parent process {gone} is gone" in node.log()
        assert "stopped cleanly" in node.log()
    finally:
        node.stop()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_up_killed_takes_its_nodes_with_it(tmp_path):
    up, info = await asyncio.to_thread(start_up, tmp_path, 2)
    pids: list[int] = []
    try:
        base = info["url"]
        pids = [n["pid"] for n in info["nodes"]]
        assert sorted(pids) == sorted(node_pids(up.proc.pid)), pids
        await open_silent_sessions(base, 2)
        up.proc.send_signal(signal.SIGKILL)
        up.proc.wait(timeout=10)
        await async_wait_until(lambda: not any(alive(p) for p in pids), 20, 0.1,
                               "the nodes of the killed `shardchat up` to exit")
        ports = up_node_ports(tmp_path)
        assert all(port_free("127.0.0.1", p) for p in ports), ports
        logs = [(tmp_path / ".shardchat" / "logs" / f"node-{n}.log").read_text()
                for n in (1, 2)]
        assert all("stopped cleanly" in text for text in logs), logs
    finally:
        up.kill()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_up_interrupted_stops_within_its_bound(tmp_path):
    up, info = await asyncio.to_thread(start_up, tmp_path, 2)
    try:
        base = info["url"]
        status, room = await asyncio.to_thread(http_json, "POST", f"{base}/api/rooms",
                                               {"name": "open"})
        assert status == 201, room
        await open_silent_sessions(base, 2)
        started = time.monotonic()
        code = await asyncio.to_thread(up.interrupt, 15)
        took = time.monotonic() - started
        assert code == 0, up.output()
        assert took < 15
        assert "stopped." in up.output().splitlines(), up.output()
    finally:
        up.kill()
