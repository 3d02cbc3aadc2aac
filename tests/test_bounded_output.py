"""Large replies never cut off a client that reads, and a client that does not read never
grows the node's memory: welcome, recovery and history pages are bounded in bytes and paged,
and a client is disconnected only for a backlog it fails to drain.

The widest text SPEC lets through is 4,000 four-byte characters (16 KB of JSON; control
characters, which escape to 6 bytes, are not valid text). The node of this module runs with
a 512 KiB ``write_buffer_cap``, so a welcome of 50 such messages (800 KB) is past it the way
50 messages of control characters (1.2 MB) are past the default 1 MiB.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import psutil
import pytest

from bench.wsclient import SioClient
from tests.conftest import EVENT_TIMEOUT, RoomClient, acreate_room, paused_member
from tests.support import (
    SECRET,
    NodeProcess,
    async_wait_until,
    http_json,
    in_thread,
    running_nodes,
)

pytestmark = pytest.mark.timeout(150)

WIDE = "\U0001F600" * 4000  # 4,000 characters, 16,000 bytes of JSON
CAP = 512 * 1024
PAGE_BOUND = 256 * 1024  # node.max_page_bytes (default)
FILL_WINDOW = 25  # messages in flight at once while filling a room


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("bounded")
    settings = {"write_buffer_cap": CAP, "rate_limit_messages": 100_000, "fsync": False}
    with running_nodes(tmp, 1, node=settings) as nodes:
        yield nodes[0]


async def fill(sender: RoomClient, count: int, text: str = WIDE) -> None:
    """Post ``count`` messages, ``FILL_WINDOW`` at a time; returns once all are acked."""
    for start in range(0, count, FILL_WINDOW):
        batch = range(start, min(count, start + FILL_WINDOW))
        await asyncio.gather(*(sender.send_ok(text) for _ in batch))


def json_size(messages: list[dict]) -> int:
    return len(orjson.dumps(messages))


def assert_bounded_tail(messages: list[dict], newest: int) -> None:
    """A non-empty page within the byte bound, contiguous and ending at ``newest``."""
    seqs = [m["seq"] for m in messages]
    assert seqs, "a page always carries at least one message"
    assert seqs == list(range(newest - len(seqs) + 1, newest + 1)), seqs
    assert json_size(messages) <= PAGE_BOUND


async def page_back(client: RoomClient, before: int, down_to: int) -> list[dict]:
    """Every message with down_to < seq < before, paged backwards with ``history``."""
    out: list[dict] = []
    for _ in range(300):  # bounded: 300 pages of at least one message each
        if before <= down_to + 1:
            break
        page = await client.call("history", {"before": before, "limit": 100})
        assert page["ok"] is True, page
        if not page["messages"]:
            break
        assert json_size(page["messages"]) <= PAGE_BOUND
        out = page["messages"] + out
        before = page["messages"][0]["seq"]
    return [m for m in out if m["seq"] > down_to]


async def drain(client: RoomClient, count: int) -> list[int]:
    """The seqs of the next ``count`` ``message`` events of ``client``."""
    return [(await client.next("message", timeout=EVENT_TIMEOUT * 3))["seq"]
            for _ in range(count)]


async def test_new_joiner_gets_a_bounded_welcome_and_everyone_keeps_receiving(
        node, connect, transport):
    room = await acreate_room(node, "Wide welcome")
    sender = await connect(node, room, name="sender")
    member = await connect(node, room, name="member", transport=transport)
    await fill(sender, 51)
    assert await drain(member, 51) == list(range(1, 52))

    joiner = await connect(node, room, name="joiner", transport=transport)
    w = joiner.welcome
    assert_bounded_tail(w["history"], 51)
    assert len(w["history"]) < 50 and w["more"] is True
    assert w["last_seq"] == 51 and w["recovered"] is False
    # what the welcome left out of the latest 50 is one page-back away
    older = await page_back(joiner, w["history"][0]["seq"], down_to=1)
    assert [m["seq"] for m in older + w["history"]] == list(range(2, 52))

    await sender.send_ok("after the welcome")
    for client in (joiner, member):
        assert (await client.next("message"))["text"] == "after the welcome"
        assert client.connected


async def test_recovery_of_300_wide_messages_pages_to_completeness(node, connect, transport):
    room = await acreate_room(node, "Wide recovery")
    sender = await connect(node, room, name="sender")
    await fill(sender, 5, "small")
    away = await connect(node, room, name="bob", transport=transport)
    assert away.welcome["last_seq"] == 5
    await away.close()
    await fill(sender, 300)

    bob = await connect(node, room, name="bob", transport=transport, last_seq=5)
    w = bob.welcome
    assert w["recovered"] is True and w["more"] is True and w["last_seq"] == 305
    assert_bounded_tail(w["history"], 305)
    older = await page_back(bob, w["history"][0]["seq"], down_to=5)
    seqs = [m["seq"] for m in older + w["history"]]
    assert seqs == list(range(6, 306))  # every seq exactly once

    await sender.send_ok("live again")
    assert (await bob.next("message"))["seq"] == 306
    assert bob.connected


async def test_history_page_of_100_wide_messages_is_bounded(node, connect, transport):
    room = await acreate_room(node, "Wide history")
    sender = await connect(node, room, name="sender")
    reader = await connect(node, room, name="reader", transport=transport)
    await fill(sender, 100)
    assert await drain(reader, 100) == list(range(1, 101))

    page = await reader.call("history", {"limit": 100})
    assert page["ok"] is True and page["more"] is True
    assert_bounded_tail(page["messages"], 100)
    assert len(page["messages"]) < 100
    older = await page_back(reader, page["messages"][0]["seq"], down_to=0)
    assert [m["seq"] for m in older + page["messages"]] == list(range(1, 101))

    await sender.send_ok("still here")
    assert (await reader.next("message"))["text"] == "still here"
    assert reader.connected


async def test_short_history_pages_are_not_marked_truncated(node, connect, transport):
    room = await acreate_room(node, "Small history")
    sender = await connect(node, room, name="sender", transport=transport)
    await fill(sender, 10, "small")
    page = await sender.call("history", {"before": 8, "limit": 100})
    assert page == {"ok": True, "messages": page["messages"]}
    assert [m["seq"] for m in page["messages"]] == list(range(1, 8))
    assert "more" not in sender.welcome or sender.welcome["more"] is False


async def test_a_burst_reaches_a_python_long_polling_client_in_several_responses(
        node, connect):
    """40 messages committed together queue 40 packets at once; python-engineio clients
    refuse a long-poll response of more than 16 packets, so they come in several."""
    room = await acreate_room(node, "Burst")
    sender = await connect(node, room, name="sender")
    poller = await connect(node, room, name="poller", transport=["polling"])
    await asyncio.gather(*(sender.send_ok(f"burst {i}") for i in range(40)))
    assert await drain(poller, 40) == list(range(1, 41))
    await sender.send_ok("after the burst")
    assert (await poller.next("message"))["text"] == "after the burst"
    assert poller.connected


# ---------------------------------------------------------------------------------------
# backlog: only a reader that fails to drain is cut off


def metrics(node: NodeProcess) -> dict[str, Any]:
    status, body = http_json("GET", f"{node.internal_url}/internal/metrics",
                             headers={"Authorization": f"Bearer {SECRET}"})
    assert status == 200, body
    return body


async def afanout(node: NodeProcess) -> dict[str, int]:
    return (await asyncio.to_thread(metrics, node))["fanout"]


class Inbox:
    """The ``message`` payloads a raw client received, with an event per arrival."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.changed = asyncio.Event()

    def __call__(self, _client: SioClient, payload: bytes) -> None:
        self.payloads.append(payload)
        self.changed.set()

    def seqs(self) -> list[int]:
        return [json.loads(p[p.index(b"["):])[1]["seq"] for p in self.payloads]

    async def wait_for(self, count: int, timeout: float = EVENT_TIMEOUT) -> None:
        async def until() -> None:
            while len(self.payloads) < count:
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(until(), timeout)


