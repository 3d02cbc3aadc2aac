"""The fast broadcast path, seen from clients of a real node.

Many websocket clients (raw, the benchmark's lean client, with and without offering
permessage-deflate, and with the node compressing or not) plus an official long-polling
client share one room while several members send at once: every member must get every
message exactly once and in seq order, whichever path the node used for it. A client that
stops reading is cut off once its unsent bytes pass ``write_buffer_cap``, and the others
keep receiving.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from bench.wsclient import SioClient
from bench.wsclient import connect as raw_connect
from tests.conftest import EVENT_TIMEOUT, acreate_room, open_client, paused_member
from tests.support import async_wait_until, running_nodes

RAW_CLIENTS = 24
SENDERS = 4
PER_SENDER = 12


class Inbox:
    """The ``message`` payloads one raw client received, in arrival order.

    The client calls it from its protocol callback, where a failed assertion would only
    break that connection (and the test would time out instead of saying why), so it only
    records; anything that is not a ``message`` event lands in ``unexpected``, which the
    test asserts on."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.unexpected: list[bytes] = []
        self.changed = asyncio.Event()

    def __call__(self, client: SioClient, payload: bytes) -> None:
        try:
            event, msg = json.loads(payload[payload.index(b"["):])
        except ValueError:
            event, msg = None, None
        if event == "message":
            self.messages.append(msg)
        else:
            self.unexpected.append(bytes(payload))
        self.changed.set()

    async def wait_for(self, count: int, timeout: float = EVENT_TIMEOUT * 2) -> None:
        async def until() -> None:
            while len(self.messages) < count:
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(until(), timeout)


async def raw_member(node: Any, room: dict, name: str, deflate: bool) -> tuple[SioClient, Inbox]:
    inbox = Inbox()
    client = await raw_connect("127.0.0.1", node.port, room["socketio_path"], room["namespace"],
                               {"name": name}, deflate=deflate, on_message=inbox)
    return client, inbox


@pytest.mark.parametrize(("offer_deflate", "node_compresses"),
                         [(False, False), (True, False), (True, True)],
                         ids=["plain", "deflate-offered", "deflate-negotiated"])
async def test_every_member_gets_every_message_in_order(tmp_path, offer_deflate,
                                                        node_compresses):
    settings = {"rate_limit_messages": 100_000, "websocket_compression": node_compresses}
    with running_nodes(tmp_path, 1, node=settings) as (node,):
        room = await acreate_room(node)
        raws = [await raw_member(node, room, f"raw{i}", offer_deflate)
                for i in range(RAW_CLIENTS)]
        poller = await open_client(node, room, name="poller", transport=["polling"])
        official = await open_client(node, room, name="official", transport=["websocket"])
        try:
            if offer_deflate and node_compresses:
                assert all(c.deflate_active for c, _ in raws)
            senders = [c for c, _ in raws[:SENDERS]]

            async def send_all(i: int, client: SioClient) -> None:
                for k in range(PER_SENDER):
                    ack = await asyncio.wait_for(
                        client.emit("message", {"text": f"s{i} m{k} " + "x" * (k * 40)},
                                    ack=True), EVENT_TIMEOUT)
                    assert ack[0]["ok"] is True, ack

            await asyncio.gather(*(send_all(i, c) for i, c in enumerate(senders)),
                                 official.send_ok("from the official client"))
            total = SENDERS * PER_SENDER + 1
            expected = list(range(1, total + 1))
            for _, inbox in raws:
                await inbox.wait_for(total)
                assert [m["seq"] for m in inbox.messages] == expected
                assert inbox.unexpected == []
            for member in (poller, official):
                got = [(await member.next("message"))["seq"] for _ in range(total)]
                assert got == expected
            texts = {m["seq"]: m["text"] for m in raws[0][1].messages}
            for _, inbox in raws[1:]:
                assert {m["seq"]: m["text"] for m in inbox.messages} == texts
        finally:
            for c, _ in raws:
                c.close()
            await poller.close()
            await official.close()


