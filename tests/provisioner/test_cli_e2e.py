"""The installed ``shardchat-provision`` against a moto server, checked with plain boto3."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT, write_config

from .conftest import build_network, provision, write_provision_config


@pytest.fixture
def setup(moto_server, tmp_path):
    ec2, elbv2 = moto_server.client("ec2"), moto_server.client("elbv2")
    net = build_network(ec2)
    return moto_server, elbv2, net, tmp_path


def rule_table(elbv2, listener_arn: str) -> list[tuple[int, str, str]]:
    names = {tg["TargetGroupArn"]: tg["TargetGroupName"]
             for tg in elbv2.describe_target_groups()["TargetGroups"]}
    out = []
    for r in elbv2.describe_rules(ListenerArn=listener_arn)["Rules"]:
        if not r["IsDefault"]:
            out.append((int(r["Priority"]), r["Conditions"][0]["PathPatternConfig"]["Values"][0],
                        names[r["Actions"][0]["TargetGroupArn"]]))
    return sorted(out)


def test_apply_plan_status_destroy(setup):
    server, elbv2, net, tmp = setup
    cfg = write_provision_config(tmp / "c.toml", net, [1, 2])
    common = ("--config", str(cfg), "--endpoint-url", server.url)

    done = provision("apply", "--auto-approve", *common)
    assert done.returncode == 0, done.stderr
    assert "[1/" in done.stdout and "Done." in done.stdout

    groups = {tg["TargetGroupName"]: tg for tg in elbv2.describe_target_groups()["TargetGroups"]}
    assert set(groups) == {"demo-i1-9001", "demo-i2-9002", "demo-lobby"}
    health = elbv2.describe_target_health(
        TargetGroupArn=groups["demo-i2-9002"]["TargetGroupArn"])["TargetHealthDescriptions"]
    assert [(h["Target"]["Id"], h["Target"]["Port"]) for h in health] == [
        (net.instances[1], 9002)]
    lb = elbv2.describe_load_balancers(Names=["demo-alb"])["LoadBalancers"][0]
    listener = elbv2.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"][0]
    assert listener["Port"] == 80
    assert listener["DefaultActions"][0]["TargetGroupArn"] == \
        groups["demo-lobby"]["TargetGroupArn"]
    assert rule_table(elbv2, listener["ListenerArn"]) == [
        (1, "/i1/*", "demo-i1-9001"), (2, "/i2/*", "demo-i2-9002")]

    for command in (("plan",), ("apply", "--auto-approve")):
        again = provision(*command, *common)
        assert again.returncode == 0, again.stderr
        assert "No changes" in again.stdout

    status = provision("status", *common)
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if line.startswith("2 "))
    assert "demo-i2-9002" in row and "/i2/*" in row and f"{net.instances[1]}:9002" in row
    assert "healthy" in row

    gone = provision("destroy", "--auto-approve", *common)
    assert gone.returncode == 0, gone.stderr
    assert elbv2.describe_target_groups()["TargetGroups"] == []
    assert elbv2.describe_load_balancers()["LoadBalancers"] == []


def test_apply_without_approval_changes_nothing(setup):
    server, elbv2, net, tmp = setup
    cfg = write_provision_config(tmp / "c.toml", net, [1])
    done = provision("apply", "--config", str(cfg), "--endpoint-url", server.url, stdin="n\n")
    assert done.returncode == 0, done.stderr
    assert "+ create load balancer demo-alb" in done.stdout
    assert "Nothing changed." in done.stdout
    assert elbv2.describe_load_balancers()["LoadBalancers"] == []


def test_bad_config_exits_2_naming_the_key(setup):
    server, _, net, tmp = setup
    cfg = write_provision_config(tmp / "c.toml", net, [1], aws={"target_type": "instance"})
    text = cfg.read_text().replace("ec2_instance_id", "# ec2_instance_id")
    cfg.write_text(text)
    done = provision("plan", "--config", str(cfg), "--endpoint-url", server.url)
    assert done.returncode == 2
    assert "instances[0].ec2_instance_id" in done.stderr


def test_an_instance_without_a_shard_table_exits_2_before_any_call(setup):
    _, _, net, tmp = setup
    cfg = write_provision_config(tmp / "c.toml", net, list(range(1, 101)),
                                 aws={"target_type": "ip"})
    # no endpoint that answers: the refusal must come before any AWS call
    done = provision("apply", "--auto-approve", "--config", str(cfg),
                     "--endpoint-url", "http://127.0.0.1:9")
    assert done.returncode == 2, done.stderr
    assert "aws.shards" in done.stderr and "instance 100" in done.stderr


def test_aws_refusal_exits_1_with_the_error_code(setup):
    server, elbv2, net, tmp = setup
    cfg = write_provision_config(tmp / "c.toml", net, [1],
                                 aws={"subnets": ["subnet-00000001", "subnet-00000002"]})
    done = provision("apply", "--auto-approve", "--config", str(cfg),
                     "--endpoint-url", server.url)
    assert done.returncode == 1
    assert "AWS refused (" in done.stderr and "Subnet" in done.stderr
    assert elbv2.describe_target_groups()["TargetGroups"] == []


def test_a_bad_config_reads_the_same_in_every_command(tmp_path):
    """``shardchat`` and ``shardchat-provision`` share one start-up: the key at fault, exit 2."""
    cfg = write_config(tmp_path / "c.toml", cluster={"name": "demo", "secret": "s3cret"},
                       instances=[{"number": 1, "port": 70000, "internal_port": 9101}])
    expected = "Config error at instances[0].port: must be a TCP port 1..65535, got 70000"
    check = subprocess.run([sys.executable, "-m", "shardchat", "check", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    plan = provision("plan", "--config", str(cfg), "--endpoint-url", "http://127.0.0.1:9")
    for done in (check, plan):
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines()[0] == expected


def test_a_held_lock_refuses_apply_naming_the_holder_and_watch_records_its_round(setup):
    from provisioner.lock import Lock, ensure_table

    server, elbv2, net, tmp = setup
    cfg = write_provision_config(tmp / "c.toml", net, [1, 2])
    common = ("--config", str(cfg), "--endpoint-url", server.url)
    dynamodb = server.client("dynamodb")
    ensure_table(dynamodb, "shardchat-locks")
    other = Lock(dynamodb, "shardchat-locks", "demo", lease=120)
    other.acquire("apply")

    for command in (("plan",), ("apply", "--auto-approve"), ("destroy", "--auto-approve")):
        done = provision(*command, *common)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Refused (Locked)" in done.stderr and str(other.id) in done.stderr
        assert "(apply) until " in done.stderr and "UTC" in done.stderr
    assert elbv2.describe_load_balancers()["LoadBalancers"] == []
    # a watch round under the held lock changes nothing either
    done = provision("watch", "--once", *common)
    assert done.returncode == 0 and "locked" in done.stdout, done.stdout + done.stderr
    assert elbv2.describe_load_balancers()["LoadBalancers"] == []

    other.release()
    done = provision("watch", "--max-rounds", "2", "--interval", "0.1", *common)
    assert done.returncode == 0, done.stderr
    assert "round 1: changed" in done.stdout and "round 2: ok" in done.stdout
    status = provision("status", *common)
    assert status.returncode == 0, status.stderr
    assert "Last reconcile: " in status.stdout and ": ok, 2 instance(s)" in status.stdout
    assert Lock(dynamodb, "shardchat-locks", "demo", lease=120).holder() is None


def test_an_apply_killed_midway_holds_the_lock_only_until_its_lease_ends(setup):
    """kill -9 of an apply in the middle of its plan (the fault switch kills it once its
    5th action is done): the next apply is refused while the dead holder's lease runs, then
    takes the lock and finishes from what exists."""
    import os
    import signal
    import time

    from provisioner.lock import Lock
    from tests.support import wait_until

    from .conftest import PROVISION, ROOT

    server, elbv2, net, tmp = setup
    cfg = write_provision_config(tmp / "c.toml", net, list(range(1, 25)),
                                 aws={"target_type": "ip", "lock_lease": 10})
    common = ("--config", str(cfg), "--endpoint-url", server.url)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHARDCHAT_FAULT": "provision.after_action",
           "SHARDCHAT_FAULT_AT": "5"}
    killed = subprocess.run([str(PROVISION), "apply", "--auto-approve", *common], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "[5/" in killed.stdout and "[6/" not in killed.stdout  # died after step 5
    lock = Lock(server.client("dynamodb"), "shardchat-locks", "demo", lease=10)
    dead = lock.holder()
    assert dead is not None and dead.command == "apply"  # never released
    made = len(elbv2.describe_target_groups()["TargetGroups"])
    assert elbv2.describe_load_balancers()["LoadBalancers"] and made < 25  # half way

    refused = provision("apply", "--auto-approve", *common)
    assert refused.returncode == 1 and "Refused (Locked)" in refused.stderr
    assert dead.holder in refused.stderr and "(apply) until" in refused.stderr

    wait_until(lambda: time.time() > dead.expires + 0.2, timeout=20, what="the lease ends")
    done = provision("apply", "--auto-approve", *common)
    assert done.returncode == 0, done.stderr
    assert "No changes" in provision("plan", *common).stdout
    lb = elbv2.describe_load_balancers(Names=["demo-alb"])["LoadBalancers"][0]
    listener = elbv2.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"][0]
    rules = [r for r in elbv2.describe_rules(ListenerArn=listener["ListenerArn"])["Rules"]
             if not r["IsDefault"]]
    patterns = sorted(r["Conditions"][0]["PathPatternConfig"]["Values"][0] for r in rules)
    assert patterns == sorted(f"/i{n}/*" for n in range(1, 25))  # each once


def test_a_misspelt_fault_point_is_refused_before_anything_runs(tmp_path):
    import os

    from .conftest import PROVISION, ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHARDCHAT_FAULT": "provision.after_acton"}
    done = subprocess.run([str(PROVISION), "plan", "--config", str(tmp_path / "none.toml")],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "provision.after_acton" in done.stderr, done.stderr


def test_sigterm_ends_watch_between_rounds_at_once_with_the_lock_given_back(setup):
    """systemd stops the watch service with SIGTERM: it must not sit out the interval it is
    waiting, and it leaves the lock free and its last round recorded."""
    import os
    import signal

    from provisioner.lock import Lock
    from tests.support import wait_until

    from .conftest import PROVISION, ROOT

    server, elbv2, net, tmp = setup
    cfg = write_provision_config(tmp / "c.toml", net, [1])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([str(PROVISION), "watch", "--interval", "300", "--config",
                             str(cfg), "--endpoint-url", server.url], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = Lock(server.client("dynamodb"), "shardchat-locks", "demo", lease=120)
    try:
        wait_until(lambda: proc.poll() is None and lock.last() is not None, timeout=60,
                   what="the first round recorded")
        assert lock.last()[1] == "changed"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)  # the wait was 300 s (at least 240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, err
    assert "round 1: changed" in out and "round 2" not in out
    assert lock.holder() is None
    assert [lb["LoadBalancerName"] for lb in elbv2.describe_load_balancers()["LoadBalancers"]
            ] == ["demo-alb"]