async def send_until_backlogged(node: NodeProcess, sender: RoomClient) -> int:
    """Send wide messages, 4 at a time (64 KB, half the margin between the cap and twice the
    cap of ``grace_node``), until the node reports a client above the cap but not cut off
    (the kernel takes a few MB first); returns how many were sent."""
    for batch in range(1, 500):  # bounded: far more than the kernel and the cap can hold
        await asyncio.gather(*(sender.send_ok(WIDE) for _ in range(4)))
        if (await afanout(node))["backlogged"] >= 1:
            return batch * 4
    raise AssertionError("no client ever went above the cap")


async def wait_for_leave(client: RoomClient, sid: str, timeout: float) -> None:
    async def until() -> None:
        while True:
            p = await client.next("presence", timeout=timeout)
            if p["event"] == "leave" and p["member"]["sid"] == sid:
                return
    await asyncio.wait_for(until(), timeout)


@pytest.fixture
def grace_node(tmp_path) -> Iterator[NodeProcess]:
    settings = {"write_buffer_cap": 128 * 1024, "max_page_bytes": 64 * 1024,
                "write_buffer_grace": 1.0, "rate_limit_messages": 100_000, "fsync": False}
    with running_nodes(tmp_path, 1, node=settings) as nodes:
        yield nodes[0]


