"""What ``shardchat move | drain | rebalance`` report: for people (``lines``) and for
scripts (``to_json``, printed by ``--json``). Every room a command tried to move is in its
report, moved or not moved with the reason; ``ok`` decides the exit code."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shardchat.cluster import rebalance as planner
from shardchat.cluster.mover import MoveOutcome, plural


def _load(value: float | None) -> str:
    """A load for people: one decimal, or the first digits of a load below 1 (idle rooms
    weigh 0.0001 each, and "0.0" would hide them)."""
    if value is None:
        return "?"
    return f"{value:.1f}" if value >= 1 or value == 0 else f"{value:.2g}"


def _loads(values: Mapping[int, float | None]) -> str:
    return "  ".join(f"i{n} {_load(v)}" for n, v in sorted(values.items()))


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
        out = [f"moved {plural(len(self.moved), 'room')} off instance {self.instance} "
               f"in {self.seconds:.1f} s ({plural(self.rounds, 'round')}, to instances "
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
                else plural(self.remaining, "room")
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
                f"({plural(self.rooms, 'room')} on it)."]

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
            out.append(f"dry run: {plural(plan.count, 'room')} would move; nothing moved.")
            out += [f"  would move {m.room_id}: instance {m.source} -> {m.target} "
                    f"(weight {m.weight:.2f})" for m in plan.moves]
        elif plan.count == 0:
            out.append("the instances are even already; nothing moved.")
        else:
            out.append(f"moved {len(self.moved)} of {plural(plan.count, 'planned room')} in "
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
