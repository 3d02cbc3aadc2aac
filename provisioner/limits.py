"""ALB quotas, checked before any call that changes something.

A config that cannot fit must be refused whole: half of the instances routed and the rest
failing with TooManyTargetGroups is worse than no change at all. Each shard's ALB is checked
on its own (``shardchat/shards.py`` keeps one shard at 99 instances + its lobby), and every
shard is checked before the first change to any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardchat.config import ConfigError

# https://docs.aws.amazon.com/elasticloadbalancing/latest/application/load-balancer-limits.html
HARD_TARGET_GROUPS_PER_ALB = 100  # not adjustable
DEFAULT_RULES_PER_ALB = 100  # adjustable through a quota increase; default rules not counted


class LimitError(ConfigError):
    """The config asks for more than one ALB can hold."""


@dataclass(frozen=True)
class Usage:
    target_groups: int  # ours: one per instance + the lobby
    rules: int  # ours: one per instance
    foreign_rules: int = 0  # rules on our listener that someone else manages
    foreign_target_groups: int = 0  # target groups of such rules (they count against the ALB)
    shard: int = 1
    load_balancer: str = ""


def check(usage: Usage, max_target_groups: int, max_rules: int) -> None:
    """Raise LimitError naming the numbers and the way out when ``usage`` cannot fit."""
    tg_cap = min(max_target_groups, HARD_TARGET_GROUPS_PER_ALB)
    tgs = usage.target_groups + usage.foreign_target_groups
    where = f"shard {usage.shard} (load balancer {usage.load_balancer or '?'}): "
    if tgs > tg_cap:
        instances = usage.target_groups - 1
        foreign = (f" + {usage.foreign_target_groups} used by rules shardchat does not manage"
                   if usage.foreign_target_groups else "")
        raise LimitError("aws.max_target_groups", f"{where}{instances} instances need "
                         f"{usage.target_groups} target groups (one each + the lobby){foreign} "
                         f"= {tgs}, but this ALB holds at most {tg_cap}: move the rules "
                         "shardchat does not manage to another ALB, or split the instances "
                         "into several clusters")
    rules = usage.rules + usage.foreign_rules
    if rules > max_rules:
        foreign = (f" + {usage.foreign_rules} rules shardchat does not manage"
                   if usage.foreign_rules else "")
        raise LimitError("aws.max_rules", f"{where}{usage.rules} instance rules{foreign} = "
                         f"{rules} exceed the listener's {max_rules}-rule quota: request a "
                         "rules quota increase (then raise aws.max_rules) or split the "
                         "instances into several clusters/ALBs")
