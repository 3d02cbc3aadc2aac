"""One room's move as the operator's commands run it: the owner's handoff asked for,
retried while it fails for a passing reason, checked after a lost answer, and the room's
activity numbers handed to its new owner. ``moves.py`` decides which rooms go where and
runs many of these at once (``Mover.many``); this module is what becomes of each.

Retried (up to ``attempts``, backing off from ``RETRY_FIRST`` to ``RETRY_MAX`` seconds, each
retry said): the owner did not answer or its answer was lost (then the room's owner is asked
first: a move whose answer was lost may have happened, and counts as done), 503
``unavailable`` (the target refused a step or could not be reached, the freeze ran out of
time), 409 ``moving`` (another move of the room is under way). Not retried: the room is not
on that instance any more (nor on the target), the target takes no rooms (``retarget``: a
drain plans the room again onto another instance), a request the node calls bad.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from shardchat import whereabouts
from shardchat.cluster import rebalance as planner
from shardchat.cluster.control import NodeDown, Nodes

CONCURRENCY = 4  # moves running at once: each freezes one room for a moment, on its owner
MOVE_ATTEMPTS = 4  # tries of one move that keeps failing for a passing reason
RETRY_FIRST = 0.5  # seconds before the first retry ...
RETRY_MAX = 5.0  # ... doubling up to this

Say = Callable[[str], None]


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class MoveOutcome:
    """What became of one room's move."""

    room_id: str
    source: int
    target: int
    ok: bool
    attempts: int
    error: str | None = None  # why not, when not ok
    messages: int | None = None  # copied by the handoff (None: its answer was lost)
    took_ms: float | None = None
    frozen_ms: float | None = None
    numbers: bool = False  # the room's activity numbers reached its new owner
    permanent: bool = False  # not ok, and retrying will not help
    retarget: bool = False  # not ok because the target takes no rooms: plan it elsewhere

    def line(self) -> str:
        if not self.ok:
            return (f"  not moved: room {self.room_id} (instance {self.source} -> "
                    f"{self.target}): {self.error}")
        detail = "the move's answer was lost, its owner says it moved" \
            if self.messages is None else \
            f"{plural(self.messages, 'message')}, {self.took_ms:.0f} ms, frozen " \
            f"{self.frozen_ms:.0f} ms"
        tries = f", attempt {self.attempts}" if self.attempts > 1 else ""
        return f"  moved {self.room_id}: instance {self.source} -> {self.target} " \
               f"({detail}{tries})"

    def to_json(self) -> dict[str, Any]:
        return {"room": self.room_id, "from": self.source, "to": self.target, "ok": self.ok,
                "attempts": self.attempts, "error": self.error, "messages": self.messages,
                "took_ms": self.took_ms, "frozen_ms": self.frozen_ms}


