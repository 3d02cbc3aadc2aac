"""The reconciler against an in-process moto: what apply leaves on the ALB, and what it
refuses to touch."""

from __future__ import annotations

import pytest

from provisioner import reconcile
from provisioner.limits import LimitError
from shardchat.config import ConfigError

from .conftest import CallRecorder, make_config


def target_groups(elbv2) -> dict[str, dict]:
    return {tg["TargetGroupName"]: tg for tg in elbv2.describe_target_groups()["TargetGroups"]}


def targets(elbv2, tg_arn: str) -> set[tuple[str, int]]:
    health = elbv2.describe_target_health(TargetGroupArn=tg_arn)["TargetHealthDescriptions"]
    return {(h["Target"]["Id"], int(h["Target"]["Port"])) for h in health}


def listener(elbv2, port: int = 80) -> dict:
    lb = elbv2.describe_load_balancers(Names=["demo-alb"])["LoadBalancers"][0]
    found = elbv2.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]
    return next(ls for ls in found if ls["Port"] == port)


def rules(elbv2, port: int = 80) -> list[tuple[int, str, str]]:
    """(priority, pattern, target group name), sorted by priority."""
    names = {arn: tg["TargetGroupName"] for arn, tg in
             ((tg["TargetGroupArn"], tg) for tg in target_groups(elbv2).values())}
    out = []
    for r in elbv2.describe_rules(ListenerArn=listener(elbv2, port)["ListenerArn"])["Rules"]:
        if r["IsDefault"]:
            continue
        pattern = r["Conditions"][0]["PathPatternConfig"]["Values"][0]
        out.append((int(r["Priority"]), pattern, names[r["Actions"][0]["TargetGroupArn"]]))
    return sorted(out)


def test_apply_creates_one_group_and_rule_per_instance_and_a_lobby(aws):
    elbv2, _, net = aws
    cfg = make_config(net, [1, 2], aws={"idle_timeout": 75, "deregistration_delay": 12})
    reconcile.apply_config(cfg, elbv2)

    groups = target_groups(elbv2)
    assert set(groups) == {"demo-i1-9001", "demo-i2-9002", "demo-lobby"}
    assert targets(elbv2, groups["demo-i1-9001"]["TargetGroupArn"]) == {(net.instances[0], 9001)}
    assert targets(elbv2, groups["demo-lobby"]["TargetGroupArn"]) == {
        (net.instances[0], 9001), (net.instances[1], 9002)}
    assert groups["demo-i2-9002"]["HealthCheckPath"] == "/i2/healthz"
    attrs = elbv2.describe_target_group_attributes(
        TargetGroupArn=groups["demo-i1-9001"]["TargetGroupArn"])["Attributes"]
    assert {"Key": "deregistration_delay.timeout_seconds", "Value": "12"} in attrs
    assert rules(elbv2) == [(1, "/i1/*", "demo-i1-9001"), (2, "/i2/*", "demo-i2-9002")]
    default = listener(elbv2)["DefaultActions"][0]
    assert default["TargetGroupArn"] == groups["demo-lobby"]["TargetGroupArn"]
    lb_arn = listener(elbv2)["LoadBalancerArn"]
    lb_attrs = elbv2.describe_load_balancer_attributes(LoadBalancerArn=lb_arn)["Attributes"]
    assert {"Key": "idle_timeout.timeout_seconds", "Value": "75"} in lb_attrs
    tags = elbv2.describe_tags(ResourceArns=[groups["demo-i2-9002"]["TargetGroupArn"]])
    assert {"Key": "shardchat:instance", "Value": "2"} in tags["TagDescriptions"][0]["Tags"]


def test_second_apply_makes_no_changing_call(aws):
    elbv2, _, net = aws
    cfg = make_config(net, [1, 2, 3])
    reconcile.apply_config(cfg, elbv2)
    recorder = CallRecorder(elbv2)
    plan = reconcile.apply_config(cfg, elbv2)
    assert plan.empty and "No changes" in plan.render()
    assert recorder.calls and recorder.mutating == []


def test_plan_changes_nothing(aws):
    elbv2, _, net = aws
    recorder = CallRecorder(elbv2)
    plan = reconcile.plan_for(make_config(net, [1, 2]), elbv2)
    assert not plan.empty and "+ create load balancer demo-alb" in plan.render()
    assert recorder.mutating == []
    assert elbv2.describe_target_groups()["TargetGroups"] == []


