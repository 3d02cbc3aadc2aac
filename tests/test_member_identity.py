"""Member identity: dedup and "who sent this" follow the member the server issued, not the
display name a client claims. Real nodes, real Socket.IO clients, both transports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path

import pytest

from shardchat.node.members import MemberTokens
from shardchat.node.store import MessageRecord, RoomRecord, Store
from shardchat.node.store.schema import SCHEMA_VERSION
from tests.conftest import acreate_room, assert_refusal_shape, refusal
from tests.support import SECRET, NodeProcess, make_cluster_config, running_nodes

pytestmark = pytest.mark.timeout(120)


def texts(messages: list[dict]) -> list[str]:
    return [m["text"] for m in messages]


async def history(client) -> list[dict]:
    page = await client.call("history", {"limit": 100})
    assert page["ok"] is True, page
    return page["messages"]


# -- the attack: someone takes your name and pre-sends your next client_id ---------------


async def test_an_impostor_with_your_name_cannot_swallow_your_message(node1, connect,
                                                                       transport):
    room = await acreate_room(node1, "Impostors")
    victim = await connect(node1, room, name="alice", transport=transport)
    impostor = await connect(node1, room, name="alice", transport=transport)
    bob = await connect(node1, room, name="bob", transport=transport)

    fake = await impostor.send_ok("not really alice", client_id="c-1")
    real = await victim.send_ok("the real alice", client_id="c-1")
    assert real["seq"] != fake["seq"], "the victim's message was taken for the impostor's"
    assert victim.welcome["you"]["member"] != impostor.welcome["you"]["member"]

    got = [await bob.next("message"), await bob.next("message")]
    assert texts(got) == ["not really alice", "the real alice"]
    assert got[1]["from"] == victim.public and got[0]["from"] == impostor.public
    mine = [m for m in victim.pending("message") if m["seq"] == real["seq"]]
    assert texts(mine) == ["the real alice"], "the sender gets its own broadcast too"
    assert texts(await history(bob)) == ["not really alice", "the real alice"]

    # and a genuine retry of the victim is still recognised as one
    again = await victim.send_ok("the real alice", client_id="c-1")
    assert again["seq"] == real["seq"]
    await bob.send_ok("barrier")
    assert texts(bob.pending("message")) == ["barrier"]


async def test_the_token_is_never_shown_to_anyone_else(node1, connect, transport):
    room = await acreate_room(node1, "Quiet tokens", private=True)
    bob = await connect(node1, room, name="bob", transport=transport)
    alice = await connect(node1, room, name="alice", transport=transport)
    await alice.send_ok("hi", client_id="c-1")
    await alice.emit("typing", {"typing": True})
    seen = [await bob.next("presence"), await bob.next("message"), await bob.next("typing")]
    await alice.close()
    seen += [await bob.next("presence"), await history(bob)]
    late = await connect(node1, room, name="carol", transport=transport)
    seen += [late.welcome["members"], late.welcome["history"]]
    assert seen[1]["from"]["member"] == alice.welcome["you"]["member"]
    assert alice.token not in json.dumps(seen)
    assert "token" not in json.dumps(seen)


# -- retries keep working: same token, same member --------------------------------------


async def test_a_retry_after_reconnecting_with_the_token_gets_the_first_seq(node1, connect,
                                                                             transport):
    room = await acreate_room(node1, "Flaky")
    bob = await connect(node1, room, name="bob", transport=transport)
    alice = await connect(node1, room, name="alice", transport=transport)
    first = await alice.send_ok("sent once", client_id="c-1")
    await alice.close()

    back = await connect(node1, room, name="alice", transport=transport, token=alice.token)
    assert back.welcome["you"]["member"] == alice.welcome["you"]["member"]
    assert back.welcome["you"]["token"] == alice.token
    assert (await back.send_ok("sent once", client_id="c-1"))["seq"] == first["seq"]

    # **Decision**: the identity is the token's, so a new display name keeps it
    await back.close()
    renamed = await connect(node1, room, name="Alice B.", transport=transport,
                            token=alice.token)
    assert renamed.welcome["you"]["member"] == alice.welcome["you"]["member"]
    assert (await renamed.send_ok("sent once", client_id="c-1"))["seq"] == first["seq"]
    assert (await renamed.send_ok("new one", client_id="c-2"))["seq"] == first["seq"] + 1

    got = [await bob.next("message"), await bob.next("message")]
    assert texts(got) == ["sent once", "new one"]
    assert got[1]["from"]["name"] == "Alice B."
    assert got[0]["from"]["member"] == got[1]["from"]["member"]
    assert texts(await history(bob)) == ["sent once", "new one"]


async def test_without_the_token_a_reconnect_is_a_new_member(node1, connect, transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, name="alice", transport=transport)
    await alice.send_ok("first", client_id="c-1")
    await alice.close()
    again = await connect(node1, room, name="alice", transport=transport)
    assert again.welcome["you"]["member"] != alice.welcome["you"]["member"]
    ack = await again.send_ok("a different message", client_id="c-1")
    assert ack["seq"] == 2
    assert texts(await history(again)) == ["first", "a different message"]


async def test_a_retry_after_kill_9_and_restart_gets_the_first_seq(tmp_path, connect,
                                                                    transport):
    with running_nodes(tmp_path, 1) as (node,):
        room = await acreate_room(node, "Restarts")
        alice = await connect(node, room, name="alice", transport=transport)
        await alice.send_ok("before", client_id="c-0")
        first = await alice.send_ok("acked before the crash", client_id="c-1")
        node.kill()
        await alice.close()
        await asyncio.to_thread(node.start)

        back = await connect(node, room, name="alice", transport=transport, token=alice.token)
        assert back.welcome["you"]["member"] == alice.welcome["you"]["member"]
        retry = await back.send_ok("acked before the crash", client_id="c-1")
        assert retry == first
        after = await back.send_ok("after", client_id="c-2")
        assert after["seq"] == first["seq"] + 1
        assert texts(await history(back)) == ["before", "acked before the crash", "after"]


# -- a token proves one member of one room, and nothing else -----------------------------


def forgeries(room_id: str, victim_member: str, own_token: str, other_token: str,
              invite: str) -> dict[str, str]:
    """Tokens someone who knows the victim's public member id might try."""
    own_sig = own_token.partition(".")[2]
    return {
        "public_id_alone": victim_member,
        "public_id_dot": victim_member + ".",
        "random_signature": victim_member + ".AAAAAAAAAAAAAAAAAAAAAA",
        "own_signature": f"{victim_member}.{own_sig}",
        "other_room_token": other_token,
        "invite_as_token": invite,
        "other_cluster_secret": MemberTokens("another secret").token(room_id, victim_member),
        "changed_case": own_token.swapcase(),
        "huge": victim_member + "." + "A" * 10_000,
    }


