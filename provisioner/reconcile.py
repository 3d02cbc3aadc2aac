"""The whole reconcile loop as plain functions: config -> plan -> applied changes.

A fleet is one ALB per shard (``shardchat/shards.py``), so a plan is a FleetPlan: one Plan
per shard, each with the observed state it was made from. Every shard is planned (and every
quota checked) before the first change to any of them. The CLI and ``watch`` are thin
shells around these, and tests drive them directly with any boto3 client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from provisioner import apply as applier
from provisioner import limits
from provisioner.actions import CHANGE, CREATE, DELETE, Action, Plan, count_verbs
from provisioner.desired import DesiredState, desired_states
from provisioner.observed import ObservedState, observe, our_target_groups
from provisioner.plan import make_plan, usage
from provisioner.teardown import make_destroy_plan
from shardchat.config import Config, validate_for_aws
from shardchat.shards import span


@dataclass(frozen=True)
class ShardPlan:
    shard: int
    load_balancer: str
    plan: Plan
    observed: ObservedState


@dataclass(frozen=True)
class FleetPlan:
    """The plans of every shard, in shard order; reads like one Plan."""

    parts: tuple[ShardPlan, ...]

    @property
    def actions(self) -> tuple[Action, ...]:
        return tuple(a for p in self.parts for a in p.plan.actions)

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(w for p in self.parts for w in p.plan.warnings)

    @property
    def empty(self) -> bool:
        return not self.actions

    def counts(self) -> dict[str, int]:
        return count_verbs(self.actions)

    def render(self) -> str:
        if len(self.parts) == 1:
            return self.parts[0].plan.render()
        body = "\n\n".join(p.plan.render() for p in self.parts)
        if self.empty:
            return body
        c = self.counts()
        return (f"{body}\n\nFleet ({len(self.parts)} load balancers): {c[CREATE]} to create, "
                f"{c[CHANGE]} to change, {c[DELETE]} to delete.")


def checked_desired(cfg: Config) -> tuple[DesiredState, ...]:
    """The desired state of every shard, refused up front (no AWS call) when the config
    lacks what the provisioner needs or a shard cannot fit its ALB."""
    states = desired_states(validate_for_aws(cfg))
    for desired in states:
        limits.check(usage(desired, None), cfg.aws.max_target_groups, cfg.aws.max_rules)
    return states


def plan_for(cfg: Config, elbv2: Any) -> FleetPlan:
    """Plan every shard: build those with instances, tear down ours of those without."""
    states = {d.shard: d for d in checked_desired(cfg)}
    groups = our_target_groups(elbv2, cfg.cluster.name)
    parts = []
    for shard in cfg.shards:
        observed = observe(elbv2, cfg.cluster.name, shard.load_balancer, shard.index, groups)
        desired = states.get(shard.index)
        if desired is None:
            plan = make_destroy_plan(observed, shard.load_balancer, title=(
                f"Plan for load balancer {shard.load_balancer} (cluster {cfg.cluster.name}, "
                f"shard {shard.index}): no instance numbered {span(shard.index)}, so "
                "nothing of ours stays on it:"))
        else:
            plan = make_plan(desired, observed, max_target_groups=cfg.aws.max_target_groups,
                             max_rules=cfg.aws.max_rules)
        parts.append(ShardPlan(shard.index, shard.load_balancer, plan, observed))
    return FleetPlan(tuple(parts))


def observe_fleet(cfg: Config, elbv2: Any) -> tuple[ObservedState, ...]:
    """What exists on every configured shard, shard 1 first."""
    groups = our_target_groups(elbv2, cfg.cluster.name)
    return tuple(observe(elbv2, cfg.cluster.name, s.load_balancer, s.index, groups)
                 for s in cfg.shards)


def destroy_plan_for(cfg: Config, elbv2: Any) -> FleetPlan:
    return FleetPlan(tuple(
        ShardPlan(o.shard, s.load_balancer, make_destroy_plan(o, s.load_balancer), o)
        for s, o in zip(cfg.shards, observe_fleet(cfg, elbv2), strict=True)))


def run(fleet: FleetPlan, elbv2: Any,
        progress: Callable[[int, int, Action], None] | None = None) -> None:
    """Run every shard's plan in order, each against the ARNs of its own load balancer;
    the first failure stops the run (what is done stays done)."""
    total, done = len(fleet.actions), 0
    for part in fleet.parts:
        def step(idx: int, _total: int, action: Action, base: int = done) -> None:
            if progress:
                progress(base + idx, total, action)
        applier.run(part.plan, elbv2, applier.Context.from_observed(part.observed), step)
        done += len(part.plan.actions)


def apply_config(cfg: Config, elbv2: Any) -> FleetPlan:
    """Plan and apply in one go; returns the plan that ran."""
    fleet = plan_for(cfg, elbv2)
    run(fleet, elbv2)
    return fleet


def destroy_config(cfg: Config, elbv2: Any) -> FleetPlan:
    fleet = destroy_plan_for(cfg, elbv2)
    run(fleet, elbv2)
    return fleet
