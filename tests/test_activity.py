"""Per-room activity: a decayed message rate and the last use, cheap on the hot path."""

from __future__ import annotations

import math
import time

import pytest

from shardchat.cluster import load
from shardchat.cluster.load import RoomLoad, instance_load
from shardchat.node.activity import (
    ACTIVITY_TIME_CONSTANT,
    PRUNE_AFTER,
    UNKNOWN_IDLE_SECONDS,
    ActivityTracker,
    RoomActivity,
)

TAU = ACTIVITY_TIME_CONSTANT


def steady(tracker: ActivityTracker, room: str, per_minute: float, minutes: float,
           start: float = 0.0) -> float:
    """Messages at an even pace; returns the time of the last one."""
    step = 60.0 / per_minute
    t = start
    for _ in range(int(minutes * per_minute)):
        t += step
        tracker.message(room, now=t)
    return t


def test_a_steady_pace_reads_as_its_messages_per_minute():
    tracker = ActivityTracker()
    end = steady(tracker, "r", per_minute=6, minutes=120)
    assert tracker.rate("r", now=end) == pytest.approx(6.0, rel=0.1)
    end = steady(tracker, "slow", per_minute=0.5, minutes=240)
    assert tracker.rate("slow", now=end) == pytest.approx(0.5, rel=0.15)


def test_a_quiet_room_fades_by_e_every_time_constant():
    tracker = ActivityTracker()
    end = steady(tracker, "r", per_minute=10, minutes=60)
    now = tracker.rate("r", now=end)
    assert tracker.rate("r", now=end + TAU) == pytest.approx(now / math.e)
    assert tracker.rate("r", now=end + 6 * TAU) < now / 400  # an hour later: almost nothing


def test_a_burst_does_not_read_as_a_busy_room_for_long():
    tracker = ActivityTracker()
    for i in range(100):  # 100 messages within one minute
        tracker.message("r", now=i * 0.6)
    assert tracker.rate("r", now=60) == pytest.approx(100 * 60 / TAU, rel=0.1)
    assert tracker.rate("r", now=3660) < 0.3


def test_touch_marks_a_room_used_without_counting_a_message():
    tracker = ActivityTracker()
    tracker.touch("r", now=100.0)
    assert tracker.rate("r", now=100.0) == 0.0
    assert tracker.idle_seconds("r", now=160.0) == 60.0
    tracker.message("r", now=200.0)
    tracker.touch("r", now=150.0)  # an older reading never makes the room look idler
    assert tracker.idle_seconds("r", now=260.0) == 60.0


def test_a_room_without_an_entry_is_quiet_and_idle_for_long():
    tracker = ActivityTracker()
    assert tracker.rate("nobody", now=5.0) == 0.0
    assert tracker.idle_seconds("nobody", now=5.0) == UNKNOWN_IDLE_SECONDS


def test_the_tracker_and_the_measure_agree_on_an_unknown_rooms_idle_time():
    assert UNKNOWN_IDLE_SECONDS == load.UNKNOWN_IDLE_SECONDS
    assert RoomLoad("r").idle_seconds == ActivityTracker().idle_seconds("r")


def test_readings_out_of_order_never_inflate_the_rate():
    tracker = ActivityTracker()
    tracker.message("r", now=100.0)
    tracker.message("r", now=90.0)  # a clock read out of order counts, without decay
    assert tracker.rate("r", now=100.0) == pytest.approx(2 * 60 / TAU)
    assert tracker.rate("r", now=50.0) == pytest.approx(2 * 60 / TAU)
    assert tracker.idle_seconds("r", now=50.0) == 0.0


