"""Config -> the AWS state shardchat wants. Pure: no boto3, no I/O.

The listener rules come from ``shardchat.cluster.rules.build_rules``, the same function the
local router evaluates, so what the ALB routes and what the laptop routes cannot drift apart.
Past 99 instances the fleet is several ALBs ("shards", ``shardchat/shards.py``): one desired
state per shard that has instances, each with its own lobby and only its own instances.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from provisioner import naming
from shardchat import shards, urls
from shardchat.aws.alb import HealthCheck, Target
from shardchat.aws.tags import (
    ROLE_INSTANCE,
    ROLE_LB,
    ROLE_LISTENER,
    ROLE_LOBBY,
    ROLE_REDIRECT,
    ownership,
)
from shardchat.cluster.rules import build_rules
from shardchat.config import HTTPS_PORT, Config, ConfigError, Instance
from shardchat.shards import Shard

HEALTHY_CODES = "200"  # a draining node answers 503 and leaves rotation
LOBBY_HEALTH_PATH = "/healthz"  # default-routed: any node answers it


@dataclass(frozen=True)
class TargetGroupSpec:
    name: str
    role: str  # ROLE_INSTANCE or ROLE_LOBBY
    instance: int | None
    port: int
    target_type: str
    vpc_id: str
    health: HealthCheck
    deregistration_delay: int
    targets: tuple[Target, ...]
    tags: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class RuleSpec:
    instance: int
    priority: int
    path_pattern: str
    target_group: str  # name of the target group it forwards to
    tags: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ListenerSpec:
    role: str  # ROLE_LISTENER (forwards, holds the rules) or ROLE_REDIRECT
    port: int
    protocol: str
    certificate_arn: str = ""
    redirect_port: int | None = None  # set for the HTTP -> HTTPS redirect listener
    tags: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class LoadBalancerSpec:
    name: str
    subnets: tuple[str, ...]
    security_groups: tuple[str, ...]
    scheme: str
    idle_timeout: int
    tags: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class DesiredState:
    cluster: str
    shard: int
    load_balancer: LoadBalancerSpec
    listeners: tuple[ListenerSpec, ...]
    target_groups: tuple[TargetGroupSpec, ...]
    rules: tuple[RuleSpec, ...]
    lobby: str  # name of the lobby target group

    @property
    def main_listener(self) -> ListenerSpec:
        return next(ls for ls in self.listeners if ls.role == ROLE_LISTENER)

    def target_group(self, name: str) -> TargetGroupSpec:
        return next(tg for tg in self.target_groups if tg.name == name)


def _target(cfg: Config, inst: Instance) -> Target:
    if cfg.aws.target_type == "ip":
        return Target(inst.host, inst.port)
    return Target(str(inst.ec2_instance_id), inst.port)


def _health(cfg: Config, path: str) -> HealthCheck:
    a = cfg.aws
    return HealthCheck(path=path, interval=a.health_check_interval,
                       timeout=a.health_check_timeout, healthy=a.healthy_threshold,
                       unhealthy=a.unhealthy_threshold, matcher=HEALTHY_CODES)


def _listeners(cfg: Config, cluster: str, k: int) -> tuple[ListenerSpec, ...]:
    a = cfg.aws
    if not a.certificate_arn:
        return (ListenerSpec(ROLE_LISTENER, a.listener_port, "HTTP",
                             tags=ownership(cluster, ROLE_LISTENER, shard=k)),)
    return (
        ListenerSpec(ROLE_LISTENER, HTTPS_PORT, "HTTPS", a.certificate_arn,
                     tags=ownership(cluster, ROLE_LISTENER, shard=k)),
        ListenerSpec(ROLE_REDIRECT, a.listener_port, "HTTP",
                     redirect_port=HTTPS_PORT,
                     tags=ownership(cluster, ROLE_REDIRECT, shard=k)),
    )


def desired_states(cfg: Config) -> tuple[DesiredState, ...]:
    """One desired state per configured shard that has instances, shard 1 first. ``cfg``
    has passed ``config.validate_for_aws`` (so every instance's shard has a table)."""
    out = []
    for shard in cfg.shards:
        members = [i for i in cfg.instances if shards.shard_of(i.number) == shard.index]
        if members:
            out.append(_shard_state(cfg, shard, members))
    return tuple(out)


def desired_state(cfg: Config, shard: int = 1) -> DesiredState:
    """The desired state of one shard (by default the first)."""
    return next(d for d in desired_states(cfg) if d.shard == shard)


def _shard_state(cfg: Config, shard: Shard, instances: list[Instance]) -> DesiredState:
    """Everything apply should leave behind on one shard's ALB (the only check left here
    is what ``build_rules`` refuses)."""
    a, cluster, k = cfg.aws, cfg.cluster.name, shard.index
    targets = [_target(cfg, inst) for inst in instances]
    groups: list[TargetGroupSpec] = []
    by_instance: dict[int, str] = {}
    for inst, target in zip(instances, targets, strict=True):
        name = naming.target_group_name(cluster, inst.number, inst.port, a.target_type)
        by_instance[inst.number] = name
        groups.append(TargetGroupSpec(
            name=name, role=ROLE_INSTANCE, instance=inst.number, port=inst.port,
            target_type=a.target_type, vpc_id=a.vpc_id,
            health=_health(cfg, urls.healthz_path(inst.number)),
            deregistration_delay=a.deregistration_delay, targets=(target,),
            tags=ownership(cluster, ROLE_INSTANCE, inst.number, k)))
    lobby = naming.lobby_name(cluster, a.target_type, k)
    groups.append(TargetGroupSpec(
        name=lobby, role=ROLE_LOBBY, instance=None, port=instances[0].port,
        target_type=a.target_type, vpc_id=a.vpc_id, health=_health(cfg, LOBBY_HEALTH_PATH),
        deregistration_delay=a.deregistration_delay,
        targets=tuple(sorted(set(targets), key=lambda t: (t.id, t.port))),
        tags=ownership(cluster, ROLE_LOBBY, shard=k)))
    try:
        ruleset = build_rules((i.number for i in instances), a.rule_priority_offset)
    except ValueError as exc:
        raise ConfigError("aws.rule_priority_offset", str(exc)) from None
    rules = tuple(RuleSpec(r.instance, r.priority, r.path_pattern, by_instance[r.instance],
                           tags=ownership(cluster, ROLE_INSTANCE, r.instance, k))
                  for r in ruleset.rules)
    lb = LoadBalancerSpec(shard.load_balancer, tuple(a.subnets), tuple(a.security_groups),
                          a.scheme, a.idle_timeout, tags=ownership(cluster, ROLE_LB, shard=k))
    return DesiredState(cluster=cluster, shard=k, load_balancer=lb,
                        listeners=_listeners(cfg, cluster, k), target_groups=tuple(groups),
                        rules=rules, lobby=lobby)
