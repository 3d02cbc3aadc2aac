"""Leaves and lost connections, against a real node on both engines and both transports:
what the members who stay are told, what the room and the node hold afterwards.

A room that empties at once (a deploy, a blip: every connection of the room gone within a
moment) must tell whoever stays of every leave, once, end with the right ``member_count``,
and leave nothing behind on the node: its ``connections``, and the engine's Engine.IO
sessions and namespaces (``sessions`` in the metrics), come back to what they were. A
session connected to several rooms over one connection leaves all of them when that
connection ends, and only the one it leaves when it leaves one.

The node runs with small thresholds (as ``test_large_rooms.py``), so a dozen members make
a large room whose leaves go out in ``presence`` batches. Fillers are lean websocket
clients (``tests/crowd.py``) whose connections are simply dropped; the members whose view
is checked, and the sessions of several rooms, are python-socketio clients on the
transport under test.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import socketio

from tests import crowd
from tests.conftest import ENGINES, RoomClient, acreate_room, close_polling
from tests.support import AUTH, NodeProcess, async_wait_until, http_json, running_nodes

pytestmark = pytest.mark.timeout(120)
ENGINES = ENGINES  # every test here runs on the fast and the stock engine

THRESHOLD = 4  # presence_batch_members: above it, leaves go out in batches
TICK = 1.0  # seconds; fixed (presence_tick_max = presence_tick)
# The stock engine forgets a long-polling session that sent CLOSE only once its waiting GET
# returns, after ping_interval + ping_timeout (engineio's poll timeout): short here, so that
# the node is back where it was within ``WAIT`` on that engine too.
SETTINGS = {"welcome_members": 3, "presence_batch_members": THRESHOLD,
            "presence_tick": TICK, "presence_tick_max": TICK,
            "ping_interval": 2, "ping_timeout": 3}
FILLERS = 12  # lean members of the room that empties
LEAVERS = 3  # python-socketio members on the transport under test that leave with them
WAIT = 15.0  # seconds a node may take to be back where it was


@pytest.fixture(scope="module")
def node(tmp_path_factory, engine) -> Iterator[NodeProcess]:
    with running_nodes(tmp_path_factory.mktemp("leaves"), 1, engine=engine,
                       node=SETTINGS) as (n,):
        yield n


def _get(node: NodeProcess, path: str) -> dict[str, Any]:
    status, body = http_json("GET", f"{node.internal_url}{path}", headers=AUTH)
    assert status == 200, body
    return body


def held(node: NodeProcess) -> dict[str, int]:
    """What the node holds now: its members (``connections``) and the engine's sessions
    and namespaces, and presence batches waiting."""
    metrics = _get(node, "/internal/metrics")
    return {"connections": _get(node, "/internal/stats")["connections"],
            **metrics["sessions"], "pending_batches": metrics["presence"]["pending_batches"]}


async def back_to(node: NodeProcess, expected: dict[str, int], what: str) -> None:
    """Wait until the node holds ``expected`` again (every key of it)."""
    async def there() -> bool:
        now = await asyncio.to_thread(held, node)
        return all(now[k] == v for k, v in expected.items())

    try:
        await async_wait_until(there, timeout=WAIT, interval=0.1, what=what)
    except TimeoutError:
        raise AssertionError(f"{what}: the node holds {held(node)}, expected {expected}"
                             ) from None


async def until_count(client: RoomClient, count: int) -> tuple[set[str], set[str]]:
    """Read ``client``'s presence events until one says the room has ``count`` members;
    (sids told as joined, sids told as left), each event checked to name a sid once."""
    joined: set[str] = set()
    left: set[str] = set()
    for _ in range(200):
        event = await client.next("presence", timeout=WAIT)
        if event["event"] == "batch":
            came, went = ([m["sid"] for m in event[k]] for k in ("joined", "left"))
        else:
            came, went = ([event["member"]["sid"]], []) if event["event"] == "join" else (
                [], [event["member"]["sid"]])
        assert not left & set(went), f"a leave told twice: {event}"
        joined |= set(came)
        left |= set(went)
        if event["count"] == count:
            return joined, left
    raise AssertionError(f"the room never reached {count} members")


async def drop_session(sio: socketio.AsyncClient) -> None:
    """End the client's Engine.IO session (a CLOSE packet, no Socket.IO DISCONNECT of any
    namespace first): the server disconnects every namespace of that session itself. Over
    polling the last GET is abandoned, as ``RoomClient.close`` does."""
    if sio.eio.current_transport == "websocket":
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sio.eio.disconnect(), WAIT)
        return
    await close_polling(sio, WAIT, leave=False)


async def test_a_room_emptying_at_once_tells_who_stays_and_leaves_nothing_behind(
        node, connect, transport):
    """Fillers dropped and members leaving, all at once: the one who stays hears of every
    one of them once (in batches), the room counts 1, its ``members`` list only that one;
    once it leaves too, the node holds what it held before the room filled, no batch is
    left waiting, and the next joiner's welcome shows an empty room."""
    room = await acreate_room(node)
    before = await asyncio.to_thread(held, node)
    stays = await connect(node, room, name="stays", transport=transport)
    leavers = [await connect(node, room, name=f"leaver-{i}", transport=transport)
               for i in range(LEAVERS)]
    fillers = await crowd.join_in_order(node, room, FILLERS, "filler")
    try:
        everyone = 1 + LEAVERS + FILLERS
        await until_count(stays, everyone)
        await back_to(node, {"connections": before["connections"] + everyone,
                             "pending_batches": before["pending_batches"]},
                      "every member in and told")
        gone = {c.sid for c in leavers} | {f.sid for f in fillers}
        for f in fillers:  # the connections are lost: no Socket.IO DISCONNECT
            assert f.client is not None
            f.client.close()
        await asyncio.gather(*(c.close() for c in leavers))  # these leave the room
        joined, left = await until_count(stays, 1)
        assert left == gone and not joined
        page = await stays.call("members", {"after": None, "limit": 50})
        assert page["ok"] is True and page["next"] is None, page
        assert [m["sid"] for m in page["members"]] == [stays.sid]
        await back_to(node, {"connections": before["connections"] + 1,
                             "engineio_sessions": before["engineio_sessions"] + 1},
                      "the leavers gone")
    finally:
        await crowd.leave_all(fillers)
    await stays.close()
    await back_to(node, before, "the room empty")
    newcomer = await connect(node, room, name="newcomer", transport=transport)
    assert newcomer.welcome["member_count"] == 1
    assert [m["sid"] for m in newcomer.welcome["members"]] == [newcomer.sid]


