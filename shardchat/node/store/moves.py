"""Rooms that move: the arriving copies, the forwards, and the writes that change them.

A move of room R from node A to node B leaves two kinds of durable state (the protocol is in
``node/handoff/``, the reasoning in docs/architecture.md, "The handoff"):

* On B, while the copy is under way, R is a row of ``rooms`` with ``state = 'incoming'``,
  the ``source`` instance and the ``move_id``; its copied messages sit in ``messages`` like
  any room's. An incoming room is not a room of this node: not served, not counted, not
  moved. ``activate`` turns it into one (``state = 'active'``).
* On A, the ``forwards`` row of R. Writing it deletes R's ``rooms`` row in the same
  transaction: that one commit is the moment R stops being A's, the commit point of the
  move. R's messages stay on A's disk until B confirmed it serves R (``finish_forward``),
  so no crash between the two ever leaves R's history nowhere.

``Moves`` is the event loop's side (what arrives, what left, published when a write is
durable); each write is a ``Job`` of the writer thread, one transaction running one of the
functions below. A step the state does not allow raises ``MoveConflict``, nothing written.

Rooms also change hands without a move when an instance is lost (SPEC section 9,
``node/replication/``): its follower *adopts* them (``adopt_rooms``: copies become active
rooms here), and the lost instance, back, is *fenced* (``fence``: its adopted rooms become
forwards to the adopter). ``changed`` callbacks hear of every room a committed job changed,
in commit order, so the follower stream ships the room's new state.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from collections.abc import Callable

from shardchat.node.store import schema
from shardchat.node.store.errors import MoveConflict
from shardchat.node.store.reader import Reader
from shardchat.node.store.records import Forward, Incoming, KeyRow, MessageRecord, RoomRecord
from shardchat.node.store.writer import GroupCommitWriter

ACTIVE, INCOMING = schema.ACTIVE, schema.INCOMING
_INSERT_COPY = (
    "INSERT OR IGNORE INTO messages (room_id, seq, sender_sid, sender_name, text, ts,"
    " client_id, sender_member) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


class Moves:
    """What arrives here and what left, for the event loop; see the module docstring.

    ``owns(room_id)``: the room is served here (or being created); ``adopt(room, last_seq)``
    makes an activated room a room of this node, ``give_up(room_id)`` takes a forwarded one
    out: both change the store's own view, and run when the write is durable."""

    def __init__(self, writer: GroupCommitWriter, reader: Reader, *,
                 owns: Callable[[str], bool], adopt: Callable[[RoomRecord, int], None],
                 give_up: Callable[[str], None]) -> None:
        self._writer = writer
        self._reader = reader
        self._owns = owns
        self._adopt = adopt
        self._give_up = give_up
        self._incoming: dict[str, Incoming] = {}
        self._forwards: dict[str, Forward] = {}
        self.changed: list[Callable[[str], None]] = []  # room ids, after a job's commit

    def loaded(self, incoming: dict[str, Incoming], forwards: dict[str, Forward]) -> None:
        """At open: what ``schema.load_moves`` found."""
        self._incoming, self._forwards = incoming, forwards

    # -- reads ----------------------------------------------------------------------------

    def incoming(self, room_id: str) -> Incoming | None:
        return self._incoming.get(room_id)

    def incomings(self) -> list[Incoming]:
        return list(self._incoming.values())

    def forward(self, room_id: str) -> Forward | None:
        return self._forwards.get(room_id)

    def forwards(self) -> list[Forward]:
        return list(self._forwards.values())

    def creation_keys(self, room_id: str) -> list[KeyRow]:
        return self._reader.creation_keys_of(room_id)

    async def copy_page(self, room_id: str, after: int, limit: int,
                        max_bytes: int) -> list[MessageRecord]:
        """Stored messages with seq > ``after``, oldest first: at most ``limit``, and about
        ``max_bytes`` of text (at least one). Read in the reader thread."""
        page, used = [], 0
        for m in await self._reader.page(room_id, after, limit):
            used += len(m.text) + len(m.sender_name) + 200  # text, name, and the rest
            if page and used > max_bytes:
                break
            page.append(m)
        return page

    # -- target side ----------------------------------------------------------------------

    async def begin_incoming(self, room: Incoming, keys: list[KeyRow]) -> bool:
        """Hold ``room`` as arriving, replacing a stale copy; False: this move began here
        already. ``owned`` when the room is served here."""
        if self._owns(room.room_id):
            raise MoveConflict("owned", f"room {room.room_id} is an active room here")

        def done(_written: object) -> None:
            self._incoming[room.room_id] = room

        return await self._job(lambda c: begin_incoming(c, room, keys), done)

    async def import_messages(self, room_id: str, move_id: str,
                              messages: list[MessageRecord]) -> int:
        """Add copied messages to the incoming room; the newest seq it now holds."""
        return await self._job(lambda c: import_messages(c, room_id, move_id, messages))

    async def activate(self, room_id: str, move_id: str, last_seq: int) -> str:
        """Serve the incoming room from now on (``activate`` says when it may)."""
        incoming = self._incoming.get(room_id)

        def done(outcome: object) -> None:
            if outcome != "activated" or incoming is None or incoming.move_id != move_id:
                return
            self._incoming.pop(room_id, None)
            self._forwards.pop(room_id, None)
            self._adopt(incoming.room, last_seq)

        return await self._job(lambda c: activate(c, room_id, move_id, last_seq), done,
                               rooms=[room_id])

    async def drop_incoming(self, room_id: str, move_id: str) -> bool:
        def done(dropped: object) -> None:
            if dropped:
                self._incoming.pop(room_id, None)

        return await self._job(lambda c: drop_incoming(c, room_id, move_id), done)

    # -- source side ----------------------------------------------------------------------

    async def write_forward(self, room_id: str, instance: int, move_id: str,
                            last_seq: int) -> Forward:
        """THE commit point of a move (``write_forward``). The caller has stopped new
        messages of the room and flushed the store first."""
        forward = Forward(room_id, instance, move_id, last_seq, int(time.time() * 1000), False)

        def done(_none: object) -> None:
            self._give_up(room_id)
            self._forwards[room_id] = forward

        await self._job(lambda c: write_forward(c, forward), done, rooms=[room_id])
        return forward

    async def finish_forward(self, room_id: str, move_id: str) -> bool:
        """The target serves the room: the forward is marked so, the leftovers go."""
        def done(changed: object) -> None:
            current = self._forwards.get(room_id)
            if changed and current is not None and current.move_id == move_id:
                self._forwards[room_id] = Forward(
                    room_id, current.instance, move_id, current.last_seq, current.moved_at,
                    True)

        return await self._job(lambda c: finish_forward(c, room_id, move_id), done,
                               rooms=[room_id])

    # -- an instance lost and adopted (``node/replication/adopt.py``) -----------------------

    async def adopt_rooms(self, run: Callable[[sqlite3.Connection],
                                              list[tuple[RoomRecord, int]]]
                          ) -> list[tuple[RoomRecord, int]]:
        """Run ``run`` (it writes the adopted rooms as active rooms and returns each with
        its last seq) in one transaction; once durable they are rooms of this node."""
        def done(adopted: object) -> None:
            for room, last_seq in adopted:  # type: ignore[attr-defined]
                self._incoming.pop(room.id, None)
                self._forwards.pop(room.id, None)
                self._adopt(room, last_seq)

        return await self._job(run, done)  # type: ignore[return-value]

    async def fence(self, forwards: list[Forward]) -> int:
        """Rooms adopted away from this node become forwards to their adopter, and what
        was left of them here goes, in one transaction; how many rooms were served here."""
        def done(_count: object) -> None:
            for f in forwards:
                self._give_up(f.room_id)
                self._incoming.pop(f.room_id, None)
                self._forwards[f.room_id] = f

        return await self._job(lambda c: fence(c, forwards), done,  # type: ignore[return-value]
                               rooms=[f.room_id for f in forwards])

    async def _job(self, run: Callable[[sqlite3.Connection], object],
                   done: Callable[[object], None] | None = None,
                   rooms: list[str] | None = None) -> object:
        """One write of its own transaction; ``rooms`` (or the room id of the step, read
        from the move functions' first argument) are told to ``changed`` once durable."""
        if rooms is None or not self.changed:
            return await asyncio.shield(self._writer.write_job(run, done))

        def done_and_tell(result: object) -> None:
            if done is not None:
                done(result)
            for tell in self.changed:
                for room_id in rooms:
                    tell(room_id)

        return await asyncio.shield(self._writer.write_job(run, done_and_tell))


