"""The benchmark's join scenario: members join one room, each until its welcome, and the row
says how long that took, what the server spent and what the last welcome held.

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
FIELDS = ("wall_s", "server_cpu_s", "cpu_at_last_welcome_s", "cpu_ms_per_member",
          "join_p50_ms", "join_p99_ms", "rss_after", "rss_per_member", "listen_overflows",
          "syn_retransmits", "loadgen_busy", "welcome_bytes_last")


async def _join(server: Server, members: int) -> dict:
    sc = replace(scenarios.SCENARIOS["join_500"], name=f"join_{members}", room_size=members,
                 concurrency=8, timeout=60.0)
    server.start()
    try:
        return await scenarios.run(server, sc, log=lambda line: None)
    finally:
        server.stop()


async def test_a_join_run_welcomes_every_member_and_reports_its_figures() -> None:
    rows = [await _join(ShardchatServer(None), MEMBERS),
            await _join(ShardchatServer(None), MEMBERS // 2)]
    for row, n in zip(rows, (MEMBERS, MEMBERS // 2), strict=True):
        assert row["complete"] and row["joined"] == n and row["failed"] == 0, row
        assert row["members"] == n and row["concurrency"] == 8
        for key in FIELDS:
            assert row[key] is not None, key
        assert row["server_cpu_s"] >= row["cpu_at_last_welcome_s"] > 0
        assert row["join_p50_ms"] <= row["join_p99_ms"] <= row["wall_s"] * 1000
        # the last to join sees everyone before it, up to the welcome's cap
        assert row["welcome_members_last"] == n
        assert row["events_after_welcome"] >= 0
        assert row["wall_s"] <= row["presence_out_s"], "no batch left pending at the end"
    assert report.join_sizes(rows) == [MEMBERS // 2, MEMBERS]
    assert report.join_flatness(rows, report.SHARDCHAT) == pytest.approx(
        rows[0]["cpu_ms_per_member"] / rows[1]["cpu_ms_per_member"])
    table = report.join_table(rows)
    assert f"| {MEMBERS} | {rows[0]['wall_s']:.2f} | - |" in table


async def test_a_join_run_reads_the_cpu_after_the_last_presence_batch_went_out() -> None:
    """A room above the batch threshold ends the joins with a batch waiting for its tick:
    the row waits for it (the node looks idle meanwhile) and says when it went out."""
    tick = 1.5
    server = ShardchatServer(None, node_settings={
        "presence_batch_members": 5, "presence_tick": tick, "presence_tick_max": tick})
    row = await _join(server, MEMBERS)
    assert row["complete"] and row["settled"], row
    assert row["events_after_welcome"] > 0, "the members were told of the joins in batches"
    assert row["presence_out_s"] >= row["wall_s"], row
    assert row["presence_out_s"] >= tick, "the first batch waits one tick, at least"


@pytest.mark.skipif(not NodeJsServer.available(), reason="Node or node_modules missing")
async def test_the_node_peer_welcomes_its_joiners_as_the_contract_says() -> None:
    row = await _join(NodeJsServer(None), MEMBERS)
    assert row["complete"] and row["joined"] == MEMBERS, row
    assert row["welcome_members_last"] == MEMBERS
    assert row["welcome_member_count_last"] == MEMBERS
    assert row["events_after_welcome"] == 0, "the peer announces no joins"
    assert row["presence_out_s"] is None, "nor has it batches to wait for"
    target = next(t for t in report.targets([row]) if "join one room" in t["target"])
    assert target["value"] is None, "no ratio without a shardchat row of the same size"


def test_a_join_sizes_median_round_is_by_time_and_an_unfinished_round_is_the_slowest() -> None:
    from bench.__main__ import MEDIAN_OF, median_row

    runs = [{"wall_s": 3.0, "complete": True}, {"wall_s": 1.0, "complete": False},
            {"wall_s": 2.0, "complete": True}]
    row = median_row(runs, MEDIAN_OF["join"])
    assert row["wall_s"] == 3.0, "the unfinished round (1 s, cut short) sorts last"
    assert row["rounds"] == [3.0, 1.0, 2.0]
