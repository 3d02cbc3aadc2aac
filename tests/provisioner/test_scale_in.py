"""Scale-in through drain, on moto: a leaving instance's rooms move before AWS terminates it.

Three real nodes on loopback are the EC2 instances of one Auto Scaling group (in-process
moto) with a termination lifecycle hook. The group scales in and picks instance 3; the
scale-in round must move every room of instance 3, live, while members keep sending, keep
the hook waiting with heartbeats meanwhile, and only then complete the lifecycle action.
Afterwards the instance is gone from EC2-tag discovery, and the next apply deletes its rule
and target group.

moto 5 models lifecycle hooks but not their effect: nothing enters ``Terminating:Wait`` and
``CompleteLifecycleAction`` / ``RecordLifecycleActionHeartbeat`` are not implemented. The
``lifecycle`` fixture patches those in (a scale-in that picks a given instance puts it in
``Terminating:Wait``; completing the action terminates it and takes it out of the group),
recording every call, so the test sees exactly what AWS would have been asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from click.testing import CliRunner
from moto.autoscaling import models as asg_models
from moto.autoscaling import responses as asg_responses
from moto.core.responses import EmptyResult

from provisioner import cli, reconcile
from provisioner.lock import SCALE_IN, Lock, LockLost, ensure_table
from provisioner.scalein import TERMINATING_HOOK, TERMINATING_WAIT, scale_in_round
from shardchat import config as config_mod
from shardchat.aws.clients import make_clients
from shardchat.aws.ec2 import resolve_instances
from shardchat.aws.tags import TAG_CLUSTER, TAG_INSTANCE
from tests.conftest import create_room, open_client
from tests.moves import Sender, assert_one_owner_holds, settled, stats
from tests.provisioner.conftest import MOTO_AMI, REGION, config_dict
from tests.support import (
    SECRET,
    TEST_RATE_LIMITS,
    NodeProcess,
    async_wait_until,
    distinct_free_ports,
    start_nodes,
    write_config,
)

GROUP = "chat-nodes"
HOOK = "drain-rooms"
CLUSTER = "scalein"


class Lifecycle:
    """The calls the patched moto received: heartbeats and completions, in order."""

    def __init__(self) -> None:
        self.heartbeats: list[str] = []
        self.completed: list[tuple[str, str]] = []  # (instance id, result)

    def scale_in(self, backend: Any, instance_id: str) -> None:
        """What AWS does when a scale-in picks ``instance_id`` and a hook holds it."""
        group = backend.autoscaling_groups[GROUP]
        for state in group.instance_states:
            if state.instance.id == instance_id:
                state.lifecycle_state = TERMINATING_WAIT


@pytest.fixture
def lifecycle(monkeypatch: pytest.MonkeyPatch) -> Iterator[Lifecycle]:
    seen = Lifecycle()

    def heartbeat(self: Any) -> EmptyResult:
        seen.heartbeats.append(self._get_param("InstanceId"))
        return EmptyResult()

    def complete(self: Any) -> EmptyResult:
        iid = self._get_param("InstanceId")
        backend = self.autoscaling_backend
        group = backend.autoscaling_groups[self._get_param("AutoScalingGroupName")]
        waiting = [s for s in group.instance_states if s.instance.id == iid
                   and s.lifecycle_state == TERMINATING_WAIT]
        assert waiting, f"{iid} is not in {TERMINATING_WAIT}: AWS would refuse"
        seen.completed.append((iid, self._get_param("LifecycleActionResult")))
        group.instance_states = [s for s in group.instance_states if s.instance.id != iid]
        group.desired_capacity = len(group.instance_states)
        backend.ec2_backend.terminate_instances([iid])
        return EmptyResult()

    monkeypatch.setattr(asg_responses.AutoScalingResponse, "record_lifecycle_action_heartbeat",
                        heartbeat, raising=False)
    monkeypatch.setattr(asg_responses.AutoScalingResponse, "complete_lifecycle_action",
                        complete, raising=False)
    yield seen


def _backend() -> Any:
    return asg_models.autoscaling_backends["123456789012"][REGION]


@pytest.fixture
def fleet(aws, tmp_path) -> Iterator[dict[str, Any]]:
    """An Auto Scaling group of three instances, tagged as instances 1-3 of the cluster, a
    termination hook on it, and three loopback nodes standing for them."""
    elbv2, ec2, net = aws
    autoscaling = boto3.client("autoscaling", region_name=REGION)
    ec2.create_launch_template(LaunchTemplateName="chat", LaunchTemplateData={
        "ImageId": MOTO_AMI, "InstanceType": "t3.small"})
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=GROUP, LaunchTemplate={"LaunchTemplateName": "chat"},
        MinSize=0, MaxSize=5, DesiredCapacity=3, VPCZoneIdentifier=net.subnets[0])
    autoscaling.put_lifecycle_hook(LifecycleHookName=HOOK, AutoScalingGroupName=GROUP,
                                   LifecycleTransition=TERMINATING_HOOK, HeartbeatTimeout=300,
                                   DefaultResult="CONTINUE")
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])
    ids = sorted(i["InstanceId"] for i in group["AutoScalingGroups"][0]["Instances"])
    for n, iid in enumerate(ids, start=1):
        ec2.create_tags(Resources=[iid], Tags=[{"Key": TAG_CLUSTER, "Value": CLUSTER},
                                               {"Key": TAG_INSTANCE, "Value": str(n)}])
    ports = iter(distinct_free_ports(6))
    instances = [{"number": n, "host": "127.0.0.1", "port": next(ports),
                  "internal_port": next(ports), "ec2_instance_id": iid}
                 for n, iid in enumerate(ids, start=1)]
    aws_table = {**config_dict(net, [1], name=CLUSTER)["aws"],
                 "autoscaling_groups": [GROUP], "lifecycle_heartbeat": 0.2}
    path = write_config(tmp_path / "shardchat.toml", instances=instances,
                        cluster={"name": CLUSTER, "secret": SECRET,
                                 "data_dir": str(tmp_path / "data")},
                        node=dict(TEST_RATE_LIMITS), aws=aws_table)
    nodes = [NodeProcess(path, inst, tmp_path) for inst in instances]
    start_nodes(nodes)
    try:
        yield {"autoscaling": autoscaling, "elbv2": elbv2, "ec2": ec2, "net": net,
               "ids": ids, "nodes": nodes, "cfg": config_mod.load(path),
               "aws_table": aws_table}
    finally:
        for node in nodes:
            node.stop()


def tag_config(fleet: dict[str, Any]) -> config_mod.Config:
    """The provisioner's view: instances from EC2 tags, as ``watch`` reads them."""
    raw = {"cluster": {"name": CLUSTER, "secret": SECRET},
           "instances": [{"number": 1, "host": "10.0.0.1", "port": 9001,
                          "internal_port": 9101}],
           "aws": {**fleet["aws_table"], "discover": "ec2-tags"}}
    return resolve_instances(config_mod.parse(raw, env={}), None)


