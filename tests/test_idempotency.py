"""Idempotent room creation: a retried ``POST /api/rooms`` with the same Idempotency-Key
gets the same room, whichever node answers it, and never makes a second room.

Real nodes on loopback; the retry is sent to a different node than the first attempt, as a
load balancer's round-robin lobby does. The expiry of keys is checked on a real Store.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from pathlib import Path

import pytest

from shardchat.node.store import KEY_TTL_MS, CreationKey, KeyedRoom, RoomRecord, Store
from tests.conftest import open_client
from tests.support import SECRET, http_json, running_nodes

HEADER = "Idempotency-Key"


def new_key() -> str:
    return secrets.token_urlsafe(16)


def create(node, body: dict, key: str | None = None) -> tuple[int, dict]:
    headers = {HEADER: key} if key is not None else None
    return http_json("POST", f"{node.base_url}/api/rooms", body, headers=headers)


def room_count(nodes) -> int:
    auth = {"Authorization": f"Bearer {SECRET}"}
    total = 0
    for n in nodes:
        status, stats = http_json("GET", f"{n.internal_url}/internal/stats", headers=auth)
        assert status == 200, stats
        total += stats["rooms"]
    return total


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    with running_nodes(tmp_path_factory.mktemp("idem"), 3) as nodes:
        yield nodes


def test_a_retry_on_any_other_node_returns_the_same_room(trio):
    key = new_key()
    body = {"name": "Retried", "private": True}
    status, first = create(trio[0], body, key)
    assert status == 201, first
    count = room_count(trio)
    # every node, the owner and those that must ask their peers, answers the same room
    for node in [n for n in trio if n.number != first["instance"]] + trio:
        status, again = create(node, body, key)
        assert status == 201, again
        assert {k: again[k] for k in again if k != "invite"} == \
            {k: first[k] for k in first if k != "invite"}
        assert again["invite"]  # a private room's replay carries a (fresh, valid) invite
    assert room_count(trio) == count
    status, other = create(trio[1], body, new_key())  # another key: another room
    assert status == 201 and other["id"] != first["id"]


async def test_the_invite_of_a_replay_admits(trio):
    key = new_key()
    body = {"name": "Private retried", "private": True}
    _, first = await asyncio.to_thread(create, trio[0], body, key)
    node = next(n for n in trio if n.number != first["instance"])
    _, again = await asyncio.to_thread(create, node, body, key)
    owner = next(n for n in trio if n.number == first["instance"])
    client = await open_client(owner, again, name="Ana")  # joins with the replay's invite
    try:
        assert client.welcome["room"]["id"] == first["id"]
    finally:
        await client.close()


def test_the_same_key_for_another_room_is_refused(trio):
    key = new_key()
    status, first = create(trio[0], {"name": "Original"}, key)
    assert status == 201
    count = room_count(trio)
    for node in trio:
        for body in ({"name": "Something else"}, {"name": "Original", "private": True}):
            status, err = create(node, body, key)
            assert status == 422, err
            assert err["error"] == "idempotency_conflict" and "new key" in err["message"]
    status, same = create(trio[2], {"name": "  Original "}, key)  # names are trimmed
    assert status == 201 and same["id"] == first["id"]
    assert room_count(trio) == count


@pytest.mark.parametrize("key", ["short", "x" * 129, "has spaces in it ok", "dots.are.not.ok.x"])
def test_a_malformed_key_is_a_400_that_says_what_a_key_is(trio, key):
    status, err = create(trio[0], {"name": "x"}, key)
    assert status == 400 and err["error"] == "bad_request"
    assert "Idempotency-Key" in err["message"] and "16 to 128" in err["message"]


async def test_simultaneous_retries_on_one_node_make_one_room(trio):
    key = new_key()
    count = await asyncio.to_thread(room_count, trio)
    answers = await asyncio.gather(*(asyncio.to_thread(create, trio[1], {"name": "Burst"}, key)
                                     for _ in range(8)))
    assert {status for status, _ in answers} == {201}
    assert len({room["id"] for _, room in answers}) == 1
    assert await asyncio.to_thread(room_count, trio) == count + 1


def test_the_key_survives_kill_9_of_the_node_that_holds_it(tmp_path):
    with running_nodes(tmp_path, 2) as nodes:
        key = new_key()
        status, first = create(nodes[0], {"name": "Durable"}, key)
        assert status == 201
        owner = next(n for n in nodes if n.number == first["instance"])
        other = next(n for n in nodes if n is not owner)
        owner.kill()
        owner.start()
        status, again = create(other, {"name": "Durable"}, key)
        assert status == 201 and again["id"] == first["id"]
        assert room_count(nodes) == 1


async def test_keys_expire_after_a_day(tmp_path: Path):
    store = Store(tmp_path / "i1")
    await store.open()
    try:
        now = int(time.time() * 1000)
        old = RoomRecord("old-room", "Old", False, now - KEY_TTL_MS - 60_000)
        await store.create_room(old, CreationKey("k" * 16, "f1"))
        assert store.find_key("k" * 16) is None  # past its lifetime: forgotten
        fresh = RoomRecord("new-room", "New", False, now)
        await store.create_room(fresh, CreationKey("n" * 16, "f2"))
        assert store.find_key("n" * 16) == KeyedRoom(fresh, "f2")
        assert store.get_room("old-room") is not None  # the room itself stays
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "i1" / "store.sqlite3") as db:  # pruned on that write
        assert db.execute("SELECT key FROM creation_keys").fetchall() == [("n" * 16,)]
