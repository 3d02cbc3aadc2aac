"""The instance list -> ALB-style listener rules, and their evaluation.

This module is the single source of routing truth. ``provisioner`` creates exactly these
rules on an Application Load Balancer; the local router (``router.py``) evaluates them with
the same semantics ALB documents for path-pattern conditions:

* rules are evaluated lowest priority first and the first match wins;
* patterns are case-sensitive; ``*`` matches zero or more characters, ``?`` exactly one;
* the pattern is compared with the path only (the query string never takes part);
* when no rule matches, the listener's default action applies (here: forward to the
  "lobby" target group, which holds every instance).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from shardchat import shards, urls

MAX_PRIORITY = 50_000  # ALB listener rule priorities are 1..50000
MAX_PATTERN_CHARS = 128  # ALB limit on one path-pattern value


@dataclass(frozen=True)
class Rule:
    priority: int
    path_pattern: str
    instance: int


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    default_instances: tuple[int, ...]

    def __post_init__(self) -> None:
        # Evaluation order is priority order, whatever order the rules were listed (or
        # returned by an API) in.
        object.__setattr__(self, "rules", tuple(sorted(self.rules, key=lambda r: r.priority)))

    def match(self, path: str) -> Rule | None:
        """The first rule (by priority) whose pattern matches ``path``; None -> default."""
        path = path.split("?", 1)[0]
        for rule in self.rules:
            if pattern_matches(rule.path_pattern, path):
                return rule
        return None

    def targets(self, path: str) -> tuple[int, ...]:
        """The instances a request for ``path`` may be sent to."""
        rule = self.match(path)
        return (rule.instance,) if rule else self.default_instances


def priority_for(instance: int, offset: int = 0) -> int:
    """Deterministic rule priority of instance N: ``offset + N``.

    Lower numbers win on ALB, and "/i<N>/*" patterns never overlap one another, so any
    order would route the same; a fixed mapping keeps plans stable and readable.
    """
    p = offset + instance
    if not 1 <= p <= MAX_PRIORITY:
        raise ValueError(f"rule priority {p} for instance {instance} is outside 1..{MAX_PRIORITY}"
                         f" (check aws.rule_priority_offset)")
    return p


def build_rules(instances: Iterable[int], offset: int = 0) -> RuleSet:
    """One ``/i<N>/*`` rule per instance plus the default action to all of them."""
    numbers = sorted(set(instances))
    rules = tuple(Rule(priority_for(n, offset), urls.path_pattern(n), n) for n in numbers)
    return RuleSet(rules=rules, default_instances=tuple(numbers))


def shard_rules(instances: Iterable[int], shard: int, offset: int = 0) -> RuleSet:
    """The rule set of one shard's ALB (``shardchat/shards.py``): the rules of its own
    instances, and a default action to them alone. A path of another shard's instance
    falls to this default, as it would on that ALB."""
    return build_rules(shards.in_shard(instances, shard), offset)


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str]:
    parts = []
    for ch in pattern:
        if ch == "*":
            parts.append(".*")
        elif ch == "?":
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    return re.compile("".join(parts), re.DOTALL)


def pattern_matches(pattern: str, path: str) -> bool:
    """ALB path-pattern semantics: whole-path, case-sensitive, ``*`` and ``?`` wildcards."""
    return _compile(pattern).fullmatch(path.split("?", 1)[0]) is not None