def test_adding_an_instance_adds_its_group_target_and_rule_only(aws):
    elbv2, _, net = aws
    reconcile.apply_config(make_config(net, [1, 2]), elbv2)
    plan = reconcile.apply_config(make_config(net, [1, 2, 3]), elbv2)
    ops = [a.op for a in plan.actions]
    assert sorted(ops) == ["create_rule", "create_target_group", "register_targets",
                           "register_targets"]
    assert rules(elbv2)[-1] == (3, "/i3/*", "demo-i3-9003")
    lobby = target_groups(elbv2)["demo-lobby"]["TargetGroupArn"]
    assert (net.instances[2], 9003) in targets(elbv2, lobby)


def test_removing_an_instance_removes_rule_target_and_group(aws):
    elbv2, _, net = aws
    reconcile.apply_config(make_config(net, [1, 2, 3]), elbv2)
    plan = reconcile.apply_config(make_config(net, [1, 3]), elbv2)
    assert [a.op for a in plan.actions] == ["delete_rule", "deregister_targets",
                                            "delete_target_group"]
    assert rules(elbv2) == [(1, "/i1/*", "demo-i1-9001"), (3, "/i3/*", "demo-i3-9003")]
    groups = target_groups(elbv2)
    assert "demo-i2-9002" not in groups
    assert (net.instances[1], 9002) not in targets(elbv2, groups["demo-lobby"]["TargetGroupArn"])


def test_port_change_replaces_the_group_and_health_change_is_in_place(aws):
    elbv2, _, net = aws
    reconcile.apply_config(make_config(net, [1, 2]), elbv2)
    old_tg1 = target_groups(elbv2)["demo-i1-9001"]["TargetGroupArn"]
    cfg = make_config(net, [1, 2], ports={2: 9202}, aws={"health_check_interval": 30,
                                                          "healthy_threshold": 3})
    plan = reconcile.plan_for(cfg, elbv2)
    text = plan.render()
    assert "cannot change a target group's port" in text
    ops = [a.op for a in plan.actions]
    # create before change before delete: the rule moves only once its new group is ready
    assert ops.index("create_target_group") < ops.index("register_targets") \
        < ops.index("modify_rule") < ops.index("delete_target_group")
    reconcile.run(plan, elbv2)

    groups = target_groups(elbv2)
    assert "demo-i2-9002" not in groups and "demo-i2-9202" in groups
    assert rules(elbv2)[1] == (2, "/i2/*", "demo-i2-9202")
    assert groups["demo-i1-9001"]["TargetGroupArn"] == old_tg1  # changed in place
    assert groups["demo-i1-9001"]["HealthCheckIntervalSeconds"] == 30
    assert groups["demo-i1-9001"]["HealthyThresholdCount"] == 3
    lobby = groups["demo-lobby"]["TargetGroupArn"]
    assert targets(elbv2, lobby) == {(net.instances[0], 9001), (net.instances[1], 9202)}
    assert reconcile.plan_for(cfg, elbv2).empty


def add_foreign(elbv2, net) -> tuple[str, str]:
    """A target group and a rule on our listener that someone else made (no tags)."""
    tg = elbv2.create_target_group(Name="billing", Protocol="HTTP", Port=8080, VpcId=net.vpc,
                                   TargetType="instance")["TargetGroups"][0]["TargetGroupArn"]
    rule = elbv2.create_rule(
        ListenerArn=listener(elbv2)["ListenerArn"], Priority=500,
        Conditions=[{"Field": "path-pattern", "PathPatternConfig": {"Values": ["/billing/*"]}}],
        Actions=[{"Type": "forward", "TargetGroupArn": tg}])["Rules"][0]["RuleArn"]
    return tg, rule


