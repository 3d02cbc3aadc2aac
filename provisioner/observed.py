"""What exists on AWS now, read through describe calls only.

A resource is ours when its ``shardchat:cluster`` tag names this cluster. Everything else on
the same load balancer or listener is read too (to count it against quotas and to avoid its
priorities) but is marked foreign and never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from provisioner import naming
from provisioner.aws import error_code, paginate, tags_of
from provisioner.desired import HealthCheck, Target

GONE_STATES = ("draining", "unused")  # a target in these states is on its way out


@dataclass(frozen=True)
class ObservedLoadBalancer:
    arn: str
    name: str
    dns_name: str
    scheme: str
    subnets: tuple[str, ...]
    security_groups: tuple[str, ...]
    idle_timeout: int | None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ObservedListener:
    arn: str
    port: int
    protocol: str
    certificate_arn: str
    default_actions: tuple[dict[str, Any], ...]
    tags: dict[str, str] = field(default_factory=dict)

    def forwards_to(self) -> tuple[str, ...]:
        return forward_targets(self.default_actions)

    def redirect_port(self) -> int | None:
        for action in self.default_actions:
            if action.get("Type") == "redirect":
                port = action.get("RedirectConfig", {}).get("Port", "")
                return int(port) if str(port).isdigit() else None
        return None


@dataclass(frozen=True)
class ObservedRule:
    arn: str
    listener_arn: str
    priority: int
    patterns: tuple[str, ...]
    forward: tuple[str, ...]  # target group ARNs
    other_conditions: bool  # any condition besides one path-pattern
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ObservedTargetGroup:
    arn: str
    name: str
    port: int
    protocol: str
    target_type: str
    vpc_id: str
    health: HealthCheck
    deregistration_delay: int | None
    targets: tuple[Target, ...]
    health_states: dict[Target, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def role(self) -> str:
        return self.tags.get(naming.TAG_ROLE, "")

    @property
    def instance(self) -> int | None:
        raw = self.tags.get(naming.TAG_INSTANCE, "")
        return int(raw) if raw.isdigit() else None


@dataclass(frozen=True)
class ObservedState:
    cluster: str
    load_balancer: ObservedLoadBalancer | None
    listeners: tuple[ObservedListener, ...]
    rules: tuple[ObservedRule, ...]  # every non-default rule of the LB's listeners
    target_groups: tuple[ObservedTargetGroup, ...]  # ours only
    names: dict[str, str]  # target group ARN -> name, for every group in the region

    def ours(self, tags: dict[str, str]) -> bool:
        return is_ours(tags, self.cluster)

    def target_group_by_arn(self, arn: str) -> ObservedTargetGroup | None:
        return next((tg for tg in self.target_groups if tg.arn == arn), None)

    def rules_on(self, listener_arn: str) -> tuple[ObservedRule, ...]:
        return tuple(r for r in self.rules if r.listener_arn == listener_arn)


def is_ours(tags: dict[str, str], cluster: str) -> bool:
    return tags.get(naming.TAG_CLUSTER) == cluster


def forward_targets(actions: Any) -> tuple[str, ...]:
    """Target group ARNs a list of actions forwards to (both boto3 spellings)."""
    arns: list[str] = []
    for action in actions:
        if action.get("Type") != "forward":
            continue
        if action.get("TargetGroupArn"):
            arns.append(action["TargetGroupArn"])
        for tg in action.get("ForwardConfig", {}).get("TargetGroups", []):
            if tg.get("TargetGroupArn") and tg["TargetGroupArn"] not in arns:
                arns.append(tg["TargetGroupArn"])
    return tuple(arns)


def _load_balancer(elbv2: Any, name: str) -> ObservedLoadBalancer | None:
    try:
        found = elbv2.describe_load_balancers(Names=[name])["LoadBalancers"]
    except ClientError as exc:
        if error_code(exc) in ("LoadBalancerNotFound", "LoadBalancerNotFoundException"):
            return None
        raise
    if not found:
        return None
    lb = found[0]
    attrs = elbv2.describe_load_balancer_attributes(LoadBalancerArn=lb["LoadBalancerArn"])
    idle = {a["Key"]: a["Value"] for a in attrs.get("Attributes", [])}.get(
        "idle_timeout.timeout_seconds")
    return ObservedLoadBalancer(
        arn=lb["LoadBalancerArn"], name=lb["LoadBalancerName"], dns_name=lb.get("DNSName", ""),
        scheme=lb.get("Scheme", ""),
        subnets=tuple(sorted(z["SubnetId"] for z in lb.get("AvailabilityZones", []))),
        security_groups=tuple(sorted(lb.get("SecurityGroups", []))),
        idle_timeout=int(idle) if idle and str(idle).isdigit() else None,
        tags=tags_of(elbv2, [lb["LoadBalancerArn"]]).get(lb["LoadBalancerArn"], {}))


def _listeners(elbv2: Any, lb_arn: str) -> tuple[ObservedListener, ...]:
    raw = paginate(elbv2, "describe_listeners", "Listeners", LoadBalancerArn=lb_arn)
    tags = tags_of(elbv2, [ls["ListenerArn"] for ls in raw])
    out = []
    for ls in raw:
        certs = ls.get("Certificates") or [{}]
        out.append(ObservedListener(
            arn=ls["ListenerArn"], port=int(ls["Port"]), protocol=ls.get("Protocol", ""),
            certificate_arn=certs[0].get("CertificateArn", ""),
            default_actions=tuple(ls.get("DefaultActions", [])),
            tags=tags.get(ls["ListenerArn"], {})))
    return tuple(sorted(out, key=lambda ls: ls.port))


def _rule(raw: dict[str, Any], listener_arn: str, tags: dict[str, str]) -> ObservedRule:
    patterns: list[str] = []
    other = False
    for cond in raw.get("Conditions", []):
        if cond.get("Field") == "path-pattern":
            values = cond.get("PathPatternConfig", {}).get("Values") or cond.get("Values", [])
            patterns.extend(values)
        else:
            other = True
    return ObservedRule(arn=raw["RuleArn"], listener_arn=listener_arn,
                        priority=int(raw["Priority"]), patterns=tuple(patterns),
                        forward=forward_targets(raw.get("Actions", [])),
                        other_conditions=other or len(patterns) != 1, tags=tags)


def _rules(elbv2: Any, listeners: tuple[ObservedListener, ...]) -> tuple[ObservedRule, ...]:
    out: list[ObservedRule] = []
    for ls in listeners:
        raw = [r for r in paginate(elbv2, "describe_rules", "Rules", ListenerArn=ls.arn)
               if not r.get("IsDefault") and str(r.get("Priority")).isdigit()]
        tags = tags_of(elbv2, [r["RuleArn"] for r in raw])
        out.extend(_rule(r, ls.arn, tags.get(r["RuleArn"], {})) for r in raw)
    # AWS documents no order for DescribeRules (moto returns insertion order): sort here.
    return tuple(sorted(out, key=lambda r: (r.listener_arn, r.priority)))


def _health(tg: dict[str, Any]) -> HealthCheck:
    return HealthCheck(path=tg.get("HealthCheckPath", ""),
                       interval=int(tg.get("HealthCheckIntervalSeconds", 0)),
                       timeout=int(tg.get("HealthCheckTimeoutSeconds", 0)),
                       healthy=int(tg.get("HealthyThresholdCount", 0)),
                       unhealthy=int(tg.get("UnhealthyThresholdCount", 0)),
                       matcher=str(tg.get("Matcher", {}).get("HttpCode", "")))


def _target_group(elbv2: Any, tg: dict[str, Any], tags: dict[str, str]) -> ObservedTargetGroup:
    arn = tg["TargetGroupArn"]
    attrs = elbv2.describe_target_group_attributes(TargetGroupArn=arn).get("Attributes", [])
    delay = {a["Key"]: a["Value"] for a in attrs}.get("deregistration_delay.timeout_seconds")
    health = elbv2.describe_target_health(TargetGroupArn=arn).get("TargetHealthDescriptions", [])
    states = {Target(h["Target"]["Id"], int(h["Target"].get("Port", tg["Port"]))):
              h.get("TargetHealth", {}).get("State", "") for h in health}
    live = tuple(sorted((t for t, s in states.items() if s not in GONE_STATES),
                        key=lambda t: (t.id, t.port)))
    return ObservedTargetGroup(
        arn=arn, name=tg["TargetGroupName"], port=int(tg.get("Port", 0)),
        protocol=tg.get("Protocol", ""), target_type=tg.get("TargetType", ""),
        vpc_id=tg.get("VpcId", ""), health=_health(tg),
        deregistration_delay=int(delay) if delay is not None else None,
        targets=live, health_states=states, tags=tags)


def observe(elbv2: Any, cluster: str, lb_name: str) -> ObservedState:
    """Read the load balancer by name, its listeners and rules, and our target groups."""
    lb = _load_balancer(elbv2, lb_name) if lb_name else None
    listeners = _listeners(elbv2, lb.arn) if lb else ()
    rules = _rules(elbv2, listeners)
    raw_groups = paginate(elbv2, "describe_target_groups", "TargetGroups")
    names = {tg["TargetGroupArn"]: tg["TargetGroupName"] for tg in raw_groups}
    tags = tags_of(elbv2, list(names))
    ours = tuple(_target_group(elbv2, tg, tags.get(tg["TargetGroupArn"], {}))
                 for tg in raw_groups if is_ours(tags.get(tg["TargetGroupArn"], {}), cluster))
    return ObservedState(cluster=cluster, load_balancer=lb, listeners=listeners, rules=rules,
                         target_groups=tuple(sorted(ours, key=lambda t: t.name)), names=names)
