"""The roster (a room's members in join order) and the presence batch's summary, as pure
data structures: what a welcome, a ``members`` page and a ``presence`` batch are made of."""

from __future__ import annotations

import random
from itertools import islice
from typing import Any

import orjson
import pytest

from shardchat.config import MEMBER_JSON_BYTES, NodeSettings
from shardchat.node.catchup import Catchup
from shardchat.node.engine import json_size
from shardchat.node.presence import PresenceBatch, batched, tick
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


def test_the_recipient_list_follows_joins_readiness_floors_and_leaves():
    """A message goes to the roster's list of every member only while all are ready and
    none was welcomed with that message already; the list changes with every join, leave
    and welcome (a stale one would leave out a joiner or keep a member who left)."""
    roster = Roster()
    a, b = member(1), member(2)
    for m in (a, b):
        m.eio_sid = f"eio-{m.sid}"
        roster.add(m)
    assert roster.recipients(1) is None  # nobody welcomed yet: each member is looked at
    roster.mark_ready(a, 0)
    assert roster.recipients(1) is None  # b is still being welcomed
    roster.mark_ready(b, 3)
    assert roster.recipients(3) is None  # b's welcome already holds message 3
    assert roster.recipients(4) == [("sid-1", "eio-sid-1"), ("sid-2", "eio-sid-2")]
    c = member(3)
    roster.add(c)
    assert roster.recipients(5) is None  # c joined and is not ready
    roster.mark_ready(c, 5)
    assert [sid for sid, _ in roster.recipients(6)] == ["sid-1", "sid-2", "sid-3"]
    roster.remove("sid-2")
    assert [sid for sid, _ in roster.recipients(6)] == ["sid-1", "sid-3"]
    roster.clear()
    assert roster.recipients(7) == []


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


def head_sids(roster: Roster, n: int) -> list[str]:
    return [m["sid"] for m in orjson.loads(orjson.dumps(roster.head(n)))]


def test_the_encoded_head_follows_every_join_and_leave_inside_it():
    roster = roster_of(2)
    assert head_sids(roster, 3) == ["sid-0", "sid-1"]
    roster.add(member(2))  # the head had room: the joiner is in it
    assert head_sids(roster, 3) == ["sid-0", "sid-1", "sid-2"]
    kept = roster.head(3)
    roster.add(member(3))  # outside the head: the same bytes serve the next welcome
    roster.remove("sid-3")
    assert roster.head(3) is kept
    roster.remove("sid-1")  # inside: the next member moves up
    assert head_sids(roster, 3) == ["sid-0", "sid-2"]
    roster.add(member(4))
    assert head_sids(roster, 3) == ["sid-0", "sid-2", "sid-4"]
    assert head_sids(roster, 2) == ["sid-0", "sid-2"], "another size is built anew"
    roster.clear()
    assert head_sids(roster, 3) == []
    rng = random.Random(7)
    roster, n = roster_of(30), 30
    for _ in range(300):  # churn: the head always equals the first members, freshly built
        if len(roster) and rng.random() < 0.5:
            roster.remove(rng.choice(sids(roster.values())))
        else:
            roster.add(member(n))
            n += 1
        assert head_sids(roster, 5) == sids(roster.first(5))


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


def summary(log: list, start: int = 0) -> tuple[list[dict], list[dict]]:
    """What a batch from ``start`` says, member by member (the decisions of
    docs/protocol.md, "Presence in batches"): who came and is still here, who went (also
    those who came and went), each once, in the order of their last event."""
    joined: dict[str, dict] = {}
    left: dict[str, dict] = {}
    for is_join, m in log[start:]:
        if is_join:
            joined[m["sid"]] = m
        else:
            joined.pop(m["sid"], None)
            left[m["sid"]] = m
    return list(joined.values()), list(left.values())


def split(joined: list[dict], left: list[dict], count: int, max_bytes: int) -> list[dict]:
    """Those lists as batch events filled member by member: an event ends where the next
    member (its JSON and a comma) would take it past ``max_bytes``, unless it is empty."""
    events: list[dict] = []
    current: dict[str, Any] = {"event": "batch", "joined": [], "left": [], "count": count}
    used = json_size(current)
    for key, members in (("joined", joined), ("left", left)):
        for m in members:
            size = json_size(m) + 1
            if used + size > max_bytes and (current["joined"] or current["left"]):
                events.append(current)
                current = {"event": "batch", "joined": [], "left": [], "count": count}
                used = json_size(current)
            current[key].append(m)
            used += size
    if current["joined"] or current["left"]:
        events.append(current)
    return events


