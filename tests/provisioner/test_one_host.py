"""Several instance processes on one host (SPEC section 10): every instance is its own target
group whose one target is the host with that instance's port, and the lobby holds the host
once per port. Against an in-process moto, for instance targets and for IP targets.

moto and AWS differ here, and these tests patch moto to behave like AWS. Stock moto 5.x
keeps a target group's registrations in a dict keyed by the target id alone
(``FakeTargetGroup.targets[id]``), so registering (i-1, 9001) and (i-1, 9002) in one group
leaves only the last, and deregistering (i-1, 9002) would remove whichever port is there.
AWS keys a registration by (id, port): both stay, and each goes on its own. The
``aws_by_port`` fixture swaps moto's register, deregister and health lookup for ones keyed
by (id, port), for the tests of this module only (``monkeypatch`` undoes it after each
test); nothing in the product depends on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.elbv2.exceptions import InvalidTargetError, TargetNotRunning
from moto.elbv2.models import FakeTargetGroup

from provisioner import reconcile
from shardchat import config as config_mod

from .conftest import REGION, CallRecorder, Network, build_network

HOST_PORTS = {1: (9001, 9101), 2: (9002, 9102)}  # instance -> (port, internal_port)


def _key(group: FakeTargetGroup, target: dict[str, Any]) -> tuple[str, int]:
    """A registration's identity as AWS has it: (id, port), the group's port by default."""
    return target["Id"], int(target.get("Port") or group.port)


def _register(self: FakeTargetGroup, targets: list[dict[str, Any]]) -> None:
    for target in targets:
        instance = self.ec2_backend.get_instance_by_id(target["Id"])
        if instance is not None and instance.state != "running":
            raise TargetNotRunning(instance_id=target["Id"])
        key = _key(self, target)
        self.targets[key] = {"Id": key[0], "Port": key[1]}
        self.deregistered_targets.pop(key, None)


def _deregister(self: FakeTargetGroup, targets: list[dict[str, Any]]) -> None:
    for target in targets:
        key = _key(self, target)
        registered = self.targets.pop(key, None)
        if registered is None:
            raise InvalidTargetError()
        self.deregistered_targets[key] = registered


def _health_for(original):
    def health_for(self: FakeTargetGroup, target: dict[str, Any], ec2_backend: Any) -> Any:
        """moto's own health answer, asked about the one registration (id, port) names."""
        registered = self.targets.get(_key(self, target))
        if registered is None:
            return original(self, {"Id": target["Id"], "Port": _key(self, target)[1]},
                            ec2_backend)
        by_port, self.targets = self.targets, {registered["Id"]: registered}
        try:
            return original(self, registered, ec2_backend)
        finally:
            self.targets = by_port
    return health_for


@pytest.fixture
def aws_by_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Network]]:
    """(elbv2, network with ONE running EC2 instance) in an in-process moto whose target
    groups key registrations by (id, port), as AWS does (see the module docstring)."""
    monkeypatch.setattr(FakeTargetGroup, "register", _register)
    monkeypatch.setattr(FakeTargetGroup, "deregister", _deregister)
    monkeypatch.setattr(FakeTargetGroup, "health_for", _health_for(FakeTargetGroup.health_for))
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        yield boto3.client("elbv2", region_name=REGION), build_network(ec2, count=1)


def one_host_config(net: Network, ports: dict[int, tuple[int, int]] | None = None,
                    target_type: str = "instance") -> config_mod.Config:
    """Instances 1, 2 (or those of ``ports``) as processes of the network's one EC2
    instance: one host address, one EC2 id, ports of their own."""
    host_id = net.instances[0]
    instances = [{"number": n, "host": net.ips[host_id], "port": port, "internal_port": internal,
                  "ec2_instance_id": host_id}
                 for n, (port, internal) in (ports or HOST_PORTS).items()]
    aws = {"region": REGION, "load_balancer": "demo-alb", "vpc_id": net.vpc,
           "subnets": net.subnets, "security_groups": [net.security_group],
           "target_type": target_type}
    return config_mod.parse({"cluster": {"name": "demo", "secret": "s3cret"},
                             "instances": instances, "aws": aws}, env={})


