"""What exists on AWS now, as the provisioner sees it: read through ``shardchat.aws.alb``
(describe calls only) and split by ownership tags.

A resource is ours when its ``shardchat:cluster`` tag names this cluster. Everything else on
the same load balancer or listener is read too (to count it against quotas and to avoid its
priorities) but is foreign and never touched. Target groups are region-wide: each shard's
state holds those of ours tagged with its shard (``shardchat:shard``, absent = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardchat.aws import alb
from shardchat.aws.alb import ObservedListener, ObservedRule, ObservedTargetGroup
from shardchat.aws.tags import TAG_ADOPTED, is_ours, shard_tag


@dataclass(frozen=True)
class ObservedState:
    cluster: str
    shard: int
    load_balancer: alb.ObservedLoadBalancer | None
    listeners: tuple[ObservedListener, ...]  # by port
    rules: tuple[ObservedRule, ...]  # every non-default rule, by listener then priority
    target_groups: tuple[ObservedTargetGroup, ...]  # ours only, by name
    names: dict[str, str]  # target group ARN -> name, for every group in the region

    def ours(self, tags: dict[str, str]) -> bool:
        return is_ours(tags, self.cluster)

    def target_group_by_arn(self, arn: str) -> ObservedTargetGroup | None:
        return next((tg for tg in self.target_groups if tg.arn == arn), None)

    def rules_on(self, listener_arn: str) -> tuple[ObservedRule, ...]:
        return tuple(r for r in self.rules if r.listener_arn == listener_arn)

    def foreign_rules(self, listener_arn: str | None = None) -> tuple[ObservedRule, ...]:
        """Rules someone else manages (on one listener, or on any)."""
        rules = self.rules if listener_arn is None else self.rules_on(listener_arn)
        return tuple(r for r in rules if not self.ours(r.tags))

    def must_keep(self, listener: ObservedListener) -> bool:
        """A listener of ours that must outlive its use: it was adopted, or it holds rules
        someone else manages."""
        return bool(listener.tags.get(TAG_ADOPTED) or self.foreign_rules(listener.arn))

    def foreign_refs(self) -> set[str]:
        """Target group ARNs that a rule or listener someone else manages forwards to: such
        a group must stay, and it counts against the load balancer's quota."""
        refs = {arn for r in self.foreign_rules() for arn in r.forward}
        refs |= {arn for ls in self.listeners if not self.ours(ls.tags)
                 for arn in ls.forwards_to()}
        return refs


TargetGroups = tuple[dict[str, str], tuple[ObservedTargetGroup, ...]]


def our_target_groups(elbv2: Any, cluster: str) -> TargetGroups:
    """Every target group's name by ARN, and ours read in full: one read serves every
    shard of the fleet."""
    return alb.target_groups(elbv2, lambda tags: is_ours(tags, cluster))


def observe(elbv2: Any, cluster: str, lb_name: str, shard: int = 1,
            groups: TargetGroups | None = None) -> ObservedState:
    """Read one shard: its load balancer by name, its listeners and rules, and our target
    groups of that shard (``groups``: already read by ``our_target_groups``)."""
    lb = alb.load_balancer(elbv2, lb_name) if lb_name else None
    listeners = alb.listeners(elbv2, lb.arn) if lb else ()
    rules = alb.rules(elbv2, listeners)
    names, ours = groups if groups is not None else our_target_groups(elbv2, cluster)
    return ObservedState(cluster=cluster, shard=shard, load_balancer=lb, listeners=listeners,
                         rules=rules, names=names,
                         target_groups=tuple(tg for tg in ours if shard_tag(tg.tags) == shard))