def test_foreign_rule_and_group_survive_apply_and_destroy(aws):
    elbv2, _, net = aws
    reconcile.apply_config(make_config(net, [1, 2]), elbv2)
    foreign_tg, foreign_rule = add_foreign(elbv2, net)

    plan = reconcile.apply_config(make_config(net, [1]), elbv2)
    assert all("billing" not in a.line() for a in plan.actions)
    assert (500, "/billing/*", "billing") in rules(elbv2)

    plan = reconcile.destroy_config(make_config(net, [1]), elbv2)
    assert rules(elbv2) == [(500, "/billing/*", "billing")]
    assert set(target_groups(elbv2)) == {"billing"}
    assert any("kept" in w for w in plan.warnings)
    rule = elbv2.describe_rules(RuleArns=[foreign_rule])["Rules"][0]
    assert rule["Actions"][0]["TargetGroupArn"] == foreign_tg


def test_destroy_removes_everything_it_made(aws):
    elbv2, _, net = aws
    cfg = make_config(net, [1, 2])
    reconcile.apply_config(cfg, elbv2)
    reconcile.destroy_config(cfg, elbv2)
    assert elbv2.describe_target_groups()["TargetGroups"] == []
    assert elbv2.describe_load_balancers()["LoadBalancers"] == []
    assert reconcile.destroy_config(cfg, elbv2).empty


def test_an_instance_past_99_without_a_shard_table_is_refused_before_any_call(aws):
    elbv2, _, net = aws
    cfg = make_config(net, list(range(1, 102)), aws={"target_type": "ip"})
    recorder = CallRecorder(elbv2)
    with pytest.raises(ConfigError) as err:
        reconcile.plan_for(cfg, elbv2)
    assert err.value.key == "aws.shards"
    assert "instance 100" in err.value.message and "shard 2" in err.value.message
    assert recorder.calls == []


def test_foreign_rules_count_against_the_rule_quota(aws):
    elbv2, _, net = aws
    reconcile.apply_config(make_config(net, [1, 2]), elbv2)
    add_foreign(elbv2, net)
    recorder = CallRecorder(elbv2)
    with pytest.raises(LimitError) as err:
        reconcile.plan_for(make_config(net, [1, 2, 3], aws={"max_rules": 3}), elbv2)
    assert "1 rules shardchat does not manage" in err.value.message
    assert "quota increase" in err.value.message
    assert recorder.mutating == []


def test_priority_offset_change_moves_every_rule(aws):
    elbv2, _, net = aws
    reconcile.apply_config(make_config(net, [1, 2, 3]), elbv2)
    cfg = make_config(net, [1, 2, 3], aws={"rule_priority_offset": 1})
    reconcile.apply_config(cfg, elbv2)
    assert [r[:2] for r in rules(elbv2)] == [(2, "/i1/*"), (3, "/i2/*"), (4, "/i3/*")]
    assert reconcile.plan_for(cfg, elbv2).empty


def test_https_listener_with_redirect(aws):
    import boto3

    elbv2, _, net = aws
    acm = boto3.client("acm", region_name="us-east-1")
    cert = acm.request_certificate(DomainName="chat.example.com")["CertificateArn"]
    reconcile.apply_config(make_config(net, [1], aws={"certificate_arn": cert}), elbv2)
    https = listener(elbv2, 443)
    assert https["Protocol"] == "HTTPS"
    assert https["Certificates"][0]["CertificateArn"] == cert
    assert rules(elbv2, 443) == [(1, "/i1/*", "demo-i1-9001")]
    redirect = listener(elbv2, 80)["DefaultActions"][0]
    assert redirect["Type"] == "redirect"
    assert redirect["RedirectConfig"]["Protocol"] == "HTTPS"
    assert redirect["RedirectConfig"]["Port"] == "443"
    assert rules(elbv2, 80) == []


@pytest.mark.parametrize(("change", "key"), [
    ({"instances": [{"number": 1, "port": 9001}]}, "instances[0].ec2_instance_id"),
    ({"aws": {"health_check_timeout": 10}}, "aws.health_check_timeout"),
    ({"aws": {"subnets": ["subnet-1"]}}, "aws.subnets"),
])
def test_invalid_config_names_the_key(aws, change, key):
    from shardchat import config as config_mod

    from .conftest import config_dict

    _, _, net = aws
    data = config_dict(net, [1])
    if "instances" in change:
        data["instances"] = change["instances"]
    data["aws"].update(change.get("aws", {}))
    with pytest.raises(ConfigError) as err:
        reconcile.checked_desired(config_mod.parse(data, env={}))
    assert err.value.key == key
