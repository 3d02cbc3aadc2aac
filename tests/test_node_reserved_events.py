"""Events named like Socket.IO's lifecycle handlers, sent by a client as plain events."""

from __future__ import annotations

import json

import aiohttp
import pytest

from shardchat import urls
from tests.conftest import ENGINES, acreate_room, assert_failed_ack

pytestmark = pytest.mark.timeout(60)
ENGINES = ENGINES  # refused on the fast and the stock engine alike


async def raw_member(session: aiohttp.ClientSession, node, ns: str, name: str):
    """A websocket spoken by hand, joined to ``ns``; pings answered by the reader."""
    url = (f"ws://127.0.0.1:{node.port}{urls.socketio_path(node.number)}/"
           "?EIO=4&transport=websocket")
    ws = await session.ws_connect(url)
    assert (await ws.receive_str()).startswith("0{")
    await ws.send_str(f"40{ns},{json.dumps({'name': name})}")
    return ws


async def until(ws, prefix: str) -> str:
    for _ in range(50):
        frame = await ws.receive_str(timeout=5)
        if frame == "2":
            await ws.send_str("3")
        elif frame.startswith(prefix):
            return frame
    raise AssertionError(f"no frame starting with {prefix!r}")


@pytest.mark.parametrize("event", ["disconnect", "connect", "*"])
async def test_a_client_event_named_like_a_lifecycle_handler_is_refused(node1, connect,
                                                                         event):
    """python-socketio would run the node's own connect/disconnect handler for such an
    event (the room would announce a leave while the member stays connected), and match
    ``*`` to the catch-all handler with its arguments shifted. The event is refused
    (bad_request) and nothing changes for anyone."""
    room = await acreate_room(node1)
    ns = room["namespace"]
    bystander = await connect(node1, room, name="bystander")
    async with aiohttp.ClientSession() as session:
        ws = await raw_member(session, node1, ns, "mallory")
        await until(ws, f"42{ns},[\"welcome\"")
        join = await bystander.next("presence")
        assert join["event"] == "join", join
        await ws.send_str(f'42{ns},7["{event}",{{"name":"x"}},{{}}]')
        ack = json.loads((await until(ws, f"43{ns},7"))[len(f"43{ns},7"):])
        assert_failed_ack(ack[0], "bad_request")
        await ws.send_str(f'42{ns},8["message",{{"text":"still here"}}]')
        ok = json.loads((await until(ws, f"43{ns},8"))[len(f"43{ns},8"):])[0]
        assert ok["ok"] is True, ok
        await ws.close()
    msg = await bystander.next("message")
    assert msg["text"] == "still here" and msg["from"]["name"] == "mallory"
    leave = await bystander.next("presence")
    assert leave["event"] == "leave" and leave["count"] == 1, leave
    assert bystander.pending("presence") == []