def apply(cfg: config_mod.Config) -> None:
    reconcile.apply_config(cfg, make_clients(cfg.aws.region, None).elbv2)


def rule_prefixes(elbv2: Any) -> set[str]:
    lb = elbv2.describe_load_balancers()["LoadBalancers"][0]["LoadBalancerArn"]
    listener = elbv2.describe_listeners(LoadBalancerArn=lb)["Listeners"][0]["ListenerArn"]
    return {v for r in elbv2.describe_rules(ListenerArn=listener)["Rules"]
            for c in r["Conditions"]
            for v in c.get("PathPatternConfig", {}).get("Values") or c.get("Values", [])}


async def test_a_leaving_instance_is_drained_before_its_lifecycle_action_completes(
        fleet, lifecycle):
    one, two, three = fleet["nodes"]
    apply(tag_config(fleet))
    assert any(p.startswith("/i3/") for p in rule_prefixes(fleet["elbv2"]))

    rooms = [await asyncio.to_thread(create_room, three, f"Leaving {i}", True) for i in range(2)]
    members = [await open_client(three, room, name=f"m{i}") for i, room in enumerate(rooms)]
    senders = [Sender(m, f"r{i}").start() for i, m in enumerate(members)]
    await async_wait_until(lambda: all(len(s.acked) >= 3 for s in senders),
                           what="members chatting on instance 3")

    lifecycle.scale_in(_backend(), fleet["ids"][2])
    outcomes = await scale_in_round(fleet["autoscaling"], fleet["cfg"])
    for s in senders:
        await s.stop()

    assert [(o.leaving.number, o.completed, o.rooms_moved) for o in outcomes] == [(3, True, 2)]
    assert lifecycle.completed == [(fleet["ids"][2], "CONTINUE")]
    assert fleet["ids"][2] in lifecycle.heartbeats  # the hook was kept waiting meanwhile
    assert stats(three)["rooms"] == 0
    for room, sender, member in zip(rooms, senders, members, strict=True):
        owner = settled(fleet["nodes"], room["id"])
        assert owner in (one, two), f"room {room['id']} has no single owner"
        await assert_one_owner_holds(owner, three, room, sender.acked, member.token)
        await member.close()

    # terminated: out of discovery, and the next reconcile removes its rule and target group
    cfg = tag_config(fleet)
    assert [i.number for i in cfg.instances] == [1, 2]
    apply(cfg)
    assert not any(p.startswith("/i3/") for p in rule_prefixes(fleet["elbv2"]))
    groups = [tg["TargetGroupName"] for tg in
              fleet["elbv2"].describe_target_groups()["TargetGroups"]]
    assert not any(name.endswith("-i3") for name in groups), groups


