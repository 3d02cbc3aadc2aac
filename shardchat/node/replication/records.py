"""What the follower stream carries, as JSON: one record per position.

The owner numbers what it ships 1, 2, 3 ... within an *epoch* (a random id drawn when the
owner starts or when its rooms change in bulk, an adoption): a follower that holds epoch E
up to position P resumes with ``(E, P)``. Two kinds of record:

* a **batch**: exactly the rows one commit of the owner's writer wrote (``writer.Batch``):
  new rooms with their creation keys, new messages (which carry the dedup key: room,
  sender member, ``client_id``);
* a **room image**: the whole stored state of one room after a move's step changed it
  (``Moves.changed``): its row and state, its forward, its creation keys and, when it is
  served there, its retained messages. It is read when it is shipped, which may be later
  than the step: every later record still follows it and applies on top, since every apply
  is idempotent (rows are inserted or replaced, never appended twice).

Invites and member tokens are signed with the cluster secret and stored nowhere, so a copy
of the room (its ``private`` flag) is all the follower needs for them to keep working.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson

from shardchat.node.store import schema
from shardchat.node.store.writer import Batch

# Frames of the stream (websocket text frames; a snapshot's bytes are binary frames).
HELLO, RECORD, SNAPSHOT, SNAPSHOT_END, ACK = "hello", "record", "snapshot", "snapshot_end", "ack"


def batch_record(pos: int, batch: Batch) -> str:
    """One committed batch at ``pos``, encoded once for every follower."""
    rooms = [[w.room.id, w.room.name, int(w.room.private), w.room.created_at]
             for w in batch.rooms]
    keys = [[w.key.key, w.room.id, w.key.fingerprint, w.room.created_at]
            for w in batch.rooms if w.key is not None]
    messages = [[m.room_id, m.seq, m.sender_sid, m.sender_name, m.text, m.ts, m.client_id,
                 m.sender_member] for m in (w.message for w in batch.messages)]
    return encode({"t": RECORD, "pos": pos, "rooms": rooms, "keys": keys,
                   "messages": messages})


def image_record(pos: int, image: dict[str, Any]) -> str:
    return encode({"t": RECORD, "pos": pos, "image": image})


def encode(frame: dict[str, Any]) -> str:
    """One record as a line of JSON (orjson: the stream's encoding is on the loop of both
    ends, once per commit; it never writes a raw newline)."""
    return orjson.dumps(frame).decode()


def decode(line: str) -> dict[str, Any]:
    return orjson.loads(line)


def read_image(conn: sqlite3.Connection, room_id: str) -> dict[str, Any]:
    """Room ``room_id`` as stored now (see the module docstring)."""
    row = conn.execute("SELECT id, name, private, created_at, state FROM rooms WHERE id = ?",
                       (room_id,)).fetchone()
    forward = conn.execute("SELECT room_id, instance, move_id, last_seq, moved_at, activated"
                           " FROM forwards WHERE room_id = ?", (room_id,)).fetchone()
    keys = conn.execute("SELECT key, room_id, fingerprint, created_at FROM creation_keys"
                        " WHERE room_id = ?", (room_id,)).fetchall()
    messages: list = []
    if row is not None and row[4] == schema.ACTIVE:
        messages = conn.execute(f"SELECT room_id, {schema.MESSAGE_COLUMNS} FROM messages"
                                " WHERE room_id = ? ORDER BY seq", (room_id,)).fetchall()
    return {"id": room_id, "room": list(row) if row else None,
            "forward": list(forward) if forward else None,
            "keys": [list(k) for k in keys], "messages": [list(m) for m in messages]}
