"""Bad text and unreadable payloads are refusals with a SPEC code, never exceptions.

SPEC section 4: text that is not valid Unicode (lone surrogates) or holds control characters
other than newline and tab is ``bad_request``. Each case here is sent for real to a running
node, over websocket and long-polling where the transport matters, and each checks that the
sender got its code, that another member of the room is unaffected, and that the node logged
no traceback (an exception is what these inputs used to cause).
"""

from __future__ import annotations

import asyncio
import collections
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from shardchat import config, urls
from shardchat.node.http import security_headers
from shardchat.node.main import Node
from shardchat.node.sockets import answers_errors
from tests.conftest import (
    ENGINES,
    acreate_room,
    assert_failed_ack,
    assert_refusal_shape,
    refusal,
)
from tests.support import (
    HEALTHY_TIMEOUT,
    SECRET,
    TEST_RATE_LIMITS,
    NodeProcess,
    async_wait_until,
    distinct_free_ports,
    http_json,
    in_thread,
    write_config,
)
from tests.test_node_refusals import raw_socket

pytestmark = pytest.mark.timeout(120)
ENGINES = ENGINES  # the fast and the stock engine refuse bad input alike

NESTED = "[" * 5000 + "]" * 5000  # deeper than orjson (1024) or the stdlib json goes
BAD_TEXT = {"lone_surrogate": "bad \ud800 text", "low_surrogate": "\udfff",
            "nul": "a\x00b", "bell": "ding\x07", "escape": "\x1b[31mred", "del": "x\x7f",
            "c1": "x\x9bz"}


class LogWatch:
    """What a node logged from now on: the inputs here must never produce a traceback."""

    def __init__(self, node: NodeProcess):
        self.node = node
        self.start = self._size()

    def _size(self) -> int:
        try:
            return self.node.log_path.stat().st_size
        except OSError:
            return 0

    def new(self) -> str:
        with open(self.node.log_path, "rb") as f:
            f.seek(self.start)
            return f.read().decode("utf-8", "replace")

    def assert_no_traceback(self) -> None:
        text = self.new()
        assert "Traceback" not in text, text[-3000:]


@pytest.fixture
def watch(node1) -> LogWatch:
    return LogWatch(node1)


async def assert_member_unaffected(node, room, bystander, connect) -> None:
    """The bystander still gets messages, and only the good ones."""
    other = await connect(node, room, name="other")
    ack = await other.send_ok("still fine")
    seen = await bystander.next("message")
    assert (seen["text"], seen["seq"]) == ("still fine", ack["seq"])
    assert bystander.pending("message") == []
    assert bystander.connected


# ---------------------------------------------------------------------------------------
# room names (HTTP)


@pytest.mark.parametrize("text", list(BAD_TEXT.values()), ids=list(BAD_TEXT))
@pytest.mark.parametrize("where", ["public", "internal"])
def test_room_name_with_bad_text_is_bad_request(node1, watch, text, where):
    body = json.dumps({"name": text}).encode()  # ensure_ascii: surrogates go as \ud800
    if where == "public":
        status, answer = http_json("POST", f"{node1.base_url}/api/rooms", body)
    else:
        status, answer = http_json("POST", f"{node1.internal_url}/internal/rooms", body,
                                   headers={"Authorization": f"Bearer {SECRET}"})
    assert status == 400 and answer["error"] == "bad_request", (status, answer)
    assert "room name" in answer["message"]
    watch.assert_no_traceback()


def test_room_name_may_hold_any_printable_text(node1):
    name = "Café 👩‍👩‍👧 — 中文"  # the zero-width joiner is a format character, not control
    status, room = http_json("POST", f"{node1.base_url}/api/rooms", {"name": name})
    assert status == 201 and room["name"] == name, room


@pytest.mark.parametrize("where", ["public", "internal"])
def test_deeply_nested_json_body_is_a_json_400(node1, watch, where):
    headers = {"Authorization": f"Bearer {SECRET}"} if where == "internal" else {}
    base = node1.base_url + "/api/rooms" if where == "public" else (
        node1.internal_url + "/internal/rooms")
    for body in (NESTED, '{"name": ' + NESTED + "}"):
        status, answer = http_json("POST", base, body.encode(), headers=headers)
        assert status == 400, (status, answer)
        assert isinstance(answer, dict) and answer["error"] == "bad_request", answer
    watch.assert_no_traceback()


