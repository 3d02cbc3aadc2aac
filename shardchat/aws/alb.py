"""The one reader of an Application Load Balancer: describe calls only, never a change.

The provisioner builds its observed state from these records (``provisioner/observed.py``)
and ``shardchat router --rules-from-alb`` turns them into a rule set
(``cluster/alb_rules.py``), so both see a load balancer the same way: the same rules, in the
same order, forwarding to the same target groups, with the same targets counted as live.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from shardchat.aws.clients import error_code, paginate
from shardchat.aws.tags import TAG_ROLE, instance_of, tag_map

DESCRIBE_TAGS_BATCH = 20  # AWS accepts at most 20 ARNs per DescribeTags call
GONE_STATES = ("draining", "unused")  # a target in these states is on its way out
NOT_FOUND = ("LoadBalancerNotFound", "LoadBalancerNotFoundException")


@dataclass(frozen=True)
class Target:
    id: str  # EC2 instance id, or an IP address for target_type "ip"
    port: int


@dataclass(frozen=True)
class HealthCheck:
    path: str
    interval: int
    timeout: int
    healthy: int
    unhealthy: int
    matcher: str  # the HTTP codes that count as healthy, e.g. "200"


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


def sole_target(actions: Any) -> str | None:
    """The target group when the whole of ``actions`` is one forward to one group (what
    shardchat writes); None for anything else (weighted, redirect, fixed response...)."""
    arns = forward_targets(actions)
    return arns[0] if len(actions) == 1 and len(arns) == 1 else None


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

    @property
    def sole_target(self) -> str | None:
        return sole_target(self.default_actions)

    @property
    def role(self) -> str:
        return self.tags.get(TAG_ROLE, "")

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
    actions: tuple[dict[str, Any], ...]
    other_conditions: bool  # any condition besides one path-pattern with one value
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def forward(self) -> tuple[str, ...]:
        """Target group ARNs the rule forwards to."""
        return forward_targets(self.actions)

    @property
    def sole_target(self) -> str | None:
        return sole_target(self.actions)

    @property
    def sole_pattern(self) -> str | None:
        """The path pattern when it is the rule's only condition (what shardchat writes)."""
        return None if self.other_conditions else self.patterns[0]


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
    targets: tuple[Target, ...]  # live ones (not draining or unused), sorted
    health_states: dict[Target, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def role(self) -> str:
        return self.tags.get(TAG_ROLE, "")

    @property
    def instance(self) -> int | None:
        return instance_of(self.tags)


def tags_of(elbv2: Any, arns: list[str]) -> dict[str, dict[str, str]]:
    """Tags of many ELB resources, 20 ARNs per call."""
    out: dict[str, dict[str, str]] = {}
    for start in range(0, len(arns), DESCRIBE_TAGS_BATCH):
        batch = arns[start:start + DESCRIBE_TAGS_BATCH]
        resp = elbv2.describe_tags(ResourceArns=batch)
        for desc in resp.get("TagDescriptions", []):
            out[desc["ResourceArn"]] = tag_map(desc.get("Tags", []))
    return out


def _attributes(resp: dict[str, Any]) -> dict[str, str]:
    return {a["Key"]: a["Value"] for a in resp.get("Attributes", [])}


def load_balancer(elbv2: Any, name: str) -> ObservedLoadBalancer | None:
    """The load balancer called ``name``, or None when there is none."""
    try:
        found = elbv2.describe_load_balancers(Names=[name])["LoadBalancers"]
    except ClientError as exc:
        if error_code(exc) in NOT_FOUND:
            return None
        raise
    if not found:
        return None
    lb = found[0]
    idle = _attributes(elbv2.describe_load_balancer_attributes(
        LoadBalancerArn=lb["LoadBalancerArn"])).get("idle_timeout.timeout_seconds")
    return ObservedLoadBalancer(
        arn=lb["LoadBalancerArn"], name=lb["LoadBalancerName"], dns_name=lb.get("DNSName", ""),
        scheme=lb.get("Scheme", ""),
        subnets=tuple(sorted(z["SubnetId"] for z in lb.get("AvailabilityZones", []))),
        security_groups=tuple(sorted(lb.get("SecurityGroups", []))),
        idle_timeout=int(idle) if idle and str(idle).isdigit() else None,
        tags=tags_of(elbv2, [lb["LoadBalancerArn"]]).get(lb["LoadBalancerArn"], {}))


def listeners(elbv2: Any, lb_arn: str) -> tuple[ObservedListener, ...]:
    """The load balancer's listeners, by port."""
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
                        actions=tuple(raw.get("Actions", [])),
                        other_conditions=other or len(patterns) != 1, tags=tags)


