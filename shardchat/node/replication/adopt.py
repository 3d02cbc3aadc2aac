"""Adoption and fencing: the follower takes a lost instance's rooms, the lost one stays out.

**Adopt** (``shardchat adopt``, or ``auto.py``): the follower M of a lost instance N stops
following it and, in one transaction of its own writer, turns every room N served in its
copy (``copy.py``) into an active room of M: the room row, its retained messages (with their
dedup keys) and its creation keys, and a row of ``adopted_rooms`` that remembers the room
came from N. Once durable the rooms are M's (``Moves.adopt_rooms``): seq goes on from the
last copied one, a retry of a copied ``client_id`` is a duplicate, and lookups find M as the
owner (``GET /internal/rooms/<id>``). M's own follower then re-copies M from a snapshot
(``ShipLog.reset``): that is what replicates the adopted rooms afterwards.

**Fence**: a node that starts with replication on asks, before its public listener opens,
every peer which of its rooms they adopted (``GET /internal/replication/adopted``). It goes
on only once its follower (the one node that adopts it) or a majority of the others
answered; until then it keeps asking, with its internal listener up so that peers starting
at the same time can ask it too. Each adopted room becomes a forward to wherever the room is
now (``Moves.fence``), so N's clients get ``moved`` and its pages redirect, exactly as after
a move; N never serves them again. A room that has since come back to N (the adopter
forwards it to N) is left alone. An instance adopted while it ran learns it from its
follower instead, and stops so that this runs (``OnlineReplication._check_adopted_away``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import aiohttp

from shardchat.internal_api import ADOPTED_PATH
from shardchat.node import faults
from shardchat.node.store import Forward, RoomRecord, Store, schema

log = logging.getLogger("shardchat.node.replication")

FENCE_RETRY = 1.0  # seconds between two rounds of asking the peers at start


class AdoptRefused(Exception):
    """An adoption this node will not run; ``code`` and ``message`` are the answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def adopt(store: Store, copy_file: Path, owner: int,
                elsewhere: Collection[str] = ()) -> int:
    """Make every room of ``owner`` in ``copy_file`` a room of this node; how many rooms of
    the copy are this node's now (adopted by this call or an earlier one: running it again
    adopts what is new in the copy and nothing twice)."""
    if not await asyncio.to_thread(copy_file.exists):
        raise AdoptRefused("no_copy", f"This node holds no copy of instance {owner} "
                           f"({copy_file} does not exist): it is not its follower, or "
                           "node.replication was off.")
    held: list[str] = []
    adopted = await store.moves.adopt_rooms(
        lambda conn: _import(conn, copy_file, owner, held, elsewhere))
    faults.reach("replication.after_adopt")
    log.warning("adopted %d rooms of instance %d (%d were adopted before)", len(adopted),
                owner, len(held))
    return len(adopted) + len(held)


