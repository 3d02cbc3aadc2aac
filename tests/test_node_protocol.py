"""SPEC section 4 as a chat user sees it: welcome, messages, typing, history, presence,
recovery and room isolation, over both Engine.IO transports, against a real node."""

from __future__ import annotations

import time

import pytest

from shardchat import urls
from tests.conftest import ENGINES, acreate_room, assert_refusal_shape, refusal
from tests.support import async_wait_until, running_nodes

pytestmark = pytest.mark.timeout(90)
ENGINES = ENGINES  # every test here runs on the fast and the stock engine

MESSAGE_KEYS = {"seq", "room", "from", "text", "ts", "client_id"}


def assert_message(msg: dict, *, seq: int, room: dict, sender, text: str,
                   client_id: str | None = None) -> None:
    """A broadcast message carries every SPEC field with the sender's identity."""
    assert set(msg) >= MESSAGE_KEYS, msg
    assert msg["seq"] == seq, msg
    assert msg["room"] == room["id"], msg
    assert msg["from"] == sender.public, msg
    assert msg["text"] == text, msg
    assert msg["client_id"] == client_id, msg
    assert isinstance(msg["ts"], int) and abs(msg["ts"] - time.time() * 1000) < 60_000, msg


async def test_welcome_describes_room_self_members_and_empty_history(node1, connect,
                                                                      transport):
    room = await acreate_room(node1, "Welcome room")
    alice = await connect(node1, room, name="alice", transport=transport)
    w = alice.welcome
    assert w["room"] == {"id": room["id"], "name": "Welcome room", "private": False}
    assert w["you"]["name"] == "alice" and isinstance(w["you"]["sid"], str) and w["you"]["sid"]
    assert w["members"] == [{"sid": w["you"]["sid"], "name": "alice",
                             "member": w["you"]["member"]}]
    assert w["last_seq"] == 0
    assert w["history"] == []
    assert w["recovered"] is False

    bob = await connect(node1, room, name="bob", transport=transport)
    members = sorted((m["name"], m["sid"]) for m in bob.welcome["members"])
    assert members == sorted([("alice", alice.sid), ("bob", bob.sid)])
    assert alice.sid != bob.sid


async def test_private_room_welcome_says_private(node1, connect, transport):
    room = await acreate_room(node1, "Secret", private=True)
    alice = await connect(node1, room, name="alice", transport=transport)
    assert alice.welcome["room"] == {"id": room["id"], "name": "Secret", "private": True}


async def test_join_and_leave_announced_to_others_with_count(node1, connect, transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, name="alice", transport=transport)
    bob = await connect(node1, room, name="bob", transport=transport)

    join = await alice.next("presence")
    assert join == {"event": "join", "member": bob.public, "count": 2}

    # bob's own message is a barrier: anything about his join would have come before it
    await bob.send_ok("hi")
    await bob.next("message")
    assert bob.pending("presence") == [], "a member must not be told about its own join"

    await bob.close()
    leave = await alice.next("presence")
    assert leave == {"event": "leave", "member": bob.public, "count": 1}


async def test_message_reaches_everyone_including_sender_with_gapless_seq(node1, connect,
                                                                            transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, name="alice", transport=transport)
    bob = await connect(node1, room, name="bob", transport=transport)

    for seq, text in enumerate(["one", "two", "three"], start=1):
        before = time.time() * 1000
        ack = await alice.send(text, client_id=f"c{seq}")
        assert ack["ok"] is True and ack["seq"] == seq, ack
        assert isinstance(ack["ts"], int) and ack["ts"] >= before - 5_000, ack
        for who in (alice, bob):
            msg = await who.next("message")
            assert_message(msg, seq=seq, room=room, sender=alice, text=text,
                           client_id=f"c{seq}")
            assert msg["ts"] == ack["ts"]

    ack = await bob.send_ok("from bob")
    assert ack["seq"] == 4
    msg = await alice.next("message")
    assert_message(msg, seq=4, room=room, sender=bob, text="from bob")


async def test_message_keeps_unicode_and_exact_text(node1, connect, transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, name="Zoë 🚀", transport=transport)
    text = "  héllo\nwörld 🚀 <b>not html</b> \"quoted\"  "
    await alice.send_ok(text)
    msg = await alice.next("message")
    assert msg["text"] == text
    assert msg["from"]["name"] == "Zoë 🚀"


async def test_message_of_exactly_max_length_is_accepted(node1, connect, transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, transport=transport)
    text = "é" * 4000
    ack = await alice.send_ok(text)
    msg = await alice.next("message")
    assert msg["seq"] == ack["seq"] and msg["text"] == text


