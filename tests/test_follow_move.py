"""Clients that follow a room when it moves (SPEC section 8), with the official clients.

The client code is the two snippets of docs/protocol.md ("Following a room that moves":
"With socket.io-client" and "With python-socketio"), read out of the doc and run exactly as
they stand: the JavaScript one under Node (``tests/js/follow_move.mjs`` drives it), the
Python one in this process. A doc that drifts from working code fails here.

Every client goes through a local router with the cluster's rules, as it would through the
ALB: after a move the new namespace and path reach the new instance by its own rule, and
the prefix of an instance that does not exist takes the default rule. The moves are real:
``POST /internal/rooms/<room_id>/move`` on the owner (the handoff), while the clients keep
sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shardchat import urls
from shardchat.cluster.router import Router, serve
from shardchat.cluster.rules import build_rules
from tests.conftest import acreate_room, open_client
from tests.support import (
    AUTH,
    ROOT,
    JsClient,
    NodeProcess,
    bound_port,
    http_json,
    running_nodes,
)

pytestmark = pytest.mark.timeout(120)

DOC = ROOT / "docs" / "protocol.md"
MARKER = "<!-- tested: tests/test_follow_move.py"
DRIVER = Path(__file__).parent / "js" / "follow_move.mjs"
CLIENT_PACKAGE = ROOT / "node_modules" / "socket.io-client" / "package.json"
GONE = 9  # an instance number the cluster does not have
SENDS = 60  # messages each client sends while its room moves
MOVE_AFTER = 10  # ... the move is asked for once this many were acked


def snippets() -> dict[str, str]:
    """The code blocks docs/protocol.md marks as tested here, by their fence's language."""
    found = {}
    for part in DOC.read_text().split(MARKER)[1:]:
        block = re.search(r"```(\w+)\n(.*?)^```", part, re.S | re.M)
        assert block, f"{DOC}: a {MARKER!r} marker without a code block after it"
        found[block.group(1)] = block.group(2)
    assert set(found) == {"js", "python"}, f"{DOC}: tested blocks are {sorted(found)}"
    return found


