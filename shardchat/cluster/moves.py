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
* retries of the moves that failed for a passing reason, backing off, and the hand-over of
  each moved room's activity numbers to its new owner (read from the old owner just before
  the move), so the loads measured after a rebalance are the ones it planned: one move is
  ``mover.py``'s;
* a report of every room it was asked to move (``move_reports.py``): moved, or not moved
  and why. A room that cannot be moved is reported, never skipped in silence.

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
from collections.abc import Mapping, Sequence

from shardchat import urls, whereabouts
from shardchat.cluster import rebalance as planner
from shardchat.cluster.control import NodeDown, Nodes, NodeState
from shardchat.cluster.load import RoomLoad
from shardchat.cluster.move_reports import DrainReport, MoveReport, RebalanceReport, UndrainReport
from shardchat.cluster.mover import CONCURRENCY, MoveOutcome, Mover, Say, plural
from shardchat.config import Config

MOVE_DEADLINE = 300.0  # seconds a `shardchat move` may take, retries included
DRAIN_DEADLINE = 600.0  # seconds a drain may take (no move starts after it)
REBALANCE_DEADLINE = 600.0
DRAIN_ROUNDS = 8  # list-plan-move rounds of one drain, at most


class Refused(Exception):
    """The request cannot be done as asked, and nothing was changed; the message says what
    to do instead."""


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
                f"{plural(source.rooms, 'room')} to instances "
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
            say(f"moving {plural(plan.count, 'room')} to even the load ...")
        mover = Mover(nodes, started + deadline, concurrency, say)
        report.outcomes = await mover.many(plan.moves)
        report.after = _loads_of({n: s for n, s in (await nodes.survey()).items()
                                  if n in listed})
    report.seconds = time.monotonic() - started
    return report