# -- the writes, in the writer thread inside a transaction --------------------------------


def _room_row(conn: sqlite3.Connection, room_id: str) -> tuple[str, str | None] | None:
    row = conn.execute("SELECT state, move_id FROM rooms WHERE id = ?", (room_id,)).fetchone()
    return (row[0], row[1]) if row else None


def _delete_room_data(conn: sqlite3.Connection, room_id: str) -> None:
    conn.execute("DELETE FROM messages WHERE room_id = ?", (room_id,))
    conn.execute("DELETE FROM creation_keys WHERE room_id = ?", (room_id,))


def begin_incoming(conn: sqlite3.Connection, room: Incoming, keys: list[KeyRow]) -> bool:
    """Hold ``room`` as incoming, replacing any stale copy of it (an earlier move's incoming
    row, leftover messages). True when written, False when this move already began here.
    A forward of the room stays until ``activate``: until then it still says where it is."""
    found = _room_row(conn, room.room_id)
    if found is not None:
        state, move_id = found
        if state != INCOMING:
            raise MoveConflict("owned", f"room {room.room_id} is an active room here")
        if move_id == room.move_id:
            return False
    r = room.room
    conn.execute("DELETE FROM rooms WHERE id = ?", (r.id,))
    _delete_room_data(conn, r.id)
    conn.execute("INSERT INTO rooms (id, name, private, created_at, state, source, move_id)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (r.id, r.name, int(r.private), r.created_at, INCOMING, room.source,
                  room.move_id))
    conn.executemany("INSERT OR IGNORE INTO creation_keys (key, room_id, fingerprint,"
                     " created_at) VALUES (?, ?, ?, ?)",
                     [(k.key, r.id, k.fingerprint, k.created_at) for k in keys])
    return True