def two_node_cluster(tmp: Path, node2_settings: dict | None = None) -> list[NodeProcess]:
    """Nodes 1 and 2; node 2 may read its own config copy with other ``[node]`` settings
    (a node that disagrees with its peers, as during a rolling config change)."""
    ports = iter(distinct_free_ports(4))
    instances = [{"number": n, "host": "127.0.0.1", "port": next(ports),
                  "internal_port": next(ports)} for n in (1, 2)]
    cluster = {"name": "test", "secret": SECRET, "data_dir": str(tmp / "data")}
    shared = write_config(tmp / "shardchat.toml", instances=instances, cluster=cluster,
                          node=TEST_RATE_LIMITS)
    own = shared
    if node2_settings:
        own = write_config(tmp / "node2.toml", instances=instances, cluster=cluster,
                           node={**TEST_RATE_LIMITS, **node2_settings})
    return [NodeProcess(shared, instances[0], tmp), NodeProcess(own, instances[1], tmp)]


async def create_interleaved(node: NodeProcess, bad_body: dict, count: int
                             ) -> tuple[list[tuple[int, Any]], collections.Counter]:
    """``count`` times: one bad creation, then one good one. Returns the bad answers and
    where the good rooms went. A bad request that made the receiving node mark its peer
    failed would send the good room that follows to the receiving node itself."""
    bad: list[tuple[int, Any]] = []
    placed: collections.Counter[int] = collections.Counter()
    url = f"{node.base_url}/api/rooms"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for i in range(count):
            async with s.post(url, data=json.dumps(bad_body).encode(),
                              headers={"Content-Type": "application/json"}) as resp:
                bad.append((resp.status, await resp.json(content_type=None)))
            async with s.post(url, json={"name": f"good {i}"}) as resp:
                assert resp.status == 201, await resp.text()
                placed[(await resp.json())["instance"]] += 1
    return bad, placed


async def wait_both_placeable(nodes: list[NodeProcess]) -> collections.Counter[int]:
    """Until node 1's placement has seen node 2 (a room created via node 1 lands there).
    Probes are paced (node 1 asks an unseen peer again every 0.2 s): a tight loop would pile
    dozens of probe rooms onto node 1 first. Returns where the probe rooms went."""
    probes: collections.Counter[int] = collections.Counter()

    def landed_on_2() -> bool:
        status, room = http_json("POST", f"{nodes[0].base_url}/api/rooms", {"name": "probe"})
        assert status == 201, room
        probes[room["instance"]] += 1
        return room["instance"] == 2

    await async_wait_until(in_thread(landed_on_2), timeout=15, interval=0.1,
                           what="node 1 placing a room on node 2")
    return probes


async def start_placeable(nodes: list[NodeProcess]) -> collections.Counter[int]:
    """Start both nodes (two config files, so not ``start_nodes``, which rewrites one) and
    wait until each sees the other as a placement candidate; returns where the probe rooms
    went."""
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        await asyncio.to_thread(node.wait_ready, HEALTHY_TIMEOUT)
    return await wait_both_placeable(nodes)


async def test_bad_room_names_do_not_mark_peers_failed(tmp_path):
    """20 bad names (each followed by a good one) leave placement spreading over both."""
    nodes = two_node_cluster(tmp_path)
    try:
        probes = await start_placeable(nodes)
        bad, placed = await create_interleaved(nodes[0], {"name": "evil \ud800"}, 20)
        assert all(status == 400 and body["error"] == "bad_request" for status, body in bad)
        # a node 2 marked failed after each bad request would take none of the good rooms
        # (node 1's view of node 2's load is a poll old, so the split is not exact)
        assert placed[1] >= 5 and placed[2] >= 5, (placed, probes)
    finally:
        for node in nodes:
            node.stop()
    for node in nodes:
        assert "Traceback" not in node.log(), node.log()


async def test_a_peer_refusing_with_4xx_is_not_a_failed_peer(tmp_path):
    """Node 2 takes smaller bodies than node 1 (413 for long names): the long-named rooms
    all end up on node 1, and node 2 stays a candidate, taking its share of the rest."""
    nodes = two_node_cluster(tmp_path, node2_settings={"max_body_bytes": 64})
    try:
        await start_placeable(nodes)
        long_named, placed = await create_interleaved(nodes[0], {"name": "L" * 90}, 20)
        assert all(status == 201 and body["instance"] == 1 for status, body in long_named)
        # a peer marked failed after each 413 would take none of the short-named rooms
        assert placed[2] >= 5, placed
    finally:
        for node in nodes:
            node.stop()


