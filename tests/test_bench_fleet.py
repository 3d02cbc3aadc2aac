"""The many-connections scenario (bench/manyconn.py, bench/fleet.py): it runs the largest
count the open-files limits allow and says why when that is fewer than asked, its clients
spread over load generator processes and loopback source addresses, and it reports what it
measured and what it projects, labelled as such."""

from __future__ import annotations

import pytest

from bench import loadgen, manyconn, scenarios
from bench.fleet import split
from bench.servers import Endpoint, ShardchatServer

pytestmark = pytest.mark.timeout(120)


def test_the_server_limit_decides_on_a_machine_like_this_one():
    p = manyconn.plan(500, 100, server_limit=20_000, loadgen_limit=20_000)
    assert (p.asked, p.clients, p.rooms) == (50_000, 19_000, 190)
    assert p.per_process == (19_000,)
    assert "server's open-files limit is 20,000" in p.limited_by
    assert "51,000" in p.limited_by  # what the asked count would need


def test_the_asked_count_runs_where_the_limits_allow_over_several_processes():
    p = manyconn.plan(500, 100, server_limit=1_048_576, loadgen_limit=20_000)
    assert p.clients == 50_000 and p.limited_by is None
    assert p.per_process == (19_800, 19_800, 10_400)  # each within its own limit


def test_the_load_generator_decides_when_its_processes_cannot_hold_the_count():
    p = manyconn.plan(500, 100, server_limit=1_048_576, loadgen_limit=5_000,
                      max_processes=2)
    assert p.clients == 9_600 and p.per_process == (4_800, 4_800)
    assert "load generator's open-files limit is 5,000" in p.limited_by


def test_rooms_are_split_whole_within_each_share():
    rooms = [[Endpoint("127.0.0.1", 1, "/p", f"/r{i}")] * 10 for i in range(5)]
    shares = split(rooms, [20, 20, 10])
    assert [s.clients for s in shares] == [20, 20, 10]
    assert [s.first for s in shares] == [0, 20, 40]
    with pytest.raises(ValueError):
        split(rooms, [20, 20])


async def test_clients_bind_the_source_addresses_in_turn():
    server = ShardchatServer(None, 1)
    server.start()
    try:
        (room,) = server.create_rooms(1)
        rooms = await loadgen.connect_rooms([[server.endpoint(room, j) for j in range(6)]],
                                            sources=3)
        try:
            local = sorted(c.transport.get_extra_info("sockname")[0]
                           for c in rooms[0].members)
        finally:
            loadgen.close_all(rooms)
    finally:
        server.stop()
    assert local == ["127.0.0.2"] * 2 + ["127.0.0.3"] * 2 + ["127.0.0.4"] * 2


async def test_the_scenario_runs_over_two_processes_and_reports_what_it_measured():
    sc = scenarios.Scenario("idle_small", "idle", rooms=3, room_size=10, fleet=True)
    server = ShardchatServer(None, 1)
    server.start()
    try:
        # a load generator limit of 220 leaves 20 clients per process: 2 processes for 30
        row = await manyconn.run(server, sc, log=lambda *a: None, loadgen_limit=220)
        server.check()
    finally:
        server.stop()
    assert (row["clients_asked"], row["clients"], row["loadgen_processes"]) == (30, 30, 2)
    assert row["limited_by"] is None and row["rss_at_asked_measured"] is True
    assert row["rss_after"] > row["rss_before"] and row["rss_per_conn"] > 0
    assert row["rss_at_asked"] == row["rss_after"]  # all ran: nothing is projected
    assert row["connect_s"] > 0 and row["server_fd_limit"] >= 1000
