"""The target side of a move: hold the arriving copy, confirm each step, serve on activate.

A copy is never served before ``activate`` (the room service refuses its connects with
``unavailable``, stats do not count it). Each handler writes before it answers, so a
confirmation the source receives is always durable here, and each is idempotent per move
id: a source that retries after a lost answer gets the same answer.

While this node holds incoming rooms it asks each one's source, every ``RESOLVE_INTERVAL``,
what became of the move (``resolve_once``): the source still owns the room and is not moving
it here any more (it crashed before its forward, or called the move off) -> the copy is
dropped; the source forwarded the room here under this move -> the room is activated. So a
crash of either side never leaves a copy in limbo once both are up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from shardchat.node import faults
from shardchat.node.handoff import api
from shardchat.node.handoff.peer import PeerDown, PeerRefused, Peers
from shardchat.node.handoff.ports import MoveStore
from shardchat.node.handoff.records import MoveError
from shardchat.node.store import Incoming, KeyRow, MoveConflict, RoomRecord

log = logging.getLogger("shardchat.handoff")

RESOLVE_INTERVAL = 1.0  # seconds between two looks at the incoming rooms' sources
ASK_TIMEOUT = 3.0


class Target:
    def __init__(self, number: int, moves: MoveStore, peers: Peers,
                 draining: Callable[[], bool]):
        self.number = number
        self.moves = moves
        self.peers = peers
        self.draining = draining
        self._task: asyncio.Task[None] | None = None
        self._puzzled: set[tuple[str, str]] = set()  # (room, move) already logged as odd

    # -- the steps, as the source calls them ------------------------------------------------

    async def begin(self, body: Any) -> dict[str, Any]:
        move_id = api.field(body, "move_id", "move_id")
        source = api.field(body, "source", "instance")
        room = api.field(body, "room", "object")
        record = RoomRecord(api.field(room, "id", "room_id"), api.field(room, "name", "str"),
                            api.field(room, "private", "bool"),
                            api.field(room, "created_at", "seq"))
        incoming = Incoming(record, source, move_id)
        keys = [KeyRow(api.field(k, "key", "str"), api.field(k, "fingerprint", "str"),
                       api.field(k, "created_at", "seq"))
                for k in api.field(body, "keys", "list")]
        if source == self.number:
            raise api.BadRequest("A room cannot move to the instance it is on.")
        if self.draining():
            raise MoveError(503, "draining", f"Instance {self.number} is draining; it takes "
                            "no rooms.")
        await self._conflicts(self.moves.begin_incoming(incoming, keys))
        faults.reach("handoff.target_after_begin")
        log.info("room %s is arriving from instance %d (move %s)", incoming.room_id, source,
                 move_id)
        return {"room": incoming.room_id, "state": "incoming", "have": 0}

    async def copy(self, body: Any) -> dict[str, Any]:
        move_id = api.field(body, "move_id", "move_id")
        room_id = api.field(body, "room_id", "room_id")
        messages = api.messages_of(room_id, api.field(body, "messages", "list"))
        have = await self._conflicts(self.moves.import_messages(room_id, move_id, messages))
        faults.reach("handoff.target_after_copy")
        return {"room": room_id, "have": have}

    async def activate(self, body: Any) -> dict[str, Any]:
        move_id = api.field(body, "move_id", "move_id")
        room_id = api.field(body, "room_id", "room_id")
        last_seq = api.field(body, "last_seq", "seq")
        outcome = await self._conflicts(self.moves.activate(room_id, move_id, last_seq))
        faults.reach("handoff.target_after_activate")
        if outcome == "activated":
            log.info("room %s is served here now (move %s, last seq %d)", room_id, move_id,
                     last_seq)
        return {"room": room_id, "state": "active", "outcome": outcome}

    async def abort(self, body: Any) -> dict[str, Any]:
        move_id = api.field(body, "move_id", "move_id")
        room_id = api.field(body, "room_id", "room_id")
        dropped = await self.moves.drop_incoming(room_id, move_id)
        if dropped:
            log.info("dropped the copy of room %s: its move %s was called off", room_id,
                     move_id)
        return {"room": room_id, "dropped": dropped}

    @staticmethod
    async def _conflicts(write: Any) -> Any:
        try:
            return await write
        except MoveConflict as exc:
            raise MoveError(409, exc.code, str(exc)) from None

    # -- what became of each incoming room --------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="handoff-target")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.resolve_once()
            except Exception:
                log.exception("looking at the incoming rooms failed; trying again")
            await asyncio.sleep(RESOLVE_INTERVAL)

    async def resolve_once(self) -> None:
        """Ask the source of each incoming room what became of its move."""
        await asyncio.gather(*(self._resolve(i) for i in self.moves.incomings()))

    async def _resolve(self, inc: Incoming) -> None:
        try:
            answer = await self.peers.call(inc.source, "GET", api.room_state_path(inc.room_id),
                                           timeout=ASK_TIMEOUT, ok=(200, 404))
        except (PeerDown, PeerRefused) as exc:
            log.debug("cannot ask instance %d about room %s yet: %s", inc.source,
                      inc.room_id, exc)
            return
        state = answer.get("state") if isinstance(answer, dict) else None
        if state == "owner":
            moving = answer.get("moving") or {}
            if moving.get("move_id") != inc.move_id:
                await self._drop(inc, f"instance {inc.source} still owns it")
        elif state == "forwarded":
            if answer.get("to") == self.number and answer.get("move_id") == inc.move_id:
                await self._activate(inc, answer.get("last_seq"))
            else:
                await self._drop(inc, f"instance {inc.source} forwards it to instance "
                                 f"{answer.get('to')} under another move")
        elif (inc.room_id, inc.move_id) not in self._puzzled:
            # Nothing is dropped on an answer that proves nothing: the copy may be the only
            # one left (a source that lost its store answers 404).
            self._puzzled.add((inc.room_id, inc.move_id))
            log.warning("instance %d says %r about room %s, which is arriving here from it; "
                        "keeping the copy (an operator may drop it)", inc.source,
                        state or answer, inc.room_id)

    async def _drop(self, inc: Incoming, why: str) -> None:
        if await self.moves.drop_incoming(inc.room_id, inc.move_id):
            log.info("dropped the copy of room %s (move %s): %s", inc.room_id, inc.move_id,
                     why)

    async def _activate(self, inc: Incoming, last_seq: Any) -> None:
        if not api.whole(last_seq):
            log.error("instance %d forwards room %s here without a last seq", inc.source,
                      inc.room_id)
            return
        try:
            outcome = await self.moves.activate(inc.room_id, inc.move_id, last_seq)
        except MoveConflict as exc:
            log.error("cannot activate room %s forwarded by instance %d: %s", inc.room_id,
                      inc.source, exc)
            return
        log.info("room %s is served here now (%s after asking instance %d)", inc.room_id,
                 outcome, inc.source)