# ---------------------------------------------------------------------------------------
# message text and client_id (events)


@pytest.mark.parametrize("text", list(BAD_TEXT.values()), ids=list(BAD_TEXT))
async def test_message_with_bad_text_acks_bad_request(node1, connect, transport, watch, text):
    room = await acreate_room(node1)
    bystander = await connect(node1, room, name="bystander", transport=transport)
    alice = await connect(node1, room, name="alice", transport=transport)
    ack = await alice.send(text)
    assert_failed_ack(ack, "bad_request")
    await assert_member_unaffected(node1, room, bystander, connect)
    assert (await alice.send_ok("and now a good one"))["ok"]
    watch.assert_no_traceback()


async def test_newlines_and_tabs_are_fine_in_a_message(node1, connect, transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, transport=transport)
    await alice.send_ok("line one\nline two\ttabbed")
    assert (await alice.next("message"))["text"] == "line one\nline two\ttabbed"


@pytest.mark.parametrize("client_id", ["id\ud800", "id\nnext", "\x00"],
                         ids=["lone_surrogate", "newline", "nul"])
async def test_client_id_with_bad_text_acks_bad_request(node1, connect, transport, watch,
                                                        client_id):
    room = await acreate_room(node1)
    bystander = await connect(node1, room, name="bystander", transport=transport)
    alice = await connect(node1, room, name="alice", transport=transport)
    assert_failed_ack(await alice.send("hello", client_id=client_id), "bad_request")
    await assert_member_unaffected(node1, room, bystander, connect)
    watch.assert_no_traceback()


# ---------------------------------------------------------------------------------------
# display names and invites (connect)


@pytest.mark.parametrize("name", ["ev\ud800il", "\udc00", "bell\x07", "two\nlines", "x\x9b"],
                         ids=["lone_surrogate", "low_surrogate", "bell", "newline", "c1"])
async def test_display_name_with_bad_text_is_refused(node1, connect, transport, watch, name):
    room = await acreate_room(node1)
    bystander = await connect(node1, room, name="bystander", transport=transport)
    refused = await refusal(node1, room, name=name, transport=transport)
    assert_refusal_shape(refused, "bad_request")
    assert "display name" in refused.data["message"]
    assert bystander.pending("presence") == [], "a refused joiner was announced"
    await assert_member_unaffected(node1, room, bystander, connect)
    watch.assert_no_traceback()


@pytest.mark.parametrize("invite", ["tpdtrq.\u00e9\u00e9\u00e9", "9" * 4000 + ".abc",
                                    "\ud800.x", "+1.abc", "1_0.abc", "zzzzzzzzzzzzzz.abc",
                                    "." * 30, "x" * 10_000],
                         ids=["non_ascii_signature", "4000_digit_expiry", "surrogate",
                              "signed_expiry", "underscore_expiry", "long_expiry", "dots",
                              "10k"])
async def test_malformed_invite_is_forbidden(node1, connect, transport, watch, invite):
    room = await acreate_room(node1, "Private", private=True)
    bystander = await connect(node1, room, name="bystander", transport=transport)
    refused = await refusal(node1, room, invite=invite, transport=transport)
    assert_refusal_shape(refused, "forbidden")
    await assert_member_unaffected(node1, room, bystander, connect)
    watch.assert_no_traceback()


@pytest.mark.parametrize("token", ["\ud800" * 22 + ".sig", "é" * 22 + ".sig",
                                   "A" * 22 + ".\udfff", "x" * 5000],
                         ids=["surrogate_member", "non_ascii_member", "surrogate_sig", "5000"])
async def test_malformed_member_token_gets_a_fresh_identity(node1, connect, transport, watch,
                                                            token):
    room = await acreate_room(node1)
    bystander = await connect(node1, room, name="bystander", transport=transport)
    alice = await connect(node1, room, name="alice", transport=transport,
                          auth={"name": "alice", "token": token})
    assert alice.welcome["you"]["token"] != token
    await alice.send_ok("a fresh identity, not an error")
    assert (await bystander.next("message"))["text"] == "a fresh identity, not an error"
    watch.assert_no_traceback()


# ---------------------------------------------------------------------------------------
# unreadable Socket.IO packets


