"""Read the rule set back from a live ALB, so the local router routes exactly like AWS.

``shardchat-provision apply`` writes rules built by ``rules.build_rules``; this module takes
what is actually on the load balancer (which may have been edited by hand since), read by
the provisioner's own reader (``shardchat.aws.alb``), and turns it into the same ``RuleSet``
plus the address of each instance's target.
"""

from __future__ import annotations

from typing import Any

from shardchat import urls
from shardchat.aws import alb, ec2
from shardchat.aws.alb import ObservedListener, Target
from shardchat.aws.clients import make_clients
from shardchat.aws.tags import ROLE_LISTENER, instance_of
from shardchat.cluster.rules import Rule, RuleSet
from shardchat.config import Config

Endpoint = tuple[str, int]


class AlbRulesError(RuntimeError):
    """The load balancer cannot be turned into a rule set (absent, no listener, ...)."""


def _listener(elbv2: Any, lb_name: str) -> ObservedListener:
    """The listener whose rules route: shardchat's own when tagged, else the first (by
    port) whose default action forwards to one target group."""
    lb = alb.load_balancer(elbv2, lb_name)
    if lb is None:
        raise AlbRulesError(f"load balancer {lb_name!r} not found")
    forwarding = [ls for ls in alb.listeners(elbv2, lb.arn) if ls.sole_target]
    ours = [ls for ls in forwarding if ls.role == ROLE_LISTENER]
    if not (ours or forwarding):
        raise AlbRulesError(f"load balancer {lb_name!r} has no listener that forwards to a "
                            "target group (run shardchat-provision apply)")
    return (ours or forwarding)[0]


def _instance_rules(elbv2: Any, listener: ObservedListener) -> list[tuple[Rule, str]]:
    """(rule, target group ARN) for each rule that sends one path pattern to one group,
    in priority order. The instance is the group's ``shardchat:instance`` tag, else the
    instance the pattern's path is addressed to; rules with neither are left out."""
    found = [r for r in alb.rules(elbv2, (listener,)) if r.sole_pattern and r.sole_target]
    tags = alb.tags_of(elbv2, sorted({str(r.sole_target) for r in found}))
    out = []
    for r in found:
        pattern, tg = str(r.sole_pattern), str(r.sole_target)
        number = instance_of(tags.get(tg, {}))
        if number is None:
            number = urls.instance_of_path(pattern.rstrip("*"))
        if number is not None:
            out.append((Rule(r.priority, pattern, number), tg))
    return out


def _live(elbv2: Any, tg_arn: str) -> tuple[Target, ...]:
    return alb.live(alb.target_health(elbv2, tg_arn))


def load_rules_from_alb(lb_name: str, *, region: str, endpoint_url: str | None = None,
                        cfg: Config | None = None
                        ) -> tuple[RuleSet, dict[int, Endpoint]]:
    """The ALB's path rules as a RuleSet, and instance -> (host, port) of its target.

    Instance targets resolve to ``cfg``'s host for that instance when given, else to the EC2
    private IP; IP targets are their own address."""
    clients = make_clients(region, endpoint_url)
    listener = _listener(clients.elbv2, lb_name)
    rules = _instance_rules(clients.elbv2, listener)
    targets = {n: _live(clients.elbv2, tg) for n, tg in
               {rule.instance: tg for rule, tg in reversed(rules)}.items()}
    known = {i.number: i.host for i in cfg.instances} if cfg else {}
    ids = sorted({ts[0].id for n, ts in targets.items()
                  if ts and ts[0].id.startswith("i-") and n not in known})
    hosts = ec2.private_ips(clients.ec2, ids)
    endpoints: dict[int, Endpoint] = {}
    for n, ts in targets.items():
        if not ts:
            continue
        tid, port = ts[0].id, ts[0].port
        host = known.get(n) or hosts.get(tid, tid) if tid.startswith("i-") else tid
        endpoints[n] = (host, port)
    lobby = listener.sole_target
    lobby_targets = set(_live(clients.elbv2, lobby)) if lobby else set()
    default = sorted(n for n, ts in targets.items() if ts and ts[0] in lobby_targets)
    ruleset = RuleSet(rules=tuple(r for r, _ in rules), default_instances=tuple(default))
    return ruleset, endpoints
