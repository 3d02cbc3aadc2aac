"""What the handoff needs from the rest of the node, as small protocols.

The store implements ``RoomStore``, its ``moves`` ``MoveStore`` (``store/moves.py``); the room
service implements ``RoomHost``. Every write named here is durable when it returns and goes through
the store's single writer, so each is one transaction.
"""

from __future__ import annotations

from typing import Any, Protocol

from shardchat.node.handoff.records import MovedTo
from shardchat.node.store import Forward, Incoming, KeyRow, MessageRecord, RoomRecord


class RoomStore(Protocol):
    """The rooms this node serves (``Store``)."""

    def get_room(self, room_id: str) -> RoomRecord | None: ...

    def last_seq(self, room_id: str) -> int:
        """The last seq handed out in the room, committed or in flight."""

    async def flush(self) -> None:
        """Every write queued so far is committed (or failed) when this returns."""


class MoveStore(Protocol):
    """The durable state of moves (``Store.moves``, ``store/moves.py``)."""

    async def copy_page(self, room_id: str, after: int, limit: int,
                        max_bytes: int) -> list[MessageRecord]:
        """Stored messages with seq > after, ascending, at most ``limit`` and about
        ``max_bytes`` (always at least one when there is one)."""

    def creation_keys(self, room_id: str) -> list[KeyRow]: ...

    # -- source side ----------------------------------------------------------------------
    def forward(self, room_id: str) -> Forward | None: ...

    def forwards(self) -> list[Forward]: ...

    async def write_forward(self, room_id: str, instance: int, move_id: str,
                            last_seq: int) -> Forward:
        """THE commit point: the forward row in and the room out of this node's rooms, in one
        transaction. Raises MoveConflict when the room is not an active room here."""

    async def finish_forward(self, room_id: str, move_id: str) -> bool:
        """The target serves the room: mark the forward activated, delete the leftovers."""

    # -- target side ----------------------------------------------------------------------
    def incoming(self, room_id: str) -> Incoming | None: ...

    def incomings(self) -> list[Incoming]: ...

    async def begin_incoming(self, room: Incoming, keys: list[KeyRow]) -> bool: ...

    async def import_messages(self, room_id: str, move_id: str,
                              messages: list[MessageRecord]) -> int: ...

    async def activate(self, room_id: str, move_id: str, last_seq: int) -> str: ...

    async def drop_incoming(self, room_id: str, move_id: str) -> bool: ...


class RoomHost(Protocol):
    """The room service, as a move sees it."""

    async def announce_moved(self, room_id: str, moved: MovedTo) -> int:
        """Send ``moved`` to every member of the room and disconnect them; how many."""

    def describe_owned(self, room_id: str) -> dict[str, Any] | None:
        """The room's creation answer (without invite), None when it is not served here."""
