"""The whole reconcile loop as plain functions: config -> plan -> applied changes.

The CLI is a thin shell around these, and tests drive them directly with any boto3 client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from provisioner import apply as applier
from provisioner import limits
from provisioner.actions import Action, Plan
from provisioner.desired import DesiredState, desired_state
from provisioner.observed import ObservedState, observe
from provisioner.plan import make_plan, usage
from provisioner.teardown import make_destroy_plan
from shardchat.config import Config, validate_for_aws


def checked_desired(cfg: Config) -> DesiredState:
    """The desired state, refused up front (no AWS call) when the config lacks what the
    provisioner needs or cannot fit one ALB."""
    desired = desired_state(validate_for_aws(cfg))
    limits.check(usage(desired, None), cfg.aws.max_target_groups, cfg.aws.max_rules)
    return desired


def plan_for(cfg: Config, elbv2: Any) -> tuple[Plan, ObservedState]:
    desired = checked_desired(cfg)
    observed = observe(elbv2, cfg.cluster.name, cfg.aws.load_balancer)
    plan = make_plan(desired, observed, max_target_groups=cfg.aws.max_target_groups,
                     max_rules=cfg.aws.max_rules)
    return plan, observed


def destroy_plan_for(cfg: Config, elbv2: Any) -> tuple[Plan, ObservedState]:
    observed = observe(elbv2, cfg.cluster.name, cfg.aws.load_balancer)
    return make_destroy_plan(observed, cfg.aws.load_balancer), observed


def run(plan: Plan, observed: ObservedState, elbv2: Any,
        progress: Callable[[int, int, Action], None] | None = None) -> None:
    applier.run(plan, elbv2, applier.Context.from_observed(observed), progress)


def apply_config(cfg: Config, elbv2: Any) -> Plan:
    """Plan and apply in one go; returns the plan that ran."""
    plan, observed = plan_for(cfg, elbv2)
    run(plan, observed, elbv2)
    return plan


def destroy_config(cfg: Config, elbv2: Any) -> Plan:
    plan, observed = destroy_plan_for(cfg, elbv2)
    run(plan, observed, elbv2)
    return plan
