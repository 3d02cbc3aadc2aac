"""The local router: ALB-like forwarding of HTTP, long-polling and WebSockets.

Two kinds of targets: small in-process HTTP servers that echo what reached them (to see
headers, bodies and streaming exactly), and real ``shardchat node`` processes (to see that
a room's page, polling and websocket all reach the node that owns the room).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import subprocess
import sys

import aiohttp
import psutil
import pytest
import socketio
from aiohttp import web

from shardchat import urls
from shardchat.cluster.nodeproc import ADDRESS_IN_USE
from shardchat.cluster.router import HealthSettings, Router, RouterLimits, serve
from shardchat.cluster.rules import Rule, RuleSet, build_rules
from shardchat.listener import ListenerTimeouts
from tests.conftest import create_room
from tests.support import (
    PORT_ATTEMPTS,
    ROOT,
    GiveUp,
    async_wait_until,
    bound_port,
    free_port,
    http_json,
    refusing_port,
    running_nodes,
)
from tests.test_listener import trickle_headers


class EchoTarget:
    """A stand-in target for instance N that reports what the router sent it."""

    def __init__(self, number: int):
        self.number = number
        self.port = 0  # bound on the first start; a restart takes the same port again
        self.healthy = True
        self.release = asyncio.Event()
        self.bodies: list[int] = []  # length of every request body read in full
        self._runner: web.AppRunner | None = None

    async def start(self) -> EchoTarget:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = bound_port(self._runner)
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        if path == urls.healthz_path(self.number):
            status = 200 if self.healthy else 503
            return web.json_response({"instance": self.number}, status=status)
        if path.endswith("/ws"):
            return await self.websocket(request)
        if path.endswith("/stream"):
            return await self.stream(request)
        body = await request.read()
        self.bodies.append(len(body))
        return web.json_response({
            "instance": self.number, "method": request.method, "raw": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "length": len(body), "sha256": hashlib.sha256(body).hexdigest()})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """First chunk, then wait until the test saw it through the router, then the rest."""
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first;")
        await asyncio.wait_for(self.release.wait(), 10)
        await resp.write(b"second")
        await resp.write_eof()
        return resp

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT and msg.data.startswith("close:"):
                await ws.close(code=int(msg.data[6:]), message=b"asked to")
            elif msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"{self.number}:{msg.data}")
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws


BIG = RouterLimits(max_body_bytes=64 * 1024 * 1024, max_frame_bytes=64 * 1024 * 1024)


async def start_router(rules: RuleSet, targets: dict[int, tuple[str, int]],
                       limits: RouterLimits = BIG, **kwargs):
    """A router on a port of its own (bound to port 0, so nothing can take it first); by
    default with room for the streaming tests' big bodies."""
    router = Router(rules, targets, limits=limits, **kwargs)
    runner = await serve(router, "127.0.0.1", 0)
    return router, runner, f"http://127.0.0.1:{bound_port(runner)}"


@pytest.fixture
async def echo_cluster():
    """Echo targets 1 and 2 behind a router with the standard rules."""
    targets = [await EchoTarget(n).start() for n in (1, 2)]
    router, runner, base = await start_router(
        build_rules([1, 2]), {t.number: ("127.0.0.1", t.port) for t in targets})
    try:
        yield router, base, targets
    finally:
        for t in targets:
            t.release.set()
        await runner.cleanup()
        for t in targets:
            await t.stop()


