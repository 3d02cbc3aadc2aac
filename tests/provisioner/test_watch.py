"""``shardchat-provision watch`` (provisioner/watch.py) against an in-process moto: each
round follows EC2 tag discovery (new, stopped and terminated instances), a round under a
held lock changes nothing, throttling backs off exponentially with jitter, and every round's
outcome is recorded for ``status``."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from provisioner.lock import Lock, ensure_table
from provisioner.watch import CHANGED, FAILED, JITTER, LOCKED, OK, Round, Watcher
from shardchat.aws.ec2 import resolve_instances

from .conftest import REGION, CallRecorder, add_instances, make_config
from .test_discovery import tags


@pytest.fixture
def lock(aws) -> Lock:
    dynamodb = boto3.client("dynamodb", region_name=REGION)
    ensure_table(dynamodb, "shardchat-locks")
    return Lock(dynamodb, "shardchat-locks", "demo", lease=60)


def watcher(aws, lock: Lock, **kw: Any) -> Watcher:
    elbv2, _, net = aws
    base = make_config(net, [1], aws={"discover": "ec2-tags"})
    return Watcher(load=lambda: resolve_instances(base), elbv2=elbv2, lock=lock,
                   interval=kw.pop("interval", 30.0), say=lambda _line: None, **kw)


def rule_patterns(elbv2: Any) -> list[str]:
    lb = elbv2.describe_load_balancers(Names=["demo-alb"])["LoadBalancers"][0]
    ls = elbv2.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"][0]
    return sorted(r["Conditions"][0]["PathPatternConfig"]["Values"][0]
                  for r in elbv2.describe_rules(ListenerArn=ls["ListenerArn"])["Rules"]
                  if not r["IsDefault"])


def test_rounds_follow_new_stopped_and_terminated_instances(aws, lock):
    elbv2, ec2, net = aws
    add_instances(ec2, net, 1, tags("demo", 1))
    w = watcher(aws, lock)
    assert w.round().outcome == CHANGED
    assert rule_patterns(elbv2) == ["/i1/*"]
    recorder = CallRecorder(elbv2)
    assert w.round().outcome == OK and recorder.mutating == []

    two = add_instances(ec2, net, 1, tags("demo", 2))[0]
    three = add_instances(ec2, net, 1, tags("demo", 3))[0]
    assert w.round().outcome == CHANGED
    assert rule_patterns(elbv2) == ["/i1/*", "/i2/*", "/i3/*"]

    ec2.stop_instances(InstanceIds=[two])
    ec2.terminate_instances(InstanceIds=[three])
    done = w.round()
    assert done.outcome == CHANGED and "deleted" in done.summary
    assert rule_patterns(elbv2) == ["/i1/*"]
    _, outcome, detail = lock.last()
    assert outcome == CHANGED and detail["summary"] == done.summary
    assert lock.holder() is None  # every round gives the lock back


def test_a_round_under_a_held_lock_changes_nothing_and_is_not_recorded(aws, lock):
    elbv2, ec2, net = aws
    add_instances(ec2, net, 1, tags("demo", 1))
    other = Lock(lock.dynamodb, lock.table, "demo", lease=60)
    other.acquire("apply")
    recorder = CallRecorder(elbv2)
    done = watcher(aws, lock).round()
    assert done.outcome == LOCKED and "(apply)" in done.summary
    assert recorder.mutating == [] and lock.last() is None
    other.release()
    assert watcher(aws, lock).round().outcome == CHANGED


def test_throttling_backs_off_exponentially_with_jitter_then_recovers(aws, lock):
    elbv2, ec2, net = aws
    add_instances(ec2, net, 1, tags("demo", 1))
    throttled = {"left": 3}

    def throttle(**_: Any) -> None:
        if throttled["left"]:
            throttled["left"] -= 1
            raise ClientError({"Error": {"Code": "Throttling", "Message": "Rate exceeded"}},
                              "DescribeLoadBalancers")
    elbv2.meta.events.register("before-call.*.DescribeLoadBalancers",
                               throttle)
    w = watcher(aws, lock, interval=2.0)
    delays = []
    for expected in (4.0, 8.0, 16.0):
        done = w.round()
        assert done.outcome == FAILED and done.code == "Throttling", done
        delays.append(w.delay())
        assert expected * 0.8 <= delays[-1] <= expected * 1.2
    assert lock.last()[1] == FAILED and "throttled" in lock.last()[2]["summary"]
    # jittered, not merely inside the band: watchers throttled together must not retry in
    # step (50 draws none of them below, or none above, 5 % of the base: 1 run in 10**10)
    spread = [w.delay() / 16.0 for _ in range(50)]
    assert min(spread) < 0.95 and max(spread) > 1.05 and all(0.8 <= f <= 1.2 for f in spread)
    assert w.round().outcome == CHANGED
    assert 1.6 <= w.delay() <= 2.4  # back to the interval


def test_a_backed_off_reconcile_still_drains_leaving_instances_every_interval(aws, lock):
    """AWS keeps throttling the load balancer calls, so reconcile rounds back off to
    minutes apart; a termination hook waits only its heartbeat timeout, so the leaving
    instances must still be looked at every interval. Time is the watcher's own clock here,
    advanced by its waits: no real waiting."""
    elbv2, ec2, net = aws
    add_instances(ec2, net, 1, tags("demo", 1))

    def throttle(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "Throttling", "Message": "Rate exceeded"}},
                          "DescribeLoadBalancers")
    elbv2.meta.events.register("before-call.*.DescribeLoadBalancers", throttle)
    now = [0.0]

    def wait(seconds: float) -> bool:
        now[0] += seconds
        return False
    drained_at: list[float] = []
    found = resolve_instances(make_config(net, [1], aws={"discover": "ec2-tags"}))
    w = Watcher(load=lambda: found, elbv2=elbv2, lock=lock, interval=10.0, max_rounds=5,
                say=lambda _line: None, clock=lambda: now[0], wait=wait,
                scale_in=lambda _cfg: drained_at.append(now[0]))
    w.run()
    assert [r.outcome for r in w.rounds] == [FAILED] * 5
    assert now[0] > 10.0 * (2 + 4 + 8 + 16) * (1 - JITTER)  # the reconcile did back off
    gaps = [b - a for a, b in itertools.pairwise(drained_at)]
    assert drained_at[0] == 0.0 and max(gaps) <= 10.0 + 1e-9, drained_at
    assert len(drained_at) > 5  # more drains than rounds


def test_run_stops_after_max_rounds(aws, lock):
    _, ec2, net = aws
    add_instances(ec2, net, 1, tags("demo", 1))
    w = watcher(aws, lock, interval=0.1, max_rounds=3)
    last = w.run()
    assert [r.outcome for r in w.rounds] == [CHANGED, OK, OK] and last is w.rounds[-1]


def test_a_broken_config_fails_the_round_naming_the_key(aws, lock):
    _, ec2, net = aws
    add_instances(ec2, net, 1, tags("demo", 1, port="70000"))
    done = watcher(aws, lock).round()
    assert done.outcome == FAILED and "instances[0].port" in done.summary


class Timed(Watcher):
    """A watcher that notes when each of its reconciles (the part under the lock) ran."""

    spans: list[tuple[float, float, str]]

    def _reconcile(self, cfg):  # type: ignore[no-untyped-def]
        began = time.monotonic()
        try:
            return super()._reconcile(cfg)
        finally:
            self.spans.append((began, time.monotonic(), self.lock.id or "?"))


def test_two_watchers_at_once_take_turns_and_build_the_alb_once(aws, lock,
                                                                 one_call_at_a_time):
    """Two watchers (two hosts, for availability) started at the same moment: their
    reconciles never overlap, one round builds the ALB, every other round finds it done or
    the lock held, and nothing fails. Each moto call is made one step, as each AWS call is
    (``one_call_at_a_time``); the interleaving of whole rounds is free."""
    elbv2, ec2, net = aws
    for n in (1, 2, 3):
        add_instances(ec2, net, 1, tags("demo", n))
    base = make_config(net, [1], aws={"discover": "ec2-tags"})
    spans: list[tuple[float, float, str]] = []
    start = threading.Barrier(2)
    watchers = []
    for _ in range(2):
        w = Timed(load=lambda: resolve_instances(base),
                  elbv2=boto3.client("elbv2", region_name=REGION),
                  lock=Lock(lock.dynamodb, lock.table, "demo", lease=60),
                  interval=0.01, max_rounds=8, say=lambda _line: None)
        w.spans = spans
        watchers.append(w)
    done: list[Round | None] = []

    def run(w: Watcher) -> None:
        start.wait(timeout=30)
        done.append(w.run())
    threads = [threading.Thread(target=run, args=(w,)) for w in watchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(done) == 2
    outcomes = [r.outcome for w in watchers for r in w.rounds]
    assert FAILED not in outcomes, [r for w in watchers for r in w.rounds]
    assert outcomes.count(CHANGED) == 1 and set(outcomes) <= {CHANGED, OK, LOCKED}
    ordered = sorted(spans)
    assert len(ordered) == outcomes.count(CHANGED) + outcomes.count(OK)
    for (_, ended, who), (began, _, other) in itertools.pairwise(ordered):
        assert ended <= began, f"{who} and {other} reconciled at the same time"
    assert rule_patterns(elbv2) == ["/i1/*", "/i2/*", "/i3/*"]
    assert lock.holder() is None
