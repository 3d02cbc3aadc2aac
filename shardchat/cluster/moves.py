"""Moving rooms between running instances as an operator asks for it: one room (``move``),
every room of one instance (``drain``), or as few rooms as even out the load
(``rebalance``). ``shardchat move | drain | rebalance`` and ``shardchat up`` (when it
shrinks) run these.

Each move is the owner's live handoff (``POST /internal/rooms/<id>/move``, the node's
``handoff`` package). What this module adds is the operator's part:

* which rooms go where: ``rebalance.py``'s plans, over the loads the nodes list
  (``GET /internal/rooms``) in the measure placement uses (``load.py``);
* running the moves a few at a time (``concurrency``) within a deadline: no move starts
  after it, the ones running are let finish (a move cannot be cut off halfway, and each is
  bounded by ``control.MOVE_TIMEOUT``);
* retries of the moves that failed for a passing reason (below), backing off;
* handing each moved room's activity numbers to its new owner (read from the old owner
  just before the move), so the loads measured after a rebalance are the ones it planned;
* a report of every room it was asked to move: moved, or not moved and why. A room that
  cannot be moved is reported, never skipped in silence.

Which failures are retried (up to ``MOVE_ATTEMPTS`` times): the owner did not answer or the
answer was lost (the owner is then asked where the room is: a move whose answer was lost may
have happened, and then counts as done), 503 ``unavailable`` (the target refused a step or
could not be reached, the freeze ran out of time), 409 ``moving`` (another move of the room
is under way). Which are not: the room is not on that instance any more (and not on the
target either), the target takes no rooms (drained or stopping: a drain plans those rooms
again onto the others), a request the node calls bad.

A drain first marks the instance drained (``POST /internal/drained``), so that no room is
placed on it or moved to it while it empties; rooms created there just before (a peer's
placement that had not seen the drain yet) show up in the next listing, so the drain lists
and plans again after each round until the instance is empty, the deadline passes or a
round moves nothing. The instance stays drained afterwards: out of placement until
``shardchat drain --undrain`` or its restart.

Refusals (``Refused``) come before anything changed, each with a sentence a person can act
on: an unknown instance, a room nobody owns, a target that is down, drained or stopping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shardchat import urls, whereabouts
from shardchat.cluster import rebalance as planner
from shardchat.cluster.control import NodeDown, Nodes, NodeState
from shardchat.cluster.load import RoomLoad
from shardchat.config import Config

CONCURRENCY = 4  # moves running at once: each freezes one room for a moment, on its owner
MOVE_ATTEMPTS = 4  # tries of one move that keeps failing for a passing reason
RETRY_FIRST = 0.5  # seconds before the first retry ...
RETRY_MAX = 5.0  # ... doubling up to this
MOVE_DEADLINE = 300.0  # seconds a `shardchat move` may take, retries included
DRAIN_DEADLINE = 600.0  # seconds a drain may take (no move starts after it)
REBALANCE_DEADLINE = 600.0
DRAIN_ROUNDS = 8  # list-plan-move rounds of one drain, at most

Say = Callable[[str], None]


class Refused(Exception):
    """The request cannot be done as asked, and nothing was changed; the message says what
    to do instead."""


# -- one move -------------------------------------------------------------------------------


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
            f"{_plural(self.messages, 'message')}, {self.took_ms:.0f} ms, frozen " \
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


# -- the reports ----------------------------------------------------------------------------


def _load(value: float | None) -> str:
    """A load for people: one decimal, or the first digits of a load below 1 (idle rooms
    weigh 0.0001 each, and "0.0" would hide them)."""
    if value is None:
        return "?"
    return f"{value:.1f}" if value >= 1 or value == 0 else f"{value:.2g}"


def _loads(values: Mapping[int, float | None]) -> str:
    return "  ".join(f"i{n} {_load(v)}" for n, v in sorted(values.items()))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@dataclass
class MoveReport:
    """``shardchat move``: one room."""

    room_id: str
    source: int
    target: int
    outcome: MoveOutcome | None  # None: it was on the target already
    seconds: float

    @property
    def ok(self) -> bool:
        return self.outcome is None or self.outcome.ok

    def lines(self) -> list[str]:
        if self.outcome is None:
            return [f"room {self.room_id} is on instance {self.target} already; nothing to "
                    "move."]
        head = self.outcome.line().strip()
        if self.ok:
            return [head, f"1 room moved in {self.seconds:.1f} s."]
        return [head, f"room {self.room_id} stays on instance {self.source}."]

    def to_json(self) -> dict[str, Any]:
        return {"room": self.room_id, "from": self.source, "to": self.target,
                "ok": self.ok, "moved": self.outcome is not None and self.outcome.ok,
                "seconds": round(self.seconds, 3),
                "move": self.outcome.to_json() if self.outcome else None}


@dataclass
class DrainReport:
    """``shardchat drain``: every room of one instance."""

    instance: int
    outcomes: dict[str, MoveOutcome]  # the last outcome of each room it tried to move
    remaining: int | None  # rooms the instance still owns at the end (None: unknown)
    before: dict[int, float | None]
    after: dict[int, float | None]
    seconds: float
    rounds: int
    targets: list[int]
    drained: bool = True  # the instance is left drained
    note: str | None = None

    @property
    def moved(self) -> list[MoveOutcome]:
        return [o for o in self.outcomes.values() if o.ok]

    @property
    def failed(self) -> list[MoveOutcome]:
        return [o for o in self.outcomes.values() if not o.ok]

    @property
    def finished(self) -> bool:
        return self.remaining == 0

    @property
    def ok(self) -> bool:
        """The instance is empty (a room that failed to move but left it otherwise, say
        moved by someone else meanwhile, is still listed with its reason)."""
        return self.finished

    def lines(self) -> list[str]:
        out = [f"moved {_plural(len(self.moved), 'room')} off instance {self.instance} "
               f"in {self.seconds:.1f} s ({_plural(self.rounds, 'round')}, to instances "
               f"{', '.join(map(str, self.targets)) or 'none'}); "
               f"{len(self.failed)} not moved."]
        out += [o.line() for o in self.failed]
        out += [f"load before: {_loads(self.before)}", f"load after:  {_loads(self.after)}"]
        if self.note:
            out.append(self.note)
        if self.finished:
            state = ("drained: out of placement until `shardchat drain --undrain` or a "
                     "restart" if self.drained else "back in placement")
            out.append(f"instance {self.instance} owns no rooms now and is {state}.")
        else:
            left = "an unknown number of rooms" if self.remaining is None \
                else _plural(self.remaining, "room")
            out.append(f"instance {self.instance} still owns {left}: the drain did not "
                       "finish. Run it again (it moves what is left), or see the reasons "
                       "above.")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"instance": self.instance, "moved": len(self.moved),
                "failed": [o.to_json() for o in self.failed], "remaining": self.remaining,
                "finished": self.finished, "drained": self.drained,
                "seconds": round(self.seconds, 3), "rounds": self.rounds,
                "targets": self.targets, "before": self.before, "after": self.after,
                "moves": [o.to_json() for o in self.outcomes.values()]}


@dataclass
class UndrainReport:
    """``shardchat drain --undrain``: back in placement."""

    instance: int
    rooms: int
    ok: bool = True

    def lines(self) -> list[str]:
        return [f"instance {self.instance} is undrained: back in placement "
                f"({_plural(self.rooms, 'room')} on it)."]

    def to_json(self) -> dict[str, Any]:
        return {"instance": self.instance, "drained": False, "rooms": self.rooms}


@dataclass
class RebalanceReport:
    """``shardchat rebalance``: the plan, and what became of it."""

    plan: planner.Plan
    dry_run: bool
    outcomes: list[MoveOutcome] = field(default_factory=list)
    before: dict[int, float | None] = field(default_factory=dict)  # measured (stats)
    after: dict[int, float | None] = field(default_factory=dict)
    seconds: float = 0.0
    left_out: dict[int, str] = field(default_factory=dict)  # instance -> why

    @property
    def moved(self) -> list[MoveOutcome]:
        return [o for o in self.outcomes if o.ok]

    @property
    def failed(self) -> list[MoveOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        plan = self.plan
        out = [f"{why}; left out" for why in self.left_out.values()]
        if self.dry_run:
            out.append(f"dry run: {_plural(plan.count, 'room')} would move; nothing moved.")
            out += [f"  would move {m.room_id}: instance {m.source} -> {m.target} "
                    f"(weight {m.weight:.2f})" for m in plan.moves]
        elif plan.count == 0:
            out.append("the instances are even already; nothing moved.")
        else:
            out.append(f"moved {len(self.moved)} of {_plural(plan.count, 'planned room')} in "
                       f"{self.seconds:.1f} s; {len(self.failed)} not moved.")
            out += [o.line() for o in self.failed]
        out.append(f"load before: {_loads(self.before or plan.before)}")
        out.append(f"load after:  {_loads(plan.after)} (planned)")
        if self.after and not self.dry_run and plan.count:
            out.append(f"             {_loads(self.after)} (measured now; members of moved "
                       "rooms may still be reconnecting)")
        if plan.reason:
            out.append(f"not even: {plan.reason}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "planned": self.plan.count,
                "moved": len(self.moved), "failed": [o.to_json() for o in self.failed],
                "reached": self.plan.reached, "reason": self.plan.reason,
                "seconds": round(self.seconds, 3), "before": self.before or self.plan.before,
                "planned_after": self.plan.after, "after": self.after,
                "left_out": self.left_out,
                "moves": [{"room": m.room_id, "from": m.source, "to": m.target,
                           "weight": m.weight} for m in self.plan.moves]}


# -- checks shared by the three -------------------------------------------------------------


def _instance(nodes: Nodes, number: int, what: str) -> None:
    if number not in nodes.numbers:
        raise Refused(f"There is no instance {number} in the cluster config (its instances "
                      f"are {', '.join(map(str, nodes.numbers))}); check the {what}.")


def _loads_of(states: Mapping[int, NodeState]) -> dict[int, float | None]:
    return {n: s.load for n, s in sorted(states.items())}


async def locate(nodes: Nodes, room_id: str) -> int:
    """The instance that owns ``room_id`` now; ``Refused`` when none can be found."""
    if not urls.valid_room_id(room_id):
        raise Refused(f"{room_id!r} is not a room id (1 to 64 letters, digits, '-' or '_').")
    answers = await asyncio.gather(*(nodes.room_state(n, room_id) for n in nodes.numbers),
                                   return_exceptions=True)
    owners, arriving, silent = [], [], []
    for number, answer in zip(nodes.numbers, answers, strict=True):
        if isinstance(answer, NodeDown):
            silent.append(number)
        elif isinstance(answer, BaseException):
            raise answer
        elif answer is not None and answer.state == whereabouts.OWNER:
            owners.append(number)
        elif answer is not None and answer.state == whereabouts.INCOMING:
            arriving.append(number)
    if len(owners) == 1:
        return owners[0]
    if owners:  # never, by the handoff's design; say it rather than pick one
        raise Refused(f"Instances {', '.join(map(str, owners))} all claim room {room_id}; "
                      "nothing was moved. Their logs say why.")
    if arriving:
        raise Refused(f"Room {room_id} is being moved to instance {arriving[0]} right now; "
                      "run the command again in a moment.")
    if silent:
        raise Refused(f"No instance that answered owns room {room_id}; instance"
                      f"{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} did "
                      "not answer and may hold it. Start "
                      f"{'them' if len(silent) > 1 else 'it'} and run the command again.")
    raise Refused(f"There is no room {room_id} on any instance (asked "
                  f"{', '.join(map(str, nodes.numbers))}); check the id: room ids are "
                  "case-sensitive.")


def _target_ready(state: NodeState) -> None:
    why = state.why_not()
    if why is None:
        return
    advice = "start it, or move the room to another instance"
    if state.up and state.drained:
        advice = (f"undrain it (`shardchat drain --instance {state.number} --undrain`), "
                  "or move the room to another instance")
    elif state.up:
        advice = "wait until it is back, or move the room to another instance"
    raise Refused(f"{why[0].upper()}{why[1:]}; {advice}.")


# -- the three operations -------------------------------------------------------------------


async def move(cfg: Config, room_id: str, to: int, *, deadline: float = MOVE_DEADLINE,
               say: Say | None = None) -> MoveReport:
    """Move one room, live, to instance ``to``."""
    started = time.monotonic()
    async with Nodes(cfg) as nodes:
        _instance(nodes, to, "--to instance")
        _target_ready(await nodes.state(to))
        source = await locate(nodes, room_id)
        if source == to:
            return MoveReport(room_id, source, to, None, time.monotonic() - started)
        mover = Mover(nodes, started + deadline, 1, say)
        outcome = await mover.one(room_id, source, to)
    return MoveReport(room_id, source, to, outcome, time.monotonic() - started)


async def drain(cfg: Config, instance: int, *, deadline: float = DRAIN_DEADLINE,
                concurrency: int = CONCURRENCY, say: Say | None = None,
                keep_drained: bool = True) -> DrainReport:
    """Move every room of ``instance`` to the least loaded others, and leave it drained
    (``keep_drained=False``: undrained again when it could not be emptied)."""
    started = time.monotonic()
    async with Nodes(cfg) as nodes:
        _instance(nodes, instance, "--instance")
        states = await nodes.survey()
        source = states[instance]
        if not source.up:
            raise Refused(f"Instance {instance} does not answer on its internal listener "
                          f"({source.where}: {source.error}); its rooms cannot be moved while "
                          "it is down. Start it and run the drain again.")
        targets = [n for n, s in states.items() if n != instance and s.takes_rooms]
        if not targets and source.rooms:
            why = "; ".join(s.why_not() or "" for n, s in states.items() if n != instance)
            raise Refused(f"No other instance can take the rooms of instance {instance} "
                          f"({why or 'it is the only instance'}); start or undrain one and "
                          "run the drain again.")
        before = _loads_of(states)
        await nodes.set_drained(instance, True)
        if say is not None:
            say(f"instance {instance} is drained (out of placement); moving its "
                f"{_plural(source.rooms, 'room')} to instances "
                f"{', '.join(map(str, targets))} ...")
        mover = Mover(nodes, started + deadline, concurrency, say)
        outcomes, rounds, remaining, note = await _drain_rounds(nodes, mover, instance, targets)
        if remaining and not keep_drained:
            await nodes.set_drained(instance, False)
        after = _loads_of(await nodes.survey())
    return DrainReport(instance, outcomes, remaining, before, after,
                       time.monotonic() - started, rounds, targets,
                       drained=keep_drained or not remaining, note=note)


async def undrain(cfg: Config, instance: int) -> UndrainReport:
    """Put a drained instance back into placement (a restart does the same)."""
    async with Nodes(cfg) as nodes:
        _instance(nodes, instance, "--instance")
        state = await nodes.state(instance)
        if not state.up:
            raise Refused(f"Instance {instance} does not answer on its internal listener "
                          f"({state.where}: {state.error}); a node that starts is undrained "
                          "anyway.")
        await nodes.set_drained(instance, False)
    return UndrainReport(instance, state.rooms)


async def _drain_rounds(nodes: Nodes, mover: Mover, instance: int, targets: list[int]
                        ) -> tuple[dict[str, MoveOutcome], int, int | None, str | None]:
    """List, plan, move, until the instance is empty, time is up, or a round moves nothing.
    Returns the last outcome per room, the rounds run, the rooms left (None: unknown) and
    why the drain stopped short, if it did."""
    outcomes: dict[str, MoveOutcome] = {}
    given_up: set[str] = set()  # rooms that failed for good: reported, not tried again
    closed: set[int] = set()  # targets that refused to take rooms
    rounds = 0
    while True:
        listed = await _listings(nodes, [instance, *targets])
        if instance not in listed:
            return outcomes, rounds, None, (f"instance {instance} stopped answering; what "
                                            "it still owns is unknown")
        pending = [r for r in listed[instance] if r.room_id not in given_up]
        open_targets = [n for n in targets if n in listed and n not in closed]
        note = None
        if not pending:
            break
        if not open_targets:
            note = "no instance is left that takes rooms"
            break
        if mover.left() <= 0:
            note = "the drain's deadline passed"
            break
        if rounds == DRAIN_ROUNDS:
            note = f"{DRAIN_ROUNDS} rounds did not empty it"
            break
        rounds += 1
        plan = planner.plan_drain(instance, {n: listed[n] for n in [instance, *open_targets]})
        results = await mover.many(plan.moves)
        for out in results:
            outcomes[out.room_id] = out
            if out.permanent:
                given_up.add(out.room_id)
            if out.retarget:
                closed.add(out.target)
        if not any(out.ok or out.retarget for out in results):
            # a round that moved nothing: its rooms used up their retries; report them
            given_up.update(out.room_id for out in results)
    return outcomes, rounds, len(listed[instance]), note


async def _listings(nodes: Nodes, numbers: Sequence[int]) -> dict[int, list[RoomLoad]]:
    """The rooms of each instance that answers its listing."""
    answers = await asyncio.gather(*(nodes.rooms(n) for n in numbers), return_exceptions=True)
    out = {}
    for number, answer in zip(numbers, answers, strict=True):
        if isinstance(answer, NodeDown):
            continue
        if isinstance(answer, BaseException):
            raise answer
        out[number] = answer
    return out


async def rebalance(cfg: Config, *, dry_run: bool = False,
                    deadline: float = REBALANCE_DEADLINE, concurrency: int = CONCURRENCY,
                    say: Say | None = None) -> RebalanceReport:
    """Plan the fewest moves that even the load (``rebalance.plan_rebalance``) and run
    them (unless ``dry_run``). Instances that are down are left out; drained or stopping
    ones neither give nor take rooms."""
    started = time.monotonic()
    async with Nodes(cfg) as nodes:
        states = await nodes.survey()
        left_out = {n: s.why_not() or "" for n, s in states.items() if not s.up}
        listed = await _listings(nodes, [n for n, s in states.items() if s.up])
        for n in states:
            if states[n].up and n not in listed:
                left_out[n] = f"instance {n} did not answer its room listing"
        exclude = [n for n in listed if not states[n].takes_rooms]
        plan = planner.plan_rebalance(listed, exclude=exclude)
        report = RebalanceReport(plan, dry_run, before=_loads_of(
            {n: s for n, s in states.items() if n in listed}), left_out=left_out)
        if dry_run or not plan.moves:
            report.seconds = time.monotonic() - started
            return report
        if say is not None:
            say(f"moving {_plural(plan.count, 'room')} to even the load ...")
        mover = Mover(nodes, started + deadline, concurrency, say)
        report.outcomes = await mover.many(plan.moves)
        report.after = _loads_of({n: s for n, s in (await nodes.survey()).items()
                                  if n in listed})
    report.seconds = time.monotonic() - started
    return report
