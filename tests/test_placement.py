"""Room placement: the pure choice, and real nodes placing rooms through the router."""

from __future__ import annotations

import asyncio
import collections
import signal
import time

import aiohttp

from shardchat.cluster.placement import Load, Reservations, choose, rank
from shardchat.cluster.router import Router, serve
from shardchat.cluster.rules import build_rules
from tests.support import (
    SECRET,
    TEST_RATE_LIMITS,
    NodeProcess,
    async_wait_until,
    bound_port,
    free_port,
    http_json,
    in_thread,
    running_nodes,
    start_nodes,
    write_config,
)

# -- the pure choice -----------------------------------------------------------------------


def test_least_loaded_wins():
    loads = [Load(1, connections=10, rooms=5), Load(2, connections=3, rooms=4),
             Load(3, connections=0, rooms=9)]
    assert choose(loads) == 2
    assert rank(loads) == [2, 3, 1]


def test_draining_and_unhealthy_instances_are_never_chosen():
    loads = [Load(1, rooms=100), Load(2, draining=True), Load(3, healthy=False)]
    assert choose(loads) == 1
    assert rank(loads) == [1]
    assert choose([Load(2, draining=True), Load(3, healthy=False)]) is None
    assert choose([]) is None


def test_reservations_count_as_load():
    loads = [Load(1, rooms=3), Load(2, rooms=4)]
    assert choose(loads, {1: 2}) == 2


def test_own_reservations_count_once_per_placing_node():
    """Four nodes place at once; a gap of 8 on instance 1 is filled by 2 of mine, not 8."""
    loads = [Load(1), Load(2, rooms=8), Load(3, rooms=8), Load(4, rooms=8)]
    assert choose(loads, {1: 1}) == 1
    assert choose(loads, {1: 3}) == 2
    assert choose(loads, {1: 3}, weight=1) == 1


def test_a_burst_spreads_evenly():
    """Placing 40 rooms while the stats do not move spreads them 10/10/10/10."""
    loads = [Load(n) for n in (1, 2, 3, 4)]
    reserved: collections.Counter[int] = collections.Counter()
    for _ in range(40):
        reserved[choose(loads, reserved, prefer=2)] += 1
    assert sorted(reserved.values()) == [10, 10, 10, 10]


def test_ties_go_to_the_preferred_instance_then_cyclically():
    loads = [Load(n) for n in (1, 3, 5, 7)]
    assert rank(loads, prefer=5) == [5, 7, 1, 3]
    assert rank(loads, prefer=4) == [5, 7, 1, 3]   # preferred one is not a candidate
    assert rank(loads) == [1, 3, 5, 7]
    assert choose([Load(2, rooms=1), Load(9, rooms=1)], prefer=9) == 9


def test_reservations_expire_and_settle_when_stats_catch_up():
    now = [100.0]
    res = Reservations(ttl=5.0, clock=lambda: now[0])
    a = res.add(1)
    b = res.add(2)
    assert res.counts() == {1: 1, 2: 1}
    res.release(b)  # a failed creation loads nobody
    res.confirm(a)
    now[0] = 101.0
    assert res.counts({1: 100.5}) == {}          # a poll that started later already counts it
    assert res.counts({1: 99.0}) == {1: 1}       # an older poll does not
    res.add(3)
    now[0] = 106.5
    assert res.counts() == {}                    # expired


# -- real nodes behind the router ----------------------------------------------------------


async def _router_for(nodes) -> tuple[Router, object, str]:
    router = Router(build_rules([n.number for n in nodes]),
                    {n.number: ("127.0.0.1", n.port) for n in nodes})
    runner = await serve(router, "127.0.0.1", 0)
    return router, runner, f"http://127.0.0.1:{bound_port(runner)}"


async def _create(session: aiohttp.ClientSession, base: str, name: str) -> tuple[int, dict]:
    async with session.post(f"{base}/api/rooms", json={"name": name, "private": False},
                            timeout=aiohttp.ClientTimeout(total=10)) as r:
        return r.status, await r.json(content_type=None)


