"""Where a room lives, asked of real nodes: ``GET /api/rooms/<room_id>`` on any node, the
internal ``GET /internal/rooms/<room_id>`` it is built on, and the page redirects for
instances that are gone (SPEC section 8), also through the local router's default rule.

Moves themselves are in ``test_follow_move.py``; the directory's reasoning about forwards
and half-finished moves in ``test_directory.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from shardchat import urls
from shardchat.cluster.router import Router, serve
from shardchat.cluster.rules import build_rules
from shardchat.whereabouts import ROOM_FIELDS
from tests.conftest import create_room
from tests.support import AUTH, NodeProcess, bound_port, http_json, running_nodes

pytestmark = pytest.mark.timeout(90)

PEER_TIMEOUT = 0.5
GONE = 9  # an instance number this cluster does not have


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> Iterator[list[NodeProcess]]:
    tmp = tmp_path_factory.mktemp("lookup")
    with running_nodes(tmp, 3, node={"peer_timeout": PEER_TIMEOUT}) as started:
        yield started


def lookup(node: NodeProcess, room_id: str) -> tuple[int, Any]:
    return http_json("GET", f"{node.base_url}/api/rooms/{room_id}")


def get_raw(url: str) -> tuple[int, dict[str, str], bytes]:
    """One GET, redirects not followed: (status, headers, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def without_invite(room: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in room.items() if k != "invite"}


# ---------------------------------------------------------------------------------------
# GET /api/rooms/<room_id>


@pytest.mark.parametrize("private", [False, True], ids=["public", "private"])
def test_every_node_describes_the_room_where_it_lives_without_its_invite(nodes, private):
    room = create_room(nodes[1], "Lives on 2", private=private)
    for node in nodes:
        status, found = lookup(node, room["id"])
        assert status == 200, (node.number, found)
        assert found == without_invite(room), node.number
        assert set(found) == set(ROOM_FIELDS)


def test_an_unknown_room_is_404_with_a_sentence(nodes):
    status, body = lookup(nodes[0], "noSuchRoom0123456789ab")
    assert status == 404 and body["error"] == "not_found"
    assert "noSuchRoom0123456789ab" in body["message"] and "create" in body["message"]


@pytest.mark.parametrize("room_id", ["bad!id", "a" * 65, "", "a%2Fb", "%C3%A9t%C3%A9"],
                         ids=["punctuation", "too-long", "empty", "slash", "accents"])
def test_a_bad_room_id_is_400_saying_what_a_room_id_is(nodes, room_id):
    status, body = lookup(nodes[0], room_id)
    assert status == 400 and body["error"] == "bad_request", (status, body)
    assert "room ids are 1 to 64 letters" in body["message"]


def test_the_lookup_is_answered_fresh_every_time(nodes):
    room = create_room(nodes[2], "Fresh")
    conn = http.client.HTTPConnection("127.0.0.1", nodes[0].port, timeout=10)
    try:
        conn.request("GET", f"/api/rooms/{room['id']}")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and resp.getheader("Cache-Control") == "no-store"
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------
# GET /internal/rooms/<room_id>


def test_the_owner_says_so_on_its_internal_listener_and_the_others_know_nothing(nodes):
    room = create_room(nodes[1], "Asked", private=True)
    status, state = http_json("GET", f"{nodes[1].internal_url}/internal/rooms/{room['id']}",
                              headers=AUTH)
    assert status == 200
    assert state == {"state": "owner", "instance": 2, "room": without_invite(room)}
    status, body = http_json("GET", f"{nodes[0].internal_url}/internal/rooms/{room['id']}",
                             headers=AUTH)
    assert status == 404 and body["error"] == "not_found"
    status, body = http_json("GET", f"{nodes[0].internal_url}/internal/rooms/bad!id",
                             headers=AUTH)
    assert status == 400 and body["error"] == "bad_request"
    status, _ = http_json("GET", f"{nodes[1].internal_url}/internal/rooms/{room['id']}")
    assert status == 401


# ---------------------------------------------------------------------------------------
# pages of instances that are gone, and of other instances


def test_a_page_of_a_gone_instance_redirects_to_where_the_room_lives_keeping_the_query(nodes):
    room = create_room(nodes[1], "Old link", private=True)
    stale = urls.room_path(GONE, room["id"]) + "?invite=" + room["invite"] + "&x=1"
    status, headers, _ = get_raw(nodes[0].base_url + stale)
    assert status == 308, (status, headers)
    assert headers["location"] == room["path"] + "?invite=" + room["invite"] + "&x=1"
    status, headers, _ = get_raw(nodes[0].base_url + urls.room_path(GONE, room["id"]))
    assert status == 308 and headers["location"] == room["path"]  # no query: none added

def test_a_page_of_a_gone_instance_for_a_room_nobody_has_is_the_usual_404(nodes):
    status, headers, body = get_raw(nodes[0].base_url + urls.room_path(GONE, "nobodyHasIt"))
    assert status == 404 and b'"not_found"' in body
    assert headers["content-type"].startswith("application/json")


def test_other_paths_of_a_gone_instance_stay_421_and_say_it_is_gone(nodes):
    status, body = http_json("GET", nodes[0].base_url + urls.healthz_path(GONE))
    assert status == 421 and body["error"] == "wrong_instance"
    assert "not part of this cluster" in body["message"]
    assert "/api/rooms/" in body["message"]


@pytest.mark.parametrize("room_id", [None, "nobodyHasIt"], ids=["lives-there", "nowhere"])
def test_a_page_of_another_live_instance_is_still_a_routing_mistake(nodes, room_id):
    """The room lives on instance 2 (or nowhere), and instance 2 exists: its page reaching
    node 1 means a load balancer rule points wrong, and is said as such."""
    room_id = room_id or create_room(nodes[1], "Misrouted")["id"]
    status, body = http_json("GET", nodes[0].base_url + urls.room_path(2, room_id))
    assert status == 421 and body["error"] == "wrong_instance"
    assert "load balancer rule" in body["message"]


def test_a_page_under_a_live_instance_for_a_room_that_lives_elsewhere_redirects(nodes):
    """A link names instance 2 but the room lives on 3 (it moved), and the request came to
    node 1 (the rules were changed under way): node 1 sends it to where the room is."""
    room = create_room(nodes[2], "Elsewhere")
    status, headers, _ = get_raw(nodes[0].base_url + urls.room_path(2, room["id"]) + "?a=b")
    assert status == 308 and headers["location"] == room["path"] + "?a=b"


async def test_through_the_router_a_gone_instance_takes_the_default_rule_and_redirects(nodes):
    """The router holds the rules of the config (instances 1-3): ``/i9/...`` matches none,
    takes the default action as an ALB would, and whichever node gets it redirects."""
    rules = build_rules(n.number for n in nodes)
    assert rules.match(urls.room_path(GONE, "x")) is None
    router = Router(rules, {n.number: ("127.0.0.1", n.port) for n in nodes})
    runner = await serve(router, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{bound_port(runner)}"
    room = await asyncio.to_thread(create_room, nodes[2], "Behind the router")
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(len(nodes)):  # round-robin: every node of the default group
                async with session.get(base + urls.room_path(GONE, room["id"]),
                                       allow_redirects=False) as resp:
                    assert resp.status == 308
                    assert resp.headers["Location"] == room["path"]
            async with session.get(base + urls.room_path(GONE, room["id"])) as resp:
                assert resp.status == 200 and resp.content_type == "text/html"
                assert str(resp.url).endswith(room["path"])
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------------------
# peers that cannot be asked


@contextlib.contextmanager
def frozen(node: NodeProcess) -> Iterator[None]:
    """SIGSTOP: the node keeps its sockets but answers nothing, the worst kind of peer."""
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)


def test_a_hanging_peer_costs_one_bounded_wait_and_makes_an_unknown_room_503(nodes):
    room = create_room(nodes[1], "Still found")
    with frozen(nodes[2]):
        started = time.monotonic()
        status, found = lookup(nodes[0], room["id"])
        assert status == 200 and found["instance"] == 2
        status, body = lookup(nodes[0], "notThereAtAll0123456789")
        took = time.monotonic() - started
    assert status == 503 and body["error"] == "unavailable", body
    assert "instance 3" in body["message"], body["message"]
    assert took < 4 * PEER_TIMEOUT + 2, f"two lookups took {took:.1f} s"


def test_a_stopped_peer_makes_an_unknown_room_503_until_it_is_back(tmp_path):
    with running_nodes(tmp_path, 2, node={"peer_timeout": PEER_TIMEOUT}) as (one, two):
        two.stop()
        status, body = lookup(one, "notThereAtAll0123456789")
        assert status == 503 and "instance 2" in body["message"], body
        two.start()
        status, body = lookup(one, "notThereAtAll0123456789")
        assert status == 404, body