async def test_slow_reader_is_disconnected_and_others_keep_receiving(tmp_path):
    cap = 32 * 1024
    settings = {"write_buffer_cap": cap, "max_page_bytes": 28 * 1024,
                "rate_limit_messages": 100_000, "fsync": False}
    with running_nodes(tmp_path, 1, node=settings) as (node,):
        room = await acreate_room(node)
        alice = await open_client(node, room, name="alice")
        carol, carol_inbox = await raw_member(node, room, "carol", deflate=False)
        stalled = await paused_member(node, room, "stalled")
        try:
            text = "y" * 4000
            sent = 0
            left = False
            leaves: list[dict] = []
            # bounded: the cut-off must come long before 4 MB of messages
            for _ in range(1000):
                await alice.send_ok(text)
                sent += 1
                leaves += [p for p in alice.pending("presence") if p["event"] == "leave"]
                if any(p["member"]["sid"] == stalled.sid for p in leaves):
                    left = True
                    break
            assert left, f"the stalled reader was not cut off after {sent} messages"
            assert sent * len(text) > cap
            # the others go on receiving, in order, after the cut-off too
            await alice.send_ok("after the cut-off")
            await carol_inbox.wait_for(sent + 1)
            assert [m["seq"] for m in carol_inbox.messages] == list(range(1, sent + 2))
            assert carol_inbox.unexpected == []
            await async_wait_until(
                lambda: "slow reader" in node.log_path.read_text(errors="replace"),
                timeout=EVENT_TIMEOUT, what="the slow-reader log line")
        finally:
            stalled.close()
            carol.close()
            await alice.close()


class Member:
    """A raw client that records what a member sees of a room: its welcome (the last seq
    it carried and the seqs of its history) and every live ``message`` after it."""

    def __init__(self) -> None:
        self.inbox = Inbox()
        self.welcome: dict[str, Any] | None = None
        self.client: SioClient | None = None

    def on_event(self, client: SioClient, packet: bytes) -> None:
        try:
            event, data = json.loads(packet[packet.index(b"["):])
        except ValueError:
            return
        if event == "welcome":
            self.welcome = data

    async def join(self, node: Any, room: dict, name: str) -> Member:
        self.client = await raw_connect("127.0.0.1", node.port, room["socketio_path"],
                                        room["namespace"], {"name": name},
                                        on_message=self.inbox, on_event=self.on_event)
        await async_wait_until(lambda: self.welcome is not None, EVENT_TIMEOUT)
        return self

    def seen(self) -> list[int]:
        """Seqs of the welcome's history, then of the live messages, as they came."""
        assert self.welcome is not None
        return [m["seq"] for m in self.welcome["history"]] + [
            m["seq"] for m in self.inbox.messages]


async def test_members_joining_and_leaving_mid_stream_see_each_message_once(tmp_path):
    """A room that sends without pause while members join and leave: each joiner sees
    every message once, in seq order, its welcome's history first and then the live ones
    from just after the welcome's last seq; the members who stay see every message; and
    the sender hears its own message before the ack that says it is stored."""
    total, joins_at, leave_at = 40, (5, 15, 25), 20
    settings = {"rate_limit_messages": 100_000}
    with running_nodes(tmp_path, 1, node=settings) as (node,):
        room = await acreate_room(node)
        first = [await Member().join(node, room, f"first{i}") for i in range(3)]
        sender, leaver = first[0], first[2]
        joined: list[Member] = []
        echo_before_ack: list[bool] = []
        try:
            for k in range(1, total + 1):
                ack = await asyncio.wait_for(sender.client.emit(
                    "message", {"text": f"m{k}"}, ack=True), EVENT_TIMEOUT)
                assert ack[0]["ok"] is True, ack
                echo_before_ack.append(ack[0]["seq"] in
                                       [m["seq"] for m in sender.inbox.messages])
                if k in joins_at:
                    joined.append(await Member().join(node, room, f"late{k}"))
                if k == leave_at:
                    leaver.client.close()
            assert all(echo_before_ack)
            for m in (first[0], first[1]):
                await m.inbox.wait_for(total)
                assert m.seen() == list(range(1, total + 1))
                assert m.inbox.unexpected == []
            for m in joined:
                top = m.welcome["last_seq"]
                await m.inbox.wait_for(total - top)
                history = [h["seq"] for h in m.welcome["history"]]
                assert history == list(range(1, top + 1))  # 50 fit in a welcome
                assert [x["seq"] for x in m.inbox.messages] == list(range(top + 1, total + 1))
        finally:
            for m in first + joined:
                m.client.close()