class Mover:
    """Runs moves against the nodes: retries, the deadline, a few at a time."""

    def __init__(self, nodes: Nodes, deadline: float, concurrency: int = CONCURRENCY,
                 say: Say | None = None, attempts: int = MOVE_ATTEMPTS):
        self.nodes = nodes
        self.deadline = deadline  # time.monotonic() after which no move starts
        self.concurrency = max(1, concurrency)
        self.say = say
        self.attempts = max(1, attempts)

    def left(self) -> float:
        """Seconds until the deadline (no move starts after it)."""
        return self.deadline - time.monotonic()

    async def one(self, room_id: str, source: int, target: int) -> MoveOutcome:
        """Move one room, retrying passing failures; never raises for a failed move."""
        wait, attempt, error = RETRY_FIRST, 0, "the deadline passed before it could start"
        while attempt < self.attempts and self.left() > 0:
            attempt += 1
            outcome = await self._attempt(room_id, source, target, attempt)
            if outcome.ok or outcome.permanent or outcome.retarget:
                return outcome
            error = outcome.error or "failed"
            if attempt < self.attempts and self.left() > wait:
                if self.say is not None:
                    self.say(f"  retrying {room_id} (instance {source} -> {target}) in "
                             f"{wait:g} s, attempt {attempt + 1} of {self.attempts}: {error}")
                await asyncio.sleep(wait)
                wait = min(wait * 2, RETRY_MAX)
            else:
                break
        return MoveOutcome(room_id, source, target, False, attempt,
                           f"{error} (gave up after {attempt} attempt"
                           f"{'s' if attempt != 1 else ''})")

    async def _attempt(self, room_id: str, source: int, target: int,
                       attempt: int) -> MoveOutcome:
        numbers = await self.nodes.room_numbers(source, room_id)
        try:
            status, body = await self.nodes.move(source, room_id, target)
        except NodeDown as exc:
            where = await self._owner_after_loss(room_id, source, target)
            if where == target:
                return await self._done(room_id, source, target, attempt, None, numbers)
            return MoveOutcome(room_id, source, target, False, attempt,
                               f"instance {source} did not answer ({exc.reason})")
        body = body if isinstance(body, dict) else {}
        if status == 200:
            return await self._done(room_id, source, target, attempt, body, numbers)
        code, message = body.get("error"), body.get("message") or f"answered {status}"
        if status == 409 and code == "not_owner":
            where = await self._owner_after_loss(room_id, source, target)
            if where == target:  # an earlier attempt (or someone else) moved it there
                return await self._done(room_id, source, target, attempt, None, numbers)
            now = f"it is on instance {where} now" if where else "no instance owns it now"
            return MoveOutcome(room_id, source, target, False, attempt,
                               f"instance {source} does not own it: {now}", permanent=True)
        if status == 503 and body.get("target_error") in ("draining", "drained"):
            return MoveOutcome(room_id, source, target, False, attempt,
                               f"instance {target} takes no rooms now ({message})",
                               retarget=True)
        if status == 503 or (status == 409 and code == "moving") or status >= 500:
            return MoveOutcome(room_id, source, target, False, attempt, message)
        return MoveOutcome(room_id, source, target, False, attempt,
                           f"refused {status} {code}: {message}", permanent=True)

    async def _owner_after_loss(self, room_id: str, source: int, target: int) -> int | None:
        """Where the room is, when a move's answer was lost or the source disowns it: the
        target is asked first (it owns the room once the move is done), then the source."""
        for number in (target, source):
            try:
                state = await self.nodes.room_state(number, room_id)
            except NodeDown:
                continue
            if state is None:
                continue
            if state.state == whereabouts.OWNER:
                return number
            if state.state == whereabouts.FORWARDED and state.to == target:
                return target  # committed; the target activates it (the source retries)
        return None

    async def _done(self, room_id: str, source: int, target: int, attempt: int,
                    report: dict[str, Any] | None, numbers: dict[str, float] | None
                    ) -> MoveOutcome:
        handed = bool(numbers) and await self.nodes.hand_numbers(target, room_id, numbers)
        report = report or {}
        return MoveOutcome(room_id, source, target, True, attempt,
                           messages=report.get("messages"), took_ms=report.get("took_ms"),
                           frozen_ms=report.get("frozen_ms"), numbers=handed)

    async def many(self, moves: Iterable[planner.Move]) -> list[MoveOutcome]:
        """Run ``moves``, ``concurrency`` at a time; a move not started by the deadline is
        reported as such."""
        gate = asyncio.Semaphore(self.concurrency)

        async def run(m: planner.Move) -> MoveOutcome:
            async with gate:
                if self.left() <= 0:
                    out = MoveOutcome(m.room_id, m.source, m.target, False, 0,
                                      "not started: the deadline passed")
                else:
                    out = await self.one(m.room_id, m.source, m.target)
            if self.say is not None:
                self.say(out.line())
            return out

        return list(await asyncio.gather(*(run(m) for m in moves)))