async def test_retry_with_same_client_id_gets_first_seq_and_no_duplicate(node1, connect,
                                                                          transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, name="alice", transport=transport)
    bob = await connect(node1, room, name="bob", transport=transport)

    first = await alice.send_ok("hello", client_id="retry-1")
    again = await alice.send_ok("hello", client_id="retry-1")
    assert again["seq"] == first["seq"] == 1

    # a retry after reconnecting (new connection, the member token passed back) is still
    # the same message
    await alice.close()
    alice2 = await connect(node1, room, name="alice", transport=transport, token=alice.token)
    third = await alice2.send_ok("hello", client_id="retry-1")
    assert third["seq"] == 1

    after = await alice2.send_ok("after", client_id="retry-2")
    assert after["seq"] == 2, "a deduplicated retry must not consume a seq"
    got = [await bob.next("message"), await bob.next("message")]
    assert [(m["seq"], m["text"]) for m in got] == [(1, "hello"), (2, "after")]
    assert bob.pending("message") == []

    # the same client_id from someone else is a different message
    carol = await connect(node1, room, name="carol", transport=transport)
    other = await carol.send_ok("hello", client_id="retry-1")
    assert other["seq"] == 3
    msg = await bob.next("message")
    assert msg["seq"] == 3 and msg["from"]["name"] == "carol"


async def test_same_client_id_in_another_room_is_a_new_message(node1, connect, transport):
    room_a = await acreate_room(node1, "A")
    room_b = await acreate_room(node1, "B")
    alice_a = await connect(node1, room_a, name="alice", transport=transport)
    alice_b = await connect(node1, room_b, name="alice", transport=transport)
    await alice_a.send_ok("x", client_id="same")
    await alice_a.send_ok("y")
    ack = await alice_b.send_ok("x", client_id="same")
    assert ack["seq"] == 1
    msg = await alice_b.next("message")
    assert msg["room"] == room_b["id"] and msg["seq"] == 1


async def test_typing_goes_to_others_only_and_is_not_stored(node1, connect, transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, name="alice", transport=transport)
    bob = await connect(node1, room, name="bob", transport=transport)

    await alice.emit("typing", {"typing": True})
    assert await bob.next("typing") == {"sid": alice.sid, "name": "alice", "typing": True}
    await alice.emit("typing", {"typing": False})
    assert await bob.next("typing") == {"sid": alice.sid, "name": "alice", "typing": False}

    # alice's message is emitted after her typing events, so it is a barrier for them
    ack = await alice.send_ok("done typing")
    assert ack["seq"] == 1, "typing must not be stored as a message"
    await alice.next("message")
    assert alice.pending("typing") == [], "the typist must not get her own typing event"


async def test_history_pages_backwards_in_seq_order(node1, connect, transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, transport=transport)
    for i in range(1, 11):
        await alice.send_ok(f"m{i}")

    page = await alice.call("history", {"before": 8, "limit": 3})
    assert page["ok"] is True
    assert [m["seq"] for m in page["messages"]] == [5, 6, 7]
    assert [m["text"] for m in page["messages"]] == ["m5", "m6", "m7"]
    assert all(m["room"] == room["id"] and m["from"]["name"] == "alice"
               for m in page["messages"])

    everything = await alice.call("history", {"before": 11, "limit": 100})
    assert [m["seq"] for m in everything["messages"]] == list(range(1, 11))

    older = await alice.call("history", {"before": 3, "limit": 100})
    assert [m["seq"] for m in older["messages"]] == [1, 2]

    none = await alice.call("history", {"before": 1, "limit": 10})
    assert none == {"ok": True, "messages": []}


async def test_welcome_history_holds_only_latest_50(node1, connect, transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, transport=transport)
    for i in range(1, 61):
        await alice.send_ok(f"m{i}")

    bob = await connect(node1, room, name="bob", transport=transport)
    assert bob.welcome["last_seq"] == 60
    assert [m["seq"] for m in bob.welcome["history"]] == list(range(11, 61))
    assert bob.welcome["history"][-1]["text"] == "m60"
    assert bob.welcome["recovered"] is False


async def test_reconnect_with_last_seq_gets_every_missed_message(node1, connect, transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, name="alice", transport=transport)
    for i in range(1, 6):
        await alice.send_ok(f"m{i}")

    bob = await connect(node1, room, name="bob", transport=transport, last_seq=2)
    assert bob.welcome["recovered"] is True
    assert bob.welcome["last_seq"] == 5
    assert [(m["seq"], m["text"]) for m in bob.welcome["history"]] == [
        (3, "m3"), (4, "m4"), (5, "m5")]

    carol = await connect(node1, room, name="carol", transport=transport, last_seq=5)
    assert carol.welcome["recovered"] is True
    assert carol.welcome["history"] == []


