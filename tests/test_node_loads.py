"""A node's load as its peers and the operator tools see it: ``load`` in ``/internal/stats``,
the room listing ``GET /internal/rooms``, one room's numbers and their hand-over, and the
drained state (out of placement, still serving).

Real nodes on loopback; the unit tests of the measure itself are tests/test_load.py and
tests/test_activity.py.
"""

from __future__ import annotations

import asyncio

import pytest

from shardchat.cluster.load import IDLE_FLOOR, room_presence
from shardchat.node.activity import RoomActivity
from shardchat.node.loads import MAX_AGE, NodeLoads
from tests.conftest import acreate_room, create_room
from tests.support import AUTH, async_wait_until, http_json, running_nodes, wait_until


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with running_nodes(tmp_path_factory.mktemp("loads"), 2) as nodes:
        yield nodes


def internal(node, method: str, path: str, body=None):
    return http_json(method, f"{node.internal_url}{path}", body, headers=AUTH)


def stats(node) -> dict:
    status, body = internal(node, "GET", "/internal/stats")
    assert status == 200, body
    return body


def listing(node) -> dict:
    status, body = internal(node, "GET", "/internal/rooms")
    assert status == 200, body
    return body


async def test_stats_and_listing_weigh_connections_messages_and_idle_rooms(pair, connect):
    a, _ = pair
    busy = await acreate_room(a, "Busy")
    quiet = await acreate_room(a, "Quiet")
    before = stats(a)
    assert set(before) >= {"instance", "connections", "rooms", "draining", "load", "drained"}
    alice = await connect(a, busy, name="alice")
    await connect(a, busy, name="bob", transport=["polling"])
    for i in range(12):
        await alice.send_ok(f"m{i}", client_id=f"m{i}")

    rows = await async_wait_until(
        lambda: asyncio.to_thread(lambda: {r["room_id"]: r for r in listing(a)["active"]}
                                  if listing(a)["active"] else None),
        what="the listing")
    row = rows[busy["id"]]
    assert row["connections"] == 2
    assert row["activity"] == pytest.approx(12 * 60 / 600, rel=0.05)  # 12 messages, tau 10 min
    assert row["idle_seconds"] < 30
    assert rows[quiet["id"]]["connections"] == 0  # created a moment ago: listed as in use
    body = listing(a)
    assert body["instance"] == a.number and body["rooms"] == stats(a)["rooms"]
    assert body["rooms"] == len(body["active"]) + len(body["idle"])

    after = await async_wait_until(
        lambda: asyncio.to_thread(lambda: s if (s := stats(a))["load"] > before["load"] + 2
                                  else None), what="the load to count the members")
    # two members, 1.2 messages a minute, two rooms just used: about 5.2 over the floor
    assert after["load"] == pytest.approx(before["load"] + 2 + 1.2, abs=0.2)

    status, one = internal(a, "GET", f"/internal/rooms/{busy['id']}/load")
    assert status == 200 and one["room_id"] == busy["id"] and one["connections"] == 2


def test_a_moved_rooms_numbers_are_handed_to_its_new_owner(pair):
    _, b = pair
    room = create_room(b, "Arrived")
    status, body = internal(b, "POST", f"/internal/rooms/{room['id']}/load",
                            {"activity": 6.0, "idle_seconds": 5.0})
    assert status == 200 and body["restored"] is True, body
    _, one = internal(b, "GET", f"/internal/rooms/{room['id']}/load")
    assert one["activity"] == pytest.approx(6.0, rel=0.01)
    for bad in ({"activity": -1, "idle_seconds": 0}, {"activity": "x"}, [1, 2]):
        status, body = internal(b, "POST", f"/internal/rooms/{room['id']}/load", bad)
        assert status == 400 and body["error"] == "bad_request", body
    status, body = internal(b, "POST", "/internal/rooms/NoSuchRoom123/load",
                            {"activity": 1.0, "idle_seconds": 1.0})
    assert status == 404 and body["error"] == "not_found"
    status, body = internal(b, "GET", "/internal/rooms/NoSuchRoom123/load")
    assert status == 404 and body["error"] == "not_found"