async def test_concurrent_burst_spreads_and_a_killed_node_is_skipped(tmp_path):
    with running_nodes(tmp_path, 4) as nodes:
        router, runner, base = await _router_for(nodes)
        try:
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0)) as s:
                results = await asyncio.gather(*(_create(s, base, f"room {i}")
                                                 for i in range(200)))
                assert all(status == 201 for status, _ in results), results[:3]
                per_node = collections.Counter(body["instance"] for _, body in results)
                print(f"placement of 200 rooms over 4 nodes: {dict(sorted(per_node.items()))}")
                assert set(per_node) == {1, 2, 3, 4}
                assert all(45 <= c <= 55 for c in per_node.values()), per_node
                room = results[0][1]
                assert room["url"].endswith(room["path"])
                assert room["socketio_path"].endswith("/socket.io")

                dead = nodes[1]
                dead.kill()
                killed_at = time.monotonic()
                late, failed = [], 0
                for i in range(2000):  # bounded by count and by time
                    elapsed = time.monotonic() - killed_at
                    if elapsed > 6 or len(late) >= 20:
                        break
                    status, body = await _create(s, base, f"after kill {i}")
                    if status == 201:
                        assert body["instance"] != dead.number
                    else:  # only the router's own routing to the dead node may fail
                        assert status == 502 and elapsed < 3, (status, body, elapsed)
                        failed += 1
                    if elapsed >= 3:
                        late.append(status)
                print(f"after the kill: {i} creations, {failed} refused by the router (502) "
                      "before its health check took the dead node out")
                assert late and all(st == 201 for st in late)
                assert dead.number not in router.healthy()
        finally:
            await runner.cleanup()


async def test_every_node_draining_gives_no_capacity(tmp_path):
    with running_nodes(tmp_path, 2, node={"drain_grace_seconds": 30.0}) as nodes:
        _router, runner, base = await _router_for(nodes)
        try:
            for node in nodes:
                node.proc.send_signal(signal.SIGTERM)
            for node in nodes:
                await async_wait_until(in_thread(lambda n=node: n.healthz()[0] == 503), 10,
                                       what=f"node {node.number} draining")
            async with aiohttp.ClientSession() as s:
                for i in range(4):  # whichever node the router picks
                    status, body = await _create(s, base, f"late {i}")
                    assert status == 503 and body["error"] == "no_capacity", (status, body)
                    assert body["message"]
        finally:
            await runner.cleanup()
            for node in nodes:
                node.kill()  # they would otherwise sit out their 30 s grace


async def test_a_peer_that_never_answers_does_not_hold_up_creation(tmp_path):
    """Instance 3 accepts connections and then says nothing: creation goes elsewhere."""
    stalled: list[asyncio.StreamWriter] = []

    async def hang(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.append(writer)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    silent_port = server.sockets[0].getsockname()[1]
    instances = [{"number": n, "host": "127.0.0.1", "port": free_port(),
                  "internal_port": free_port()} for n in (1, 2)]
    instances.append({"number": 3, "host": "127.0.0.1", "port": free_port(),
                      "internal_port": silent_port})
    cfg = write_config(tmp_path / "shardchat.toml", instances=instances,
                       cluster={"name": "test", "secret": SECRET,
                                "data_dir": str(tmp_path / "data")}, node=TEST_RATE_LIMITS)
    nodes = [NodeProcess(cfg, inst, tmp_path) for inst in instances[:2]]
    try:
        await asyncio.to_thread(start_nodes, nodes)
        placed: collections.Counter[int] = collections.Counter()
        give_up = time.monotonic() + 8  # peer 2 may have come up just now: wait till seen
        for i in range(2000):  # until the healthy peer has taken a few rooms
            if time.monotonic() > give_up:
                break
            started = time.monotonic()
            status, body = await asyncio.to_thread(
                http_json, "POST", f"{nodes[0].base_url}/api/rooms", {"name": f"r{i}"})
            assert status == 201, body
            assert time.monotonic() - started < 2.5
            placed[body["instance"]] += 1
            if placed[2] >= 3:
                break
        assert placed[2] >= 3 and placed[3] == 0, placed
    finally:
        for node in nodes:
            node.stop()
        for w in stalled:
            w.close()
        server.close()