async def test_reader_that_pauses_and_catches_up_is_not_cut_off(grace_node, connect):
    node = grace_node
    room = await acreate_room(node, "Pause")
    sender = await connect(node, room, name="sender")
    inbox = Inbox()
    paused = await paused_member(node, room, "paused", inbox)
    try:
        sent = await send_until_backlogged(node, sender)
        before = await afanout(node)
        paused.transport.resume_reading()
        await async_wait_until(
            in_thread(lambda: metrics(node)["fanout"]["caught_up"] > before["caught_up"]),
            EVENT_TIMEOUT * 2, what="the paused reader's clock to run out")
        await sender.send_ok("after the grace")
        await inbox.wait_for(sent + 1)
        assert inbox.seqs() == list(range(1, sent + 2))
        assert (await afanout(node))["dropped_slow_readers"] == before["dropped_slow_readers"]
        assert not paused.closed.done()
    finally:
        paused.close()


async def test_reader_that_never_drains_is_cut_off_after_the_grace(grace_node, connect):
    node = grace_node
    room = await acreate_room(node, "Stalled")
    sender = await connect(node, room, name="sender")
    stalled = await paused_member(node, room, "stalled")
    try:
        await send_until_backlogged(node, sender)
        before = await afanout(node)
        # nothing more is sent: the cut-off comes from the clock, not from a new packet
        await wait_for_leave(sender, stalled.sid, timeout=EVENT_TIMEOUT * 2)
        after = await afanout(node)
        assert after["dropped_slow_readers"] == before["dropped_slow_readers"] + 1
        assert after["backlogged"] == 0
        sender.pending("message")
        await sender.send_ok("the room goes on")
        assert (await sender.next("message"))["text"] == "the room goes on"
    finally:
        stalled.close()


# ---------------------------------------------------------------------------------------
# memory: history requests of a client that does not read


FLOOD_POSTS = 30
FLOOD_PER_POST = 16
RSS_GROWTH_LIMIT = 20 * 1024 * 1024


@pytest.fixture
def flood_node(tmp_path) -> Iterator[NodeProcess]:
    settings = {"write_buffer_grace": 1.0, "rate_limit_messages": 100_000, "fsync": False}
    with running_nodes(tmp_path, 1, node=settings) as nodes:
        yield nodes[0]


class RawPoller:
    """An Engine.IO long-polling session spoken over plain HTTP, to do what no official
    client does: post requests and never fetch the answers."""

    def __init__(self, http: aiohttp.ClientSession, node: NodeProcess, room: dict):
        self.http = http
        self.url = f"{node.base_url}{room['socketio_path']}/"
        self.namespace = room["namespace"]
        self.sid = ""

    async def open(self) -> str:
        """Handshake, join the room, and read until the welcome; returns the Socket.IO sid."""
        body = await self.get({"EIO": "4", "transport": "polling"})
        self.sid = json.loads(body[1:])["sid"]
        await self.post(f'40{self.namespace},{{"name":"flood"}}')
        seen = ""
        for _ in range(5):  # bounded: CONNECT and welcome come within a poll or two
            seen += await self.get(self.params())
            if '"welcome"' in seen:
                break
        head = f"40{self.namespace},"
        connect = next(p for p in seen.split("\x1e") if p.startswith(head))
        return json.loads(connect[len(head):])["sid"]

    def params(self) -> dict[str, str]:
        return {"EIO": "4", "transport": "polling", "sid": self.sid}

    async def get(self, params: dict[str, str]) -> str:
        async with self.http.get(self.url, params=params) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.text()

    async def status_of_get(self) -> int:
        async with self.http.get(self.url, params=self.params()) as resp:
            await resp.read()
            return resp.status

    async def post(self, payload: str) -> None:
        async with self.http.post(self.url, params=self.params(), data=payload.encode(),
                                  headers={"Content-Type": "text/plain"}) as resp:
            assert resp.status == 200, await resp.text()

    async def flood(self, posts: int, per_post: int) -> int:
        """``posts`` POSTs of ``per_post`` history requests each; returns the bytes sent."""
        sent, ack = 0, 100
        for _ in range(posts):
            packets = []
            for _ in range(per_post):
                packets.append(f'42{self.namespace},{ack}["history",{{"limit":100}}]')
                ack += 1
            payload = "\x1e".join(packets)
            sent += len(payload)
            try:
                await self.post(payload)
            except AssertionError:
                break  # the node closed the session: the rest has nowhere to go
        return sent


