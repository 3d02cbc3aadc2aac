"""Config -> the AWS state shardchat wants. Pure: no boto3, no I/O.

The listener rules come from ``shardchat.cluster.rules.build_rules``, the same function the
local router evaluates, so what the ALB routes and what the laptop routes cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from provisioner import naming
from shardchat import urls
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
from shardchat.config import Config, ConfigError

HTTPS_PORT = 443
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


def _range(key: str, value: int, low: int, high: int, why: str = "") -> None:
    if not low <= value <= high:
        raise ConfigError(key, f"must be {low}..{high}, got {value}{why}")


def check_aws_settings(cfg: Config) -> None:
    """The [aws] values AWS itself would refuse, refused here first with the key at fault."""
    a, n = cfg.aws, cfg.node
    if not a.load_balancer:
        raise ConfigError("aws.load_balancer", "must name the load balancer to create or adopt")
    if len(a.load_balancer) > 32 or not all(c.isalnum() or c == "-" for c in a.load_balancer):
        raise ConfigError("aws.load_balancer", "must be 1..32 letters, digits or '-', "
                          f"got {a.load_balancer!r}")
    if not a.vpc_id:
        raise ConfigError("aws.vpc_id", "must name the VPC the nodes run in")
    if len(set(a.subnets)) < 2:
        raise ConfigError("aws.subnets", "must list at least two subnets in two availability "
                          f"zones (an ALB requires it), got {list(a.subnets)}")
    _range("aws.idle_timeout", a.idle_timeout, 1, 4000)
    if n.ping_interval + n.ping_timeout >= a.idle_timeout:
        raise ConfigError("aws.idle_timeout", f"must exceed node.ping_interval + "
                          f"node.ping_timeout ({n.ping_interval + n.ping_timeout:g} s), got "
                          f"{a.idle_timeout} s: the load balancer would cut idle sockets")
    _range("aws.health_check_interval", a.health_check_interval, 5, 300)
    _range("aws.health_check_timeout", a.health_check_timeout, 2, 120)
    if a.health_check_timeout >= a.health_check_interval:
        raise ConfigError("aws.health_check_timeout", f"must be less than "
                          f"aws.health_check_interval ({a.health_check_interval} s), "
                          f"got {a.health_check_timeout} s")
    _range("aws.healthy_threshold", a.healthy_threshold, 2, 10)
    _range("aws.unhealthy_threshold", a.unhealthy_threshold, 2, 10)
    _range("aws.deregistration_delay", a.deregistration_delay, 0, 3600)
    if a.certificate_arn and not a.certificate_arn.startswith("arn:"):
        raise ConfigError("aws.certificate_arn", "must be an ACM or IAM certificate ARN "
                          f"(arn:...), got {a.certificate_arn!r}")


def _target(cfg: Config, idx: int) -> Target:
    inst = cfg.instances[idx]
    if not 1 <= inst.port <= 65535:
        raise ConfigError(f"instances[{idx}].port", f"must be a TCP port 1..65535, "
                          f"got {inst.port}")
    if cfg.aws.target_type == "ip":
        return Target(inst.host, inst.port)
    if not inst.ec2_instance_id:
        raise ConfigError(f"instances[{idx}].ec2_instance_id", "is required when "
                          "aws.target_type = \"instance\" (or set aws.target_type = \"ip\" "
                          "to target the host address)")
    return Target(inst.ec2_instance_id, inst.port)


def _check_instances(cfg: Config) -> None:
    if not cfg.instances:
        raise ConfigError("instances", "the config lists no instances (and discovery found "
                          "none): there is nothing to route to")
    seen: set[int] = set()
    for idx, inst in enumerate(cfg.instances):
        if inst.number in seen:
            raise ConfigError(f"instances[{idx}].number",
                              f"duplicate instance number {inst.number}")
        seen.add(inst.number)


def _health(cfg: Config, path: str) -> HealthCheck:
    a = cfg.aws
    return HealthCheck(path=path, interval=a.health_check_interval,
                       timeout=a.health_check_timeout, healthy=a.healthy_threshold,
                       unhealthy=a.unhealthy_threshold, matcher=HEALTHY_CODES)


def _listeners(cfg: Config, cluster: str) -> tuple[ListenerSpec, ...]:
    a = cfg.aws
    if not a.certificate_arn:
        return (ListenerSpec(ROLE_LISTENER, a.listener_port, "HTTP",
                             tags=ownership(cluster, ROLE_LISTENER)),)
    if a.listener_port == HTTPS_PORT:
        raise ConfigError("aws.listener_port", f"must not be {HTTPS_PORT} when "
                          "aws.certificate_arn is set: it is the port that redirects to HTTPS")
    return (
        ListenerSpec(ROLE_LISTENER, HTTPS_PORT, "HTTPS", a.certificate_arn,
                     tags=ownership(cluster, ROLE_LISTENER)),
        ListenerSpec(ROLE_REDIRECT, a.listener_port, "HTTP",
                     redirect_port=HTTPS_PORT,
                     tags=ownership(cluster, ROLE_REDIRECT)),
    )


def desired_state(cfg: Config) -> DesiredState:
    """Everything apply should leave behind for ``cfg``; raises ConfigError on bad input."""
    check_aws_settings(cfg)
    _check_instances(cfg)
    a, cluster = cfg.aws, cfg.cluster.name
    targets = [_target(cfg, idx) for idx in range(len(cfg.instances))]
    groups: list[TargetGroupSpec] = []
    by_instance: dict[int, str] = {}
    for inst, target in zip(cfg.instances, targets, strict=True):
        name = naming.target_group_name(cluster, inst.number, inst.port, a.target_type)
        by_instance[inst.number] = name
        groups.append(TargetGroupSpec(
            name=name, role=ROLE_INSTANCE, instance=inst.number, port=inst.port,
            target_type=a.target_type, vpc_id=a.vpc_id,
            health=_health(cfg, urls.healthz_path(inst.number)),
            deregistration_delay=a.deregistration_delay, targets=(target,),
            tags=ownership(cluster, ROLE_INSTANCE, inst.number)))
    lobby = naming.lobby_name(cluster, a.target_type)
    groups.append(TargetGroupSpec(
        name=lobby, role=ROLE_LOBBY, instance=None, port=cfg.instances[0].port,
        target_type=a.target_type, vpc_id=a.vpc_id, health=_health(cfg, LOBBY_HEALTH_PATH),
        deregistration_delay=a.deregistration_delay,
        targets=tuple(sorted(set(targets), key=lambda t: (t.id, t.port))),
        tags=ownership(cluster, ROLE_LOBBY)))
    try:
        ruleset = build_rules((i.number for i in cfg.instances), a.rule_priority_offset)
    except ValueError as exc:
        raise ConfigError("aws.rule_priority_offset", str(exc)) from None
    rules = tuple(RuleSpec(r.instance, r.priority, r.path_pattern, by_instance[r.instance],
                           tags=ownership(cluster, ROLE_INSTANCE, r.instance))
                  for r in ruleset.rules)
    lb = LoadBalancerSpec(a.load_balancer, tuple(a.subnets), tuple(a.security_groups),
                          a.scheme, a.idle_timeout, tags=ownership(cluster, ROLE_LB))
    return DesiredState(cluster=cluster, load_balancer=lb, listeners=_listeners(cfg, cluster),
                        target_groups=tuple(groups), rules=rules, lobby=lobby)
