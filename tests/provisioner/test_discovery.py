"""EC2-tag discovery, and an Auto Scaling newcomer getting its group and rule on next apply."""

from __future__ import annotations

import pytest

from provisioner import reconcile
from shardchat.aws.ec2 import discover_instances, resolve_instances
from shardchat.config import ConfigError

from .conftest import add_instances, make_config


def tags(cluster: str, number: int, **extra: str) -> list[dict[str, str]]:
    out = [{"Key": "shardchat:cluster", "Value": cluster},
           {"Key": "shardchat:instance", "Value": str(number)}]
    return out + [{"Key": f"shardchat:{k.replace('_', '-')}", "Value": v}
                  for k, v in extra.items()]


def test_discovery_finds_running_tagged_instances(aws):
    _, ec2, net = aws
    one = add_instances(ec2, net, 1, tags("demo", 1))[0]
    two = add_instances(ec2, net, 1, tags("demo", 2, port="9200", internal_port="9300"))[0]
    stopped = add_instances(ec2, net, 1, tags("demo", 3))[0]
    ec2.stop_instances(InstanceIds=[stopped])
    add_instances(ec2, net, 1, tags("other", 4))
    cfg = make_config(net, [1], aws={"discover": "ec2-tags"})

    found = discover_instances(cfg)
    assert [(i.number, i.ec2_instance_id, i.host) for i in found] == [
        (1, one, net.ips[one]), (2, two, net.ips[two])]
    assert (found[0].port, found[0].internal_port) == (9001, 9501)  # first configured
    assert (found[1].port, found[1].internal_port) == (9200, 9300)  # from the tags
    unchanged = make_config(net, [1])
    assert resolve_instances(unchanged) is unchanged


def test_duplicate_instance_tags_are_refused(aws):
    _, ec2, net = aws
    add_instances(ec2, net, 2, tags("demo", 1))
    with pytest.raises(ConfigError) as err:
        discover_instances(make_config(net, [1], aws={"discover": "ec2-tags"}))
    assert err.value.key == "aws.discover" and "both claim instance number 1" in str(err.value)


def test_new_autoscaled_instance_gets_group_and_rule_on_next_apply(aws):
    elbv2, ec2, net = aws
    add_instances(ec2, net, 1, tags("demo", 1))
    base = make_config(net, [1], aws={"discover": "ec2-tags"})
    reconcile.apply_config(resolve_instances(base), elbv2)

    newcomer = add_instances(ec2, net, 1, tags("demo", 2))[0]
    plan = reconcile.apply_config(resolve_instances(base), elbv2)
    assert sorted(a.op for a in plan.actions) == ["create_rule", "create_target_group",
                                                  "register_targets", "register_targets"]
    groups = {tg["TargetGroupName"]: tg["TargetGroupArn"]
              for tg in elbv2.describe_target_groups()["TargetGroups"]}
    health = elbv2.describe_target_health(TargetGroupArn=groups["demo-i2-9001"])
    assert [h["Target"]["Id"] for h in health["TargetHealthDescriptions"]] == [newcomer]


def test_discovered_ports_are_checked_like_configured_ones(aws):
    _, ec2, net = aws
    add_instances(ec2, net, 1, tags("demo", 1, port="70000"))
    with pytest.raises(ConfigError) as err:
        reconcile.checked_desired(resolve_instances(make_config(net, [1], aws={
            "discover": "ec2-tags"})))
    assert err.value.key == "instances[0].port" and "1..65535" in err.value.message