async def test_history_flood_over_polling_without_reading_is_bounded_and_closed(
        flood_node, connect):
    """30 POSTs of 16 history requests (29 KB) once made the node queue 120 MB."""
    node = flood_node
    room = await acreate_room(node, "Flooded")
    sender = await connect(node, room, name="sender")
    bystander = await connect(node, room, name="bystander", transport=["polling"])
    await fill(sender, 100, "z" * 2000)  # every history page is ~200 KB
    assert len(await drain(bystander, 100)) == 100
    proc = psutil.Process(node.proc.pid)
    before = await afanout(node)
    async with aiohttp.ClientSession() as http:
        poller = RawPoller(http, node, room)
        flood_sid = await poller.open()
        baseline = proc.memory_info().rss
        peak = baseline

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, proc.memory_info().rss)
                await asyncio.sleep(0.02)  # a sampler, cancelled below; not a wait

        sampler = asyncio.ensure_future(sample())
        try:
            sent = await poller.flood(FLOOD_POSTS, FLOOD_PER_POST)
            await wait_for_leave(bystander, flood_sid, timeout=EVENT_TIMEOUT * 3)
        finally:
            sampler.cancel()
        peak = max(peak, proc.memory_info().rss)
        assert sent < 40_000
        assert peak - baseline < RSS_GROWTH_LIMIT, f"RSS grew {(peak - baseline) >> 20} MB"
        assert await poller.status_of_get() == 400  # the session is gone
    after = await afanout(node)
    assert after["dropped_slow_readers"] == before["dropped_slow_readers"] + 1
    assert after["backlog_refusals"] > before["backlog_refusals"]
    await sender.send_ok("unaffected")
    assert (await bystander.next("message"))["text"] == "unaffected"
    assert bystander.connected


async def test_history_flood_over_websocket_without_reading_is_bounded(flood_node, connect):
    """The same flood from a websocket client that stops reading: what the kernel does not
    take stays below the cap, and once the client holds more the pages are refused."""
    node = flood_node
    room = await acreate_room(node, "Flooded ws")
    sender = await connect(node, room, name="sender")
    bystander = await connect(node, room, name="bystander")
    await fill(sender, 100, "z" * 2000)
    assert len(await drain(bystander, 100)) == 100
    proc = psutil.Process(node.proc.pid)
    flooder = await paused_member(node, room, "flood")
    try:
        baseline = proc.memory_info().rss
        before = await afanout(node)
        requests = FLOOD_POSTS * FLOOD_PER_POST
        for _ in range(requests):
            flooder.emit("history", {"limit": 100}, ack=True)
        flooder._acks.clear()  # never read: nothing is to wait for them
        answered = before["direct"] + before["queued"] + requests
        await async_wait_until(
            in_thread(lambda: sum(metrics(node)["fanout"][k] for k in ("direct", "queued"))
                      >= answered), EVENT_TIMEOUT * 2, what="every history request answered")
        growth = proc.memory_info().rss - baseline
        assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth >> 20} MB"
        after = await afanout(node)
        assert after["backlog_refusals"] > before["backlog_refusals"]
    finally:
        flooder.close()
    await sender.send_ok("unaffected")
    assert (await bystander.next("message"))["text"] == "unaffected"
