"""What the store holds and hands out: rooms, creation keys, messages, as typed records.

The store speaks in these records and never in the JSON shapes of the protocol; the room
service turns them into payloads in one place (``shardchat/node/payloads.py``). They are
slotted, so each costs one small object, and frozen, so a record shared between threads and
waiters can be changed by none of them, with one exception for speed: ``MessageRecord`` is
made once per append and once per row read, and a frozen dataclass's ``__init__`` costs four
times a plain one's (0.75 us more per record, measured: a 50-message history page took half
as long again). Nothing changes a message record after it is made; treat it as frozen.

``MessageRecord``'s fields are the columns of the ``messages`` table in table order, so a row
read from SQLite (``schema.MESSAGE_COLUMNS``, after the room id) is its arguments as they
come, and a record is the row that is written. No thread of its own: plain data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RoomRecord:
    """A room as stored: what the node needs to serve it after a restart."""

    id: str
    name: str
    private: bool
    created_at: int  # epoch ms


@dataclass(frozen=True, slots=True)
class CreationKey:
    """The Idempotency-Key a room was created under, and a digest of what was asked."""

    key: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class KeyedRoom:
    """The committed room an Idempotency-Key created, and that creation's fingerprint."""

    room: RoomRecord
    fingerprint: str


@dataclass(slots=True)  # not frozen, for speed: see the module docstring
class MessageRecord:
    """One stored message of one room, in the ``messages`` table's column order.

    ``sender_member`` is the member identity the node issued (``members.py``); it is None
    only for messages stored before member identities existed."""

    room_id: str
    seq: int
    sender_sid: str
    sender_name: str
    text: str
    ts: int  # epoch ms
    client_id: str | None
    sender_member: str | None

    @property
    def dedup_key(self) -> tuple[str, str | None, str] | None:
        """(room, sender member, client_id): a second message with this key is a retry of
        this one; None when the sender gave no ``client_id``."""
        if self.client_id is None:
            return None
        return self.room_id, self.sender_member, self.client_id


# -- rooms that move (``moves.py``) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forward:
    """Room ``room_id`` left this node for ``instance`` under ``move_id``; ``last_seq`` is
    the last message it held here. ``activated``: the target confirmed it serves it."""

    room_id: str
    instance: int
    move_id: str
    last_seq: int
    moved_at: int  # epoch ms
    activated: bool


@dataclass(frozen=True, slots=True)
class Incoming:
    """A copy of room ``room`` arriving from instance ``source`` under ``move_id``; not
    served until it is activated."""

    room: RoomRecord
    source: int
    move_id: str

    @property
    def room_id(self) -> str:
        return self.room.id


@dataclass(frozen=True, slots=True)
class KeyRow:
    """An Idempotency-Key a room was created under, carried with the room when it moves."""

    key: str
    fingerprint: str
    created_at: int  # epoch ms