def _require_incoming(conn: sqlite3.Connection, room_id: str, move_id: str) -> None:
    if _room_row(conn, room_id) != (INCOMING, move_id):
        raise MoveConflict("not_incoming", f"room {room_id} is not arriving here under "
                           f"move {move_id}")


def import_messages(conn: sqlite3.Connection, room_id: str, move_id: str,
                    messages: list[MessageRecord]) -> int:
    """Add copied messages (ascending, one unbroken run of seqs) to the incoming room; a
    copy already held is skipped. Returns the newest seq now held.

    A room's stored seqs are one unbroken range (``Store.gap`` relies on it). If the source
    pruned old messages between two pages, the new page starts above the newest held + 1:
    everything held below it is older than what the source still keeps, and goes."""
    _require_incoming(conn, room_id, move_id)
    if any(m.room_id != room_id for m in messages) or any(
            b.seq != a.seq + 1 for a, b in itertools.pairwise(messages)):
        raise MoveConflict("bad_page", "copied messages must be one ascending run of seqs "
                           "of this room")
    (top,) = conn.execute("SELECT MAX(seq) FROM messages WHERE room_id = ?",
                          (room_id,)).fetchone()
    top = top or 0
    if messages and top and messages[0].seq > top + 1:
        conn.execute("DELETE FROM messages WHERE room_id = ? AND seq < ?",
                     (room_id, messages[0].seq))
    conn.executemany(_INSERT_COPY, [
        (m.room_id, m.seq, m.sender_sid, m.sender_name, m.text, m.ts, m.client_id,
         m.sender_member) for m in messages])
    return max(top, messages[-1].seq) if messages else top