def on_the_wire(events: list[dict]) -> list[dict]:
    """The events as a client reads them (their fragments spliced in)."""
    return [orjson.loads(orjson.dumps(e)) for e in events]


def test_a_batch_lists_each_member_once_by_its_last_event():
    a, b, c = ({"sid": s, "name": s, "member": s} for s in "abc")
    batch = PresenceBatch()
    batch.joined(a)
    batch.cut("a")
    batch.left(b)  # was announced before this tick
    batch.joined(c)
    batch.left(c)  # came and went within the tick: told as gone only
    encoded = Catchup(batch.log)
    assert on_the_wire(encoded.events(9, 4096)) == [
        {"event": "batch", "joined": [a], "left": [b, c], "count": 9}]
    assert on_the_wire(encoded.events(9, 4096, batch.fresh["a"])) == [
        {"event": "batch", "joined": [], "left": [b, c], "count": 9}], "never its own join"
    batch.left(a)
    assert "a" not in batch.fresh
    assert on_the_wire(Catchup(batch.log).events(8, 4096)) == [
        {"event": "batch", "joined": [], "left": [b, c, a], "count": 8}]
    assert Catchup(batch.log).events(8, 4096, len(batch.log)) == [], "nothing after the cut"
    assert Catchup([]).events(0, 4096) == []


def test_a_large_batch_is_split_into_events_within_the_page_bound():
    joined = [{"sid": f"s{n:04}", "name": "x" * 40, "member": "m" * 22} for n in range(500)]
    events = Catchup([(True, m) for m in joined]).events(500, max_bytes=4096)
    assert len(events) > 1
    assert all(json_size(e) <= 4096 and e["count"] == 500 for e in events)
    assert [m for e in on_the_wire(events) for m in e["joined"]] == joined
    huge = {"sid": "h", "name": "y" * 5000, "member": "m"}
    alone = on_the_wire(Catchup([(True, huge), (True, joined[0])]).events(2, max_bytes=4096))
    assert [e["joined"] for e in alone] == [[huge], [joined[0]]], "too large: alone"


@pytest.mark.parametrize("seed", range(40))
def test_every_catch_up_is_the_summary_of_the_log_from_its_cut(seed):
    """Random ticks (joins, leaves of members from before the tick and from within it,
    names of every length): the batch from every cut is the member-by-member summary, split
    where a member-by-member fill splits it."""
    rng = random.Random(seed)
    log: list[tuple[bool, dict]] = []
    here = [{"sid": f"old{n}", "name": "o", "member": "m"} for n in range(20)]
    for n in range(rng.randrange(0, 80)):
        if here and rng.random() < 0.4:
            log.append((False, here.pop(rng.randrange(len(here)))))
        else:
            m = {"sid": f"s{n}", "name": "é" * rng.randrange(1, 40), "member": f"id{n}"}
            log.append((True, m))
            here.append(m)
    encoded = Catchup(log)
    max_bytes = rng.choice((120, 300, 1000, 256 * 1024))
    for start in range(len(log) + 1):
        expected = split(*summary(log, start), len(here), max_bytes)
        assert on_the_wire(encoded.events(len(here), max_bytes, start)) == expected, start
        # told in two windows, cut anywhere after ``start``: each member listed once, in
        # the list of the whole summary
        joined, left = summary(log, start)
        for cut in {start, (start + len(log)) // 2, len(log)}:
            parts = on_the_wire(encoded.events(len(here), max_bytes, start, cut)
                                + encoded.events(len(here), max_bytes, cut))
            assert [m for e in parts for m in e["joined"]] == joined, (start, cut)
            assert [m for e in parts for m in e["left"]] == left, (start, cut)
            assert all(e["count"] == len(here) and json_size(e) <= max(max_bytes, 6000)
                       for e in parts)


def test_batching_starts_above_the_threshold_and_the_tick_grows_with_the_room():
    s = NodeSettings(presence_batch_members=100, presence_tick=0.5, presence_tick_max=5.0)
    assert not batched(s, 100, pending=False)
    assert batched(s, 101, pending=False) and batched(s, 3, pending=True)
    assert tick(s, 101) == pytest.approx(0.505)
    assert tick(s, 50) == 0.5 and tick(s, 400) == 2.0 and tick(s, 5000) == 5.0
    assert tick(NodeSettings(presence_batch_members=0), 7) == pytest.approx(3.5)