def rules(elbv2: Any, of: tuple[ObservedListener, ...]) -> tuple[ObservedRule, ...]:
    """Every non-default rule of the listeners ``of``, sorted by listener, then priority."""
    out: list[ObservedRule] = []
    for ls in of:
        raw = [r for r in paginate(elbv2, "describe_rules", "Rules", ListenerArn=ls.arn)
               if not r.get("IsDefault") and str(r.get("Priority")).isdigit()]
        tags = tags_of(elbv2, [r["RuleArn"] for r in raw])
        out.extend(_rule(r, ls.arn, tags.get(r["RuleArn"], {})) for r in raw)
    # AWS documents no order for DescribeRules (moto returns insertion order): evaluation
    # order is priority order, and this is the one place that puts AWS's answer in it.
    return tuple(sorted(out, key=lambda r: (r.listener_arn, r.priority)))


def target_health(elbv2: Any, tg_arn: str, default_port: int | None = None
                  ) -> dict[Target, str]:
    """Each registered target of a group and its health state, in AWS's order."""
    health = elbv2.describe_target_health(TargetGroupArn=tg_arn).get(
        "TargetHealthDescriptions", [])
    return {Target(h["Target"]["Id"], int(h["Target"].get("Port", default_port))):
            h.get("TargetHealth", {}).get("State", "") for h in health}


def live(states: dict[Target, str]) -> tuple[Target, ...]:
    """The targets that are not on their way out, in the order given."""
    return tuple(t for t, s in states.items() if s not in GONE_STATES)


def _health(tg: dict[str, Any]) -> HealthCheck:
    return HealthCheck(path=tg.get("HealthCheckPath", ""),
                       interval=int(tg.get("HealthCheckIntervalSeconds", 0)),
                       timeout=int(tg.get("HealthCheckTimeoutSeconds", 0)),
                       healthy=int(tg.get("HealthyThresholdCount", 0)),
                       unhealthy=int(tg.get("UnhealthyThresholdCount", 0)),
                       matcher=str(tg.get("Matcher", {}).get("HttpCode", "")))


def _target_group(elbv2: Any, tg: dict[str, Any], tags: dict[str, str]) -> ObservedTargetGroup:
    arn = tg["TargetGroupArn"]
    delay = _attributes(elbv2.describe_target_group_attributes(TargetGroupArn=arn)).get(
        "deregistration_delay.timeout_seconds")
    states = target_health(elbv2, arn, tg.get("Port"))
    return ObservedTargetGroup(
        arn=arn, name=tg["TargetGroupName"], port=int(tg.get("Port", 0)),
        protocol=tg.get("Protocol", ""), target_type=tg.get("TargetType", ""),
        vpc_id=tg.get("VpcId", ""), health=_health(tg),
        deregistration_delay=int(delay) if delay is not None else None,
        targets=tuple(sorted(live(states), key=lambda t: (t.id, t.port))),
        health_states=states, tags=tags)


def target_groups(elbv2: Any, detail: Callable[[dict[str, str]], bool]
                  ) -> tuple[dict[str, str], tuple[ObservedTargetGroup, ...]]:
    """Every target group of the region as ARN -> name, and those whose tags ``detail``
    accepts read in full (attributes, targets and their health), sorted by name."""
    raw = paginate(elbv2, "describe_target_groups", "TargetGroups")
    names = {tg["TargetGroupArn"]: tg["TargetGroupName"] for tg in raw}
    tags = tags_of(elbv2, list(names))
    full = (_target_group(elbv2, tg, tags.get(tg["TargetGroupArn"], {})) for tg in raw
            if detail(tags.get(tg["TargetGroupArn"], {})))
    return names, tuple(sorted(full, key=lambda t: t.name))