class RawPolling:
    """An Engine.IO v4 long-polling session spoken by hand (python-socketio's client cannot
    even encode what these tests send)."""

    def __init__(self, session: aiohttp.ClientSession, node: NodeProcess):
        self.session = session
        self.endpoint = (f"{node.base_url}{urls.socketio_path(node.number)}/"
                         "?EIO=4&transport=polling")
        self.url = ""

    async def open(self) -> RawPolling:
        async with self.session.get(self.endpoint) as resp:
            opening = await resp.text()
        assert opening.startswith("0{"), opening
        self.url = f"{self.endpoint}&sid={json.loads(opening[1:])['sid']}"
        return self

    async def send(self, packet: str) -> int:
        async with self.session.post(self.url, data=packet.encode()) as resp:
            return resp.status

    async def until(self, prefix: str, timeout: float = 5.0) -> str:
        """Poll until a packet starting with ``prefix`` arrives."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            async with self.session.get(self.url) as resp:
                assert resp.status == 200, (resp.status, await resp.text())
                for packet in (await resp.text()).split("\x1e"):
                    if packet == "2":
                        await self.send("3")
                    elif packet.startswith(prefix):
                        return packet
        raise AssertionError(f"no packet starting with {prefix!r} within {timeout}s")

    async def close(self) -> None:
        await self.send("1")


async def test_deeply_nested_event_acks_bad_request_over_websocket(node1, connect, watch):
    room = await acreate_room(node1)
    ns = room["namespace"]
    bystander = await connect(node1, room, name="bystander")
    async with aiohttp.ClientSession() as session:
        sock = await raw_socket(session, node1)
        assert (await sock.join(ns, {"name": "deep"})).startswith(f"40{ns},")
        for n, payload in enumerate([NESTED, '["message",' + NESTED + "]",
                                     '["message",{"text":' + NESTED + "}]"]):
            await sock.ws.send_str(f"42{ns},{n + 1}{payload}")
            answer = await sock.until((f"43{ns},{n + 1}",))
            ack = json.loads(answer[len(f"43{ns},{n + 1}"):])[0]
            assert_failed_ack(ack, "bad_request")
        await sock.ws.send_str(f"42{ns},9" + json.dumps(["message", {"text": "after"}]))
        answer = await sock.until((f"43{ns},9",))
        assert json.loads(answer[len(f"43{ns},9"):])[0]["ok"] is True, answer
        await sock.ws.close()
    assert (await bystander.next("message"))["text"] == "after"
    watch.assert_no_traceback()


async def test_deeply_nested_event_acks_bad_request_over_polling(node1, connect, watch):
    room = await acreate_room(node1)
    ns = room["namespace"]
    bystander = await connect(node1, room, name="bystander", transport=["polling"])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        poll = await RawPolling(session, node1).open()
        assert await poll.send(f"40{ns}," + json.dumps({"name": "deep"})) == 200
        await poll.until(f"40{ns},")
        for n, payload in enumerate([NESTED, '["message",' + NESTED + "]"]):
            assert await poll.send(f"42{ns},{n + 1}{payload}") == 200
            answer = await poll.until(f"43{ns},{n + 1}")
            assert_failed_ack(json.loads(answer[len(f"43{ns},{n + 1}"):])[0], "bad_request")
        assert await poll.send(f"42{ns},9" + json.dumps(["message", {"text": "after"}])) == 200
        answer = await poll.until(f"43{ns},9")
        assert json.loads(answer[len(f"43{ns},9"):])[0]["ok"] is True, answer
        await poll.close()
    assert (await bystander.next("message"))["text"] == "after"
    watch.assert_no_traceback()


async def test_deeply_nested_connect_auth_is_refused_bad_request(node1, connect, watch):
    room = await acreate_room(node1)
    ns = room["namespace"]
    bystander = await connect(node1, room, name="bystander")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        sock = await raw_socket(session, node1)
        await sock.ws.send_str(f"40{ns},{{\"name\":{NESTED}}}")
        answer = await sock.until((f"44{ns},", f"40{ns},"))
        assert answer.startswith(f"44{ns},"), answer
        assert json.loads(answer[len(f"44{ns},"):])["data"]["code"] == "bad_request"
        await sock.ws.close()
        poll = await RawPolling(session, node1).open()
        await poll.send(f"40{ns},{{\"name\":{NESTED}}}")
        answer = await poll.until(f"44{ns},")
        assert json.loads(answer[len(f"44{ns},"):])["data"]["code"] == "bad_request"
        await poll.close()
    await assert_member_unaffected(node1, room, bystander, connect)
    watch.assert_no_traceback()


async def test_deeply_nested_packet_without_an_answer_is_dropped(node1, connect, watch):
    """``4`` + JSON that is not a Socket.IO packet, and an event without an ack id: there is
    nobody to answer, so the packet is dropped and the connection carries on."""
    room = await acreate_room(node1)
    ns = room["namespace"]
    bystander = await connect(node1, room, name="bystander")
    unanswerable = ["4" + NESTED, f"42{ns},{NESTED}"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        sock = await raw_socket(session, node1)
        assert (await sock.join(ns, {"name": "ws"})).startswith(f"40{ns},")
        for frame in unanswerable:
            await sock.ws.send_str(frame)
        await sock.ws.send_str(f"42{ns},5" + json.dumps(["message", {"text": "ws after"}]))
        answer = await sock.until((f"43{ns},5",))
        assert answer and json.loads(answer[len(f"43{ns},5"):])[0]["ok"] is True, answer
        await sock.ws.close()
        poll = await RawPolling(session, node1).open()
        assert await poll.send(f"40{ns}," + json.dumps({"name": "poll"})) == 200
        await poll.until(f"40{ns},")
        for frame in unanswerable:
            assert await poll.send(frame) == 200
        assert await poll.send(f"42{ns},6" + json.dumps(["message", {"text": "poll after"}])) == 200
        answer = await poll.until(f"43{ns},6")
        assert json.loads(answer[len(f"43{ns},6"):])[0]["ok"] is True, answer
        await poll.close()
    assert [(await bystander.next("message"))["text"] for _ in range(2)] == ["ws after",
                                                                              "poll after"]
    await assert_member_unaffected(node1, room, bystander, connect)
    watch.assert_no_traceback()


# ---------------------------------------------------------------------------------------
# the internal listener


async def raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes (no client library would send these headers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize("value", [b"Bearer \xff\xfe\xfd", b"\xc3\x28", b"Bearer " + b"\x80" * 40,
                                   "Bearer ünïcode".encode()],
                         ids=["not_utf8", "bad_sequence", "continuations", "utf8"])
async def test_internal_auth_header_that_is_not_the_secret_is_401(node1, watch, value):
    request = (b"GET /internal/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + value
               + b"\r\nConnection: close\r\n\r\n")
    status, headers, body = await raw_http(node1.internal_port, request)
    assert status == 401, (status, body)
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"] == "unauthorized"
    watch.assert_no_traceback()


# ---------------------------------------------------------------------------------------
# the last resort


async def test_a_failing_event_handler_acks_unavailable(caplog):
    """An unexpected exception in a handler is logged once, with its traceback, and the
    client still gets an answer it can act on."""

    @answers_errors
    async def handler(namespace, sid, data=None):
        raise KeyError("a bug")

    with caplog.at_level("ERROR"):
        ack = await handler("/i1/room/x", "sid", {"text": "hi"})
    assert_failed_ack(ack, "unavailable")
    failures = [r for r in caplog.records if r.exc_info]
    assert len(failures) == 1 and "handler" in failures[0].getMessage()


async def test_a_failing_http_handler_answers_json_500(tmp_path, caplog):
    """The node's own middleware around a handler with a bug: JSON 500, never the plain
    text page aiohttp would send, and the traceback in the log once."""
    cfg = config.parse({"cluster": {"name": "t", "secret": SECRET,
                                    "data_dir": str(tmp_path / "data")},
                        "instances": [{"number": 1}]}, env={})
    node = Node(cfg, 1)  # the store is never opened: only the middleware is used

    async def broken(request: web.Request) -> web.Response:
        raise KeyError("a bug")

    app = web.Application(middlewares=[node.public_app._guard])
    app.on_response_prepare.append(security_headers)
    app.router.add_get("/api/broken", broken)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        with caplog.at_level("ERROR"):
            async with aiohttp.ClientSession() as s, s.get(
                    f"http://127.0.0.1:{port}/api/broken") as resp:
                assert resp.status == 500
                assert resp.content_type == "application/json"
                body = await resp.json()
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
    finally:
        await runner.cleanup()
    assert body["error"] == "internal_error" and body["message"], body
    assert len([r for r in caplog.records if r.exc_info]) == 1
