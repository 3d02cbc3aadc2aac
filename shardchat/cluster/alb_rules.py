"""Read the rule set back from a live ALB, so the local router routes exactly like AWS.

``shardchat-provision apply`` writes rules built by ``rules.build_rules``; this module reads
what is actually on the load balancer (which may have been edited by hand since) and turns
it into the same ``RuleSet`` plus the address of each instance's target.
"""

from __future__ import annotations

from typing import Any

from shardchat import urls
from shardchat.cluster.discovery import TAG_INSTANCE
from shardchat.cluster.rules import Rule, RuleSet
from shardchat.config import Config

TAG_ROLE = "shardchat:role"
Endpoint = tuple[str, int]


class AlbRulesError(RuntimeError):
    """The load balancer cannot be turned into a rule set (absent, no listener, ...)."""


def _clients(region: str, endpoint_url: str | None) -> tuple[Any, Any]:
    import boto3  # only the ALB-backed router needs it

    kw: dict[str, Any] = {"region_name": region}
    if endpoint_url:
        kw["endpoint_url"] = endpoint_url
    return boto3.client("elbv2", **kw), boto3.client("ec2", **kw)


def _tags(elbv2: Any, arns: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for i in range(0, len(arns), 20):  # DescribeTags takes at most 20 ARNs
        for d in elbv2.describe_tags(ResourceArns=arns[i:i + 20])["TagDescriptions"]:
            out[d["ResourceArn"]] = {t["Key"]: t["Value"] for t in d.get("Tags", [])}
    return out


def _forward_one(actions: list[dict[str, Any]]) -> str | None:
    """The one target group a forward action sends to, or None for anything else."""
    if len(actions) != 1 or actions[0].get("Type") != "forward":
        return None
    a = actions[0]
    groups = [g["TargetGroupArn"] for g in a.get("ForwardConfig", {}).get("TargetGroups", [])]
    if a.get("TargetGroupArn"):
        groups = list(dict.fromkeys([a["TargetGroupArn"], *groups]))
    return groups[0] if len(groups) == 1 else None


def _path_pattern(rule: dict[str, Any]) -> str | None:
    conds = rule.get("Conditions", [])
    if len(conds) != 1 or conds[0].get("Field") != "path-pattern":
        return None
    values = conds[0].get("PathPatternConfig", {}).get("Values") or conds[0].get("Values", [])
    return values[0] if len(values) == 1 else None


def _listener(elbv2: Any, lb_name: str) -> dict[str, Any]:
    try:
        lb = elbv2.describe_load_balancers(Names=[lb_name])["LoadBalancers"][0]
    except Exception as exc:
        raise AlbRulesError(f"load balancer {lb_name!r} not found: {exc}") from exc
    listeners = []
    for page in elbv2.get_paginator("describe_listeners").paginate(
            LoadBalancerArn=lb["LoadBalancerArn"]):
        listeners.extend(page["Listeners"])
    tags = _tags(elbv2, [ls["ListenerArn"] for ls in listeners])
    forwarding = [ls for ls in sorted(listeners, key=lambda ls: ls["Port"])
                  if _forward_one(ls.get("DefaultActions", []))]
    ours = [ls for ls in forwarding if tags[ls["ListenerArn"]].get(TAG_ROLE) == "listener"]
    if not (ours or forwarding):
        raise AlbRulesError(f"load balancer {lb_name!r} has no listener that forwards to a "
                            "target group (run shardchat-provision apply)")
    return (ours or forwarding)[0]


def _targets(elbv2: Any, tg_arn: str) -> list[tuple[str, int]]:
    resp = elbv2.describe_target_health(TargetGroupArn=tg_arn)
    return [(h["Target"]["Id"], int(h["Target"]["Port"]))
            for h in resp.get("TargetHealthDescriptions", [])
            if h.get("TargetHealth", {}).get("State") not in ("draining", "unused")]


def _hosts(ec2: Any, ids: list[str]) -> dict[str, str]:
    if not ids:
        return {}
    out = {}
    for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
        for inst in r["Instances"]:
            out[inst["InstanceId"]] = inst.get("PrivateIpAddress", "")
    return out


def _instance_rules(elbv2: Any, listener_arn: str) -> list[tuple[Rule, str]]:
    raw = []
    for page in elbv2.get_paginator("describe_rules").paginate(ListenerArn=listener_arn):
        raw.extend(r for r in page["Rules"] if str(r.get("Priority")).isdigit())
    raw.sort(key=lambda r: int(r["Priority"]))  # AWS promises no order; moto uses insertion
    found = [(r, _path_pattern(r), _forward_one(r.get("Actions", []))) for r in raw]
    found = [(r, p, tg) for r, p, tg in found if p and tg]
    tags = _tags(elbv2, sorted({tg for _, _, tg in found}))
    out = []
    for r, pattern, tg in found:
        tag = tags.get(tg, {}).get(TAG_INSTANCE, "")
        number = int(tag) if tag.isdigit() else urls.instance_of_path(pattern.rstrip("*"))
        if number is not None:
            out.append((Rule(int(r["Priority"]), pattern, number), tg))
    return out


def load_rules_from_alb(lb_name: str, *, region: str, endpoint_url: str | None = None,
                        cfg: Config | None = None
                        ) -> tuple[RuleSet, dict[int, Endpoint]]:
    """The ALB's path rules as a RuleSet, and instance -> (host, port) of its target.

    Instance targets resolve to ``cfg``'s host for that instance when given, else to the EC2
    private IP; IP targets are their own address."""
    elbv2, ec2 = _clients(region, endpoint_url)
    listener = _listener(elbv2, lb_name)
    rules = _instance_rules(elbv2, listener["ListenerArn"])
    targets = {n: _targets(elbv2, tg) for n, tg in
               {rule.instance: tg for rule, tg in reversed(rules)}.items()}
    known = {i.number: i.host for i in cfg.instances} if cfg else {}
    ids = sorted({t[0] for n, ts in targets.items() for t in ts[:1]
                  if t[0].startswith("i-") and n not in known})
    hosts = _hosts(ec2, ids)
    endpoints: dict[int, Endpoint] = {}
    for n, ts in targets.items():
        if not ts:
            continue
        tid, port = ts[0]
        host = known.get(n) or hosts.get(tid, tid) if tid.startswith("i-") else tid
        endpoints[n] = (host, port)
    lobby = _forward_one(listener.get("DefaultActions", []))
    lobby_targets = set(_targets(elbv2, lobby)) if lobby else set()
    default = sorted(n for n, ts in targets.items() if ts and ts[0] in lobby_targets)
    ruleset = RuleSet(rules=tuple(r for r, _ in rules), default_instances=tuple(default))
    return ruleset, endpoints
