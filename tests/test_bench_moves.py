"""The benchmark's rooms that move: its clients follow a moved room as the room page does,
and the move and drain scenarios run to the end and report what they measured.

The members are the load generator's (``bench/follow.py``), against real nodes; the moves
are the nodes' own (``POST /internal/rooms/<id>/move``). What a user would notice is what is
asserted: after the move every member is on the new node, has every acked message once and
in order, and what it sent while the room was frozen was stored once.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from bench import follow, moving, scenarios
from bench.servers import Endpoint, ShardchatServer
from tests.conftest import acreate_room
from tests.moves import move_room
from tests.support import running_nodes

pytestmark = pytest.mark.timeout(120)

MEMBERS = 6
UNLIMITED = {"rate_limit_messages": 100_000, "rate_limit_joins": 100_000}


def _seqs(outs: list[follow.Outgoing]) -> list[int]:
    return sorted(o.done.result()["seq"] for o in outs if o.done.result().get("ok"))


async def test_members_follow_a_moved_room_and_miss_nothing(tmp_path) -> None:
    with running_nodes(tmp_path, 2, node=UNLIMITED) as nodes:
        def resolve(number: int) -> tuple[str, int]:
            return "127.0.0.1", nodes[number - 1].port

        room_json = await acreate_room(nodes[0], "moving room")
        here = Endpoint("127.0.0.1", nodes[0].port, room_json["socketio_path"],
                        room_json["namespace"])
        room = follow.FollowingRoom()
        await follow.join_room(room, [here] * MEMBERS, resolve, "m")
        sent: list[follow.Outgoing] = []
        stop = asyncio.Event()

        async def keep_sending() -> None:
            for i in range(2000):  # bounded; stopped long before
                if stop.is_set():
                    return
                sent.append(room.followers[i % MEMBERS].send(f"t{i}", f"c{i}"))
                await asyncio.sleep(0.01)  # pacing the senders, not synchronisation

        sending = asyncio.get_running_loop().create_task(keep_sending())
        await room.wait_delivered(5 * MEMBERS, 10)
        status, report = await asyncio.to_thread(move_room, nodes[0], room_json["id"], 2)
        assert status == 200, report
        await room.wait_rejoined(MEMBERS, 30)
        # a member that arrives late, at the old address, is refused `moved` and follows
        late = follow.Member(room, "late", here, resolve)
        await late.join()
        room.followers.append(late)
        stop.set()
        await asyncio.wait_for(sending, 5)
        await asyncio.wait([o.done for o in sent], timeout=20)
        acked = _seqs(sent)
        try:
            assert len(acked) == len(sent), "every message is acked in the end"
            assert acked == list(range(1, len(acked) + 1)), "stored once each, no gap"
            await room.wait_delivered(len(acked) * MEMBERS, 20)
            for m in room.followers[:MEMBERS]:
                assert m.instance_history == [1, 2]
                assert (m.last_seq, m.duplicates, m.missing, m.unrecovered) == \
                    (acked[-1], 0, 0, 0)
            assert late.instance_history == [2] and late.endpoint.port == nodes[1].port
        finally:
            follow.close_rooms([room])


def _server(nodes: int) -> ShardchatServer:
    server = ShardchatServer(None, nodes)
    server.start()
    return server


async def test_the_move_scenario_times_the_move_and_checks_every_member() -> None:
    sc = replace(scenarios.SCENARIOS["move"], room_size=8, messages=600, rate=20.0)
    server = _server(2)
    try:
        row: dict[str, Any] = await moving.run_move(server, sc, log=lambda line: None)
    finally:
        server.stop()
    assert row["complete"], row
    assert row["rejoined"] == row["on_target"] == 8
    assert row["history"] == 600 and row["copied"] >= 600
    assert 0 < row["frozen_ms"] <= row["took_ms"]
    assert row["gap_p50_ms"] <= row["gap_p99_ms"] <= row["gap_max_ms"]
    assert row["rejoin_wall_ms"] >= row["reconnect_max_ms"] > 0


async def test_the_drain_scenario_empties_an_instance_and_compares_its_rates() -> None:
    """The drain is ``shardchat drain``'s (cluster/moves.py), while every room sends."""
    sc = replace(scenarios.SCENARIOS["drain"], rooms=6, room_size=3, rate=300.0, duration=0.5)
    server = _server(3)
    try:
        row = await moving.run_drain(server, sc, log=lambda line: None)
    finally:
        server.stop()
    assert row["complete"], row
    assert row["rooms_moved"] == row["rooms_moved_expected"] == 2
    assert row["rooms_remaining"] == 0, "shardchat drain left instance 1 empty"
    assert row["rooms_not_moved"] == 0 and row["follows"] == 2 * 3
    assert row["before_msgs_per_s"] > 0 and row["during_msgs_per_s"] > 0
    assert 0 < row["before_ack_p50_ms"] <= row["before_ack_p99_ms"]
    assert row["during_vs_before"] == round(row["during_msgs_per_s"]
                                            / row["before_msgs_per_s"], 2)
