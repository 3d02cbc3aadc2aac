"""The one AWS client factory and the one ALB reader that the provisioner, discovery and
``shardchat router --rules-from-alb`` share (in-process moto)."""

from __future__ import annotations

import re

import boto3
import pytest

from provisioner import reconcile
from provisioner.observed import observe
from shardchat.aws import alb, clients
from shardchat.cluster.alb_rules import AlbRulesError, load_rules_from_alb
from shardchat.cluster.rules import build_rules
from tests.support import ROOT

from .conftest import REGION, make_config


def test_factory_clients_retry_adaptively_in_the_given_region_and_endpoint():
    made = clients.make_clients("eu-west-2", "http://127.0.0.1:4566")
    for client in (made.elbv2, made.ec2, clients.client("elbv2", "eu-west-2")):
        retries = client.meta.config.retries  # botocore counts the first try as well
        assert retries == {"mode": "adaptive", "total_max_attempts": clients.MAX_ATTEMPTS + 1}
        assert client.meta.region_name == "eu-west-2"
    assert made.elbv2.meta.endpoint_url == "http://127.0.0.1:4566"
    assert made.ec2.meta.endpoint_url == "http://127.0.0.1:4566"
    assert clients.client("ec2", "eu-west-2").meta.endpoint_url.startswith("https://ec2.")


def test_no_module_but_the_factory_makes_a_boto3_client():
    """The router, discovery and the provisioner all get their clients (and so the retry
    policy) from ``shardchat/aws/clients.py``."""
    makes = re.compile(r"\bboto3\.client\(|\.client\(\s*[\"']|\bboto3\.session\.Session\(")
    offenders = [str(p.relative_to(ROOT)) for d in ("shardchat", "provisioner")
                 for p in sorted((ROOT / d).rglob("*.py"))
                 if makes.search(p.read_text()) and p != ROOT / "shardchat/aws/clients.py"]
    assert offenders == []


def forward(arn: str, spelling: str = "plain") -> list[dict]:
    if spelling == "plain":
        return [{"Type": "forward", "TargetGroupArn": arn}]
    return [{"Type": "forward", "ForwardConfig": {"TargetGroups": [{"TargetGroupArn": arn}]}}]


def path(pattern: str) -> list[dict]:
    return [{"Field": "path-pattern", "PathPatternConfig": {"Values": [pattern]}}]


@pytest.fixture
def hand_made(aws):
    """An ALB built by hand, not by shardchat: IP targets, untagged groups (but one), rules
    created out of priority order, one of them with a host condition as well."""
    elbv2, _, net = aws
    lb = elbv2.create_load_balancer(Name="hand-alb", Subnets=net.subnets)["LoadBalancers"][0]
    groups = {}
    for name, ip, port in (("one", "10.20.1.11", 9001), ("two", "10.20.1.12", 9002),
                           ("lobby", "10.20.1.11", 9001)):
        arn = elbv2.create_target_group(Name=name, Protocol="HTTP", Port=port, VpcId=net.vpc,
                                        TargetType="ip")["TargetGroups"][0]["TargetGroupArn"]
        elbv2.register_targets(TargetGroupArn=arn, Targets=[{"Id": ip, "Port": port}])
        groups[name] = arn
    # the "two" group says which instance it serves; the others leave it to the pattern
    elbv2.add_tags(ResourceArns=[groups["two"]],
                   Tags=[{"Key": "shardchat:instance", "Value": "2"}])
    listener = elbv2.create_listener(LoadBalancerArn=lb["LoadBalancerArn"], Protocol="HTTP",
                                     Port=80, DefaultActions=forward(groups["lobby"])
                                     )["Listeners"][0]["ListenerArn"]
    host = {"Field": "host-header", "HostHeaderConfig": {"Values": ["admin.example.com"]}}
    for priority, conditions, actions in (
            (30, [*path("/i1/*"), host], forward(groups["two"])),
            (20, path("/elsewhere/*"), forward(groups["two"], "config")),
            (10, path("/i1/*"), forward(groups["one"], "config"))):
        elbv2.create_rule(ListenerArn=listener, Priority=priority, Conditions=conditions,
                          Actions=actions)
    return elbv2, groups, listener


def test_reader_returns_rules_in_priority_order_with_both_forward_spellings(hand_made):
    elbv2, groups, listener = hand_made
    assert alb.load_balancer(elbv2, "no-such-alb") is None
    lb = alb.load_balancer(elbv2, "hand-alb")
    (ls,) = alb.listeners(elbv2, lb.arn)
    assert ls.arn == listener and ls.sole_target == groups["lobby"]
    rules = alb.rules(elbv2, (ls,))
    assert [r.priority for r in rules] == [10, 20, 30]
    assert [r.forward for r in rules] == [(groups["one"],), (groups["two"],), (groups["two"],)]
    assert [r.sole_pattern for r in rules] == ["/i1/*", "/elsewhere/*", None]
    health = alb.target_health(elbv2, groups["one"])
    assert list(health) == [alb.Target("10.20.1.11", 9001)]
    assert alb.live(health) == (alb.Target("10.20.1.11", 9001),)


def test_router_reads_the_hand_made_alb_like_aws_routes_it(hand_made):
    ruleset, endpoints = load_rules_from_alb("hand-alb", region=REGION)
    # 10: instance from the pattern; 20: from the group's tag; 30: not a path-only rule
    assert [(r.priority, r.path_pattern, r.instance) for r in ruleset.rules] == [
        (10, "/i1/*", 1), (20, "/elsewhere/*", 2)]
    assert endpoints == {1: ("10.20.1.11", 9001), 2: ("10.20.1.12", 9002)}
    assert ruleset.default_instances == (1,)  # the lobby holds instance 1's target only
    with pytest.raises(AlbRulesError, match="not found"):
        load_rules_from_alb("no-such-alb", region=REGION)


def test_router_and_provisioner_read_what_apply_wrote(aws):
    elbv2, _, net = aws
    cfg = make_config(net, [1, 2, 3], aws={"rule_priority_offset": 40})
    reconcile.apply_config(cfg, elbv2)
    ruleset, endpoints = load_rules_from_alb("demo-alb", region=REGION, cfg=cfg)
    assert ruleset == build_rules([1, 2, 3], 40)
    assert endpoints == {i.number: (i.host, i.port) for i in cfg.instances}
    observed = observe(elbv2, "demo", "demo-alb")
    assert [(r.priority, r.patterns) for r in observed.rules] == [
        (r.priority, (r.path_pattern,)) for r in ruleset.rules]


def test_reader_uses_the_callers_session(aws):
    """Discovery and the provisioner hand in their own session; the factory keeps it."""
    session = boto3.session.Session(region_name=REGION)
    client = clients.client("elbv2", REGION, session=session)
    assert client.meta.config.retries["mode"] == "adaptive"
    assert alb.load_balancer(client, "demo-alb") is None
