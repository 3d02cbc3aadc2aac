"""The node's fast inbound path (shardchat/node/engine/inbound.py, session.py) as clients see it:
pipelined messages ack in order, every member sees every message in seq order, ack ids of
any length come back, and odd EVENT frames go the normal way or are dropped without
touching anyone else."""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.conftest import acreate_room
from tests.test_node_refusals import NO_ANSWER, assert_others_unharmed, raw_socket

pytestmark = pytest.mark.timeout(90)


async def joined_raw(session: aiohttp.ClientSession, node, ns: str, name: str):
    sock = await raw_socket(session, node)
    answer = await sock.join(ns, {"name": name})
    assert answer and answer.startswith(f"40{ns},"), answer
    return sock


def ack_of(frame: str, ns: str) -> tuple[int, list]:
    """(ack id, ack arguments) of a ``43<ns>,<id>[...]`` frame."""
    rest = frame[len(f"43{ns},"):]
    cut = rest.index("[")
    return int(rest[:cut]), json.loads(rest[cut:])


async def test_pipelined_messages_ack_in_order_and_everyone_sees_seq_order(node1, connect):
    room = await acreate_room(node1)
    ns = room["namespace"]
    bob = await connect(node1, room, name="bob")
    ids = [7, 42, 999, *range(1000, 1040), 123456789012]
    async with aiohttp.ClientSession() as session:
        sock = await joined_raw(session, node1, ns, "alice")
        for n, i in enumerate(ids):  # all sent before any ack is read
            await sock.ws.send_str(f"42{ns},{i}" + json.dumps(["message", {"text": f"m{n}"}]))
        acks = []
        for _ in range(len(ids)):
            frame = await sock.until((f"43{ns},",))
            assert frame, "the node stopped answering"
            acks.append(ack_of(frame, ns))
        await sock.ws.close()
    assert [i for i, _ in acks] == ids
    assert [a[0]["seq"] for _, a in acks] == list(range(1, len(ids) + 1))
    assert all(a[0]["ok"] is True for _, a in acks)
    seen = [await bob.next("message")]
    for _ in range(len(ids) * 4):
        if len(seen) == len(ids):
            break
        seen += bob.pending("message") or [await bob.next("message")]
    assert [m["seq"] for m in seen] == list(range(1, len(ids) + 1))
    assert [m["text"] for m in seen] == [f"m{n}" for n in range(len(ids))]


async def test_events_with_and_without_ack_in_a_namespace(node1, connect):
    room = await acreate_room(node1)
    ns = room["namespace"]
    bob = await connect(node1, room, name="bob")
    async with aiohttp.ClientSession() as session:
        sock = await joined_raw(session, node1, ns, "carol")
        await sock.ws.send_str(f"42{ns}," + json.dumps(["message", {"text": "no ack"}]))
        assert (await bob.next("message"))["text"] == "no ack"
        await sock.ws.send_str(f"42{ns}," + json.dumps(["typing", {"typing": True}]))
        assert (await bob.next("typing"))["typing"] is True
        await sock.ws.send_str(f"42{ns},31" + json.dumps(["history", {"limit": 5}]))
        ack_id, args = ack_of(await sock.until((f"43{ns},",)), ns)
        assert ack_id == 31 and [m["text"] for m in args[0]["messages"]] == ["no ack"]
        await sock.ws.send_str(f"42{ns},8" + json.dumps(["shout", {"text": "x"}]))
        ack_id, args = ack_of(await sock.until((f"43{ns},",)), ns)
        assert ack_id == 8 and args[0]["error"] == "bad_request"
        # numbers orjson would read as floats take python-socketio's path, same answer
        await sock.ws.send_str(f"42{ns},9" + '["history",{"limit":5,'
                               '"before":123456789012345678901234567890}]')
        ack_id, args = ack_of(await sock.until((f"43{ns},",)), ns)
        assert ack_id == 9 and args[0]["ok"] is True
        long_id = 1234567890123456789012  # longer than the fast path takes: same answer
        await sock.ws.send_str(f"42{ns},{long_id}" + json.dumps(["history", {"limit": 1}]))
        ack_id, args = ack_of(await sock.until((f"43{ns},",)), ns)
        assert ack_id == long_id and args[0]["ok"] is True
        await sock.ws.close()


async def test_odd_event_frames_never_hurt_the_sender_or_others(node1, connect):
    room = await acreate_room(node1)
    ns = room["namespace"]
    bystander = await connect(node1, room, name="bystander")
    odd = [f"42{ns},[", f"42{ns},[]", f"42{ns},[1,2]", f"42{ns},{{}}", f"42{ns},5",
           f"42{ns},[\"message\",NaN]", f"42{ns}?x=1,[\"typing\",{{}}]",
           f"42{ns},[\"connect\",{{\"name\":\"sneaky\"}}]", "42/nope,[\"message\",{}]",
           f"42{ns},3[\"message\",{{\"text\":\"\\ud800\"}}]"]
    async with aiohttp.ClientSession() as session:
        sock = await joined_raw(session, node1, ns, "mallory")
        for frame in odd:
            await sock.ws.send_str(frame)
        # the sender is still connected and its requests are still answered, in order: the
        # lone surrogate's message is refused, then the history request is served
        await sock.ws.send_str(f"42{ns},77" + json.dumps(["history", {"limit": 1}]))
        acks = []
        for _ in range(2):
            answer = await sock.until((f"43{ns},",))
            assert answer not in (None, NO_ANSWER), f"the sender was dropped: {answer!r}"
            ack_id, args = ack_of(answer, ns)
            acks.append((ack_id, args[0]["ok"], args[0].get("error")))
        assert acks == [(3, False, "bad_request"), (77, True, None)], acks
        await sock.ws.send_str(f"42{ns},78" + json.dumps(["message", {"text": "after"}]))
        ack_id, args = ack_of(await sock.until((f"43{ns},",)), ns)
        assert ack_id == 78 and args[0]["ok"] is True, args
        assert (await bystander.next("message"))["text"] == "after"
        assert not sock.ws.closed
        await sock.ws.close()
    await assert_others_unharmed(node1, room, bystander, connect, history=("after",))


async def test_events_for_a_namespace_not_joined_are_dropped(node1, connect):
    room = await acreate_room(node1)
    ns = room["namespace"]
    bob = await connect(node1, room, name="bob")
    async with aiohttp.ClientSession() as session:
        sock = await raw_socket(session, node1)
        await sock.ws.send_str(f"42{ns},4" + json.dumps(["message", {"text": "sneaky"}]))
        answer = await sock.join(ns, {"name": "late"})
        assert answer and answer.startswith(f"40{ns},"), answer
        await sock.ws.send_str(f"42{ns},5" + json.dumps(["message", {"text": "joined"}]))
        frame = await sock.until((f"43{ns},",))
        assert frame and frame.startswith(f"43{ns},5"), frame
        await sock.ws.close()
    assert (await bob.next("message"))["text"] == "joined"
    assert bob.pending("message") == []
