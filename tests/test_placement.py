"""Room placement: the pure choice, and real nodes placing rooms through the router."""

from __future__ import annotations

import asyncio
import collections
import signal
import time

import aiohttp

from shardchat.cluster.load import RoomLoad, instance_load
from shardchat.cluster.placement import Load, Reservations, choose, rank
from shardchat.cluster.rebalance import plan_drain, plan_rebalance
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
    make_cluster_config,
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


# -- the load measure shared with the rebalancer -------------------------------------------


def test_placement_ranks_by_the_load_measure_when_every_instance_reports_it():
    """Instance 1 keeps 9,000 rooms nobody uses; instance 2 holds 10 rooms in use with 30
    people in them. Counting rooms would call 2 the lighter one; the measure says 1."""
    loads = [Load(1, connections=0, rooms=9000, load=0.9),
             Load(2, connections=30, rooms=10, load=45.0),
             Load(3, connections=5, rooms=500, load=12.5)]
    assert rank(loads) == [1, 3, 2]
    assert rank([Load(n, rooms=r) for n, r in ((1, 9000), (2, 10), (3, 500))]) == [2, 3, 1]


def test_a_cluster_mid_upgrade_is_ranked_the_old_way_for_every_instance():
    """Instance 2 runs an older version without ``load`` in its stats: comparing its
    connections + rooms with the others' measured load would mix two scales."""
    loads = [Load(1, connections=0, rooms=9000, load=0.9), Load(2, connections=30, rooms=10)]
    assert choose(loads) == 2
    assert choose([Load(1, connections=0, rooms=9000, load=0.9)]) == 1


def test_a_load_comes_from_the_stats_answer_or_falls_back():
    stats = {"instance": 3, "connections": 4, "rooms": 70, "draining": False, "load": 9.5}
    assert Load.from_stats(3, stats) == Load(3, 4, 70, True, False, 9.5)
    old = {"instance": 3, "connections": 4, "rooms": 70, "draining": True}
    assert Load.from_stats(3, old, healthy=False) == Load(3, 4, 70, False, True, None)
    assert Load.from_stats(3, {**stats, "load": "lots"}).load is None


def test_a_burst_on_a_measured_idle_cluster_still_spreads_evenly():
    loads = [Load(n, load=0.0) for n in (1, 2, 3, 4)]
    reserved: collections.Counter[int] = collections.Counter()
    for _ in range(40):
        reserved[choose(loads, reserved, prefer=3)] += 1
    assert sorted(reserved.values()) == [10, 10, 10, 10]


def _cluster_with_a_newcomer() -> dict[int, list[RoomLoad]]:
    busy = [RoomLoad(f"b{i}", connections=6, activity=3.0, idle_seconds=60) for i in range(30)]
    idle = [RoomLoad(f"i{i}") for i in range(3000)]
    return {1: busy[:10] + idle[:1000], 2: busy[10:20] + idle[1000:2000],
            3: busy[20:] + idle[2000:], 4: []}


def _placement_view(rooms: dict[int, list[RoomLoad]]) -> list[Load]:
    """What placement reads from each instance's stats: the same measure's total."""
    return [Load(n, sum(r.connections for r in rs), len(rs), load=instance_load(rs))
            for n, rs in rooms.items()]


def test_placement_and_rebalance_agree_on_the_least_loaded_instance():
    """A 4th empty instance joins. The rebalancer's first target is the one placement
    picks; while the plan runs (its moves counted as done), placement picks the instance
    the plan leaves least loaded, which is also where the plan puts the next room when a
    new room arrives; and once the moves are done the two still agree."""
    rooms = _cluster_with_a_newcomer()
    plan = plan_rebalance(rooms)
    assert plan.count > 0 and plan.reached
    view = _placement_view(rooms)
    assert choose(view) == plan.moves[0].target == 4
    lightest_after = min(plan.after, key=lambda n: (plan.after[n], n))
    assert choose(view, pending=plan.pending()) == lightest_after
    moved = {m.room_id: m.target for m in plan.moves}
    after: dict[int, list[RoomLoad]] = {n: [] for n in rooms}
    for n, rs in rooms.items():
        for r in rs:
            after[moved.get(r.room_id, n)].append(r)
    assert choose(_placement_view(after)) == lightest_after
    # a new room there does not undo the plan: a second plan finds nothing to move
    fresh = RoomLoad("new-room", connections=1, idle_seconds=0)
    after[lightest_after].append(fresh)
    assert plan_rebalance(after).moves == ()


def test_placement_never_sends_a_room_to_an_instance_being_drained():
    """While instance 2 is drained its pending change makes it look empty; it is closed
    to new rooms all the same, and the rooms go where the drain spreads the load."""
    rooms = _cluster_with_a_newcomer()
    rooms[4] = [RoomLoad(f"n{i}", connections=6, activity=3.0, idle_seconds=60)
                for i in range(10)]
    plan = plan_drain(2, rooms)
    view = _placement_view(rooms)
    picks = rank(view, pending=plan.pending(), closed=plan.closed)
    assert 2 not in picks and len(picks) == 3
    assert picks[0] == min((n for n in plan.after if n != 2),
                           key=lambda n: (plan.after[n], n))


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


