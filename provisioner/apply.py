"""Runs a Plan's actions with boto3, in order, retrying throttled mutations.

Each action is one small handler. Resources created earlier in the same run are found
through a Context (names -> ARNs), so a plan can say "forward to demo-i3-9001" before that
target group exists.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from provisioner import faults
from provisioner.actions import Action, Plan
from provisioner.desired import ListenerSpec, TargetGroupSpec
from provisioner.observed import ObservedState
from shardchat.aws.clients import error_code
from shardchat.aws.tags import OWNERSHIP_KEYS, TAG_ADOPTED, tag_list

THROTTLE_CODES = {"Throttling", "ThrottlingException", "RequestLimitExceeded",
                  "TooManyRequestsException", "RequestThrottled"}
MUTATION_ATTEMPTS = 6
SSL_POLICY = "ELBSecurityPolicy-TLS13-1-2-2021-06"
ADOPTED = {TAG_ADOPTED: "true"}
TAG_BATCH = 20  # AWS tags at most 20 resources per AddTags call


@dataclass
class Context:
    """ARNs known so far: read from AWS before the run, extended by what the run creates."""

    lb_arn: str | None = None
    tg_arns: dict[str, str] = field(default_factory=dict)  # name -> ARN
    listener_arns: dict[int, str] = field(default_factory=dict)  # port -> ARN
    rule_arns: dict[int, str] = field(default_factory=dict)  # instance -> ARN

    @classmethod
    def from_observed(cls, observed: ObservedState) -> Context:
        return cls(lb_arn=observed.load_balancer.arn if observed.load_balancer else None,
                   tg_arns={tg.name: tg.arn for tg in observed.target_groups},
                   listener_arns={ls.port: ls.arn for ls in observed.listeners})


def call(fn: Callable[..., Any], sleep: Callable[[float], None] = time.sleep,
         **kwargs: Any) -> Any:
    """``fn(**kwargs)``, retried with jittered exponential backoff while AWS throttles.

    botocore's own retries cover most throttling; mutations get a few more patient tries
    because failing halfway through a plan costs more than waiting."""
    for attempt in range(MUTATION_ATTEMPTS):
        try:
            return fn(**kwargs)
        except ClientError as exc:
            if error_code(exc) not in THROTTLE_CODES or attempt == MUTATION_ATTEMPTS - 1:
                raise
            sleep(min(20.0, 0.5 * 2 ** attempt) * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


def _forward(arn: str) -> list[dict[str, Any]]:
    return [{"Type": "forward", "TargetGroupArn": arn}]


def _default_actions(ctx: Context, default: dict[str, Any]) -> list[dict[str, Any]]:
    if "redirect" in default:
        return [{"Type": "redirect", "RedirectConfig": {
            "Protocol": "HTTPS", "Port": str(default["redirect"]), "Host": "#{host}",
            "Path": "/#{path}", "Query": "#{query}", "StatusCode": "HTTP_301"}}]
    if "fixed" in default:
        return [{"Type": "fixed-response", "FixedResponseConfig": {
            "StatusCode": "404", "ContentType": "text/plain", "MessageBody": default["fixed"]}}]
    return _forward(ctx.tg_arns[default["forward"]])


def _path_condition(pattern: str) -> list[dict[str, Any]]:
    return [{"Field": "path-pattern", "PathPatternConfig": {"Values": [pattern]}}]


# ---------------------------------------------------------------------------------------
# handlers: (elbv2 client, context, action args) -> None


def create_load_balancer(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    spec = args["spec"]
    kw: dict[str, Any] = {"Name": spec.name, "Subnets": list(spec.subnets),
                          "Scheme": spec.scheme, "Type": "application", "IpAddressType": "ipv4",
                          "Tags": tag_list(spec.tags)}
    if spec.security_groups:
        kw["SecurityGroups"] = list(spec.security_groups)
    ctx.lb_arn = call(elbv2.create_load_balancer, **kw)["LoadBalancers"][0]["LoadBalancerArn"]


def set_idle_timeout(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    call(elbv2.modify_load_balancer_attributes, LoadBalancerArn=ctx.lb_arn, Attributes=[
        {"Key": "idle_timeout.timeout_seconds", "Value": str(args["seconds"])}])


def set_subnets(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    call(elbv2.set_subnets, LoadBalancerArn=ctx.lb_arn, Subnets=list(args["subnets"]))


def set_security_groups(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    call(elbv2.set_security_groups, LoadBalancerArn=ctx.lb_arn,
         SecurityGroups=list(args["groups"]))


def adopt(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    call(elbv2.add_tags, ResourceArns=[args["arn"]], Tags=tag_list({**args["tags"], **ADOPTED}))


def retag(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    call(elbv2.add_tags, ResourceArns=[args["arn"]], Tags=tag_list(args["tags"]))


def add_tags(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    arns = list(args["arns"])
    for start in range(0, len(arns), TAG_BATCH):
        call(elbv2.add_tags, ResourceArns=arns[start:start + TAG_BATCH],
             Tags=tag_list(args["tags"]))


def untag(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    call(elbv2.remove_tags, ResourceArns=[args["arn"]], TagKeys=list(OWNERSHIP_KEYS))


def create_target_group(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    spec: TargetGroupSpec = args["spec"]
    h = spec.health
    resp = call(elbv2.create_target_group, Name=spec.name, Protocol="HTTP",
                ProtocolVersion="HTTP1", Port=spec.port, VpcId=spec.vpc_id,
                TargetType=spec.target_type, HealthCheckEnabled=True,
                HealthCheckProtocol="HTTP", HealthCheckPort="traffic-port",
                HealthCheckPath=h.path, HealthCheckIntervalSeconds=h.interval,
                HealthCheckTimeoutSeconds=h.timeout, HealthyThresholdCount=h.healthy,
                UnhealthyThresholdCount=h.unhealthy, Matcher={"HttpCode": h.matcher},
                Tags=tag_list(spec.tags))
    arn = resp["TargetGroups"][0]["TargetGroupArn"]
    ctx.tg_arns[spec.name] = arn
    call(elbv2.modify_target_group_attributes, TargetGroupArn=arn, Attributes=[
        {"Key": "deregistration_delay.timeout_seconds", "Value": str(spec.deregistration_delay)}])


def modify_health(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    h = args["health"]
    call(elbv2.modify_target_group, TargetGroupArn=ctx.tg_arns[args["name"]],
         HealthCheckPath=h.path, HealthCheckIntervalSeconds=h.interval,
         HealthCheckTimeoutSeconds=h.timeout, HealthyThresholdCount=h.healthy,
         UnhealthyThresholdCount=h.unhealthy, Matcher={"HttpCode": h.matcher})


def set_deregistration_delay(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    call(elbv2.modify_target_group_attributes, TargetGroupArn=ctx.tg_arns[args["name"]],
         Attributes=[{"Key": "deregistration_delay.timeout_seconds",
                      "Value": str(args["seconds"])}])


def _targets(targets: Any) -> list[dict[str, Any]]:
    return [{"Id": t.id, "Port": t.port} for t in targets]


def register_targets(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    call(elbv2.register_targets, TargetGroupArn=ctx.tg_arns[args["name"]],
         Targets=_targets(args["targets"]))


def deregister_targets(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    call(elbv2.deregister_targets, TargetGroupArn=ctx.tg_arns[args["name"]],
         Targets=_targets(args["targets"]))


def _listener_kwargs(ctx: Context, spec: ListenerSpec, default: dict[str, Any]
                     ) -> dict[str, Any]:
    kw: dict[str, Any] = {"Protocol": spec.protocol, "Port": spec.port,
                          "DefaultActions": _default_actions(ctx, default)}
    if spec.certificate_arn:
        kw["Certificates"] = [{"CertificateArn": spec.certificate_arn}]
        kw["SslPolicy"] = SSL_POLICY
    return kw


def create_listener(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    spec: ListenerSpec = args["spec"]
    resp = call(elbv2.create_listener, LoadBalancerArn=ctx.lb_arn,
                Tags=tag_list(spec.tags), **_listener_kwargs(ctx, spec, args["default"]))
    ctx.listener_arns[spec.port] = resp["Listeners"][0]["ListenerArn"]


def modify_listener(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    call(elbv2.modify_listener, ListenerArn=args["arn"],
         **_listener_kwargs(ctx, args["spec"], args["default"]))


def set_default_action(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    call(elbv2.modify_listener, ListenerArn=args["arn"],
         DefaultActions=_default_actions(ctx, args["default"]))


def create_rule(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    spec = args["spec"]
    resp = call(elbv2.create_rule, ListenerArn=ctx.listener_arns[args["listener_port"]],
                Priority=args["priority"], Conditions=_path_condition(spec.path_pattern),
                Actions=_forward(ctx.tg_arns[spec.target_group]), Tags=tag_list(spec.tags))
    ctx.rule_arns[spec.instance] = resp["Rules"][0]["RuleArn"]


def modify_rule(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    spec = args["spec"]
    call(elbv2.modify_rule, RuleArn=args["arn"], Conditions=_path_condition(spec.path_pattern),
         Actions=_forward(ctx.tg_arns[spec.target_group]))


def set_priorities(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    moves = [(ctx.rule_arns[ref] if isinstance(ref, int) else ref, p)
             for ref, p in args["moves"]]
    try:
        call(elbv2.set_rule_priorities,
             RulePriorities=[{"RuleArn": arn, "Priority": p} for arn, p in moves])
    except ClientError as exc:
        # AWS applies all priorities of one call together, so shifts and swaps succeed.
        # moto checks each new priority against the old ones and answers PriorityInUse:
        # park every rule on a spare priority first, then move each to its final one. Our
        # patterns never overlap, so the order of our rules never changes routing.
        if error_code(exc) != "PriorityInUse":
            raise
        for (arn, _), spare in zip(moves, args["spare"], strict=False):
            call(elbv2.set_rule_priorities, RulePriorities=[{"RuleArn": arn, "Priority": spare}])
        for arn, p in moves:
            call(elbv2.set_rule_priorities, RulePriorities=[{"RuleArn": arn, "Priority": p}])


def delete_rule(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    call(elbv2.delete_rule, RuleArn=args["arn"])


def delete_listener(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    call(elbv2.delete_listener, ListenerArn=args["arn"])


def delete_target_group(elbv2: Any, ctx: Context, args: dict[str, Any],
                        sleep: Callable[[float], None] = time.sleep) -> None:
    if args.get("targets"):
        call(elbv2.deregister_targets, TargetGroupArn=args["arn"],
             Targets=_targets(args["targets"]))
    # Right after its last rule or load balancer goes, AWS may still call the group in use
    # for a few seconds: retry that answer a bounded number of times.
    for attempt in range(8):
        try:
            call(elbv2.delete_target_group, TargetGroupArn=args["arn"])
            return
        except ClientError as exc:
            if error_code(exc) != "ResourceInUse" or attempt == 7:
                raise
            sleep(min(10.0, 0.5 * 2 ** attempt))


def delete_load_balancer(elbv2: Any, ctx: Context, args: dict[str, Any]) -> None:
    call(elbv2.delete_load_balancer, LoadBalancerArn=args["arn"])


HANDLERS: dict[str, Callable[[Any, Context, dict[str, Any]], None]] = {
    f.__name__: f for f in (
        create_load_balancer, set_idle_timeout, set_subnets, set_security_groups, adopt, retag,
        add_tags, untag, create_target_group, modify_health, set_deregistration_delay,
        register_targets, deregister_targets, create_listener, modify_listener,
        set_default_action, create_rule, modify_rule, set_priorities, delete_rule,
        delete_listener, delete_target_group, delete_load_balancer)}


def run(plan: Plan, elbv2: Any, ctx: Context,
        progress: Callable[[int, int, Action], None] | None = None) -> None:
    """Perform every action of ``plan`` in order; the first failure stops the run."""
    total = len(plan.actions)
    for idx, action in enumerate(plan.actions, 1):
        if progress:
            progress(idx, total, action)
        HANDLERS[action.op](elbv2, ctx, action.args)
        faults.reach("provision.after_action")