async def test_forwarded_headers_arrive_and_hop_by_hop_headers_do_not(echo_cluster):
    _router, base, _ = echo_cluster
    headers = {"X-Forwarded-For": "203.0.113.9", "Connection": "keep-alive, X-Private-Hop",
               "X-Private-Hop": "secret", "X-Custom": "kept", "Cookie": "a=b"}
    async with aiohttp.ClientSession() as s, s.get(f"{base}/i2/echo?x=1", headers=headers) as r:
        body = await r.json()
    assert r.status == 200 and body["instance"] == 2 and body["raw"] == "/i2/echo?x=1"
    got = {k.lower(): v for k, v in body["headers"]}
    assert got["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert got["x-forwarded-proto"] == "http"
    assert got["x-forwarded-port"] == base.rsplit(":", 1)[1]
    assert got["x-custom"] == "kept" and got["cookie"] == "a=b"
    assert "x-private-hop" not in got


async def test_large_body_passes_through_unchanged(echo_cluster):
    _router, base, _ = echo_cluster
    payload = os.urandom(8 * 1024 * 1024)
    async with aiohttp.ClientSession() as s, s.put(f"{base}/i1/upload", data=payload) as r:
        body = await r.json()
    assert r.status == 200 and body["method"] == "PUT"
    assert body["length"] == len(payload)
    assert body["sha256"] == hashlib.sha256(payload).hexdigest()


async def test_chunked_request_body_is_streamed(echo_cluster):
    _router, base, _ = echo_cluster

    async def parts():
        for i in range(50):
            yield bytes([i]) * 10_000

    async with aiohttp.ClientSession() as s, s.post(f"{base}/api/x", data=parts()) as r:
        body = await r.json()
    assert body["length"] == 500_000


async def test_response_is_streamed_not_buffered(echo_cluster):
    _router, base, targets = echo_cluster
    async with aiohttp.ClientSession() as s, s.get(f"{base}/i1/stream") as r:
        first = await asyncio.wait_for(r.content.readexactly(6), 5)
        assert first == b"first;"  # arrived while the target still holds the rest back
        targets[0].release.set()
        assert await asyncio.wait_for(r.content.read(), 5) == b"second"


async def test_unknown_instance_prefix_takes_the_default_action(echo_cluster):
    _router, base, _ = echo_cluster
    seen = set()
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.get(f"{base}/i77/room/x") as r:
                body = await r.json()
                assert body["raw"] == "/i77/room/x"
                seen.add(body["instance"])
    assert seen == {1, 2}  # round-robin over the healthy default targets


async def test_default_action_skips_an_unhealthy_target(echo_cluster):
    router, base, targets = echo_cluster
    targets[1].healthy = False
    # as many failed rounds as take a target out (the background rounds only add failures)
    for _ in range(router.health_settings.unhealthy_threshold):
        await router.check_health()
    assert 2 not in router.healthy(), router.health[2]
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.get(f"{base}/") as r:
                assert (await r.json())["instance"] == 1
        async with s.get(f"{base}/i2/still-routed") as r:  # its own rule still forwards
            assert (await r.json())["instance"] == 2


async def test_dead_target_gives_502_and_unregistered_target_503():
    live = await EchoTarget(1).start()
    dead = contextlib.ExitStack()
    dead_port = dead.enter_context(refusing_port())
    rules = RuleSet(rules=(Rule(1, "/i1/*", 1), Rule(2, "/i2/*", 2), Rule(3, "/i3/*", 3)),
                    default_instances=(1, 2))
    _router, runner, base = await start_router(
        rules, {1: ("127.0.0.1", live.port), 2: ("127.0.0.1", dead_port)})
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/i2/x") as r:  # fail open, then the connection fails
                assert r.status == 502 and (await r.json())["error"] == "bad_gateway"
            async with s.get(f"{base}/i3/x") as r:
                assert r.status == 503 and (await r.json())["error"] == "no_target"
            async with s.get(f"{base}/i1/x") as r:
                assert r.status == 200
    finally:
        await runner.cleanup()
        await live.stop()
        dead.close()


async def test_websocket_frames_and_close_code_pass_both_ways(echo_cluster):
    _router, base, _ = echo_cluster
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"{base}/i2/ws", protocols=("chat",)) as ws:
            assert ws.protocol == "chat"
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "2:hello"
            await ws.send_bytes(b"\x00\x01\x02")
            assert (await ws.receive(timeout=5)).data == b"\x02\x01\x00"
            await ws.send_str("close:4001")
            msg = await ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4001
        async with s.get(f"{base}/i2/ws") as r:  # no upgrade requested: plain HTTP
            assert r.status in (400, 405, 426)


# -- real nodes ----------------------------------------------------------------------------


async def _welcome(base: str, room: dict, transport: str) -> dict:
    sio = socketio.AsyncClient(reconnection=False)
    welcome: asyncio.Future = asyncio.get_running_loop().create_future()
    ns = room["namespace"]
    sio.on("welcome", lambda data: welcome.done() or welcome.set_result(data), namespace=ns)
    await sio.connect(base, socketio_path=room["socketio_path"], namespaces=[ns],
                      transports=[transport], auth={"name": f"via-{transport}"},
                      wait_timeout=10)
    try:
        data = await asyncio.wait_for(welcome, 10)
        ack = await sio.call("message", {"text": f"hi over {transport}"}, namespace=ns,
                             timeout=10)
        assert ack["ok"] is True and ack["seq"] >= 1
        return data
    finally:
        await sio.disconnect()