async def _one_session_in(node: NodeProcess, rooms: list[dict], transport: list[str]
                          ) -> tuple[socketio.AsyncClient, dict[str, RoomClient]]:
    """One python-socketio client connected to every room of ``rooms`` over one
    connection, each namespace welcomed."""
    sio = socketio.AsyncClient(reconnection=False)
    clients = {r["namespace"]: RoomClient(sio, r["namespace"]) for r in rooms}
    await sio.connect(node.base_url, namespaces=list(clients),
                      socketio_path=rooms[0]["socketio_path"], transports=transport,
                      auth={"name": "several"}, wait_timeout=WAIT)
    for client in clients.values():
        client.welcome = await client.next("welcome", timeout=WAIT)
    return sio, clients


async def test_a_session_in_several_rooms_leaves_all_of_them_when_it_ends(
        node, connect, transport):
    """A session in three rooms whose connection ends: the watcher of each of the three
    is told of its leave, with the right count, the watcher of a fourth room hears
    nothing, and the node's members, sessions and namespaces are back where they were."""
    rooms = [await acreate_room(node, name=f"room {i}") for i in range(4)]
    watchers = [await connect(node, r, name=f"watcher-{i}", transport=transport)
                for i, r in enumerate(rooms)]
    before = await asyncio.to_thread(held, node)
    sio, clients = await _one_session_in(node, rooms[:3], transport)
    try:
        for watcher, room in zip(watchers[:3], rooms[:3], strict=True):
            event = await watcher.next("presence", timeout=WAIT)
            assert event["event"] == "join" and event["count"] == 2, event
            assert event["member"]["sid"] == clients[room["namespace"]].sid
        await back_to(node, {"connections": before["connections"] + 3,
                             "engineio_sessions": before["engineio_sessions"] + 1},
                      "the session in its three rooms")
        await drop_session(sio)
        for watcher, room in zip(watchers[:3], rooms[:3], strict=True):
            event = await watcher.next("presence", timeout=WAIT)
            assert event == {"event": "leave", "member": clients[room["namespace"]].public,
                             "count": 1}
        await back_to(node, before, "the session gone from every room")
        assert watchers[3].pending("presence") == []
    finally:
        with contextlib.suppress(Exception):
            await sio.eio.disconnect(abort=True)
        for watcher in watchers:
            await watcher.close()


async def test_leaving_one_room_of_a_session_keeps_it_in_the_others(node, connect,
                                                                    transport):
    """The session leaves one of its two rooms (a Socket.IO DISCONNECT of that namespace):
    that room's watcher is told, the other's is not and still gets the session's
    messages; the connection stays and the node holds one member less."""
    rooms = [await acreate_room(node, name=f"room {i}") for i in range(2)]
    watchers = [await connect(node, r, name=f"watcher-{i}", transport=transport)
                for i, r in enumerate(rooms)]
    sio, clients = await _one_session_in(node, rooms, transport)
    try:
        for watcher in watchers:
            assert (await watcher.next("presence", timeout=WAIT))["event"] == "join"
        mid = await asyncio.to_thread(held, node)
        first, second = (clients[r["namespace"]] for r in rooms)
        await sio._send_packet(sio.packet_class(socketio.packet.DISCONNECT,
                                                namespace=first.namespace))
        assert await watchers[0].next("presence", timeout=WAIT) == {
            "event": "leave", "member": first.public, "count": 1}
        await back_to(node, {"connections": mid["connections"] - 1,
                             "engineio_sessions": mid["engineio_sessions"],
                             "namespaces": mid["namespaces"]}, "one room left")
        ack = await second.send_ok("still here")
        message = await watchers[1].next("message", timeout=WAIT)
        assert message["seq"] == ack["seq"] and message["from"] == second.public
        assert watchers[1].pending("presence") == []
    finally:
        await drop_session(sio)
        for watcher in watchers:
            await watcher.close()
