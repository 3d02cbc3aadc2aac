"""Engine.IO liveness on the websocket transport (shardchat/node/engine/liveness.py): the node
pings every ``ping_interval`` from shared coarse timers, a client that answers stays in its
room for as long as it likes, and one that stops answering is cut off after
``ping_timeout``, so its room sees it leave."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import pytest

from tests.conftest import acreate_room
from tests.support import NodeProcess, running_nodes
from tests.test_node_refusals import NO_ANSWER, raw_socket

pytestmark = pytest.mark.timeout(60)

PING_INTERVAL = 1.0
PING_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def fast_ping_node(tmp_path_factory) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("liveness")
    with running_nodes(tmp, 1, node={"ping_interval": PING_INTERVAL,
                                     "ping_timeout": PING_TIMEOUT}) as nodes:
        yield nodes[0]


async def next_frame(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> str | None:
    """The next text frame as sent (pings are not answered), None once closed."""
    try:
        msg = await asyncio.wait_for(ws.receive(), timeout)
    except TimeoutError:
        return NO_ANSWER
    if msg.type is aiohttp.WSMsgType.TEXT:
        return msg.data
    return None


async def test_a_client_that_answers_pings_stays_and_keeps_receiving(fast_ping_node, connect):
    room = await acreate_room(fast_ping_node)
    ns = room["namespace"]
    async with aiohttp.ClientSession() as session:
        sock = await raw_socket(session, fast_ping_node)
        answer = await sock.join(ns, {"name": "patient"})
        assert answer and answer.startswith(f"40{ns},"), answer
        pings = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10 * PING_INTERVAL
        for _ in range(200):  # several ping cycles, answering each
            if pings >= 4 or loop.time() > deadline:
                break
            frame = await next_frame(sock.ws, 2 * PING_INTERVAL + 1)
            assert frame is not None and frame != NO_ANSWER, "the node went quiet or closed"
            if frame == "2":
                pings += 1
                await sock.ws.send_str("3")
        assert pings >= 4, f"only {pings} pings in {10 * PING_INTERVAL} s"
        other = await connect(fast_ping_node, room, name="talker")
        await other.call("message", {"text": "still there?"})
        frame = await sock.until((f'42{ns},["message"',), timeout=5)
        assert frame and json.loads(frame[len(f"42{ns},"):])[1]["text"] == "still there?"
        await sock.ws.close()


async def test_a_client_that_stops_answering_is_cut_off_and_its_room_sees_it_leave(
        fast_ping_node, connect):
    room = await acreate_room(fast_ping_node)
    ns = room["namespace"]
    watcher = await connect(fast_ping_node, room, name="watcher")
    async with aiohttp.ClientSession() as session:
        sock = await raw_socket(session, fast_ping_node)
        answer = await sock.join(ns, {"name": "silent"})
        assert answer and answer.startswith(f"40{ns},"), answer
        loop = asyncio.get_running_loop()
        started = loop.time()
        saw_ping, closed = False, False
        for _ in range(100):  # read without ever answering a PING
            frame = await next_frame(sock.ws, 3 * (PING_INTERVAL + PING_TIMEOUT) + 2)
            assert frame != NO_ANSWER, "the node neither pinged nor closed"
            if frame is None:
                closed = True
                break
            saw_ping = saw_ping or frame == "2"
        elapsed = loop.time() - started
    assert saw_ping and closed
    assert elapsed < PING_INTERVAL + PING_TIMEOUT + 3, f"cut off only after {elapsed:.1f} s"
    for _ in range(20):  # presence events until the silent member leaves
        presence = await watcher.next("presence")
        if presence["event"] == "leave" and presence["member"]["name"] == "silent":
            break
    else:
        raise AssertionError("the room never saw the silent member leave")