async def test_forged_or_foreign_tokens_get_a_fresh_identity(node1, connect, transport):
    room = await acreate_room(node1, "Guarded", private=True)
    other_room = await acreate_room(node1, "Elsewhere")
    alice = await connect(node1, room, name="alice", transport=transport)
    first = await alice.send_ok("mine", client_id="c-1")
    mallory = await connect(node1, room, name="alice", transport=transport)
    alice_elsewhere = await connect(node1, other_room, name="alice", transport=transport)
    victim = alice.welcome["you"]["member"]
    cases = forgeries(room["id"], victim, mallory.token, alice_elsewhere.token,
                      room["invite"])
    assert len({*cases.values()}) == len(cases)
    for case, token in cases.items():
        fake = await connect(node1, room, name="alice", transport=transport, token=token)
        member = fake.welcome["you"]["member"]
        assert member not in (victim, mallory.welcome["you"]["member"]), case
        assert fake.token != token, case
        ack = await fake.send_ok(f"forged {case}", client_id="c-1")
        assert ack["seq"] > first["seq"], f"{case}: the forged token took alice's identity"
        await fake.close()
    stored = await history(alice)
    assert texts(stored) == ["mine"] + [f"forged {case}" for case in cases]
    assert {m["from"]["member"] for m in stored[1:]}.isdisjoint({victim})


async def test_the_room_token_of_one_room_does_not_carry_into_another(node1, connect,
                                                                       transport):
    room_a = await acreate_room(node1, "A")
    room_b = await acreate_room(node1, "B")
    alice_a = await connect(node1, room_a, name="alice", transport=transport)
    in_b = await connect(node1, room_b, name="alice", transport=transport,
                         token=alice_a.token)
    assert in_b.welcome["you"]["member"] != alice_a.welcome["you"]["member"]


@pytest.mark.parametrize("token", [42, ["t"], {"t": 1}, True])
async def test_a_token_that_is_not_a_string_is_a_bad_request(node1, token):
    room = await acreate_room(node1)
    refused = await refusal(node1, room, auth={"name": "alice", "token": token})
    assert_refusal_shape(refused, "bad_request")
    assert "token" in refused.data["message"]


async def test_a_null_token_is_no_token(node1, connect):
    room = await acreate_room(node1)
    alice = await connect(node1, room, auth={"name": "alice", "token": None})
    assert alice.welcome["you"]["member"] and alice.token


def test_tokens_are_stateless_and_bound_to_room_and_secret() -> None:
    tokens = MemberTokens(SECRET)
    identity = tokens.identify("room-a", None)
    assert identity.token.startswith(identity.member + ".")
    again = MemberTokens(SECRET)  # another node, or this one after a restart
    assert again.identify("room-a", identity.token) == identity
    assert again.check("room-b", identity.token) is None
    assert MemberTokens("other").check("room-a", identity.token) is None
    assert tokens.identify("room-a", None).member != identity.member