async def test_an_instance_that_does_not_answer_is_not_let_go(fleet, lifecycle):
    """Its rooms cannot be moved, so the action is not completed: the hook keeps it, and the
    next round tries again (its follower may adopt its rooms meanwhile)."""
    three = fleet["nodes"][2]
    await asyncio.to_thread(create_room, three, "Stranded?", False)
    three.kill()
    lifecycle.scale_in(_backend(), fleet["ids"][2])
    outcomes = await scale_in_round(fleet["autoscaling"], fleet["cfg"])
    assert [(o.leaving.number, o.completed) for o in outcomes] == [(3, False)]
    assert "does not answer" in outcomes[0].note
    assert lifecycle.completed == []
    state = fleet["ec2"].describe_instances(InstanceIds=[fleet["ids"][2]])
    assert state["Reservations"][0]["Instances"][0]["State"]["Name"] == "running"


async def test_groups_without_a_termination_hook_are_left_alone(fleet, lifecycle):
    three = fleet["nodes"][2]
    await asyncio.to_thread(create_room, three, "Staying", False)
    fleet["autoscaling"].delete_lifecycle_hook(LifecycleHookName=HOOK,
                                               AutoScalingGroupName=GROUP)
    lifecycle.scale_in(_backend(), fleet["ids"][2])
    assert await scale_in_round(fleet["autoscaling"], fleet["cfg"]) == []
    assert lifecycle.completed == []
    assert stats(three)["rooms"] == 1 and not stats(three)["drained"]


def test_the_command_lets_a_drained_instance_go_and_says_so(fleet, lifecycle):
    three = fleet["nodes"][2]
    create_room(three, "Command", False)
    lifecycle.scale_in(_backend(), fleet["ids"][2])
    result = CliRunner().invoke(cli.main, ["scale-in", "--config", fleet["cfg"].source])
    assert result.exit_code == 0, result.output
    assert f"{fleet['ids'][2]} (instance 3 of {GROUP}): let go, 1 room moved" in result.output
    assert lifecycle.completed == [(fleet["ids"][2], "CONTINUE")]
    again = CliRunner().invoke(cli.main, ["scale-in", "--config", fleet["cfg"].source])
    assert again.exit_code == 0 and f"No instance of {GROUP} is leaving." in again.output


def test_every_round_of_watch_lets_the_drained_instances_go(fleet, lifecycle):
    three = fleet["nodes"][2]
    create_room(three, "Watched", False)
    lifecycle.scale_in(_backend(), fleet["ids"][2])
    result = CliRunner().invoke(cli.main, ["watch", "--once", "--config", fleet["cfg"].source])
    assert result.exit_code == 0, result.output
    assert "(instance 3 of chat-nodes): let go, 1 room moved" in result.output
    assert lifecycle.completed == [(fleet["ids"][2], "CONTINUE")]
    assert stats(three)["rooms"] == 0


