"""Fuzz: hostile Engine.IO / Socket.IO frames over a raw websocket and raw long-polling POSTs.

Whatever a socket sends (broken packet types, namespaces, ack ids, attachment counts, JSON
that is not JSON, nested past every recursion limit, numbers past 64 bits, invalid UTF-8,
lone surrogates, control characters, packets up to and past node.max_packet_bytes), the
node may refuse it or close that one socket, but the node lives, stays healthy, and the
other members of the room notice nothing (``Harness.check``). Long-polling POSTs are never
answered with a server error.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardchat import urls
from tests.fuzz.conftest import examples
from tests.fuzz.harness import Harness, RawPolling, RawWebSocket, join
from tests.fuzz.strategies import Blob, Frame, frames, short

# one worker runs the whole module, so the module has one node (pytest -n 2)
pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(300), pytest.mark.xdist_group("fuzz_frames")]

def other_namespace(harness: Harness) -> str:
    """A room namespace on this node that the hostile socket never joined."""
    return urls.room_namespace(harness.node.number, "not-joined-room")


async def probe(sock: RawWebSocket | RawPolling, harness: Harness) -> str | None:
    """A namespace CONNECT to a room that does not exist: the node answers it (refusal) once
    it has handled every frame before it, or has closed the socket. Only a wait."""
    return await join(sock, urls.room_namespace(harness.node.number, "probe-room"), "probe")


async def hostile_websocket(harness: Harness, batch: list[Frame], joined: bool) -> None:
    sock = await RawWebSocket.open(harness)
    try:
        if joined:
            answer = await join(sock, harness.namespace)
            assert answer is not None and answer.startswith(f"40{harness.namespace},"), answer
        room_ns, other_ns = harness.namespace, other_namespace(harness)
        for frame in batch:
            if not await sock.send(frame.render(room_ns, other_ns), text=frame.text):
                return  # the node closed this socket: allowed
        if not any(f.wants_attachments for f in batch):
            await probe(sock, harness)
    finally:
        await sock.close()


@examples(120)
@given(batch=st.lists(frames(), min_size=1, max_size=4), joined=st.booleans())
def test_hostile_websocket_frames_harm_nobody(harness: Harness, batch: list[Frame],
                                              joined: bool) -> None:
    harness.ready()
    harness.run(hostile_websocket(harness, batch, joined))
    harness.check(f"websocket frames {batch!r}")


async def hostile_polling(harness: Harness, bodies: list[bytes]) -> list[tuple[int, str, bytes]]:
    sock = await RawPolling.open(harness)
    try:
        answer = await join(sock, harness.namespace)
        assert answer is not None and answer.startswith(f"40{harness.namespace},"), answer
        for body in bodies:
            if await sock.post(body) != 200:
                break
        if sock.statuses[-1][0] == 200:
            await probe(sock, harness)
    finally:
        await sock.close()
    return sock.statuses


def polling_body(batch: list[Frame], room_ns: str, other_ns: str) -> bytes:
    """Engine.IO's polling payload: packets joined by the record separator, binary ones as
    ``b<base64>``."""
    parts = [f.render(room_ns, other_ns) if f.text
             else b"b" + base64.b64encode(f.render(room_ns, other_ns)) for f in batch]
    return b"\x1e".join(parts)


def assert_no_server_error(statuses: list[tuple[int, str, bytes]], what: str) -> None:
    for status, ctype, body in statuses:
        assert status < 500, f"{what}: answered {status} ({ctype}) {body[:200]!r}"


@examples(60)
@given(batches=st.lists(st.lists(frames(), min_size=1, max_size=3), min_size=1, max_size=3),
       raw=st.lists(st.binary(max_size=300), max_size=2))
def test_hostile_polling_posts_harm_nobody(harness: Harness, batches: list[list[Frame]],
                                           raw: list[bytes]) -> None:
    harness.ready()
    room_ns, other_ns = harness.namespace, other_namespace(harness)
    bodies = [polling_body(b, room_ns, other_ns) for b in batches] + raw
    statuses = harness.run(hostile_polling(harness, bodies))
    what = f"long-polling POSTs {short([Blob(b) for b in bodies], 600)}"
    assert_no_server_error(statuses, what)
    harness.check(what)


@examples(20)
@given(depth=st.integers(900, 6000), opener=st.sampled_from(["[", '{"a":']),
       transport=st.sampled_from(["websocket", "polling"]))
def test_deeply_nested_event_arguments_harm_nobody(harness: Harness, depth: int, opener: str,
                                                   transport: str) -> None:
    """A joined member's event with arguments nested ``depth`` deep: the node answers or
    drops it, and nobody else notices."""
    harness.ready()
    closer = "]" if opener == "[" else "}"
    nest = opener * depth + ("" if opener == "[" else "1") + closer * depth
    frame = f'42{harness.namespace},1["message",{nest}]'.encode()
    statuses = harness.run(send_one(harness, transport, frame))
    assert_no_server_error(statuses, f"{depth}-deep {opener} over {transport}")
    harness.check(f"a {depth}-deep {opener!r} nest over {transport}")


async def send_one(harness: Harness, transport: str, frame: bytes
                   ) -> list[tuple[int, str, bytes]]:
    if transport == "polling":
        return await hostile_polling(harness, [frame])
    sock = await RawWebSocket.open(harness)
    try:
        answer = await join(sock, harness.namespace)
        assert answer is not None and answer.startswith(f"40{harness.namespace},"), answer
        if await sock.send(frame):
            await probe(sock, harness)
    finally:
        await sock.close()
    return []
