"""Store records as clients see them: the SPEC shapes of a message and of a room.

What a record turns into is what every client receives (``message`` events, welcome and
history pages, creation answers); a record that came from the store, through a real SQLite
file, must give the same payload as the one that was sent.
"""

from __future__ import annotations

import orjson
import pytest

from shardchat.node import payloads
from shardchat.node.store import MessageRecord, RoomRecord, Store

pytestmark = pytest.mark.timeout(60)


def test_a_message_has_the_spec_shape_with_its_member() -> None:
    record = MessageRecord(room_id="r1", seq=7, sender_sid="s1", sender_name="Zoë",
                           text="héllo 👋\n", ts=1_700_000_000_123, client_id="c-1",
                           sender_member="m1")
    assert payloads.message(record) == {
        "seq": 7, "room": "r1", "from": {"sid": "s1", "name": "Zoë", "member": "m1"},
        "text": "héllo 👋\n", "ts": 1_700_000_000_123, "client_id": "c-1"}


def test_a_message_without_client_id_or_member_keeps_both_keys_as_null() -> None:
    old = MessageRecord("r1", 1, "s1", "alice", "from before members", 10, None, None)
    payload = payloads.message(old)
    assert payload["client_id"] is None and payload["from"]["member"] is None
    assert orjson.loads(orjson.dumps(payload)) == payload  # what the client decodes


def test_a_room_shows_id_name_and_privacy_only() -> None:
    record = RoomRecord("r1", "Team chat", True, created_at=1)
    assert payloads.room(record) == {"id": "r1", "name": "Team chat", "private": True}


def test_a_placed_room_says_where_it_lives_and_carries_an_invite_if_given() -> None:
    record = RoomRecord("q9V3", "Team chat", False, created_at=1)
    public = payloads.placed_room(record, instance=3, public_url="https://chat.example.com/")
    assert public == {"id": "q9V3", "name": "Team chat", "private": False, "instance": 3,
                      "path": "/i3/room/q9V3", "url": "https://chat.example.com/i3/room/q9V3",
                      "namespace": "/i3/room/q9V3", "socketio_path": "/i3/socket.io"}
    private = payloads.placed_room(RoomRecord("x", "Secret", True, 1), instance=3,
                                   public_url="https://chat.example.com", invite="tok")
    assert private["invite"] == "tok" and private["url"] == "https://chat.example.com/i3/room/x"


async def test_a_stored_message_gives_the_payload_that_was_sent(tmp_path) -> None:
    store = Store(tmp_path, fsync=False)
    await store.open()
    try:
        await store.create_room(RoomRecord("r1", "Room", False, 1))
        sent, _ = await store.append_message("r1", sender_sid="s1", sender_name="ann",
                                             sender_member="m1", text="hi", client_id=None,
                                             ts=5)
        page, more = await store.newest("r1", limit=50, max_bytes=10**6,
                                        size=lambda m: len(m.text))
        assert [payloads.message(m) for m in page] == [payloads.message(sent)]
        assert more is False
    finally:
        await store.close()
