"""The roster (a room's members in join order) and the presence batch's summary, as pure
data structures: what a welcome, a ``members`` page and a ``presence`` batch are made of."""

from __future__ import annotations

from itertools import islice

import pytest

from shardchat.config import MEMBER_JSON_BYTES, NodeSettings
from shardchat.node.engine import json_size
from shardchat.node.presence import (
    PresenceBatch,
    batch_events,
    batched,
    summary,
    tick,
)
from shardchat.node.roster import MIN_DEPARTED, Member, Roster, UnknownCursor


def member(n: int) -> Member:
    return Member(f"sid-{n}", f"name {n}", None, "127.0.0.1", identity=f"id-{n}")


def roster_of(count: int) -> Roster:
    roster = Roster()
    for n in range(count):
        roster.add(member(n))
    return roster


def sids(members) -> list[str]:
    return [m.sid for m in members]


def test_members_come_in_join_order_and_pages_go_on_from_any_member():
    roster = roster_of(10)
    assert sids(roster.values()) == [f"sid-{n}" for n in range(10)]
    assert sids(roster.first(3)) == ["sid-0", "sid-1", "sid-2"]
    assert sids(roster.first(50)) == sids(roster.values())
    assert sids(islice(roster.after(None), 4)) == ["sid-0", "sid-1", "sid-2", "sid-3"]
    assert sids(roster.after("sid-7")) == ["sid-8", "sid-9"]
    assert list(roster.after("sid-9")) == []
    roster.remove("sid-1")
    roster.add(member(10))
    assert sids(roster.first(3)) == ["sid-0", "sid-2", "sid-3"]
    assert sids(roster.after("sid-8")) == ["sid-9", "sid-10"], "a newcomer comes last"


def test_a_page_after_a_member_that_left_goes_on_from_where_it_was():
    roster = roster_of(6)
    for sid in ("sid-2", "sid-3"):
        roster.remove(sid)
    assert sids(roster.after("sid-2")) == ["sid-4", "sid-5"]
    assert sids(roster.after("sid-3")) == ["sid-4", "sid-5"]
    with pytest.raises(UnknownCursor):
        roster.after("never-here")


def test_departed_cursors_are_bounded_and_forgotten_oldest_first():
    roster = roster_of(MIN_DEPARTED + 10)
    for n in range(MIN_DEPARTED + 5):
        roster.remove(f"sid-{n}")
    assert len(roster) == 5
    with pytest.raises(UnknownCursor):
        roster.after("sid-0")  # forgotten: MIN_DEPARTED others left after it
    assert sids(roster.after(f"sid-{MIN_DEPARTED + 4}"))[:1] == [f"sid-{MIN_DEPARTED + 5}"]
    for n in range(MIN_DEPARTED + 5, MIN_DEPARTED + 10):
        roster.remove(f"sid-{n}")
    assert not roster
    with pytest.raises(UnknownCursor):
        roster.after(f"sid-{MIN_DEPARTED + 9}")  # an empty room pages nothing


def test_a_large_roster_pages_lazily():
    roster = roster_of(100_000)
    assert sids(islice(roster.after("sid-50000"), 3)) == ["sid-50001", "sid-50002",
                                                          "sid-50003"]
    assert len(roster.first(100)) == 100
    assert roster.remove("nobody") is None
    assert sids(roster.clear()[:2]) == ["sid-0", "sid-1"] and len(roster) == 0


def test_the_largest_member_fits_its_json_bound():
    m = Member("s" * 20, "\U0001F680" * 39 + '"', None, "a", identity="i" * 22)
    assert json_size(m.public()) + 1 <= MEMBER_JSON_BYTES


def test_a_batch_summary_lists_each_member_once_by_its_last_event():
    a, b, c = ({"sid": s, "name": s, "member": s} for s in "abc")
    batch = PresenceBatch()
    batch.joined(a)
    batch.cut("a")
    batch.left(b)  # was announced before this tick
    batch.joined(c)
    batch.left(c)  # came and went within the tick: told as gone only
    assert summary(batch.log) == ([a], [b, c])
    assert summary(batch.log, batch.fresh["a"]) == ([], [b, c]), "never its own join"
    batch.left(a)
    assert "a" not in batch.fresh
    assert summary(batch.log) == ([], [b, c, a])


def test_a_large_batch_is_split_into_events_within_the_page_bound():
    joined = [{"sid": f"s{n:04}", "name": "x" * 40, "member": "m" * 22} for n in range(500)]
    events = batch_events(joined, [], 500, max_bytes=4096)
    assert len(events) > 1
    assert all(json_size(e) <= 4096 and e["count"] == 500 for e in events)
    assert [m for e in events for m in e["joined"]] == joined
    assert batch_events([], [], 3, 4096) == []


def test_batching_starts_above_the_threshold_and_the_tick_grows_with_the_room():
    s = NodeSettings(presence_batch_members=100, presence_tick=0.5, presence_tick_max=5.0)
    assert not batched(s, 100, pending=False)
    assert batched(s, 101, pending=False) and batched(s, 3, pending=True)
    assert tick(s, 101) == pytest.approx(0.505)
    assert tick(s, 50) == 0.5 and tick(s, 400) == 2.0 and tick(s, 5000) == 5.0
    assert tick(NodeSettings(presence_batch_members=0), 7) == pytest.approx(3.5)