async def test_room_page_polling_and_websocket_reach_the_owning_node(tmp_path):
    # a short ping interval keeps a polling client's disconnect (it waits for its pending
    # long-poll) from dominating the test's run time
    with running_nodes(tmp_path, 2, node={"ping_interval": 1.0, "ping_timeout": 2.0}) as nodes:
        rules = build_rules([n.number for n in nodes])
        _router, runner, base = await start_router(
            rules, {n.number: ("127.0.0.1", n.port) for n in nodes})
        try:
            async with aiohttp.ClientSession() as s:
                rooms = []
                for i in range(4):
                    async with s.post(f"{base}/api/rooms", json={"name": f"r{i}"}) as r:
                        assert r.status == 201, await r.text()
                        rooms.append(await r.json())
                assert {room["instance"] for room in rooms} == {1, 2}
                for room in rooms[:2]:
                    async with s.get(base + room["path"]) as r:
                        assert r.status == 200 and "html" in r.headers["Content-Type"]
                async with s.get(f"{base}{urls.prefix(77)}/healthz") as r:
                    assert r.status == 421  # default action; the node names the mistake
            for room in rooms[:2]:
                for transport in ("polling", "websocket"):
                    data = await _welcome(base, room, transport)
                    assert data["room"]["id"] == room["id"]
        finally:
            await runner.cleanup()



# -- a target that refuses connections -------------------------------------------------------


async def test_refused_default_request_goes_to_the_next_target_and_the_refuser_is_out():
    """A lobby request that hits a stopped target (connection refused: nothing reached it) is
    sent to another healthy target, and later requests skip the stopped one at once, long
    before a health check would have noticed."""
    targets = [await EchoTarget(n).start() for n in (1, 2, 3)]
    slow_checks = HealthSettings(interval=3600)  # only the requests themselves can notice
    router, runner, base = await start_router(
        build_rules([1, 2, 3]), {t.number: ("127.0.0.1", t.port) for t in targets},
        health=slow_checks)
    try:
        assert sorted(router.healthy()) == [1, 2, 3]
        await targets[1].stop()
        seen = []
        async with aiohttp.ClientSession() as s:
            for i in range(12):
                async with s.post(f"{base}/api/rooms", data=b"x" * (1000 + i)) as r:
                    assert r.status == 200, await r.text()
                    body = await r.json()
                    assert body["length"] == 1000 + i  # the retried body arrived whole
                    seen.append(body["instance"])
            assert 2 not in seen and set(seen) == {1, 3}
            assert 2 not in router.healthy()
            assert "connection failed" in router.health[2].reason
            async with s.get(f"{base}/i2/x") as r:  # a rule has no other target
                assert r.status == 502 and (await r.json())["error"] == "bad_gateway"
            await targets[1].start()  # back on its port: health checks bring it back
            for _ in range(slow_checks.healthy_threshold):
                await router.check_health()
            assert 2 in router.healthy()
            got = set()
            for _ in range(6):
                async with s.get(f"{base}/") as r:
                    got.add((await r.json())["instance"])
            assert got == {1, 2, 3}
    finally:
        await runner.cleanup()
        for t in targets:
            await t.stop()


async def test_kill_9_of_one_node_of_four_does_not_fail_room_creation(tmp_path):
    """Right after a node dies, the default action still has it as healthy; every creation
    through the router succeeds anyway and none is placed on the dead node."""
    with running_nodes(tmp_path, 4) as nodes:
        router, runner, base = await start_router(
            build_rules([n.number for n in nodes]),
            {n.number: ("127.0.0.1", n.port) for n in nodes}, limits=RouterLimits())
        try:
            dead = nodes[1]
            dead.kill()
            assert dead.number in router.healthy()  # no health check has seen it yet
            statuses, instances = [], []
            async with aiohttp.ClientSession() as s:
                for i in range(40):
                    async with s.post(f"{base}/api/rooms", json={"name": f"r{i}"}) as r:
                        statuses.append(r.status)
                        if r.status == 201:
                            instances.append((await r.json())["instance"])
            assert statuses == [201] * 40, statuses
            assert dead.number not in instances
            assert len(set(instances)) >= 2  # still spread over the living nodes
        finally:
            await runner.cleanup()


# -- bodies, frames and slow clients ---------------------------------------------------------


async def test_body_over_the_cap_is_refused_and_never_reaches_the_target_whole():
    target = await EchoTarget(1).start()
    limits = RouterLimits(max_body_bytes=100_000)
    _router, runner, base = await start_router(
        build_rules([1]), {1: ("127.0.0.1", target.port)}, limits=limits)

    async def parts():
        for _ in range(30):
            yield b"y" * 10_000

    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{base}/api/x", data=b"x" * 100_001) as r:
                assert r.status == 413 and (await r.json())["error"] == "too_large"
            async with s.post(f"{base}/api/x", data=parts()) as r:  # chunked, no length
                assert r.status == 413 and (await r.json())["error"] == "too_large"
            async with s.post(f"{base}/api/x", data=b"z" * 100_000) as r:
                assert r.status == 200 and (await r.json())["length"] == 100_000
        assert target.bodies == [100_000]  # the cut-off one was never taken as complete
    finally:
        await runner.cleanup()
        await target.stop()


