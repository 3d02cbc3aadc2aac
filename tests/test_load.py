"""The load measure: what a room and an instance weigh, and a stats answer's load."""

from __future__ import annotations

import math
import random

import pytest

from shardchat.cluster import load
from shardchat.cluster.load import (
    IDLE_FLOOR,
    LIVE_ROOM_WEIGHT,
    RoomLoad,
    instance_load,
    legacy_load,
    node_load,
    placement_load,
    room_weight,
    stats_load,
)
from shardchat.node.activity import UNKNOWN_IDLE_SECONDS, ActivityTracker

DAY = 86400.0


def idle_room(n: int) -> RoomLoad:
    return RoomLoad(f"idle-{n}", idle_seconds=30 * DAY)


def test_ten_thousand_idle_rooms_count_a_little_but_far_less_than_one_busy_room():
    idle = instance_load(idle_room(n) for n in range(10_000))
    busy = room_weight(RoomLoad("busy", connections=8, activity=6.0, idle_seconds=10))
    assert 0 < idle <= 1.0
    assert busy >= 10 * idle
    # an instance with more idle rooms still weighs more: they break a tie, nothing else
    assert instance_load(idle_room(n) for n in range(10_001)) > idle


def test_a_room_just_used_counts_like_one_member_and_fades_over_hours():
    fresh = room_weight(RoomLoad("r", idle_seconds=0))
    assert fresh == pytest.approx(LIVE_ROOM_WEIGHT)
    assert fresh == pytest.approx(room_weight(RoomLoad("r", connections=1,
                                                       idle_seconds=30 * DAY)), rel=1e-3)
    weights = [room_weight(RoomLoad("r", idle_seconds=h * 3600)) for h in (0, 1, 4, 24)]
    assert weights == sorted(weights, reverse=True)
    assert weights[1] == pytest.approx(math.exp(-1), rel=1e-3)  # an hour: about a third
    assert weights[3] == pytest.approx(IDLE_FLOOR, rel=1e-3)  # a day: the floor


def test_connections_and_messages_add_to_a_rooms_weight():
    base = room_weight(RoomLoad("r", idle_seconds=30 * DAY))
    assert room_weight(RoomLoad("r", connections=7, idle_seconds=30 * DAY)) \
        == pytest.approx(base + 7 * load.CONNECTION_WEIGHT)
    assert room_weight(RoomLoad("r", activity=12.0, idle_seconds=30 * DAY)) \
        == pytest.approx(base + 12 * load.MESSAGE_WEIGHT)
    assert RoomLoad("r", 3, 2.0, 0).weight == room_weight(RoomLoad("r", 3, 2.0, 0))


def test_a_room_without_numbers_weighs_the_floor():
    assert RoomLoad("r").idle_seconds == UNKNOWN_IDLE_SECONDS
    assert room_weight(RoomLoad("r")) == pytest.approx(IDLE_FLOOR)
    assert room_weight(RoomLoad("r", idle_seconds=math.nan)) == pytest.approx(IDLE_FLOOR)


def test_nonsense_numbers_never_make_a_room_weigh_less_than_the_floor():
    odd = RoomLoad("r", connections=-4, activity=-3.0, idle_seconds=-100.0)
    assert room_weight(odd) == pytest.approx(LIVE_ROOM_WEIGHT)  # negative idle: just used


def test_instance_load_does_not_depend_on_the_order_of_its_rooms():
    rng = random.Random(3)
    rooms = [RoomLoad(f"r{i}", rng.randint(0, 50), rng.random() * 30,
                      rng.choice([0.0, 77.0, 4000.0, 9 * DAY])) for i in range(2000)]
    shuffled = rooms[:]
    rng.shuffle(shuffled)
    assert instance_load(rooms) == instance_load(shuffled)  # exactly, not approximately


def test_node_load_from_the_rooms_in_use_equals_the_load_of_every_room():
    tracker = ActivityTracker(clock=lambda: 1000.0)
    for i in range(20):
        for _ in range(i):
            tracker.message(f"busy{i}", now=900.0 + i)
    tracker.touch("joined", now=990.0)
    connections = {"busy3": 2, "joined": 1, "quiet-but-connected": 4}
    everyone = [f"busy{i}" for i in range(20)] + ["joined", "quiet-but-connected"] \
        + [f"idle{i}" for i in range(500)]
    full = instance_load(tracker.snapshot(connections, everyone))
    in_use = tracker.snapshot(connections)
    assert len(in_use) == 21  # busy1..19, joined, quiet-but-connected: no idle room
    assert node_load(in_use, room_count=len(everyone)) == pytest.approx(full, rel=1e-12)


# -- stats answers ------------------------------------------------------------------------


def test_stats_with_a_load_report_it():
    stats = {"instance": 2, "connections": 40, "rooms": 9000, "draining": False,
             "load": 55.5}
    assert stats_load(stats) == 55.5
    assert placement_load(stats) == 55.5
    assert placement_load({**stats, "load": 0}) == 0.0


def test_stats_of_an_older_node_fall_back_to_connections_plus_rooms():
    stats = {"instance": 2, "connections": 40, "rooms": 9000, "draining": False}
    assert stats_load(stats) is None
    assert placement_load(stats) == legacy_load(stats) == 9040.0


@pytest.mark.parametrize("value", [True, "12", None, -1.0, math.nan, math.inf, [3]])
def test_a_load_that_is_not_a_finite_number_is_not_believed(value):
    stats = {"connections": 3, "rooms": 4, "load": value}
    assert stats_load(stats) is None
    assert placement_load(stats) == 7.0


def test_legacy_load_ignores_fields_that_are_not_counts():
    assert legacy_load({"connections": True, "rooms": "9"}) == 0.0
    assert legacy_load({}) == 0.0


# -- room loads on the wire ---------------------------------------------------------------


def test_a_room_load_survives_a_trip_through_json():
    room = RoomLoad("q9V3", connections=3, activity=1.5, idle_seconds=42.0)
    assert RoomLoad.from_dict(room.to_dict()) == room
    assert RoomLoad.from_dict({"room_id": "r"}) == RoomLoad("r")


@pytest.mark.parametrize("data, field", [
    ([], "object"), ({"connections": 1}, "room_id"), ({"room_id": ""}, "room_id"),
    ({"room_id": "r", "connections": -1}, "connections"),
    ({"room_id": "r", "connections": 1.5}, "connections"),
    ({"room_id": "r", "connections": True}, "connections"),
    ({"room_id": "r", "activity": math.nan}, "activity"),
    ({"room_id": "r", "activity": "busy"}, "activity"),
    ({"room_id": "r", "idle_seconds": -3}, "idle_seconds"),
])
def test_a_malformed_room_load_names_its_field(data, field):
    with pytest.raises(ValueError, match=field):
        RoomLoad.from_dict(data)