async def test_reconnect_recovers_more_than_50_missed_messages(node1, connect, transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, name="alice", transport=transport)
    for i in range(1, 81):
        await alice.send_ok(f"m{i}")
    bob = await connect(node1, room, name="bob", transport=transport, last_seq=10)
    assert bob.welcome["recovered"] is True
    assert [m["seq"] for m in bob.welcome["history"]] == list(range(11, 81))


async def test_recovery_gap_longer_than_max_recovery_gives_latest_50(tmp_path, connect,
                                                                     transport, engine):
    with running_nodes(tmp_path, 1, engine=engine,
                       node={"max_recovery": 50, "rate_limit_messages": 100_000}) as (node,):
        room = await acreate_room(node)
        alice = await connect(node, room, name="alice", transport=transport)
        for i in range(1, 121):
            await alice.send_ok(f"m{i}")
        bob = await connect(node, room, name="bob", transport=transport, last_seq=1)
        assert bob.welcome["recovered"] is False
        assert bob.welcome["last_seq"] == 120
        assert [m["seq"] for m in bob.welcome["history"]] == list(range(71, 121))
        carol = await connect(node, room, name="carol", transport=transport, last_seq=70)
        assert carol.welcome["recovered"] is True
        assert [m["seq"] for m in carol.welcome["history"]] == list(range(71, 121))
        for c in (alice, bob, carol):
            await c.close()


async def test_recovery_of_a_pruned_gap_gives_latest_50_not_recovered(tmp_path, connect,
                                                                      transport, engine):
    """The node keeps at least history_retention messages and prunes older ones lazily
    (after a write, at most every node.prune_interval seconds per room); once the gap after
    last_seq is pruned, a reconnect cannot be complete and says so."""
    with running_nodes(tmp_path, 1, engine=engine,
                       node={"history_retention": 50, "prune_interval": 0.1,
                             "rate_limit_messages": 100_000}) as (node,):
        room = await acreate_room(node)
        alice = await connect(node, room, name="alice", transport=transport)
        for i in range(1, 121):
            await alice.send_ok(f"m{i}")
        extra = iter(range(1000))

        async def gap_reported_as_lost() -> dict:
            """One more write (pruning follows a write), then a reconnect from seq 1."""
            await alice.send_ok(f"extra{next(extra)}")
            bob = await connect(node, room, name="bob", transport=transport, last_seq=1)
            await bob.close()
            return bob.welcome if not bob.welcome["recovered"] else {}

        # a deadline below the 5 s default: only the configured interval can meet it
        w = await async_wait_until(gap_reported_as_lost, timeout=4, interval=0.1,
                                   what="messages beyond retention to be pruned")
        assert w["recovered"] is False
        assert [m["seq"] for m in w["history"]] == list(range(w["last_seq"] - 49,
                                                             w["last_seq"] + 1))
        await alice.close()


async def test_rooms_never_see_each_others_messages(node1, connect, transport):
    room_a = await acreate_room(node1, "A")
    room_b = await acreate_room(node1, "B")
    alice = await connect(node1, room_a, name="alice", transport=transport)
    bob = await connect(node1, room_b, name="bob", transport=transport)

    await alice.send_ok("for room A only")
    await alice.emit("typing", {"typing": True})
    ack = await bob.send_ok("for room B only")
    assert ack["seq"] == 1, "room B's seq must not count room A's messages"

    msg = await bob.next("message")
    assert msg["text"] == "for room B only"
    assert bob.pending("message") == [] and bob.pending("typing") == []
    assert bob.pending("presence") == []
    history = await bob.call("history", {"before": 100, "limit": 100})
    assert [m["text"] for m in history["messages"]] == ["for room B only"]


async def test_one_client_in_two_rooms_gets_each_rooms_events_on_its_namespace(
        node1, connect, transport):
    room_a = await acreate_room(node1, "A")
    room_b = await acreate_room(node1, "B")
    alice_a = await connect(node1, room_a, name="alice", transport=transport)
    alice_b = await connect(node1, room_b, name="alice", transport=transport)
    await alice_a.send_ok("in A")
    await alice_b.send_ok("in B")
    assert (await alice_a.next("message"))["text"] == "in A"
    assert (await alice_b.next("message"))["text"] == "in B"
    assert alice_a.pending("message") == [] and alice_b.pending("message") == []


async def test_invite_of_one_private_room_does_not_open_another(node1, transport):
    room_a = await acreate_room(node1, "A", private=True)
    room_b = await acreate_room(node1, "B", private=True)
    refused = await refusal(node1, room_b, invite=room_a["invite"], transport=transport)
    assert_refusal_shape(refused, "forbidden")


async def test_room_created_through_public_api_is_joinable(node1, connect, transport):
    room = await acreate_room(node1, "Via API", via="api")
    assert room["namespace"] == urls.room_namespace(1, room["id"])
    alice = await connect(node1, room, transport=transport)
    assert alice.welcome["room"]["name"] == "Via API"
    await alice.send_ok("works")
