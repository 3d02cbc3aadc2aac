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
