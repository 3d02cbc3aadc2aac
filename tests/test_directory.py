"""The directory's reasoning: how answers of the instances become "the room lives here".

The instances are scripted here (what each one says about the room, or that it cannot be
reached, or that it hangs), so that every shape of a cluster in the middle of moves can be
set up exactly: chains of forwards, loops, answers from before and after a move's commit.
Real nodes answering real lookups are in ``test_lookup.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from shardchat import urls
from shardchat.cluster.directory import Directory
from shardchat.cluster.peers import PeerError
from shardchat.whereabouts import ROOM_FIELDS, public_room

pytestmark = pytest.mark.timeout(30)

ROOM = "Rm0123456789abcdefghij"
TIMEOUT = 0.3


def described(n: int, room_id: str = ROOM, private: bool = False) -> dict[str, Any]:
    path = urls.room_path(n, room_id)
    room = {"id": room_id, "name": "Moving room", "private": private, "instance": n,
            "path": path, "url": "http://chat.test" + path,
            "namespace": urls.room_namespace(n, room_id),
            "socketio_path": urls.socketio_path(n)}
    if private:
        room["invite"] = "a-credential"
    return room


def owner(n: int, **kw: Any) -> dict[str, Any]:
    return {"state": "owner", "instance": n, "room": described(n, **kw)}


def forwarded(n: int, to: int) -> dict[str, Any]:
    return {"state": "forwarded", "instance": n, "to": to}


def incoming(n: int, source: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"state": "incoming", "instance": n}
    if source is not None:
        out["from"] = source
    return out


DOWN = "down"  # the instance refuses the connection
HANGS = "hangs"  # it never answers


class Cluster:
    """Scripted instances: ``answers[n]`` is what n says about ROOM, a list of answers for
    successive calls (the last one repeats), DOWN or HANGS; n absent: knows nothing."""

    def __init__(self, here: int, answers: dict[int, Any], peers: list[int] | None = None):
        self.here = here
        self.answers = answers
        self.peers = peers if peers is not None else sorted(n for n in answers if n != here)
        self.calls: list[int] = []

    def _next(self, n: int) -> Any:
        script = self.answers.get(n)
        if isinstance(script, list):
            return script.pop(0) if len(script) > 1 else script[0]
        return script

    def local(self, room_id: str) -> Any:
        return self._next(self.here)

    def numbers(self) -> list[int]:
        return self.peers

    async def room_state(self, number: int, room_id: str, timeout: float) -> Any:
        self.calls.append(number)
        if number not in self.peers:
            raise PeerError(number, "not an instance of this cluster")
        answer = self._next(number)
        if answer == DOWN:
            raise PeerError(number, "unreachable (ClientConnectorError)")
        if answer == HANGS:
            await asyncio.sleep(timeout)
            raise PeerError(number, f"no answer within {timeout:g} s")
        return answer

    def directory(self, **kw: Any) -> Directory:
        return Directory(self.here, self.local, self, TIMEOUT, **kw)


async def find(cluster: Cluster, room_id: str = ROOM, **kw: Any):
    return await cluster.directory(**kw).find(room_id)


async def test_the_owner_answers_itself_without_asking_anyone():
    cluster = Cluster(2, {2: owner(2), 1: owner(1), 3: DOWN})
    found = await find(cluster)
    assert found.status == 200 and found.room == described(2)
    assert cluster.calls == []


async def test_a_room_elsewhere_is_found_by_asking_the_peers():
    cluster = Cluster(1, {3: owner(3)}, peers=[2, 3, 4])
    found = await find(cluster)
    assert found.status == 200 and found.room["instance"] == 3
    assert sorted(cluster.calls) == [2, 3, 4]


async def test_a_lookup_never_gives_out_an_invite():
    cluster = Cluster(1, {2: owner(2, private=True)})
    found = await find(cluster)
    assert found.room == public_room(described(2, private=True))
    assert "invite" not in found.room and set(found.room) == set(ROOM_FIELDS)


async def test_a_local_forward_is_followed_first_and_settles_it_in_one_call():
    cluster = Cluster(1, {1: forwarded(1, 3), 3: owner(3)}, peers=[2, 3, 4, 5])
    found = await find(cluster)
    assert found.room["instance"] == 3
    assert cluster.calls == [3]


async def test_a_chain_of_forwards_is_followed_to_its_end():
    cluster = Cluster(1, {1: forwarded(1, 2), 2: forwarded(2, 3), 3: forwarded(3, 4),
                          4: owner(4)}, peers=[2, 3, 4])
    found = await find(cluster)
    assert found.room["instance"] == 4
    assert cluster.calls == [2, 3, 4]


async def test_a_forward_loop_ends_the_lookup_with_503():
    cluster = Cluster(1, {1: forwarded(1, 2), 2: forwarded(2, 3), 3: forwarded(3, 1)},
                      peers=[2, 3])
    found = await find(cluster)
    assert found.status == 503 and found.code == "unavailable"
    assert len(cluster.calls) <= 6


async def test_a_chain_longer_than_the_hop_limit_stops():
    chain = {n: forwarded(n, n + 1) for n in range(1, 12)}
    cluster = Cluster(1, chain, peers=list(range(2, 13)))
    found = await find(cluster, max_hops=3)
    assert found.status == 503
    assert cluster.calls[:3] == [2, 3, 4]


async def test_an_answer_from_before_the_move_reached_the_target_is_asked_again():
    """The fan-out caught the target before it was activated (incoming), and the source
    after its commit point (forwarded): the target is asked again, and owns it now."""
    cluster = Cluster(1, {2: forwarded(2, 3), 3: [incoming(3, source=2), owner(3)]})
    found = await find(cluster)
    assert found.room["instance"] == 3
    assert cluster.calls.count(3) == 2


async def test_two_owners_across_a_commit_point_the_forwarded_one_wins():
    """Node 2 answered before its move's commit, node 3 after its activation, and node 4
    still has the forward of an earlier move to 3: 3 is where the room lives."""
    cluster = Cluster(1, {2: owner(2), 3: owner(3), 4: forwarded(4, 3)})
    found = await find(cluster)
    assert found.room["instance"] == 3


async def test_nobody_knows_the_room_is_404():
    cluster = Cluster(1, {}, peers=[2, 3])
    found = await find(cluster)
    assert found.status == 404 and found.code == "not_found"
    assert ROOM in found.message and "create" in found.message


async def test_an_unreachable_peer_makes_an_unknown_room_503_naming_it():
    cluster = Cluster(1, {3: DOWN}, peers=[2, 3])
    found = await find(cluster)
    assert found.status == 503 and "instance 3" in found.message, found.message


async def test_an_unreachable_peer_does_not_matter_when_another_owns_the_room():
    cluster = Cluster(1, {2: DOWN, 3: owner(3)})
    assert (await find(cluster)).room["instance"] == 3


async def test_a_moving_room_without_an_owner_yet_is_503():
    cluster = Cluster(1, {2: incoming(2)}, peers=[2, 3])
    found = await find(cluster)
    assert found.status == 503 and "moving to instance 2" in found.message


async def test_a_forward_to_an_instance_that_is_gone_is_503():
    cluster = Cluster(1, {2: forwarded(2, 9)}, peers=[2, 3])
    found = await find(cluster)
    assert found.status == 503 and "instance 9" in found.message, found.message


async def test_hanging_peers_are_asked_at_once_and_cost_one_timeout():
    cluster = Cluster(1, {2: HANGS, 3: HANGS, 4: HANGS, 5: owner(5)})
    loop = asyncio.get_running_loop()
    started = loop.time()
    found = await find(cluster)
    took = loop.time() - started
    assert found.room["instance"] == 5
    assert took < 2 * TIMEOUT, f"peers were asked one after another ({took:.2f} s)"


async def test_the_whole_lookup_is_bounded_by_its_budget():
    """A chain of slow forwards cannot hold a lookup longer than the budget."""
    chain = {n: forwarded(n, n + 1) for n in range(1, 6)}
    cluster = Cluster(1, {**chain, 6: HANGS}, peers=list(range(2, 7)))
    loop = asyncio.get_running_loop()
    started = loop.time()
    found = await find(cluster, budget=TIMEOUT)
    assert found.status == 503
    assert loop.time() - started < TIMEOUT + 0.6


@pytest.mark.parametrize("answer", [
    {"state": "owner", "room": described(7)},  # describes another instance
    {"state": "owner", "room": {**described(2), "id": "someOtherRoom"}},
    {"state": "forwarded", "to": 2},  # to itself
    {"state": "forwarded", "to": "3"},
    {"state": "elsewhere"},
    ["owner"],
], ids=["other-instance", "other-room", "self-forward", "bad-to", "bad-state", "not-object"])
async def test_nonsense_answers_are_not_believed(answer):
    cluster = Cluster(1, {2: answer}, peers=[2, 3])
    found = await find(cluster)
    assert found.status == 503 and "instance 2" in found.message, found


async def test_a_peer_list_that_changes_is_read_at_each_lookup():
    peers: list[int] = [2]
    cluster = Cluster(1, {3: owner(3)}, peers=peers)
    directory = cluster.directory()
    assert (await directory.find(ROOM)).status == 404
    assert not directory.knows(3) and directory.knows(1) and directory.knows(2)
    peers.append(3)
    assert directory.knows(3)
    assert (await directory.find(ROOM)).room["instance"] == 3


def test_knows_names_this_node_and_its_peers_only():
    directory: Callable[[], Directory] = Cluster(4, {}, peers=[1, 2]).directory
    assert [n for n in range(1, 7) if directory().knows(n)] == [1, 2, 4]
