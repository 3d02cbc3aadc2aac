"""Large rooms (SPEC section 10), against a real node on both engines and both transports:
the welcome's capped member list and ``member_count``, ``members`` pages in join order, and
joins and leaves told as one ``presence`` batch per tick above the threshold.

The node runs with small thresholds, so a room of a dozen members is a large room here:
``welcome_members`` 3, ``presence_batch_members`` 4, and a fixed tick long enough that a
burst of joins on a loaded machine still falls into one tick. Fillers are lean clients
(``tests/crowd.py``); the members whose view is checked are python-socketio clients on the
transport under test.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from tests import crowd
from tests.conftest import ENGINES, acreate_room, assert_failed_ack
from tests.moves import AUTH, move_room
from tests.support import NodeProcess, async_wait_until, http_json, running_nodes

pytestmark = pytest.mark.timeout(120)
ENGINES = ENGINES  # every test here runs on the fast and the stock engine

WELCOME_MEMBERS = 3
THRESHOLD = 4
TICK = 2.5  # seconds; fixed (presence_tick_max = presence_tick)
SETTINGS = {"welcome_members": WELCOME_MEMBERS, "presence_batch_members": THRESHOLD,
            "presence_tick": TICK, "presence_tick_max": TICK}


@pytest.fixture(scope="module")
def big(tmp_path_factory, engine) -> Iterator[NodeProcess]:
    with running_nodes(tmp_path_factory.mktemp("large"), 1, engine=engine,
                       node=SETTINGS) as (node,):
        yield node


@pytest.fixture
async def lean() -> Any:
    """``await lean(...)`` joins lean members (``crowd.join_in_order``); all of them
    leave when the test ends."""
    opened: list[crowd.LeanMember] = []

    async def _lean(node: NodeProcess, room: dict, count: int, prefix: str = "member",
                    at_once: bool = False) -> list[crowd.LeanMember]:
        join = crowd.join_at_once if at_once else crowd.join_in_order
        members = await join(node, room, count, prefix)
        opened.extend(members)
        return members

    yield _lean
    await crowd.leave_all(opened)


async def walk(client: Any, limit: int, after: str | None = None
               ) -> tuple[list[dict], list[dict]]:
    """Every ``members`` page from ``after`` to the end: (members, pages)."""
    members: list[dict] = []
    pages: list[dict] = []
    for _ in range(1000):
        page = await client.call("members", {"after": after, "limit": limit})
        assert page["ok"] is True, page
        pages.append(page)
        members += page["members"]
        after = page["next"]
        if after is None:
            return members, pages
    raise AssertionError("the walk did not end")


def metrics(node: NodeProcess) -> dict[str, Any]:
    status, body = http_json("GET", f"{node.internal_url}/internal/metrics", headers=AUTH)
    assert status == 200, body
    return body


def batch_view(start: int, batches: list[dict]) -> int:
    """The member count a client holds after applying ``batches`` to ``start``."""
    return start + sum(len(b["joined"]) - len(b["left"]) for b in batches)


# ---------------------------------------------------------------------------------------
# the welcome


async def test_a_small_room_welcome_lists_everyone_with_the_count(big, connect, transport):
    room = await acreate_room(big, "Small")
    alice = await connect(big, room, name="alice", transport=transport)
    bob = await connect(big, room, name="bob", transport=transport)
    assert bob.welcome["members"] == [alice.public, bob.public]
    assert bob.welcome["member_count"] == 2


async def test_a_large_room_welcome_lists_its_first_members_and_counts_all(big, connect, lean,
                                                                           transport):
    room = await acreate_room(big, "Large")
    early = await lean(big, room, 7)
    late = await connect(big, room, name="late", transport=transport)
    w = late.welcome
    assert w["members"] == [m.public for m in early[:WELCOME_MEMBERS]], "first in join order"
    assert w["member_count"] == 8
    assert w["you"]["sid"] == late.sid


async def gone(reader: Any, sid: str) -> None:
    """Wait until the node no longer lists ``sid`` in the room (its leave was handled)."""

    async def left() -> bool:
        members, _ = await walk(reader, limit=500)
        return sid not in {m["sid"] for m in members}

    await async_wait_until(left, timeout=10, interval=0.2, what=f"{sid} gone from the room")


async def test_the_welcome_follows_joins_and_leaves_inside_and_outside_its_first_members(
        big, connect, lean, transport):
    """Every welcome lists the room's first members as they are at that join: a joiner of
    a room smaller than the list is in it, a leave from the list lets the next member move
    up, and joins and leaves behind it change only ``member_count``."""
    room = await acreate_room(big, "Head")
    a, b = await lean(big, room, 2)
    third = await connect(big, room, name="third", transport=transport)
    assert third.welcome["members"] == [a.public, b.public, third.public], "room in the list"
    assert third.welcome["member_count"] == 3
    d, e = await lean(big, room, 2, prefix="behind")
    fourth = await connect(big, room, name="fourth", transport=transport)
    assert fourth.welcome["members"] == [a.public, b.public, third.public]
    assert fourth.welcome["member_count"] == 6
    await d.close()  # behind the list: the next welcome lists the same members
    await gone(fourth, d.sid)
    fifth = await connect(big, room, name="fifth", transport=transport)
    assert fifth.welcome["members"] == [a.public, b.public, third.public]
    assert fifth.welcome["member_count"] == 6
    await b.close()  # in the list: the member after it moves up
    await gone(fifth, b.sid)
    sixth = await connect(big, room, name="sixth", transport=transport)
    assert sixth.welcome["members"] == [a.public, third.public, e.public]
    assert sixth.welcome["member_count"] == 6
    await a.close()
    await third.close()
    await gone(sixth, third.sid)
    await gone(sixth, a.sid)
    last = await connect(big, room, name="last", transport=transport)
    assert last.welcome["members"] == [e.public, fourth.public, fifth.public]
    assert last.welcome["member_count"] == 5


# ---------------------------------------------------------------------------------------
# members pages


async def test_a_walk_of_members_pages_is_everyone_in_join_order(big, connect, lean,
                                                                 transport):
    room = await acreate_room(big, "Walk")
    early = await lean(big, room, 11)
    reader = await connect(big, room, name="reader", transport=transport)
    everyone = [m.public for m in early] + [reader.public]
    members, pages = await walk(reader, limit=5)
    assert members == everyone
    assert [len(p["members"]) for p in pages] == [5, 5, 2]
    assert [p["next"] for p in pages] == [everyone[4]["sid"], everyone[9]["sid"], None]
    # the welcome's first members go on where the welcome stopped
    rest, _ = await walk(reader, limit=500, after=reader.welcome["members"][-1]["sid"])
    assert reader.welcome["members"] + rest == everyone
    whole = await reader.call("members", {"after": None, "limit": 12})
    assert whole["members"] == everyone and whole["next"] is None, "the last page ends it"
    default = await reader.call("members", {})
    assert default["members"] == everyone and default["next"] is None


async def test_a_page_after_a_member_that_left_goes_on_from_its_place(big, connect, lean,
                                                                      transport):
    room = await acreate_room(big, "Left")
    reader = await connect(big, room, name="reader", transport=transport)
    a, b, c = await lean(big, room, 3)
    for _ in range(3):  # four members: below the threshold, each join comes at once
        assert (await reader.next("presence"))["event"] == "join"
    first = await reader.call("members", {"after": None, "limit": 2})
    assert first["members"] == [reader.public, a.public] and first["next"] == a.sid
    await a.close()
    leave = await reader.next("presence")
    assert leave == {"event": "leave", "member": a.public, "count": 3}
    rest = await reader.call("members", {"after": first["next"], "limit": 10})
    assert rest == {"ok": True, "members": [b.public, c.public], "next": None}


@pytest.mark.parametrize("data, why", [
    (None, "no payload"),
    ("all", "not an object"),
    ({"after": 5}, "after not a string"),
    ({"after": ""}, "after empty"),
    ({"after": "x" * 65}, "after too long"),
    ({"after": "no-such-sid"}, "after unknown"),
    ({"limit": 0}, "limit 0"),
    ({"limit": 501}, "limit 501"),
    ({"limit": "5"}, "limit a string"),
    ({"limit": True}, "limit a boolean"),
    ({"limit": 2.5}, "limit not whole"),
])
async def test_bad_members_requests_ack_bad_request(big, connect, transport, data, why):
    room = await acreate_room(big, "Bad")
    reader = await connect(big, room, name="reader", transport=transport)
    ack = await reader.call("members", data)
    assert_failed_ack(ack, "bad_request")
    assert '"after"' in ack["message"] or '"limit"' in ack["message"] or (
        "members" in ack["message"]), f"{why}: {ack}"
    ok = await reader.call("members", {"after": None, "limit": 1})
    assert ok["ok"] is True, "the connection stays up and serves the next request"


# ---------------------------------------------------------------------------------------
# presence


async def test_below_the_threshold_each_join_and_leave_is_its_own_event(big, connect, lean,
                                                                       transport):
    room = await acreate_room(big, "Few")
    watcher = await connect(big, room, name="watcher", transport=transport)
    others = await lean(big, room, THRESHOLD - 1)
    for n, other in enumerate(others, start=2):
        assert await watcher.next("presence") == {"event": "join", "member": other.public,
                                                  "count": n}
    await others[0].close()
    assert await watcher.next("presence") == {"event": "leave", "member": others[0].public,
                                              "count": THRESHOLD - 1}


async def large_room_with_watcher(big, connect, lean, transport, name: str,
                                  fillers_too: bool = False) -> Any:
    """A room just above the threshold, its one batch so far taken: (room, watcher), and
    the lean members after the watcher when ``fillers_too``."""
    room = await acreate_room(big, name)
    watcher = await connect(big, room, name="watcher", transport=transport)
    fillers = await lean(big, room, THRESHOLD)
    for n, filler in enumerate(fillers[:-1], start=2):  # the room is small: one by one
        assert await watcher.next("presence") == {"event": "join", "member": filler.public,
                                                  "count": n}
    batch = await watcher.next("presence", timeout=TICK + 10)  # the last one makes it large
    assert batch == {"event": "batch", "joined": [fillers[-1].public], "left": [],
                     "count": THRESHOLD + 1}
    return (room, watcher, fillers) if fillers_too else (room, watcher)


async def test_a_burst_of_joins_above_the_threshold_arrives_as_one_batch(big, connect, lean,
                                                                         transport):
    room, watcher = await large_room_with_watcher(big, connect, lean, transport, "Burst")
    burst = await asyncio.gather(*(connect(big, room, name=f"burst-{n}", transport=transport)
                                   for n in range(5)))
    got = await watcher.next("presence", timeout=TICK + 10)
    assert got["event"] == "batch", got
    assert sorted(m["sid"] for m in got["joined"]) == sorted(b.sid for b in burst)
    assert {b.sid: b.public for b in burst} == {m["sid"]: m for m in got["joined"]}
    assert got["left"] == [] and got["count"] == THRESHOLD + 1 + 5

    # Each burst joiner is never told of its own join, and its welcome's count plus the
    # batches it gets add up to the room's (the last one welcomed may get none at all).
    seen: dict[str, list[dict]] = {b.sid: [] for b in burst}

    def views_add_up() -> bool:
        for b in burst:
            seen[b.sid] += b.pending("presence")
        return all(batch_view(b.welcome["member_count"], seen[b.sid]) == got["count"]
                   for b in burst)

    await async_wait_until(views_add_up, timeout=TICK + 10, what="the joiners' views")
    for b in burst:
        assert all(e["event"] == "batch" and e["count"] == got["count"] for e in seen[b.sid])
        assert b.sid not in {m["sid"] for e in seen[b.sid] for m in e["joined"]}
        assert all(e["left"] == [] for e in seen[b.sid])

    await burst[0].close()
    await burst[1].close()
    got = await watcher.next("presence", timeout=TICK + 10)
    assert got["event"] == "batch" and got["joined"] == [], got
    assert sorted(m["sid"] for m in got["left"]) == sorted([burst[0].sid, burst[1].sid])
    assert got["count"] == THRESHOLD + 1 + 3
    assert watcher.pending("presence") == []


async def test_every_joiner_of_a_tick_ends_up_knowing_the_room_as_it_is(big, connect, lean,
                                                                         transport):
    """Members join one after the other within a tick, then one from before them and two of
    them leave. Each joiner starts from the room its welcome saw (everyone before it in
    join order) and, applying what it is told after its welcome, holds exactly the room
    that remains, never told of its own join; so does the member from before them, who
    reads the shared batches."""
    room, watcher, fillers = await large_room_with_watcher(big, connect, lean, transport,
                                                           "Catch-up", fillers_too=True)
    before = [watcher.sid] + [f.sid for f in fillers]
    joiners = []
    for n in range(6):  # each welcomed before the next comes: the join order is known
        joiners.append(await connect(big, room, name=f"joiner-{n}", transport=transport))
    order = before + [j.sid for j in joiners]
    leaving = [fillers[0].sid, joiners[0].sid, joiners[3].sid]
    await fillers[0].close()
    await joiners[0].close()
    await joiners[3].close()
    remaining = {sid for sid in order if sid not in leaving}
    readers = {j.sid: j for j in joiners if j.sid not in leaving}
    known = {sid: set(order[:order.index(sid) + 1]) for sid in readers}
    readers[watcher.sid], known[watcher.sid] = watcher, set(before)
    counts: dict[str, int] = {}

    def everyone_knows_the_room() -> bool:
        for sid, reader in readers.items():
            for event in reader.pending("presence"):
                assert event["event"] == "batch", event
                joined = {m["sid"] for m in event["joined"]}
                assert sid not in joined, "a joiner is never told of its own join"
                known[sid] = (known[sid] | joined) - {m["sid"] for m in event["left"]}
                counts[sid] = event["count"]
        return all(known[sid] == remaining and counts.get(sid) == len(remaining)
                   for sid in readers)

    await async_wait_until(everyone_knows_the_room, timeout=2 * TICK + 15,
                           what="every reader's view of the room")


async def test_a_member_that_joins_and_leaves_within_a_tick_is_only_told_as_gone(
        big, connect, lean, transport):
    room, watcher = await large_room_with_watcher(big, connect, lean, transport, "Brief")
    brief = await crowd.join(big, room, "brief")
    await brief.close()
    got = await watcher.next("presence", timeout=TICK + 10)
    assert got == {"event": "batch", "joined": [], "left": [brief.public],
                   "count": THRESHOLD + 1}


async def test_a_joiner_of_a_large_room_sees_a_consistent_room(big, connect, lean,
                                                               transport):
    """The welcome, a full walk and the batches that follow add up to the room."""
    room = await acreate_room(big, "Consistent")
    await lean(big, room, 8)
    late = await connect(big, room, name="late", transport=transport)
    members, _ = await walk(late, limit=4)
    assert len(members) == late.welcome["member_count"] == 9
    known = {m["sid"] for m in members}
    more = await lean(big, room, 2, prefix="more", at_once=True)
    await more[0].close()
    expected = known | {more[1].sid}
    count = None
    for _ in range(10):  # the joins and the leave may fall into one tick or two
        got = await late.next("presence", timeout=TICK + 10)
        assert got["event"] == "batch" and late.sid not in str(got["joined"]), got
        known |= {m["sid"] for m in got["joined"]}
        known -= {m["sid"] for m in got["left"]}
        count = got["count"]
        if known == expected and count == len(expected):
            break
    assert known == expected and count == 10
    now, _ = await walk(late, limit=500)
    assert {m["sid"] for m in now} == known


async def test_a_stop_with_a_pending_batch_leaves_nothing_running(tmp_path, engine):
    """A batch waiting for a long tick does not hold up the node's stop, and no task of it
    is left behind (asyncio would log one destroyed while pending)."""
    settings = {**SETTINGS, "presence_tick": 60.0, "presence_tick_max": 60.0}
    with running_nodes(tmp_path, 1, engine=engine, node=settings) as (node,):
        room = await acreate_room(node, "Stopping")
        members = await crowd.join_in_order(node, room, THRESHOLD + 2)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            node.send_signal(signal.SIGTERM)
            code = await node.wait_async(timeout=30)
            assert code == 0, node.log()
            assert loop.time() - started < 30
        finally:
            await crowd.leave_all(members)
        log = node.log()
        assert "Task was destroyed" not in log and "presence batch" not in log, log


async def test_a_room_that_moves_drops_its_pending_batch(tmp_path, engine, connect):
    """The members are told ``moved``; the batch waiting for its tick on the old node is
    dropped with the room, and the new node serves the room as it is."""
    settings = {**SETTINGS, "presence_tick": 60.0, "presence_tick_max": 60.0}
    with running_nodes(tmp_path, 2, engine=engine, node=settings) as (a, b):
        room = await acreate_room(a, "Moving crowd")
        members = await crowd.join_in_order(a, room, THRESHOLD + 2)  # the last two: a batch
        try:
            assert (await asyncio.to_thread(metrics, a))["presence"] == {"pending_batches": 1}
            status, body = await asyncio.to_thread(move_room, a, room["id"], b.number)
            assert status == 200, body
            for m in members:
                moved = await asyncio.wait_for(asyncio.shield(m.moved), 10)
                assert moved["instance"] == b.number
            assert (await asyncio.to_thread(metrics, a))["presence"] == {"pending_batches": 0}
            back = await connect(b, moved, name="back")
            assert back.welcome["member_count"] == 1
            assert back.welcome["members"] == [back.public]
        finally:
            await crowd.leave_all(members)
        assert "presence batch" not in a.log(), a.log()