_COPY_MESSAGES = (f"INSERT OR IGNORE INTO messages (room_id, {schema.MESSAGE_COLUMNS})"
                  " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


def _import(conn: sqlite3.Connection, copy_file: Path, owner: int, held: list[str],
            elsewhere: Collection[str]) -> list[tuple[RoomRecord, int]]:
    """Writer thread, inside its transaction (see the module docstring); the rooms that
    are active here already go to ``held``; those in ``elsewhere`` (owned by another
    instance now) are left out."""
    src = schema.connect(copy_file, query_only=True)
    now = int(time.time() * 1000)
    out = []
    try:
        src.execute("BEGIN")
        for rid, name, private, created_at in src.execute(
                "SELECT id, name, private, created_at FROM rooms WHERE state = ?",
                (schema.ACTIVE,)).fetchall():
            if rid in elsewhere:
                log.warning("room %s of instance %d's copy is owned by another instance "
                            "now (it moved just before the loss): not adopted", rid, owner)
                continue
            mine = conn.execute("SELECT state FROM rooms WHERE id = ?", (rid,)).fetchone()
            if mine is not None and mine[0] == schema.ACTIVE:
                held.append(rid)  # adopted before (or a conflict: kept as it is here)
                continue
            for table, column in (("rooms", "id"), ("messages", "room_id"),
                                  ("creation_keys", "room_id"), ("forwards", "room_id")):
                conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (rid,))
            conn.execute("INSERT INTO rooms (id, name, private, created_at, state, source)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (rid, name, private, created_at, schema.ACTIVE, owner))
            conn.executemany(_COPY_MESSAGES, src.execute(
                f"SELECT room_id, {schema.MESSAGE_COLUMNS} FROM messages WHERE room_id = ?",
                (rid,)))
            conn.executemany("INSERT OR REPLACE INTO creation_keys (key, room_id, "
                             "fingerprint, created_at) VALUES (?, ?, ?, ?)", src.execute(
                                 "SELECT key, room_id, fingerprint, created_at FROM "
                                 "creation_keys WHERE room_id = ?", (rid,)))
            conn.execute("INSERT OR REPLACE INTO adopted_rooms (room_id, instance, "
                         "adopted_at) VALUES (?, ?, ?)", (rid, owner, now))
            (top,) = conn.execute("SELECT MAX(seq) FROM messages WHERE room_id = ?",
                                  (rid,)).fetchone()
            out.append((RoomRecord(rid, name, bool(private), created_at), top or 0))
        src.execute("COMMIT")
    finally:
        src.close()
    return out


def adopted_from(store: Store, owner: int) -> list[str]:
    """Ids of the rooms this node adopted from ``owner`` (read from its disk)."""
    conn = schema.connect(store.path, query_only=True)
    try:
        return [r for (r,) in conn.execute(
            "SELECT room_id FROM adopted_rooms WHERE instance = ?", (owner,))]
    finally:
        conn.close()


def where_adopted(store: Store, number: int, owner: int) -> dict[str, int]:
    """For ``owner`` asking at its start: each room adopted from it here, and the instance
    that has it now (this one, or where it moved on to); rooms back on ``owner`` left out."""
    out = {}
    for rid in adopted_from(store, owner):
        if store.get_room(rid) is not None:
            out[rid] = number
        else:
            forward = store.moves.forward(rid)
            if forward is not None and forward.instance != owner:
                out[rid] = forward.instance
    return out


async def fence_at_start(store: Store, number: int, follower: int | None,
                         peers: dict[int, str], headers: dict[str, str], timeout: float,
                         waiting: Callable[[str], None] = log.warning) -> int:
    """Ask the peers before serving (see the module docstring); how many rooms went."""
    if not peers:
        return 0
    asked = 0
    async with aiohttp.ClientSession(headers=headers) as session:
        while True:
            asked += 1
            answers = await ask_adopted(session, peers, number, timeout)
            if (follower in answers or follower is None
                    or len(answers) * 2 > len(peers)):
                break
            if asked % 10 == 1:
                waiting(f"instance {number} waits before serving: its follower (instance "
                        f"{follower}) and a majority of its peers have not said which of its "
                        f"rooms were adopted ({len(answers)} of {len(peers)} answered)")
            await asyncio.sleep(FENCE_RETRY)
    where: dict[str, int] = {}
    for found in answers.values():
        where.update(found)
    if not where:
        return 0
    now = int(time.time() * 1000)
    forwards = [Forward(rid, to, f"adopted-by-{to}", store.last_seq(rid), now, True)
                for rid, to in sorted(where.items())]
    served = await store.moves.fence(forwards)
    faults.reach("replication.after_fence")
    log.warning("instance %d was adopted while it was away: %d of its rooms now live "
                "elsewhere (%d were still on its disk) and are forwarded there", number,
                len(forwards), served)
    return len(forwards)


async def ask_adopted(session: aiohttp.ClientSession, peers: dict[int, str], number: int,
                      timeout: float) -> dict[int, dict[str, int]]:
    """Each peer that answered: the rooms it adopted from ``number`` and where they are."""
    async def ask(peer: int, base: str) -> tuple[int, dict[str, int] | None]:
        try:
            async with session.get(f"{base}{ADOPTED_PATH}", params={"instance": number},
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status != 200:
                    return peer, None
                body: Any = await resp.json()
                return peer, {str(k): int(v) for k, v in body["rooms"].items()}
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError):
            return peer, None

    results = await asyncio.gather(*(ask(p, b) for p, b in peers.items()))
    return {p: found for p, found in results if found is not None}
