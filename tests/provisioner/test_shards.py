"""More instances than one ALB holds (SPEC section 10): one ALB ("shard") per 99 instances,
against an in-process moto. 250 instances make 3 shards: every instance is routed by exactly
one rule on exactly one ALB (that of shard ceil(N / 99)), each ALB's lobby holds its own
instances, every resource carries its shard tag, and a second apply changes nothing. Quotas
are checked per shard, before the first change to any of them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import boto3
import pytest
from moto import mock_aws

from provisioner import reconcile, status
from provisioner.limits import LimitError
from shardchat import config as config_mod
from shardchat.aws.clients import paginate
from shardchat.aws.tags import TAG_SHARD, tag_map
from shardchat.config import ConfigError
from shardchat.shards import shard_of

from .conftest import REGION, CallRecorder, Network, add_instances, build_network

SHARDS = [{"load_balancer": f"demo-s{k}", "public_url": f"https://s{k}.chat.example.com"}
          for k in (1, 2, 3)]


def fleet_config(net: Network, numbers: list[int], *, shards: list[dict] | None = None,
                 aws: dict | None = None) -> config_mod.Config:
    """Instance N on port 9000 + N of the network's (N-1)th EC2 instance (counted round
    when the network has fewer), behind ``shards``."""
    ids = {n: net.instances[(n - 1) % len(net.instances)] for n in numbers}
    instances = [{"number": n, "host": net.ips[ids[n]], "port": 9000 + n,
                  "internal_port": 20000 + n, "ec2_instance_id": ids[n]} for n in numbers]
    table = {"region": REGION, "vpc_id": net.vpc, "subnets": net.subnets,
             "security_groups": [net.security_group],
             "shards": SHARDS if shards is None else shards, **(aws or {})}
    return config_mod.parse({"cluster": {"name": "demo", "secret": "s3cret"},
                             "instances": instances, "aws": table}, env={})


@pytest.fixture
def fleet() -> Any:
    """(elbv2, network with 250 running EC2 instances) inside an in-process moto."""
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        net = build_network(ec2, count=0)
        for _ in range(5):
            add_instances(ec2, net, 50)
        yield boto3.client("elbv2", region_name=REGION), net


@pytest.fixture
def small() -> Any:
    """(elbv2, network with 10 running EC2 instances) inside an in-process moto."""
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        yield boto3.client("elbv2", region_name=REGION), build_network(ec2, count=10)


def routes(elbv2: Any, lb_name: str) -> dict[str, Any]:
    """One ALB as it routes: pattern -> (target group, its targets), its lobby's targets,
    and the tags of everything on it."""
    lb = elbv2.describe_load_balancers(Names=[lb_name])["LoadBalancers"][0]
    listener = elbv2.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"][0]
    rules = [r for r in paginate(elbv2, "describe_rules", "Rules",
                                 ListenerArn=listener["ListenerArn"]) if not r["IsDefault"]]

    def targets(arn: str) -> set[tuple[str, int]]:
        health = elbv2.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
        return {(h["Target"]["Id"], int(h["Target"]["Port"])) for h in health}

    lobby = listener["DefaultActions"][0]["TargetGroupArn"]
    groups = {r["Actions"][0]["TargetGroupArn"] for r in rules} | {lobby}
    arns = [lb["LoadBalancerArn"], listener["ListenerArn"], *sorted(groups),
            *(r["RuleArn"] for r in rules)]
    tags = {}
    for start in range(0, len(arns), 20):
        for d in elbv2.describe_tags(ResourceArns=arns[start:start + 20])["TagDescriptions"]:
            tags[d["ResourceArn"]] = tag_map(d["Tags"])
    return {"rules": {r["Conditions"][0]["PathPatternConfig"]["Values"][0]:
                      (int(r["Priority"]), targets(r["Actions"][0]["TargetGroupArn"]))
                      for r in rules},
            "lobby": targets(lobby), "tags": tags}


def test_250_instances_make_3_shards_each_instance_routed_once(fleet):
    elbv2, net = fleet
    numbers = list(range(1, 251))
    cfg = fleet_config(net, numbers)
    reconcile.apply_config(cfg, elbv2)

    seen: Counter[str] = Counter()
    for k in (1, 2, 3):
        alb = routes(elbv2, f"demo-s{k}")
        mine = [n for n in numbers if shard_of(n) == k]
        assert len(mine) == (99 if k < 3 else 52)
        assert sorted(alb["rules"]) == sorted(f"/i{n}/*" for n in mine)
        for n in mine:  # priority offset + N, whatever the shard; the one target of N
            assert alb["rules"][f"/i{n}/*"] == (n, {(net.instances[n - 1], 9000 + n)})
        assert alb["lobby"] == {(net.instances[n - 1], 9000 + n) for n in mine}
        assert {t.get(TAG_SHARD) for t in alb["tags"].values()} == {str(k)}
        seen.update(list(alb["rules"]))
    assert set(seen.values()) == {1} and len(seen) == 250  # one rule on one ALB each

    recorder = CallRecorder(elbv2)
    again = reconcile.apply_config(cfg, elbv2)
    assert again.empty, again.render()
    assert recorder.calls and recorder.mutating == []

    text = status.render(cfg, reconcile.observe_fleet(cfg, elbv2))
    assert "Shard 3: Load balancer demo-s3 (ours)" in text
    assert "https://s2.chat.example.com" in text and "/i250/*" in text

    # a rule someone else put on shard 2's ALB tips it over a 99-rule quota: refused
    # whole, before shard 1 or 3 (which fit) see a change
    lb2 = elbv2.describe_load_balancers(Names=["demo-s2"])["LoadBalancers"][0]
    ls2 = elbv2.describe_listeners(LoadBalancerArn=lb2["LoadBalancerArn"])["Listeners"][0]
    elbv2.create_rule(ListenerArn=ls2["ListenerArn"], Priority=5000, Conditions=[
        {"Field": "path-pattern", "PathPatternConfig": {"Values": ["/billing/*"]}}],
        Actions=[{"Type": "fixed-response", "FixedResponseConfig": {"StatusCode": "404"}}])
    recorder.clear()
    with pytest.raises(LimitError) as err:
        reconcile.apply_config(fleet_config(net, numbers[:-1], aws={"max_rules": 99}), elbv2)
    assert err.value.key == "aws.max_rules"
    assert "shard 2 (load balancer demo-s2)" in err.value.message
    assert "1 rules shardchat does not manage" in err.value.message
    assert recorder.mutating == []
    assert "/i250/*" in routes(elbv2, "demo-s3")["rules"]  # shard 3's change did not run


def test_a_shard_over_a_lowered_quota_is_refused_before_any_call(small):
    elbv2, net = small
    recorder = CallRecorder(elbv2)
    with pytest.raises(LimitError) as err:
        reconcile.plan_for(fleet_config(net, list(range(1, 151)), aws={"max_rules": 60}),
                           elbv2)
    assert "shard 1 (load balancer demo-s1): 99 instance rules" in err.value.message
    assert recorder.calls == []


def test_an_emptied_shard_loses_its_alb_and_groups_and_others_stay(small):
    elbv2, net = small
    reconcile.apply_config(fleet_config(net, [1, 2, 100, 199]), elbv2)
    names = {lb["LoadBalancerName"] for lb in elbv2.describe_load_balancers()["LoadBalancers"]}
    assert names == {"demo-s1", "demo-s2", "demo-s3"}

    cfg = fleet_config(net, [1, 2, 199])
    plan = reconcile.apply_config(cfg, elbv2)
    assert "no instance numbered 100-198" in plan.render()
    names = {lb["LoadBalancerName"] for lb in elbv2.describe_load_balancers()["LoadBalancers"]}
    assert names == {"demo-s1", "demo-s3"}
    groups = {tg["TargetGroupName"] for tg in elbv2.describe_target_groups()["TargetGroups"]}
    assert groups == {"demo-i1-9001", "demo-i2-9002", "demo-lobby", "demo-i199-9199",
                      "demo-s3-lobby"}
    assert reconcile.apply_config(cfg, elbv2).empty

    reconcile.destroy_config(cfg, elbv2)
    assert elbv2.describe_load_balancers()["LoadBalancers"] == []
    assert elbv2.describe_target_groups()["TargetGroups"] == []


def test_a_shard_with_no_instances_is_never_built(small):
    elbv2, net = small
    reconcile.apply_config(fleet_config(net, [1, 250]), elbv2)
    names = {lb["LoadBalancerName"] for lb in elbv2.describe_load_balancers()["LoadBalancers"]}
    assert names == {"demo-s1", "demo-s3"}


def test_resources_made_before_shards_get_their_shard_tag(small):
    elbv2, net = small
    cfg = fleet_config(net, [1, 2], shards=[], aws={"load_balancer": "demo-s1"})
    reconcile.apply_config(cfg, elbv2)
    alb = routes(elbv2, "demo-s1")
    arns = list(alb["tags"])
    for start in range(0, len(arns), 20):
        elbv2.remove_tags(ResourceArns=arns[start:start + 20], TagKeys=[TAG_SHARD])

    plan = reconcile.apply_config(cfg, elbv2)
    assert [a.op for a in plan.actions] == ["add_tags"]
    assert {t.get(TAG_SHARD) for t in routes(elbv2, "demo-s1")["tags"].values()} == {"1"}
    assert reconcile.apply_config(cfg, elbv2).empty


@pytest.mark.parametrize(("shards", "numbers", "key"), [
    (SHARDS[:2], [1, 199], "aws.shards"),  # shard 3 has no table
    ([SHARDS[0], {"load_balancer": "demo-s2"}], [1], "aws.shards[1].public_url"),
    ([SHARDS[0], {"public_url": "https://x"}], [1], "aws.shards[1].load_balancer"),
    ([SHARDS[0], {**SHARDS[1], "load_balancer": "demo-s1"}], [1],
     "aws.shards[1].load_balancer"),
])
def test_shard_tables_are_checked_naming_the_key(small, shards, numbers, key):
    elbv2, net = small
    recorder = CallRecorder(elbv2)
    with pytest.raises(ConfigError) as err:
        reconcile.plan_for(fleet_config(net, numbers, shards=shards), elbv2)
    assert err.value.key == key, err.value
    assert recorder.calls == []


def test_shard_1_takes_the_load_balancer_and_public_url_keys_as_defaults(small):
    _, net = small
    cfg = config_mod.parse({
        "cluster": {"name": "demo", "public_url": "https://one.example.com"},
        "instances": [{"number": 1, "ec2_instance_id": net.instances[0]},
                      {"number": 100, "port": 9002, "internal_port": 9102,
                       "ec2_instance_id": net.instances[0]}],
        "aws": {"load_balancer": "demo-one", "vpc_id": net.vpc, "subnets": net.subnets,
                "shards": [{}, {"load_balancer": "demo-two",
                                "public_url": "https://two.example.com"}]}}, env={})
    assert [(s.load_balancer, s.public_url) for s in cfg.shards] == [
        ("demo-one", "https://one.example.com"), ("demo-two", "https://two.example.com")]
    assert cfg.public_url_for(99) == "https://one.example.com"
    assert cfg.public_url_for(100) == "https://two.example.com"
    assert [d.load_balancer.name for d in reconcile.checked_desired(cfg)] == [
        "demo-one", "demo-two"]