def burst_bound(rooms: int, k: int) -> int:
    """The most rooms one of ``k`` nodes can end up with when the router deals ``rooms``
    creations round-robin (n = rooms / k to each node) and all of them arrive at once.

    Each node places with its own count live but counts every room it placed on a peer k
    times until that peer's stats show it (placement.py), because while it placed one there
    the other k - 1 nodes are assumed to have placed one each. That assumption holds when
    the nodes run side by side; on a loaded machine they do not: one node gets the CPU and
    handles a streak of its requests while the others wait, and in that streak it keeps about
    k rooms for itself for every one it gives each peer. (So the spread depends on how the
    CPU is shared, which is why an even 45..55 band of 200 failed under load, with one node
    at 62 and another at 31.) What the reservation logic does guarantee, however the nodes
    are scheduled and with no stats poll landing in the burst (the worst case, and the one
    CPU starvation makes likely; a poll in between only replaces an estimate by the true
    count):

    * a node keeps a room for itself only while its live count is at most k times what it
      placed on its least-filled peer, so of its n it keeps s <= ceil((k*n + k - 1) / (2k - 1));
    * it always gives a peer room to the peer it gave the fewest, so each peer gets at most
      ceil(n / (k - 1)) from it.

    One node thus holds at most s + (k - 1) * ceil(n / (k - 1)): 29 + 3 * 17 = 80 of 200
    (40 %) for 4 nodes, against all 200 if a burst piled onto one node.
    """
    n = rooms // k
    kept = -(-(k * n + k - 1) // (2 * k - 1))
    return kept + (k - 1) * -(-n // (k - 1))


def test_burst_bound_is_what_the_reservations_allow():
    """The bound above, checked against ``rank`` itself: nodes placing one after another
    (the most uneven schedule) with stats that never refresh during the burst."""
    k, n = 4, 50
    placed: collections.Counter[int] = collections.Counter()
    for me in range(1, k + 1):
        mine: collections.Counter[int] = collections.Counter()
        for _ in range(n):
            loads = [Load(i, rooms=placed[i] if i == me else 0) for i in range(1, k + 1)]
            target = rank(loads, {i: c for i, c in mine.items() if i != me}, prefer=me)[0]
            mine[target] += 1
            placed[target] += 1
        assert mine[me] <= -(-(k * n + k - 1) // (2 * k - 1))
        assert max(c for i, c in mine.items() if i != me) <= -(-n // (k - 1))
    assert placed[1] > 55, placed  # the first node keeps a big share of its streak...
    assert max(placed.values()) <= burst_bound(k * n, k) == 80  # ...within the bound


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
                # every node places its first room on itself (an idle cluster ties, and ties
                # go to the placing node), so each one gets rooms; none gets a pile
                assert set(per_node) == {1, 2, 3, 4}
                assert max(per_node.values()) <= burst_bound(200, 4), per_node
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


async def test_a_burst_on_one_node_is_spread_by_its_reservations(tmp_path):
    """100 creations at once on one node (a client that talks to it directly). Its stats
    of the peers do not refresh during the burst (a long stats_interval, as when polls are
    starved), so only its reservations keep the rooms from piling onto the peer that looked
    emptiest: it gives each peer room to the peer it gave the fewest (they end within one
    of each other) and keeps at most k of every 2k - 1 for itself (see ``burst_bound``)."""
    k, burst = 4, 100
    node = {"stats_interval": 600.0, "placement_reservation_seconds": 600.0,
            "peer_timeout": 10.0}  # nothing expires, refreshes or times out mid-burst
    cfg_path, instances = make_cluster_config(tmp_path, k, node=node)
    nodes = [NodeProcess(cfg_path, inst, tmp_path) for inst in instances]
    placer, peers = nodes[0], nodes[1:]
    try:
        # the peers first: the placer's first stats poll, before it serves, sees them all
        await asyncio.to_thread(start_nodes, peers)
        await asyncio.to_thread(start_nodes, [placer])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            results = await asyncio.gather(*(_create(s, placer.base_url, f"room {i}")
                                             for i in range(burst)))
        assert all(status == 201 for status, _ in results), results[:3]
        per_node = collections.Counter(body["instance"] for _, body in results)
        print(f"100 rooms placed by node 1 alone: {dict(sorted(per_node.items()))}")
        on_peers = [per_node[p.number] for p in peers]
        assert max(on_peers) - min(on_peers) <= 1, per_node
        assert per_node[placer.number] <= -(-(k * burst + k - 1) // (2 * k - 1)), per_node
    finally:
        for n in nodes:
            n.stop()


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