# -- the store: dedup per member, and stores written when dedup was per name -------------


async def test_store_keeps_same_name_same_client_id_from_two_members(tmp_path: Path) -> None:
    store = Store(tmp_path)
    await store.open()
    try:
        await store.create_room(RoomRecord("r", "room", False, 1))

        async def send(member: str, text: str) -> tuple[MessageRecord, bool]:
            return await store.append_message("r", sender_sid=f"sid-{member}",
                                              sender_name="alice", sender_member=member,
                                              text=text, client_id="c-1", ts=1)

        results = await asyncio.gather(send("m-victim", "real"), send("m-impostor", "fake"),
                                       send("m-victim", "real retry"))
        assert [(m.seq, dup) for m, dup in results] == [(1, False), (2, False), (1, True)]
        assert [m.text for m in await store.history("r")] == ["real", "fake"]
        with contextlib.closing(sqlite3.connect(store.path)) as db:
            plan = db.execute(
                "EXPLAIN QUERY PLAN SELECT seq FROM messages WHERE room_id = ? AND "
                "sender_member = ? AND client_id = ? AND seq <= ?", ("r", "m", "c", 9)
            ).fetchall()
        assert "messages_member_dedup" in str(plan), plan
    finally:
        await store.close()


SCHEMA_1 = """
CREATE TABLE rooms (id TEXT PRIMARY KEY, name TEXT NOT NULL, private INTEGER NOT NULL,
                    created_at INTEGER NOT NULL);
CREATE TABLE messages (room_id TEXT NOT NULL, seq INTEGER NOT NULL,
    sender_sid TEXT NOT NULL, sender_name TEXT NOT NULL, text TEXT NOT NULL,
    ts INTEGER NOT NULL, client_id TEXT, PRIMARY KEY (room_id, seq)) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_dedup
    ON messages (room_id, sender_name, client_id) WHERE client_id IS NOT NULL;
PRAGMA user_version = 1;
"""


def write_schema_1_store(directory: Path) -> None:
    """A store as nodes wrote it while dedup was keyed by display name."""
    directory.mkdir(parents=True)
    with sqlite3.connect(directory / "store.sqlite3") as conn:
        conn.executescript(SCHEMA_1)
        conn.execute("INSERT INTO rooms VALUES ('r', 'old room', 0, 1)")
        conn.executemany("INSERT INTO messages VALUES ('r', ?, ?, 'alice', ?, ?, ?)",
                         [(1, "s1", "old one", 10, "c-1"), (2, "s1", "old two", 11, None)])
    conn.close()


async def test_a_store_of_name_keyed_dedup_is_migrated_and_keeps_every_message(
        tmp_path: Path) -> None:
    write_schema_1_store(tmp_path / "data")
    for _ in range(2):  # the migration runs once; the second open finds nothing to do
        store = Store(tmp_path / "data")
        await store.open()
        try:
            old = await store.history("r")
            assert [(m.seq, m.text, m.sender_sid, m.sender_name, m.sender_member)
                    for m in old[:2]] == [(1, "old one", "s1", "alice", None),
                                          (2, "old two", "s1", "alice", None)]
            # nobody can claim the old name-keyed row: the same name and client_id is new
            msg, dup = await store.append_message(
                "r", sender_sid="s2", sender_name="alice", sender_member=f"m-{len(old)}",
                text="new", client_id="c-1", ts=12)
            assert not dup and msg.seq == len(old) + 1
            again, dup = await store.append_message(
                "r", sender_sid="s3", sender_name="alice", sender_member=f"m-{len(old)}",
                text="new", client_id="c-1", ts=13)
            assert dup and again == msg
        finally:
            await store.close()
    with sqlite3.connect(tmp_path / "data" / "store.sqlite3") as conn:
        indexes = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'")}
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    conn.close()
    assert "messages_dedup" not in indexes and "messages_member_dedup" in indexes
    assert version == SCHEMA_VERSION  # and every later migration ran too


async def test_a_node_upgraded_on_an_old_store_serves_its_messages(tmp_path, connect):
    cfg_path, instances = make_cluster_config(tmp_path, 1)
    write_schema_1_store(tmp_path / "data" / "i1")
    node = NodeProcess(cfg_path, instances[0], tmp_path)
    try:
        await asyncio.to_thread(node.start)
        alice = await connect(node, "r", name="alice")
        assert texts(alice.welcome["history"]) == ["old one", "old two"]
        assert alice.welcome["history"][0]["from"]["member"] is None
        ack = await alice.send_ok("new under the old name", client_id="c-1")
        assert ack["seq"] == 3
        assert (await alice.send_ok("retry", client_id="c-1"))["seq"] == 3
    finally:
        node.stop()
