"""The owner's lease (``node.adopt_lease``) with real nodes on loopback: with ``auto_adopt``,
an owner cut off from the majority (not from its clients) stops before its follower adopts
its rooms, so they never have two owners; one that still reaches a majority serves on.

Cluster of three: instance 1's follower is 2, 2's is 3, 3's is 1 (the default ring).
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from shardchat.node.main import EXIT_ADOPTED_AWAY
from shardchat.node.replication.lease import Lease, needed_to_adopt
from tests.conftest import acreate_room, open_client
from tests.replicas import (
    assert_fenced,
    burst,
    caught_up,
    check_adopted,
    cluster,
    lookup,
    metrics,
    stop_all,
)
from tests.support import AUTH, async_wait_until, http_json, in_thread

LEASE = 3.0  # a few seconds: a loaded machine's slow polls must not stop a node
# adopt_lease + stats_interval + peer_timeout (4.5 s) < adopt_after, with room for the
# owner's stop (its drain) before the first adoption can pass
TIMINGS = {"auto_adopt": True, "adopt_after": 8.0, "adopt_lease": LEASE,
           "stats_interval": 0.5, "peer_timeout": 1.0, "replication_ack_timeout": 1.0}
# every link between instance 1 and the others, both ways: its stats polls of 2 and 3, and
# theirs of it (2's follower stream to 1 too); 2 and 3 still reach each other, and every
# client still reaches 1
AROUND_ONE = [(1, 2), (1, 3), (2, 1), (3, 1)]
# one way only: 2 and 3 cannot reach 1 (so they vote for its adoption), 1 still polls them
TOWARD_ONE = [(2, 1), (3, 1)]
SLACK = 1.5  # seconds a loaded two-core machine may add to a poll or a log line


def logged_at(path: Path, words: str) -> float:
    """The time (epoch seconds) of the first line of a node's log holding ``words``."""
    for line in path.read_text(errors="replace").splitlines():
        if words in line:
            stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
            assert stamp, line
            return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"{words!r} is not in {path}")


def unreached_for(node, peer: int) -> float:
    status, body = http_json("GET", f"{node.internal_url}/internal/reachability",
                             headers=AUTH, timeout=5)
    assert status == 200, body
    return body["unreached_for"][str(peer)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cuts", [AROUND_ONE, TOWARD_ONE], ids=["both-ways", "one-way"])
async def test_an_owner_cut_off_from_the_majority_stops_before_its_follower_adopts(
        tmp_path, cuts):
    """Sync mode, so that every acked message must be on the adopter. One way only, the
    owner learns it from its peers' answers to its polls (how long they have not reached
    it)."""
    with cluster(tmp_path, "sync", cuts=cuts, **TIMINGS) as (
            _path, (one, two, three), proxies):
        room = await acreate_room(one, "Leased room")
        running, clients = await burst(one, room, senders=2, until_acked=40)
        token = clients[0].token
        await async_wait_until(in_thread(lambda: caught_up(one)), timeout=30,
                               what="instance 2 to copy instance 1")
        cut_at = time.time()
        for proxy in proxies.values():
            proxy.stop()  # the senders go on: their acks now fail (the follower is away)
        code = await asyncio.to_thread(one.proc.wait, LEASE + 30)
        exited_at = time.time()
        assert code == EXIT_ADOPTED_AWAY, one.log()
        # not adopted yet when the owner is gone: the follower waits adopt_after
        assert "adopted" not in await asyncio.to_thread(metrics, two)
        acked = await stop_all(running, clients)
        assert len(acked) >= 40
        log_path = one.log_path
        stopped_at = logged_at(log_path, "could not reach a majority of the other instances "
                                         f"(or they it) for {LEASE:g} s")
        assert "in touch with 0 of 2, not with instances 2, 3" in one.log()
        assert "stopped before a follower could adopt its rooms" in one.log()
        # within the lease, plus one poll of the peers that may have begun before the cut
        assert stopped_at - cut_at <= LEASE + TIMINGS["stats_interval"] + SLACK, (
            stopped_at - cut_at)
        gone_at = logged_at(log_path, "instance 1 stopped")
        assert gone_at <= exited_at + SLACK

        # the follower adopts by itself, after the owner stopped (its metrics count the
        # adoption once it follows instance 1 again, a moment after the rooms are its own)
        await async_wait_until(in_thread(lambda: "adopted" in metrics(two)), timeout=60,
                               what="instance 2 to adopt instance 1 by itself")
        assert (await asyncio.to_thread(metrics, two))["adopted"] == {"1": 1}
        await async_wait_until(
            in_thread(lambda: lookup(three, room["id"])[1].get("instance") == 2),
            timeout=60, what="instance 3 to find the room on instance 2")
        adopted_at = logged_at(two.log_path, "has not reached instance 1 for 8 s: adopting")
        assert adopted_at > gone_at, (adopted_at, gone_at)
        _, found = await asyncio.to_thread(lookup, three, room["id"])
        await check_adopted(two, dict(room, **found), acked, token)

        # the links come back and the owner restarts (as systemd's Restart=always does): its
        # start fences the adopted room before it serves anything
        for proxy in proxies.values():
            proxy.start()
        await asyncio.to_thread(one.start)
        await assert_fenced(one, room, 2, name="late")
        status, found = await asyncio.to_thread(lookup, one, room["id"])
        assert status == 200 and found["instance"] == 2, found
        # and, back with a majority, it keeps its lease
        assert one.proc.poll() is None
        assert (await asyncio.to_thread(metrics, one))["lease"]["lost"] is False


@pytest.mark.timeout(300)
async def test_an_owner_that_loses_one_of_two_peers_keeps_serving(tmp_path):
    """Instance 3 dies: 1 still reaches 2, so 1 and 2 are a majority of the three and no
    adoption of 1 can pass: 1 serves on well past its lease, sync acks included."""
    with cluster(tmp_path, "sync", **TIMINGS) as (_path, (one, _two, three), _):
        room = await acreate_room(one, "Serves on")
        member = await open_client(one, room, name="m")
        await member.send_ok("before", client_id="c0")
        three.kill()
        await async_wait_until(in_thread(lambda: unreached_for(one, 3) >= 3 * LEASE),
                               timeout=60, what="instance 1 not to reach 3 for three leases")
        lease = (await asyncio.to_thread(metrics, one))["lease"]
        assert lease == {"lease": LEASE, "unreached": [3], "lost": False}, lease
        assert one.proc.poll() is None, one.log()
        ack = await member.send_ok("after three leases", client_id="c1")
        assert ack["seq"] == 2, ack
        await member.close()
        assert "could not reach a majority" not in one.log()


@pytest.mark.parametrize(("instances", "stops_at"), [(3, 2), (4, 2), (5, 3), (6, 3), (7, 4)])
def test_the_lease_holds_while_the_peers_out_of_reach_cannot_adopt(instances, stops_at):
    """The lease is lost exactly when the unreached peers are as many as an adoption needs
    (``auto.py`` counts the same): the owner and the peers it reaches are then no longer a
    strict majority of the cluster."""
    others = list(range(2, instances + 1))
    assert needed_to_adopt(len(others)) == stops_at
    for out in range(len(others) + 1):
        stopped: list[str] = []
        lease = Lease(1, lambda: others, lambda p, out=out: 9.0 if p - 2 < out else 0.0,
                      LEASE, stopped.append)
        lease._started -= 10  # held long enough for the peers' times to count
        assert lease.check() is (out >= stops_at), (instances, out)
        assert len(stopped) == (out >= stops_at)
        assert ((1 + len(others) - out) * 2 > instances) is (out < stops_at)