async def test_trickled_headers_are_cut_off_but_idle_keep_alive_waits():
    targets = [await EchoTarget(1).start()]
    limits = RouterLimits(timeouts=ListenerTimeouts(header=1.0, idle=3.0))
    _router, runner, base = await start_router(
        build_rules([1]), {1: ("127.0.0.1", targets[0].port)}, limits=limits)
    port = int(base.rsplit(":", 1)[1])
    try:
        held, answer = await trickle_headers(port, b"GET /api/x HTTP/1.1\r\nX-Slow: ", 0.2, 15)
        assert held < 2.5, f"trickling client held its socket {held:.1f} s"
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
        silent, _ = await trickle_headers(port, b"", 30, 15)  # connects and sends nothing
        assert silent < 2.5
        # A kept-alive connection waits for its next request past the header timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n"
        try:
            for _ in range(2):
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))
                await asyncio.wait_for(reader.readexactly(length), 5)
                with pytest.raises(TimeoutError):  # still open after header + 0.5 s idle
                    await asyncio.wait_for(reader.read(1), 1.5)
            loop = asyncio.get_running_loop()
            idle_from = loop.time()
            assert await asyncio.wait_for(reader.read(1), 10) == b""  # idle timeout ends it
            assert loop.time() - idle_from < 3.0
        finally:
            writer.close()
    finally:
        await runner.cleanup()
        await targets[0].stop()


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _spawn_router(config_path, port: int, log_path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "shardchat", "router", "--config", str(config_path),
             "--port", str(port)], cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT)


@contextlib.asynccontextmanager
async def router_process(config_path, log_path):
    """``shardchat router`` as its own process (its memory is its own); yields it and its
    URL once it answers. Its port is picked before it starts, so a port another process
    took meanwhile (it exits saying the address is in use) is retried with a fresh one."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        start = log_path.stat().st_size if log_path.exists() else 0
        proc = _spawn_router(config_path, port, log_path)

        async def answering(proc=proc, base=base, start=start) -> bool:
            if proc.poll() is not None:
                raise GiveUp(log_path.read_bytes()[start:].decode(errors="replace"))
            return (await asyncio.to_thread(http_json, "GET", f"{base}/healthz", None, None,
                                            1))[0] == 200
        try:
            await async_wait_until(answering, 60, what="router answering")
            break
        except GiveUp as exc:
            if ADDRESS_IN_USE not in str(exc).lower() or attempt == PORT_ATTEMPTS:
                raise AssertionError(f"shardchat router exited:\n{exc}") from None
    try:
        yield proc, base
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 15)


async def test_huge_websocket_frame_is_refused_without_buffering_it(tmp_path):
    """A 40 MB frame from a client: the router (its own process, so its memory can be read)
    closes that WebSocket with 1009 from the frame's header, and chat keeps working."""
    log_path = tmp_path / "router.log"
    huge = "4" + "x" * (40 * 1024 * 1024)  # an Engine.IO message packet of 40 MB
    # default pings (20 s): this raw client answers none, and must not be dropped for that
    with running_nodes(tmp_path, 1) as nodes:
        async with router_process(nodes[0].config_path, log_path) as (router, base):
            room = create_room(nodes[0])
            await _welcome(base, room, "websocket")  # warm up every code path once
            before = _rss(router.pid)
            ws_url = f"{base}{room['socketio_path']}/?EIO=4&transport=websocket"
            async with aiohttp.ClientSession() as s, s.ws_connect(ws_url) as ws:
                assert (await ws.receive(timeout=5)).data.startswith("0{")  # Engine.IO open
                sending = asyncio.create_task(ws.send_str(huge))
                msg = await ws.receive(timeout=20)
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1009, msg
            grown = _rss(router.pid) - before
            print(f"router RSS growth over a refused 40 MB frame: {grown / 2**20:.1f} MiB")
            assert grown < 16 * 1024 * 1024, f"router RSS grew by {grown / 2**20:.1f} MiB"
            data = await _welcome(base, room, "websocket")  # chat through the router still works
            assert data["room"]["id"] == room["id"]
    assert "1009" in log_path.read_text()  # the refusal is logged
