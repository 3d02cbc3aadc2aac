"""Long-polling requests that arrive after their Engine.IO session has closed."""

from __future__ import annotations

import asyncio
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


async def test_post_the_server_refuses_is_answered_even_with_no_poll_pending(node1, connect):
    """A POST holding a packet Engine.IO refuses from a client (an OPEN) closes that session.
    With no long-poll GET pending, engineio used to wait forever for the CLOSE to be
    fetched, holding the request, the socket and its queue: it must be answered at once
    and the session forgotten."""
    room = await acreate_room(node1)
    bystander = await connect(node1, room, name="bystander")
    endpoint = f"{node1.base_url}{urls.socketio_path(node1.number)}/?EIO=4&transport=polling"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        async with session.get(endpoint) as resp:
            sid = json.loads((await resp.text())[1:])["sid"]
        url = f"{endpoint}&sid={sid}"
        async with session.post(url, data=f'40{room["namespace"]},{{"name":"x"}}') as resp:
            assert resp.status == 200
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(8):
                async with session.post(url, data=b"0") as resp:
                    status = resp.status
        except TimeoutError:
            raise AssertionError("a POST with an Engine.IO OPEN packet was not answered "
                                 "within 8 s") from None
        assert 400 <= status < 500, status
        assert loop.time() - started < 8
        async with session.get(url) as resp:
            assert resp.status == 400, "the closed session still answers polls"
    ack = await bystander.send_ok("unharmed")
    assert (await bystander.next("message"))["seq"] == ack["seq"]
