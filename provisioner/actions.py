"""One planned change (an Action) and an ordered list of them (a Plan), and how both read.

An action names what it touches, what it does and why, so ``plan`` output can be reviewed by
a person before ``apply`` runs exactly the same list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CREATE, CHANGE, DELETE, ADOPT = "create", "change", "delete", "adopt"
SIGNS = {CREATE: "+", CHANGE: "~", DELETE: "-", ADOPT: "*"}


@dataclass(frozen=True)
class Action:
    verb: str  # CREATE, CHANGE, DELETE or ADOPT
    kind: str  # "load balancer", "listener", "rule", "target group", "target"
    subject: str  # what a person calls it: a name, "priority 3 /i3/*", "i-0abc:9001"
    reason: str
    op: str  # the apply.py handler that performs it
    args: dict[str, Any] = field(default_factory=dict, compare=False)

    def line(self) -> str:
        return f"{SIGNS[self.verb]} {self.verb} {self.kind} {self.subject}: {self.reason}"


def count_verbs(actions: tuple[Action, ...]) -> dict[str, int]:
    """How many actions create, change (adopting counts as changing) and delete."""
    out = {CREATE: 0, CHANGE: 0, DELETE: 0}
    for a in actions:
        out[CHANGE if a.verb == ADOPT else a.verb] += 1
    return out


@dataclass(frozen=True)
class Plan:
    title: str
    actions: tuple[Action, ...]
    warnings: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.actions

    def counts(self) -> dict[str, int]:
        return count_verbs(self.actions)

    def render(self) -> str:
        lines = [self.title]
        lines += [f"  {a.line()}" for a in self.actions]
        lines += [f"  ! {w}" for w in self.warnings]
        if self.empty:
            lines.append("No changes: AWS already matches the config.")
        else:
            c = self.counts()
            lines.append(f"Plan: {c[CREATE]} to create, {c[CHANGE]} to change, "
                         f"{c[DELETE]} to delete.")
        return "\n".join(lines)