def test_one_scale_in_at_a_time_a_second_one_touches_nothing(fleet, lifecycle):
    """Two watchers (or a watcher and the command) must never drain one instance at once:
    while another run holds the scale-in lock, the command is refused and a watch round
    reconciles but leaves the leaving instance alone; once it is free, the next one drains."""
    three = fleet["nodes"][2]
    create_room(three, "Twice?", False)
    lifecycle.scale_in(_backend(), fleet["ids"][2])
    cfg = fleet["cfg"]
    dynamodb = make_clients(cfg.aws.region, None).dynamodb
    ensure_table(dynamodb, cfg.aws.lock_table)
    other = Lock(dynamodb, cfg.aws.lock_table, CLUSTER, lease=120, name=SCALE_IN)
    other.acquire("scale-in")

    refused = CliRunner().invoke(cli.main, ["scale-in", "--config", cfg.source])
    assert refused.exit_code == 1, refused.output
    assert "Refused (Locked): the scale-in lock of cluster scalein" in refused.output
    assert str(other.id) in refused.output
    watched = CliRunner().invoke(cli.main, ["watch", "--once", "--config", cfg.source])
    assert watched.exit_code == 0, watched.output
    assert "round 1: changed" in watched.output  # the ALB part does not wait for a drain
    assert "scale-in skipped this round: the scale-in lock" in watched.output
    assert lifecycle.completed == [] and lifecycle.heartbeats == []
    assert stats(three)["rooms"] == 1 and not stats(three)["drained"]
    status = CliRunner().invoke(cli.main, ["status", "--config", cfg.source])
    assert status.exit_code == 0, status.output
    assert f"the scale-in lock is held by {other.id} (scale-in) until" in status.output

    other.release()
    done = CliRunner().invoke(cli.main, ["scale-in", "--config", cfg.source])
    assert done.exit_code == 0, done.output
    assert lifecycle.completed == [(fleet["ids"][2], "CONTINUE")]
    assert other.holder() is None  # given back at the end of the round


def test_a_round_refused_for_its_shard_tables_still_drains_the_leaving_instance(
        fleet, lifecycle, tmp_path):
    """The 100th instance joined before the [[aws.shards]] tables: every round's reconcile
    is refused (naming aws.shards) until they exist, but a leaving instance must still be
    drained, or its hook times out and AWS terminates it with its rooms."""
    three = fleet["nodes"][2]
    create_room(three, "Still drained", False)
    cfg = fleet["cfg"]
    spare_port, spare_internal = distinct_free_ports(2)
    instances = [{"number": i.number, "host": i.host, "port": i.port,
                  "internal_port": i.internal_port, "ec2_instance_id": i.ec2_instance_id}
                 for i in cfg.instances]
    instances.append({"number": 100, "host": "127.0.0.1", "port": spare_port,
                      "internal_port": spare_internal, "ec2_instance_id": fleet["ids"][0]})
    path = write_config(tmp_path / "past-99.toml", instances=instances,
                        cluster={"name": CLUSTER, "secret": SECRET}, node=dict(TEST_RATE_LIMITS),
                        aws=fleet["aws_table"])
    lifecycle.scale_in(_backend(), fleet["ids"][2])
    result = CliRunner().invoke(cli.main, ["watch", "--once", "--config", str(path)])
    assert result.exit_code == 1, result.output  # the round failed ...
    assert "round 1: failed: config error at aws.shards: instance 100" in result.output
    # ... and the leaving instance was drained and let go all the same
    assert "(instance 3 of chat-nodes): let go, 1 room moved" in result.output
    assert lifecycle.completed == [(fleet["ids"][2], "CONTINUE")]
    assert stats(three)["rooms"] == 0


async def test_a_round_whose_scale_in_lock_was_taken_over_drains_nothing_more(fleet, lifecycle):
    """Its lease ran out (a stalled host) and another watcher holds the lock now: the
    leaving instances are that one's to drain, so this round touches none of them."""
    two, three = fleet["nodes"][1:]
    for node in (two, three):
        await asyncio.to_thread(create_room, node, "Not mine", False)
    for iid in fleet["ids"][1:]:
        lifecycle.scale_in(_backend(), iid)

    def taken_over() -> None:
        raise LockLost(CLUSTER, SCALE_IN)
    outcomes = await scale_in_round(fleet["autoscaling"], fleet["cfg"], keep=taken_over)
    assert sorted((o.leaving.number, o.completed) for o in outcomes) == [(2, False), (3, False)]
    assert all("taken over" in o.note for o in outcomes)
    assert lifecycle.completed == [] and lifecycle.heartbeats == []
    assert stats(two)["rooms"] == 1 and stats(three)["rooms"] == 1