def activate(conn: sqlite3.Connection, room_id: str, move_id: str, last_seq: int) -> str:
    """Make the incoming room an active room of this node once it holds every retained
    message up to ``last_seq``, and drop this node's own old forward of it.

    Returns ``"activated"``, ``"already_active"`` (this move activated it before: the answer
    was lost), or ``"moved_on"`` (the room was activated here and has left again under a
    later move). Raises ``MoveConflict`` otherwise."""
    found = _room_row(conn, room_id)
    if found == (ACTIVE, move_id):
        return "already_active"
    if found is None and conn.execute(
            "SELECT 1 FROM forwards WHERE room_id = ? AND move_id != ?",
            (room_id, move_id)).fetchone():
        return "moved_on"
    _require_incoming(conn, room_id, move_id)
    low, high, count = conn.execute("SELECT MIN(seq), MAX(seq), COUNT(*) FROM messages"
                                    " WHERE room_id = ?", (room_id,)).fetchone()
    whole = (count == 0 and last_seq == 0) or (high == last_seq and count == high - low + 1)
    if not whole:
        raise MoveConflict("incomplete", f"room {room_id} holds {count} messages up to seq "
                           f"{high or 0}, but the source's last seq is {last_seq}")
    conn.execute("UPDATE rooms SET state = ? WHERE id = ?", (ACTIVE, room_id))
    conn.execute("DELETE FROM forwards WHERE room_id = ?", (room_id,))
    return "activated"


def drop_incoming(conn: sqlite3.Connection, room_id: str, move_id: str) -> bool:
    """Forget the incoming copy of a move that did not happen; False when there is none
    under ``move_id`` (a later move replaced it, or it was activated)."""
    if _room_row(conn, room_id) != (INCOMING, move_id):
        return False
    conn.execute("DELETE FROM rooms WHERE id = ?", (room_id,))
    _delete_room_data(conn, room_id)
    return True


def write_forward(conn: sqlite3.Connection, forward: Forward) -> None:
    """The commit point of a move: the forward row in, the room's row out, atomically."""
    found = _room_row(conn, forward.room_id)
    if found is None or found[0] != ACTIVE:
        raise MoveConflict("not_owner", f"room {forward.room_id} is not a room of this node")
    conn.execute("INSERT OR REPLACE INTO forwards (room_id, instance, move_id, last_seq,"
                 " moved_at, activated) VALUES (?, ?, ?, ?, ?, 0)",
                 (forward.room_id, forward.instance, forward.move_id, forward.last_seq,
                  forward.moved_at))
    conn.execute("DELETE FROM rooms WHERE id = ?", (forward.room_id,))


def finish_forward(conn: sqlite3.Connection, room_id: str, move_id: str) -> bool:
    """The target serves the room: mark the forward activated and delete what the room left
    here. False (nothing changed) when the forward is not this move's any more; the data is
    kept when the room has come back to this node meanwhile (it is then the new copy)."""
    cur = conn.execute("UPDATE forwards SET activated = 1 WHERE room_id = ? AND move_id = ?",
                       (room_id, move_id))
    if cur.rowcount != 1:
        return False
    if _room_row(conn, room_id) is None:
        _delete_room_data(conn, room_id)
    return True


def fence(conn: sqlite3.Connection, forwards: list[Forward]) -> int:
    """Each room a forward to its adopter, its data here gone; how many were active here."""
    served = 0
    for f in forwards:
        found = _room_row(conn, f.room_id)
        served += found is not None and found[0] == ACTIVE
        conn.execute("DELETE FROM rooms WHERE id = ?", (f.room_id,))
        _delete_room_data(conn, f.room_id)
        conn.execute("INSERT OR REPLACE INTO forwards (room_id, instance, move_id, last_seq,"
                     " moved_at, activated) VALUES (?, ?, ?, ?, ?, ?)",
                     (f.room_id, f.instance, f.move_id, f.last_seq, f.moved_at,
                      int(f.activated)))
    return served