async def test_a_drained_node_is_out_of_placement_but_serves_its_rooms(pair, connect):
    a, b = pair
    kept = await acreate_room(b, "Still here")
    status, body = internal(b, "POST", "/internal/drained", {"drained": True})
    assert status == 200 and body == {"instance": b.number, "drained": True,
                                      "rooms": stats(b)["rooms"]}
    try:
        s = stats(b)
        assert s["draining"] is True and s["drained"] is True
        assert b.healthz() == (200, {"instance": b.number, "status": "ok"})  # not stopping
        status, body = internal(b, "POST", "/internal/rooms", {"name": "No", "private": False})
        assert status == 503 and body["error"] == "draining" and "drained" in body["message"]
        member = await connect(b, kept, name="carol")  # its rooms still serve
        await member.send_ok("hello from a drained node")
        # a's placer sees b out of placement at its next poll: every new room goes to a
        wait_until(lambda: all(http_json("POST", f"{b.base_url}/api/rooms",
                                         {"name": f"r{i}"})[1]["instance"] == a.number
                               for i in range(4)), what="placement to skip the drained node")
        for _ in range(6):
            status, room = http_json("POST", f"{a.base_url}/api/rooms", {"name": "placed"})
            assert status == 201 and room["instance"] == a.number, room
    finally:
        status, body = internal(b, "POST", "/internal/drained", {"drained": False})
    assert status == 200 and body["drained"] is False
    assert stats(b)["draining"] is False
    for bad in ({}, {"drained": "yes"}, None):
        status, body = internal(b, "POST", "/internal/drained", bad)
        assert status == 400 and body["error"] == "bad_request", body


def test_the_listing_of_many_idle_rooms_is_complete_and_streamed(tmp_path):
    """Rooms created before a restart have no numbers on the restarted node: each is
    listed by id alone, and every one of them is there."""
    with running_nodes(tmp_path, 1) as (node,):
        made = {create_room(node, f"r{i}")["id"] for i in range(2100)}  # > one chunk
        node.stop()
        node.start()
        body = listing(node)
        assert body["active"] == [] and set(body["idle"]) == made
        assert body["load"] == pytest.approx(len(made) * IDLE_FLOOR, rel=1e-3)


# -- the cache of the total, without a node ----------------------------------------------


class FakeStore:
    def __init__(self) -> None:
        self.rooms: set[str] = set()

    def get_room(self, room_id):
        return room_id if room_id in self.rooms else None

    def room_count(self) -> int:
        return len(self.rooms)

    def room_ids(self) -> list[str]:
        return sorted(self.rooms)


class FakeTracker:
    def __init__(self) -> None:
        self.rows: dict[str, RoomActivity] = {}
        self.forgotten: list[str] = []

    def snapshot(self, connections):
        return sorted(self.rows.values())

    def forget(self, room_id):
        self.forgotten.append(room_id)
        self.rows.pop(room_id, None)


class FakeRooms:
    def __init__(self) -> None:
        self.activity = FakeTracker()

    def connections_by_room(self):
        return {}


def test_the_total_is_cached_but_counts_rooms_created_since_at_once():
    now = [0.0]
    store, rooms = FakeStore(), FakeRooms()
    computed = []

    def measure(active, count):
        computed.append(count)
        return sum(r.activity for r in active) + count

    loads = NodeLoads(store, rooms, measure, room_presence(0.0), clock=lambda: now[0])
    store.rooms.add("a")
    rooms.activity.rows["a"] = RoomActivity("a", 0, 5.0, 0.0)
    assert loads.total() == 6.0 and computed == [1]
    store.rooms.update({"b", "c"})  # created since: a fresh room each, no recomputation
    assert loads.total() == pytest.approx(8.0) and computed == [1]
    store.rooms.difference_update({"a", "b"})  # rooms left: computed again ...
    assert loads.total() == 1.0 and computed == [1, 1]
    assert rooms.activity.forgotten == ["a"]  # ... and the numbers of a forgotten
    assert loads.total() == 1.0 and computed == [1, 1]
    now[0] += MAX_AGE  # any other change shows within MAX_AGE
    rooms.activity.rows["c"] = RoomActivity("c", 0, 3.0, 0.0)
    assert loads.total() == 4.0 and computed == [1, 1, 1]