def python_snippet() -> types.ModuleType:
    module = types.ModuleType("protocol_follow_move")
    exec(compile(snippets()["python"], f"{DOC} (python snippet)", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> Iterator[list[NodeProcess]]:
    tmp = tmp_path_factory.mktemp("moves")
    with running_nodes(tmp, 2, node={"peer_timeout": 0.5}) as started:
        yield started


@pytest.fixture
async def site(nodes) -> AsyncIterator[str]:
    """The base URL of a router in front of the nodes, with the cluster's rules."""
    router = Router(build_rules(n.number for n in nodes),
                    {n.number: ("127.0.0.1", n.port) for n in nodes})
    runner = await serve(router, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}"
    finally:
        await runner.cleanup()


def move(node: NodeProcess, room_id: str, to: int) -> dict[str, Any]:
    """Move ``room_id`` from ``node`` (its owner) to instance ``to``; the handoff's report."""
    status, report = http_json("POST", f"{node.internal_url}/internal/rooms/{room_id}/move",
                               {"to": to}, headers=AUTH, timeout=60)
    assert status == 200, f"the move of {room_id} to {to} failed: {status} {report}"
    return report


def stale(room: dict[str, Any], instance: int) -> dict[str, Any]:
    """``room`` as a client that last saw it on ``instance`` knows it."""
    return {**room, "instance": instance, "path": urls.room_path(instance, room["id"]),
            "namespace": urls.room_namespace(instance, room["id"]),
            "socketio_path": urls.socketio_path(instance)}


def assert_everything_once_in_order(seen: list[dict[str, Any]], count: int, text: str
                                    ) -> None:
    seqs = [m["seq"] for m in seen]
    assert seqs == list(range(1, len(seqs) + 1)), f"gaps or repeats: {seqs}"
    assert [m["text"] for m in seen] == [f"{text} {i}" for i in range(count)]


async def stored_texts(node: NodeProcess, room: dict[str, Any]) -> list[str]:
    """What the room's owner has, read by a fresh member joining there."""
    client = await open_client(node, room, name="reader")
    try:
        page = await client.call("history", {"limit": 100})
        return [m["text"] for m in page["messages"]]
    finally:
        await client.close()


# ---------------------------------------------------------------------------------------
# the JavaScript snippet


needs_node = pytest.mark.skipif(shutil.which("node") is None or not CLIENT_PACKAGE.exists(),
                                reason="needs node and node_modules/socket.io-client (npm ci)")


@pytest.fixture
def js_snippet(tmp_path) -> Path:
    """The doc's JS block as a module file, beside a node_modules it can import from."""
    (tmp_path / "node_modules").symlink_to(ROOT / "node_modules")
    path = tmp_path / "follow_move_snippet.mjs"
    path.write_text(snippets()["js"])
    return path


async def start_driver(snippet: Path, base: str, room: dict[str, Any], *, name: str,
                       count: int, text: str, pause_ms: int = 0) -> JsClient:
    spec = {"snippet": str(snippet), "base": base, "room": room, "auth": {"name": name},
            "count": count, "text": text, "pause_ms": pause_ms, "timeout_ms": 60_000}
    if room.get("invite"):
        spec["auth"]["invite"] = room["invite"]
    proc = await asyncio.create_subprocess_exec(
        "node", str(DRIVER), json.dumps(spec), cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return JsClient(proc)


@needs_node
async def test_js_snippet_follows_a_move_with_messages_in_flight(nodes, site, js_snippet):
    one, two = nodes
    room = await acreate_room(one, "Moving with JS", private=True)
    js = await start_driver(js_snippet, site, room, name="js", count=SENDS, text="js",
                            pause_ms=5)
    try:
        while (await js.next("ack", timeout=30))["index"] < MOVE_AFTER:
            pass
        report = await asyncio.to_thread(move, one, room["id"], 2)
        done = await js.next("done", timeout=60)
    finally:
        await js.stop()
    assert report["to"] == 2
    assert done["where"] == urls.room_namespace(2, room["id"])
    acks = [e["data"] for e in js.all("ack")]
    assert all(a["ok"] for a in acks), [a for a in acks if not a["ok"]]
    assert [a["seq"] for a in acks] == list(range(1, SENDS + 1))
    assert_everything_once_in_order([e["data"] for e in js.all("message")], SENDS, "js")
    assert {e["where"] for e in js.all("ack")} == {room["namespace"], done["where"]}
    assert await stored_texts(two, {**room, **stale(room, 2)}) == [
        f"js {i}" for i in range(SENDS)]


@needs_node
async def test_js_snippet_on_the_old_address_after_a_move_is_told_moved_and_follows(
        nodes, site, js_snippet):
    one, _two = nodes
    room = await acreate_room(one, "Moved before")
    await asyncio.to_thread(move, one, room["id"], 2)
    js = await start_driver(js_snippet, site, room, name="late", count=1, text="late")
    try:
        done = await js.next("done", timeout=30)
    finally:
        await js.stop()
    assert done["where"] == urls.room_namespace(2, room["id"])
    assert [e["data"]["ok"] for e in js.all("ack")] == [True]


@needs_node
async def test_js_snippet_on_a_gone_instance_finds_the_room_by_lookup(nodes, site, js_snippet):
    room = await acreate_room(nodes[1], "Lives on 2")
    js = await start_driver(js_snippet, site, stale(room, GONE), name="lost", count=1,
                            text="found")
    try:
        done = await js.next("done", timeout=30)
    finally:
        await js.stop()
    assert done["where"] == room["namespace"]
    assert [e["data"]["text"] for e in js.all("message")] == ["found 0"]


# ---------------------------------------------------------------------------------------
# the Python snippet


class Seen:
    """What one RoomMember's ``on_message`` got, and a way to wait for a seq."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self._changed.set()

    async def up_to(self, seq: int, timeout: float = 30.0) -> None:
        async def reached() -> None:
            while not self.messages or self.messages[-1]["seq"] < seq:
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(reached(), timeout)


@contextlib.asynccontextmanager
async def member(base: str, room: dict[str, Any], name: str) -> AsyncIterator[Any]:
    snippet = python_snippet()
    seen = Seen()
    auth = {"name": name, **({"invite": room["invite"]} if room.get("invite") else {})}
    one = snippet.RoomMember(base, room, auth, seen)
    await asyncio.wait_for(one.join(), 30)
    one.seen = seen
    try:
        yield one
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(one.sio.shutdown(), 10)


async def test_python_snippet_follows_a_move_with_messages_in_flight(nodes, site):
    one, two = nodes
    room = await acreate_room(one, "Moving with Python", private=True)
    async with member(site, room, "sender") as sender, member(site, room, "reader") as reader:
        acks = []
        moved: asyncio.Task | None = None
        for i in range(SENDS):
            acks.append(await asyncio.wait_for(sender.send(f"py {i}", f"py-{i}"), 30))
            if i == MOVE_AFTER:
                moved = asyncio.create_task(asyncio.to_thread(move, one, room["id"], 2))
            await asyncio.sleep(0.005)  # a person typing, not a synchronisation
        assert moved is not None and (await moved)["to"] == 2
        await sender.seen.up_to(SENDS)
        await reader.seen.up_to(SENDS)
        for someone in (sender, reader):
            assert someone.where["namespace"] == urls.room_namespace(2, room["id"])
            assert_everything_once_in_order(someone.seen.messages, SENDS, "py")
    assert all(a["ok"] for a in acks), [a for a in acks if not a["ok"]]
    assert [a["seq"] for a in acks] == list(range(1, SENDS + 1))
    assert await stored_texts(two, {**room, **stale(room, 2)}) == [
        f"py {i}" for i in range(SENDS)]


async def test_python_snippet_on_the_old_address_after_a_move_is_told_moved_and_follows(
        nodes, site):
    one, _two = nodes
    room = await acreate_room(one, "Moved before (py)")
    await asyncio.to_thread(move, one, room["id"], 2)
    async with member(site, room, "late") as late:
        assert late.where["namespace"] == urls.room_namespace(2, room["id"])
        assert (await late.send("after the move"))["ok"] is True


async def test_python_snippet_on_a_gone_instance_finds_the_room_by_lookup(nodes, site):
    room = await acreate_room(nodes[1], "Lives on 2 (py)")
    async with member(site, stale(room, GONE), "lost") as lost:
        assert lost.where["namespace"] == room["namespace"]
        ack = await lost.send("found")
        assert ack["ok"] is True and ack["seq"] == 1


# ---------------------------------------------------------------------------------------
# what else points at the new place after a move


async def test_after_a_move_every_node_looks_it_up_there_and_the_old_page_redirects(
        nodes, site):
    one, two = nodes
    room = await acreate_room(one, "Looked up", private=True)
    await asyncio.to_thread(move, one, room["id"], 2)
    for node in nodes:
        status, found = await asyncio.to_thread(
            http_json, "GET", f"{node.base_url}/api/rooms/{room['id']}")
        assert status == 200 and found["instance"] == 2, (node.number, found)
        assert "invite" not in found
    async with aiohttp.ClientSession() as session:
        old_page = f"{site}{room['path']}?invite={room['invite']}"
        async with session.get(old_page, allow_redirects=False) as resp:
            assert resp.status == 308
            assert resp.headers["Location"] == (urls.room_path(2, room["id"])
                                                + f"?invite={room['invite']}")
        async with session.get(old_page) as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
    status, state = await asyncio.to_thread(
        http_json, "GET", f"{one.internal_url}/internal/rooms/{room['id']}", None, AUTH)
    assert status == 200 and state["state"] == "forwarded" and state["to"] == 2, state
    status, state = await asyncio.to_thread(
        http_json, "GET", f"{two.internal_url}/internal/rooms/{room['id']}", None, AUTH)
    assert status == 200 and state["state"] == "owner", state
