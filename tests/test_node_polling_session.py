"""Long-polling requests that arrive after their Engine.IO session has closed."""

from __future__ import annotations

import json

import aiohttp
import pytest

from shardchat import urls
from tests.conftest import acreate_room

pytestmark = pytest.mark.timeout(60)


async def test_post_after_the_client_closed_its_session_is_a_json_400(node1, connect):
    """A client that sends CLOSE and then a late POST (a race any polling client can hit)
    gets a 400 saying the session is closed, never a plain-text server error; the room
    carries on."""
    room = await acreate_room(node1)
    bystander = await connect(node1, room, name="bystander", transport=["polling"])
    endpoint = f"{node1.base_url}{urls.socketio_path(node1.number)}/?EIO=4&transport=polling"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(endpoint) as resp:
            sid = json.loads((await resp.text())[1:])["sid"]
        url = f"{endpoint}&sid={sid}"
        join = f'40{room["namespace"]},{{"name":"leaver"}}'.encode()
        for body in (join, b"1"):
            async with session.post(url, data=body) as resp:
                assert resp.status == 200, await resp.text()
        async with session.post(url, data=b"40") as resp:
            status, ctype, body = resp.status, resp.content_type, await resp.read()
    assert status == 400, (status, body)
    assert ctype == "application/json", (ctype, body)
    error = json.loads(body)
    assert error["error"] == "bad_request" and "closed" in error["message"], error
    ack = await bystander.send_ok("still here")
    assert (await bystander.next("message"))["seq"] == ack["seq"]
