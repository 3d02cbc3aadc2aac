"""The source side of a move: copy while serving, freeze, copy the delta, forward, activate.

One ``Source`` per node runs the moves of its rooms (one at a time per room) and, after a
restart, finishes the ones whose forward is written but whose target has not confirmed.

The order of the steps is what makes a crash at any point safe (docs/architecture.md, "The
handoff"): everything before the forward row is undone by forgetting it (the target's copy
is dropped, this node still owns the room, a freeze lives in memory only), and everything
after it is redone by asking the target to activate again until it says it serves the room.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from shardchat.node import faults
from shardchat.node.handoff import api
from shardchat.node.handoff.peer import PeerDown, PeerRefused, Peers
from shardchat.node.handoff.ports import MoveStore, RoomHost, RoomStore
from shardchat.node.handoff.records import Gate, MovedTo, MoveError, MoveReport
from shardchat.node.store import Forward, MoveConflict, RoomRecord

log = logging.getLogger("shardchat.handoff")

PAGE_ROWS = 500  # messages per copy request ...
PAGE_BYTES = 512 * 1024  # ... and about this many bytes of them
LIVE_ROUNDS = 5  # copy rounds while the room serves, at most ...
DELTA_TARGET = 50  # ... until fewer messages than this are left for the frozen delta
CALL_TIMEOUT = 10.0  # seconds for one begin / copy call (a page is one fsync on the target)
ACTIVATE_TIMEOUT = 5.0
FREEZE_LIMIT = 5.0  # the flush and the delta must be done within this, or the move aborts
RETRY_FIRST = 0.2  # activation retries after a crash or a lost answer: first wait ...
RETRY_MAX = 5.0  # ... doubling up to this


@dataclass
class Move:
    """One move under way (memory only: a restart forgets it, and that is safe)."""

    room_id: str
    target: int
    move_id: str
    started: float = field(default_factory=time.monotonic)
    cursor: int = 0  # the newest seq the target confirmed holding
    copied: int = 0
    gate: Gate | None = None
    frozen_at: float | None = None


class Source:
    def __init__(self, number: int, store: RoomStore, moves: MoveStore, host: RoomHost,
                 peers: Peers, where: Callable[[str, int], MovedTo]):
        self.number = number
        self.store = store
        self.moves = moves
        self.host = host
        self.peers = peers
        self.where = where  # (room id, instance) -> MovedTo
        self.moving: dict[str, Move] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # activation retries, abort notices
        self._activating: set[str] = set()  # rooms whose activation is being retried

    # -- what the room service asks -------------------------------------------------------

    def gate(self, room_id: str) -> Gate | None:
        move = self.moving.get(room_id)
        return move.gate if move is not None else None

    # -- one move -------------------------------------------------------------------------

    async def move(self, room_id: str, target: int) -> MoveReport:
        """Move the room to instance ``target``; raises MoveError when it did not move."""
        record = self.store.get_room(room_id)
        if record is None:
            raise MoveError(409, "not_owner", f"Room {room_id} is not a room of instance "
                            f"{self.number}.")
        if target == self.number:
            raise MoveError(400, "bad_request", f"Room {room_id} is on instance {target} "
                            "already.")
        if not self.peers.known(target):
            raise MoveError(400, "bad_request", f"There is no instance {target} in the "
                            "cluster.")
        if room_id in self.moving:
            raise MoveError(409, "moving", f"Room {room_id} is being moved to instance "
                            f"{self.moving[room_id].target} right now.")
        move = Move(room_id, target, secrets.token_urlsafe(12))
        self.moving[room_id] = move
        try:
            try:
                last = await self._prepare(move, record)
                # THE commit point: before it this node owns the room, after it the target.
                await self.moves.write_forward(room_id, target, move.move_id, last)
            except MoveError as exc:
                self._abort(move, exc)
                raise
            except MoveConflict as exc:
                self._abort(move, exc)
                raise MoveError(409, exc.code, str(exc)) from None
            except Exception as exc:
                log.exception("move of room %s to instance %d failed", room_id, target)
                self._abort(move, exc)
                raise MoveError(503, "unavailable", f"The move of room {room_id} failed on "
                                f"instance {self.number} (its log says why); the room stays "
                                "there.") from None
            except BaseException as exc:
                self._abort(move, exc)
                raise
            return await self._commit(move, last)
        finally:
            self.moving.pop(room_id, None)

    async def _prepare(self, move: Move, record: RoomRecord) -> int:
        """Begin, copy while serving, freeze, copy the delta; returns the last seq, which
        the target then holds with every message before it."""
        keys = [dataclasses.asdict(k) for k in self.moves.creation_keys(move.room_id)]
        room = dataclasses.asdict(record)
        await self._call(move, api.BEGIN_PATH, {
            "move_id": move.move_id, "source": self.number, "room": room, "keys": keys})
        faults.reach("handoff.after_begin")
        for _ in range(LIVE_ROUNDS):
            await self._copy(move)
            if self.store.last_seq(move.room_id) - move.cursor < DELTA_TARGET:
                break
        faults.reach("handoff.after_copy")
        move.gate, move.frozen_at = Gate(), time.monotonic()
        try:
            async with asyncio.timeout(FREEZE_LIMIT):
                # No message of the room gets a seq from now on (the room service checks
                # the gate before it stores one); the flush commits the ones that have one.
                await self.store.flush()
                last = self.store.last_seq(move.room_id)
                faults.reach("handoff.after_freeze")
                await self._copy(move)
        except TimeoutError:
            raise MoveError(503, "unavailable", f"The last messages of room {move.room_id} "
                            f"could not be copied within {FREEZE_LIMIT:g} s; the room stays "
                            f"on instance {self.number}.") from None
        if move.cursor != last:
            raise MoveError(503, "unavailable", f"Instance {move.target} holds room "
                            f"{move.room_id} up to seq {move.cursor}, not {last}; the room "
                            f"stays on instance {self.number}.")
        faults.reach("handoff.after_delta")
        return last

    async def _copy(self, move: Move) -> None:
        """Copy every stored message after the cursor, page by page."""
        while page := await self.moves.copy_page(move.room_id, move.cursor, PAGE_ROWS,
                                                 PAGE_BYTES):
            answer = await self._call(move, api.COPY_PATH, {
                "move_id": move.move_id, "room_id": move.room_id,
                "messages": api.message_rows(page)})
            have = answer.get("have")
            if not api.whole(have) or have < page[-1].seq:
                raise MoveError(503, "unavailable", f"Instance {move.target} did not confirm "
                                f"the copy of room {move.room_id} (it answered {answer!r}).")
            move.cursor = page[-1].seq
            move.copied += len(page)

    async def _commit(self, move: Move, last: int) -> MoveReport:
        """The forward is written, so the move has happened: activate the target, let the
        waiting messages and the members know."""
        faults.reach("handoff.after_forward")
        moved = self.where(move.room_id, move.target)
        activated = await self._activate_once(move.room_id, move.target, move.move_id, last)
        if activated:
            faults.reach("handoff.after_activate")
        assert move.gate is not None and move.frozen_at is not None
        frozen_ms = (time.monotonic() - move.frozen_at) * 1000
        move.gate.open(moved)
        try:
            members = await self.host.announce_moved(move.room_id, moved)
        except Exception:  # the move has happened: members find out at their next event
            log.exception("telling the members of room %s that it moved failed", move.room_id)
            members = 0
        if activated:
            await self._finish(move.room_id, move.move_id)
        else:
            self._retry_activation(self.moves.forward(move.room_id))
        took_ms = (time.monotonic() - move.started) * 1000
        log.info("room %s moved to instance %d: %d messages copied, %d members told, "
                 "%.0f ms in all, %.0f ms frozen%s", move.room_id, move.target, move.copied,
                 members, took_ms, frozen_ms, "" if activated else "; activation pending")
        return MoveReport(move.room_id, self.number, move.target, move.copied, last, took_ms,
                          frozen_ms, activated)

    def _abort(self, move: Move, exc: BaseException) -> None:
        """Before the forward: the room serves here again at once; the target is told to
        drop its copy (best effort: it also asks by itself, ``target.py``)."""
        if move.gate is not None:
            move.gate.open(None)
        log.warning("move of room %s to instance %d called off: %s", move.room_id,
                    move.target, exc)
        self._background(self._tell_abort(move), f"abort-{move.room_id}")

    async def _tell_abort(self, move: Move) -> None:
        with contextlib.suppress(PeerDown, PeerRefused):
            await self.peers.call(move.target, "POST", api.ABORT_PATH, {
                "move_id": move.move_id, "room_id": move.room_id}, timeout=CALL_TIMEOUT)

    async def _call(self, move: Move, path: str, body: dict) -> dict:
        try:
            answer = await self.peers.call(move.target, "POST", path, body,
                                           timeout=CALL_TIMEOUT)
        except PeerDown as exc:
            raise MoveError(503, "unavailable", f"Instance {move.target} cannot take room "
                            f"{move.room_id} now: {exc.reason}.") from None
        except PeerRefused as exc:
            raise MoveError(503, "unavailable", f"Instance {move.target} refused room "
                            f"{move.room_id}: {exc}.", target_error=exc.code) from None
        return answer if isinstance(answer, dict) else {}

    # -- activation, and its retries -------------------------------------------------------

    async def _activate_once(self, room_id: str, target: int, move_id: str,
                             last: int) -> bool:
        """Ask the target to serve the room; True when it does (or did, and moved it on)."""
        try:
            await self.peers.call(target, "POST", api.ACTIVATE_PATH, {
                "move_id": move_id, "room_id": room_id, "last_seq": last},
                timeout=ACTIVATE_TIMEOUT)
        except PeerDown as exc:
            log.warning("instance %d did not confirm room %s yet (%s); asking again",
                        target, room_id, exc.reason)
            return False
        except PeerRefused as exc:
            log.error("instance %d refused to activate room %s (move %s): %s; asking again",
                      target, room_id, move_id, exc)
            return False
        return True

    async def _finish(self, room_id: str, move_id: str) -> None:
        try:
            await self.moves.finish_forward(room_id, move_id)
        except Exception:  # the forward stands; the leftovers go at the next start
            log.exception("could not record that room %s is served by its target", room_id)

    def recover(self) -> None:
        """At start: finish every move whose forward is written but not confirmed."""
        for forward in self.moves.forwards():
            if not forward.activated:
                self._retry_activation(forward)

    def _retry_activation(self, forward: Forward | None) -> None:
        if forward is None or forward.room_id in self._activating:
            return
        self._activating.add(forward.room_id)
        self._background(self._activate_until_done(forward), f"activate-{forward.room_id}")

    def _background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _activate_until_done(self, forward: Forward) -> None:
        wait = RETRY_FIRST
        try:
            while not await self._activate_once(forward.room_id, forward.instance,
                                                forward.move_id, forward.last_seq):
                await asyncio.sleep(wait)
                wait = min(wait * 2, RETRY_MAX)
        finally:
            self._activating.discard(forward.room_id)
        await self._finish(forward.room_id, forward.move_id)
        log.info("room %s is served by instance %d now", forward.room_id, forward.instance)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
