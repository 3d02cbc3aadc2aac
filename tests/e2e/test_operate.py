"""`shardchat drain` and `shardchat rebalance` on real nodes, with members in the rooms.

The members (``tests/followers.py``) reach the nodes through a local router with the
cluster's rules, as through the ALB, some over WebSocket and some over long-polling; the
senders among them keep sending with client ids while their rooms move, follow ``moved``
and resend what the old node did not take. The commands run as a person runs them (a
subprocess, ``--json`` for the figures, which each test prints).

What a person would check afterwards is what is asserted: the drained instance owns
nothing, every acked message is stored exactly once on its room's new owner with seqs
without a gap; a rebalance leaves the largest load at most 1.25 times the smallest by the
measure placement uses, a second one moves nothing, and rooms placed afterwards keep it so.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shardchat import config as config_mod
from shardchat.cluster.control import Nodes
from shardchat.cluster.mover import Mover
from shardchat.cluster.router import Router, serve
from shardchat.cluster.rules import build_rules
from tests.conftest import acreate_room
from tests.followers import Follower, room_history
from tests.support import (
    AUTH,
    ROOT,
    NodeProcess,
    async_wait_until,
    bound_port,
    http_json,
    make_cluster_config,
    running_nodes,
    start_nodes,
)

pytestmark = pytest.mark.timeout(420)

ROOMS = 200  # rooms on the instance that is drained
SENDERS = 8  # of them with a member sending all along (half websocket, half polling)
COMMAND_TIMEOUT = 300.0


async def shardchat(*args: str) -> tuple[int, Any, str]:
    """Run a `shardchat` command; (exit code, its --json report, stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shardchat", *args, "--json", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
    text = out.decode()
    return proc.returncode, json.loads(text) if text.strip() else None, err.decode()


async def router_for(nodes: list[NodeProcess]) -> Any:
    router = Router(build_rules(n.number for n in nodes),
                    {n.number: ("127.0.0.1", n.port) for n in nodes})
    return await serve(router, "127.0.0.1", 0)


def internal(node: NodeProcess, method: str, path: str, body: Any = None) -> Any:
    status, answer = http_json(method, f"{node.internal_url}{path}", body, headers=AUTH)
    assert status == 200, (node.number, path, status, answer)
    return answer


async def owner_of(nodes: list[NodeProcess], room_id: str) -> int:
    states = await asyncio.gather(*(asyncio.to_thread(
        http_json, "GET", f"{n.internal_url}/internal/rooms/{room_id}", None, AUTH)
        for n in nodes))
    owners = [n.number for n, (status, body) in zip(nodes, states, strict=True)
              if status == 200 and body.get("state") == "owner"]
    assert len(owners) == 1, (room_id, states)
    return owners[0]


async def assert_stored_once(base: str, follower: Follower, room: dict[str, Any],
                             owner: int) -> None:
    """Every message the follower got acked is on ``owner`` once, with its seq; no gap."""
    history = await room_history(base, room, owner)
    seqs = [m["seq"] for m in history]
    assert seqs == list(range(1, len(seqs) + 1)), f"room {room['id']}: seqs {seqs}"
    held: dict[str, list[int]] = {}
    for m in history:
        held.setdefault(m["client_id"], []).append(m["seq"])
    for cid, seq in follower.acked.items():
        assert held.get(cid) == [seq], f"{cid} acked as seq {seq}, stored as {held.get(cid)}"


@pytest.fixture
async def cluster(tmp_path) -> AsyncIterator[tuple[list[NodeProcess], str]]:
    """Three nodes and a router in front of them: (nodes, router URL)."""
    with running_nodes(tmp_path, 3, node={"peer_timeout": 0.5}) as nodes:
        runner = await router_for(nodes)
        try:
            yield nodes, f"http://127.0.0.1:{bound_port(runner)}"
        finally:
            await runner.cleanup()


async def test_a_drain_empties_an_instance_while_its_members_keep_sending(cluster):
    nodes, base = cluster
    one, two, three = nodes
    rooms = [await acreate_room(three, f"room {i}", private=i % 10 == 0) for i in range(ROOMS)]
    senders = [Follower(base, rooms[i], f"s{i}", sending=True,
                        transport="websocket" if i % 2 else "polling") for i in range(SENDERS)]
    for s in senders:
        await s.join()
        s.start()
    await async_wait_until(lambda: all(len(s.acked) >= 5 for s in senders), timeout=30,
                           what="every sender to have some history")

    code, report, err = await shardchat("drain", "--config", str(three.config_path),
                                        "--instance", "3")
    assert code == 0, (report, err)
    assert report["finished"] is True and report["remaining"] == 0, report
    assert report["moved"] == ROOMS and report["failed"] == [], report
    print(f"\ndrain of {ROOMS} rooms ({SENDERS} with live senders): {report['moved']} "
          f"moved in {report['seconds']:.1f} s, {report['rounds']} round(s), to instances "
          f"{report['targets']}; load before {report['before']}, after {report['after']}")

    # the senders carry on at the new owners, then stop
    marks = {s.name: len(s.acked) for s in senders}
    await async_wait_until(lambda: all(len(s.acked) >= marks[s.name] + 5 for s in senders),
                           timeout=30, what="the senders to go on at the new owners")
    for s in senders:
        await s.stop()

    assert internal(three, "GET", "/internal/stats")["rooms"] == 0
    listed = internal(three, "GET", "/internal/rooms")
    assert listed["rooms"] == 0 and listed["active"] == [] and listed["idle"] == []
    elsewhere = set()
    for node in (one, two):
        body = internal(node, "GET", "/internal/rooms")
        elsewhere |= {r["room_id"] for r in body["active"]} | set(body["idle"])
    assert {r["id"] for r in rooms} <= elsewhere
    for room in rooms[::25]:  # the old owner forwards each of them to where it went
        state = internal(three, "GET", f"/internal/rooms/{room['id']}")
        assert state["state"] == "forwarded" and state["to"] in (1, 2), state

    acked = resent = 0
    for s, room in zip(senders, rooms, strict=False):
        assert not s.errors, (s.name, s.errors)
        owner = await owner_of(nodes, room["id"])
        assert owner in (1, 2)
        assert s.moves_seen >= 1, f"{s.name} never heard that its room moved"
        assert set(s.acked_on.values()) >= {3, owner}, (s.name, set(s.acked_on.values()))
        await assert_stored_once(base, s, room, owner)
        acked += len(s.acked)
        resent += len(s.resent)
        await s.close()
    print(f"senders: {acked} messages acked, each stored once; {resent} resent after a "
          "moved ack or a lost one")


ROOM_MEMBERS = {1: [3, 3, 2, 2, 2, 1, 1, 1, 1, 1], 2: [2, 2, 1, 1, 1], 3: [1, 1, 0]}


def measured_loads(nodes: list[NodeProcess]) -> dict[int, float]:
    return {n.number: internal(n, "GET", "/internal/stats")["load"] for n in nodes}


async def test_a_rebalance_after_a_fourth_instance_joins_evens_the_load(tmp_path):
    cfg_path, instances = make_cluster_config(tmp_path, 4)
    nodes = [NodeProcess(cfg_path, inst, tmp_path) for inst in instances]
    members: list[Follower] = []
    runner = None
    try:
        await asyncio.to_thread(start_nodes, nodes[:3])
        runner = await router_for(nodes)
        base = f"http://127.0.0.1:{bound_port(runner)}"
        for number, sizes in ROOM_MEMBERS.items():
            for r, size in enumerate(sizes):
                room = await acreate_room(nodes[number - 1], f"i{number} room {r}")
                for m in range(size):
                    members.append(await Follower(
                        base, room, f"m{number}-{r}-{m}",
                        transport="polling" if m % 3 == 2 else "websocket").join())
        await asyncio.to_thread(start_nodes, nodes[3:])  # the empty newcomer joins
        expected = sum(map(sum, ROOM_MEMBERS.values()))
        await async_wait_until(in_thread_sum(nodes, expected), timeout=20,
                               what="every member counted")

        code, dry, err = await shardchat("rebalance", "--config", str(cfg_path), "--dry-run")
        assert code == 0 and dry["dry_run"] is True and dry["planned"] >= 1, (dry, err)
        assert dry["moved"] == 0
        code, report, err = await shardchat("rebalance", "--config", str(cfg_path))
        assert code == 0, (report, err)
        assert report["failed"] == [] and report["reached"] is True, report
        assert 1 <= report["moved"] <= dry["planned"], (report, dry)
        print(f"\nrebalance: {report['moved']} rooms moved (planned {dry['planned']}) in "
              f"{report['seconds']:.1f} s; load before {report['before']}, planned after "
              f"{report['planned_after']}")

        await async_wait_until(lambda: all(m.settled for m in members), timeout=30,
                               what="every member at its room's new home")
        await async_wait_until(in_thread_sum(nodes, expected), timeout=20,
                               what="every member counted at its new home")
        loads = await asyncio.to_thread(measured_loads, nodes)
        ratio = max(loads.values()) / min(loads.values())
        print(f"measured after: {loads}; max / min = {ratio:.3f}")
        assert max(loads.values()) <= 1.25 * min(loads.values()), loads

        code, again, err = await shardchat("rebalance", "--config", str(cfg_path))
        assert code == 0 and again["planned"] == 0 and again["moved"] == 0, (again, err)

        # placement ranks by the same measure: a new room goes where the rebalancer left
        # the least load, and the instances stay even. Peers' stats are polled, so first
        # wait until the placing node has seen the loads as they are after the moves.
        loads = await asyncio.to_thread(measured_loads, nodes)
        least = min(loads, key=lambda n: (loads[n], n))

        def placer_sees_least() -> bool:
            seen = internal(nodes[1], "GET", "/internal/metrics")["placement"]["loads"]
            return len(seen) == len(nodes) and min(
                seen, key=lambda n: (seen[n], int(n))) == str(least)

        await async_wait_until(lambda: asyncio.to_thread(placer_sees_least), timeout=10,
                               what="instance 2's placement seeing the loads after the moves")
        status, room = await asyncio.to_thread(http_json, "POST",
                                               f"{nodes[1].base_url}/api/rooms",
                                               {"name": "placed after"})
        assert status == 201 and room["instance"] == least, (room, loads)
        await async_wait_until(in_thread_rooms(nodes, 18 + 1), timeout=20,
                               what="the placed room counted")
        code, after, err = await shardchat("rebalance", "--config", str(cfg_path), "--dry-run")
        assert code == 0 and after["planned"] == 0, (after["before"], after["moves"], err)
        assert not any(m.errors for m in members), [m.errors for m in members if m.errors]
    finally:
        for m in members:
            await m.close()
        if runner is not None:
            await runner.cleanup()
        for node in nodes:
            node.stop()


def in_thread_sum(nodes: list[NodeProcess], expected: int):
    async def check() -> bool:
        counts = await asyncio.gather(*(asyncio.to_thread(
            internal, n, "GET", "/internal/stats") for n in nodes))
        return sum(c["connections"] for c in counts) == expected
    return check


def in_thread_rooms(nodes: list[NodeProcess], expected: int):
    async def check() -> bool:
        stats = await asyncio.gather(*(asyncio.to_thread(
            internal, n, "GET", "/internal/stats") for n in nodes))
        return sum(s["rooms"] for s in stats) == expected
    return check



async def test_a_move_that_fails_while_its_target_is_down_is_retried_until_it_is_back(
        tmp_path):
    """A passing failure (the target does not answer) is retried, each retry said; once
    the target is back the move goes through. One that keeps failing is reported with its
    reason after the last attempt, never dropped."""
    with running_nodes(tmp_path, 2) as (one, two):
        cfg = config_mod.load(one.config_path)
        room = await acreate_room(one, "Patient")
        lost = await acreate_room(one, "Unlucky")
        await asyncio.to_thread(two.stop)
        said: list[str] = []
        retrying = asyncio.Event()

        def say(line: str) -> None:
            said.append(line)
            if "retrying" in line:
                retrying.set()

        async with Nodes(cfg) as nodes:
            gives_up = await Mover(nodes, time.monotonic() + 60, attempts=2).one(
                lost["id"], 1, 2)
            assert not gives_up.ok and gives_up.attempts == 2, gives_up
            assert "gave up after 2 attempts" in gives_up.error, gives_up
            assert "Instance 2" in gives_up.error, gives_up  # why, in the source's words

            mover = Mover(nodes, time.monotonic() + 120, say=say, attempts=12)
            task = asyncio.create_task(mover.one(room["id"], 1, 2))
            await asyncio.wait_for(retrying.wait(), 30)  # the first attempt failed ...
            await asyncio.to_thread(two.start)  # ... and now the target is back
            outcome = await asyncio.wait_for(task, 120)
        assert outcome.ok and outcome.attempts >= 2, (outcome, said)
        assert "attempt 2 of 12" in said[0], said
        status, state = http_json("GET", f"{two.internal_url}/internal/rooms/{room['id']}",
                                  headers=AUTH)
        assert status == 200 and state["state"] == "owner", state
        print(f"\nretried move: moved on attempt {outcome.attempts}")
