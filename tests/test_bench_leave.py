"""The benchmark's leave scenario: the members of one room disconnect at once, beside rooms
of one member that stay, and the row says how long the room took to empty and what the
server spent.

Real servers (a shardchat node; Node socket.io's peer where Node is installed) and the load
generator's own clients; only the plumbing is checked here, never a speed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench import report, scenarios
from bench.servers import NodeJsServer, Server, ShardchatServer

pytestmark = pytest.mark.timeout(120)

MEMBERS = 30
BYSTANDERS = 4


async def _leave(server: Server, members: int) -> dict:
    sc = replace(scenarios.SCENARIOS["leave_500"], name=f"leave_{members}", room_size=members,
                 rooms=1 + BYSTANDERS, concurrency=8)
    server.start()
    try:
        return await scenarios.run(server, sc, log=lambda line: None)
    finally:
        server.stop()


async def test_a_leave_run_empties_the_room_and_reports_its_figures() -> None:
    rows = [await _leave(ShardchatServer(None), MEMBERS),
            await _leave(ShardchatServer(None), MEMBERS // 2)]
    for row, n in zip(rows, (MEMBERS, MEMBERS // 2), strict=True):
        assert row["complete"] and row["settled"] and row["left"] == n, row
        assert row["bystanders"] == BYSTANDERS
        assert row["connected_before"] == n + BYSTANDERS
        assert row["connected_after"] == BYSTANDERS, "the bystanders stay, nobody else"
        assert row["server_cpu_s"] >= row["cpu_at_empty_s"] > 0
        assert row["cpu_ms_per_member"] == pytest.approx(row["server_cpu_s"] / n * 1000,
                                                         rel=0.01, abs=0.002)
        assert row["empty_s"] > 0
    assert report.leave_sizes(rows) == [MEMBERS // 2, MEMBERS]
    assert report.join_flatness(rows, report.SHARDCHAT, report.LEAVE) == pytest.approx(
        rows[0]["cpu_ms_per_member"] / rows[1]["cpu_ms_per_member"])
    table = report.leave_table(rows)
    assert f"| {MEMBERS} | {rows[0]['empty_s']:.2f} | - |" in table
    assert not report.markdown_table(rows).count("leave_"), "leave rows have their own table"


@pytest.mark.skipif(not NodeJsServer.available(), reason="Node or node_modules missing")
async def test_the_node_peer_counts_its_members_until_the_room_is_empty() -> None:
    row = await _leave(NodeJsServer(None), MEMBERS)
    assert row["complete"] and row["left"] == MEMBERS, row
    assert (row["connected_before"], row["connected_after"]) == (MEMBERS + BYSTANDERS,
                                                                 BYSTANDERS)
    target = next(t for t in report.targets([row]) if "leave one room" in t["target"])
    assert target["value"] is None, "no ratio without a shardchat row of the same size"


def test_a_leave_scenarios_clients_count_the_room_and_its_bystanders() -> None:
    sc = scenarios.SCENARIOS["leave_5000"]
    assert sc.room_size == 5000 and sc.rooms == 1 + 5000 // scenarios.LEAVE_MEMBERS_PER_BYSTANDER
    assert sc.clients == 5000 + 1000
    quick = scenarios.quick(sc)
    assert quick.name == "leave_1000" and quick.rooms == 1 + 200