def targets_by_group(elbv2: Any) -> dict[str, set[tuple[str, int]]]:
    """Every target group's registered targets as (id, port)."""
    out = {}
    for tg in elbv2.describe_target_groups()["TargetGroups"]:
        health = elbv2.describe_target_health(TargetGroupArn=tg["TargetGroupArn"])
        out[tg["TargetGroupName"]] = {(h["Target"]["Id"], int(h["Target"]["Port"]))
                                      for h in health["TargetHealthDescriptions"]}
    return out


def rule_targets(elbv2: Any) -> dict[str, str]:
    """Path pattern -> the target group its rule forwards to."""
    names = {tg["TargetGroupArn"]: tg["TargetGroupName"]
             for tg in elbv2.describe_target_groups()["TargetGroups"]}
    lb = elbv2.describe_load_balancers(Names=["demo-alb"])["LoadBalancers"][0]
    listener = elbv2.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"][0]
    return {r["Conditions"][0]["PathPatternConfig"]["Values"][0]:
            names[r["Actions"][0]["TargetGroupArn"]]
            for r in elbv2.describe_rules(ListenerArn=listener["ListenerArn"])["Rules"]
            if not r["IsDefault"]}


@pytest.mark.parametrize("target_type", ["instance", "ip"])
def test_two_processes_on_one_host_each_get_the_host_with_their_port(aws_by_port, target_type):
    elbv2, net = aws_by_port
    cfg = one_host_config(net, target_type=target_type)
    reconcile.apply_config(cfg, elbv2)

    host = net.instances[0] if target_type == "instance" else net.ips[net.instances[0]]
    suffix = "" if target_type == "instance" else "-ip"
    groups = targets_by_group(elbv2)
    assert groups == {f"demo-i1-9001{suffix}": {(host, 9001)},
                      f"demo-i2-9002{suffix}": {(host, 9002)},
                      f"demo-lobby{suffix}": {(host, 9001), (host, 9002)}}
    assert rule_targets(elbv2) == {"/i1/*": f"demo-i1-9001{suffix}",
                                   "/i2/*": f"demo-i2-9002{suffix}"}

    recorder = CallRecorder(elbv2)
    again = reconcile.apply_config(cfg, elbv2)
    assert again.empty, again.render()
    assert recorder.calls and recorder.mutating == []


def test_a_process_leaving_the_host_takes_only_its_own_port_out_of_the_lobby(aws_by_port):
    elbv2, net = aws_by_port
    reconcile.apply_config(one_host_config(net, {**HOST_PORTS, 3: (9003, 9103)}), elbv2)
    host = net.instances[0]
    assert targets_by_group(elbv2)["demo-lobby"] == {(host, 9001), (host, 9002), (host, 9003)}

    reconcile.apply_config(one_host_config(net), elbv2)  # instance 3 stops running there
    groups = targets_by_group(elbv2)
    assert "demo-i3-9003" not in groups
    assert groups["demo-lobby"] == {(host, 9001), (host, 9002)}
    assert reconcile.apply_config(one_host_config(net), elbv2).empty


def test_one_process_moving_to_another_port_leaves_its_neighbour_registered(aws_by_port):
    elbv2, net = aws_by_port
    reconcile.apply_config(one_host_config(net), elbv2)
    moved = one_host_config(net, {1: (9001, 9101), 2: (9004, 9102)})
    reconcile.apply_config(moved, elbv2)

    host = net.instances[0]
    groups = targets_by_group(elbv2)
    assert groups == {"demo-i1-9001": {(host, 9001)}, "demo-i2-9004": {(host, 9004)},
                      "demo-lobby": {(host, 9001), (host, 9004)}}
    assert rule_targets(elbv2)["/i2/*"] == "demo-i2-9004"
    assert reconcile.apply_config(moved, elbv2).empty