def test_the_snapshot_lists_rooms_in_id_order_with_the_connections_given():
    tracker = ActivityTracker()
    tracker.message("b", now=10.0)
    tracker.touch("a", now=20.0)
    snap = tracker.snapshot({"a": 3, "c": 2, "gone": 0}, now=30.0)
    assert [r.room_id for r in snap] == ["a", "b", "c"]
    a, b, c = snap
    assert a == RoomActivity("a", 3, 0.0, 10.0)
    assert (b.connections, b.idle_seconds) == (0, 20.0)
    assert b.activity == pytest.approx(60 / TAU * math.exp(-20 / TAU))
    assert c == RoomActivity("c", 2, 0.0, UNKNOWN_IDLE_SECONDS)
    every = tracker.snapshot({}, rooms=["z", "b"], now=30.0)
    assert [r.room_id for r in every] == ["b", "z"]
    assert every[1] == RoomActivity("z", 0, 0.0, UNKNOWN_IDLE_SECONDS)


def test_a_snapshot_row_is_a_room_load():
    tracker = ActivityTracker()
    tracker.message("r", now=1.0)
    (row,) = tracker.snapshot({"r": 4}, now=2.0)
    assert RoomLoad.of(row) == RoomLoad(*row)
    assert instance_load([row]) == instance_load([RoomLoad(*row)])


def test_entries_idle_for_a_day_are_dropped_and_weigh_the_same_without_one():
    tracker = ActivityTracker()
    for i in range(1000):
        tracker.message(f"old{i}", now=0.0)
    tracker.message("recent", now=PRUNE_AFTER)
    before = instance_load(tracker.snapshot({}, rooms=["old0"], now=PRUNE_AFTER + 1))
    assert len(tracker) == 1  # the snapshot dropped the thousand stale entries
    after = instance_load(tracker.snapshot({}, rooms=["old0"], now=PRUNE_AFTER + 1))
    assert after == pytest.approx(before, rel=1e-6)
    assert tracker.prune(now=PRUNE_AFTER + 2) == 0


def test_a_moved_room_takes_its_numbers_to_its_new_owner():
    old = ActivityTracker(clock=lambda: 5_000.0)   # two machines, two monotonic clocks
    new = ActivityTracker(clock=lambda: 77.0)
    steady(old, "r", per_minute=4, minutes=60, start=1_000.0)
    old.touch("r", now=4_990.0)
    carried = old.export("r")
    assert carried is not None
    old.forget("r")
    assert old.export("r") is None and old.rate("r") == 0.0
    new.restore("r", *carried)
    assert new.rate("r") == pytest.approx(carried[0])
    assert new.idle_seconds("r") == pytest.approx(carried[1]) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        new.restore("x", math.nan, 0.0)


def test_restored_numbers_add_to_what_the_new_owner_counted_meanwhile():
    """Members reconnect to the new owner as soon as the room moved: messages it counted
    before the old owner's numbers arrived are kept, and the room is as recently used as
    either says."""
    new = ActivityTracker()
    new.message("r", now=100.0)
    new.message("r", now=100.0)
    new.restore("r", 6.0, 30.0, now=100.0)
    assert new.rate("r", now=100.0) == pytest.approx(6.0 + 2 * 60.0 / 600.0)
    assert new.idle_seconds("r", now=100.0) == 0.0


def test_the_default_clock_is_monotonic_time():
    tracker = ActivityTracker()
    tracker.message("r")
    assert 0.0 <= tracker.idle_seconds("r") < 60.0
    assert tracker.rate("r") > 0.0


def test_a_time_constant_must_be_positive():
    with pytest.raises(ValueError):
        ActivityTracker(time_constant=0)


def test_counting_a_message_is_cheap():
    """The hot path: 200,000 messages over 2,000 rooms. About 0.2 s on a laptop; the
    bound is ten times that, so a loaded machine does not fail it."""
    tracker = ActivityTracker()
    rooms = [f"room-{i}" for i in range(2000)]
    message = tracker.message
    started = time.perf_counter()
    for i in range(200_000):
        message(rooms[i % 2000], now=i * 0.001)
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"{elapsed / 200_000 * 1e6:.2f} us per message"
    assert len(tracker) == 2000
