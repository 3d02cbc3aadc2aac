"""Scale-in through drain: an instance leaves only once its rooms have moved.

An Auto Scaling group that scales in picks an instance and, when the group has a
termination lifecycle hook (``autoscaling:EC2_INSTANCE_TERMINATING``), holds it in
``Terminating:Wait`` until someone completes the lifecycle action or the hook's heartbeat
timeout runs out. That someone is this module, run by ``shardchat-provision scale-in`` (one
round) and by every round of ``watch``:

1. find the instances of ``aws.autoscaling_groups`` in ``Terminating:Wait`` whose group has
   a termination hook;
2. map each to its shardchat instance number through ``ec2_instance_id`` (the config or the
   EC2 tags, as ``aws.discover`` says);
3. drain it (``cluster/moves.py``: every room moved live to the least loaded others, the
   instance out of placement), sending a lifecycle heartbeat every
   ``aws.lifecycle_heartbeat`` seconds meanwhile so the hook does not time out mid-drain;
4. complete the lifecycle action with ``CONTINUE`` once the instance owns no room; AWS then
   terminates it, it leaves discovery, and the next reconcile deletes its rule and target
   group (the rule's old prefix then reaches the default rule, whose node redirects:
   SPEC section 8).

A drain that leaves rooms behind, or an instance that does not answer, is not completed: the
hook keeps the instance (the heartbeat has stopped, so its timeout now runs) and the next
round tries again. So no room is ever stranded by a scale-in that this module sees, and an
instance that is down loses nothing more by waiting (its follower can adopt its rooms, SPEC
section 9). An instance of the group that is no shardchat instance has nothing to drain and
is completed at once. Groups not in the config are never touched.

A round holds the scale-in lock (``lock.py``, ``SCALE_IN``), renewed while it drains, so two
watchers (or a watcher and the ``scale-in`` command) never drain the same instance at once;
the caller takes it, this module keeps it (``keep``). A round whose lock was taken over
meanwhile finishes the instance under way (its completion is still right: the instance owns
no room) and leaves the others to the new holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from provisioner.lock import LockLost
from shardchat.aws.clients import error_code, paginate
from shardchat.cluster.moves import Refused, drain
from shardchat.config import Config

log = logging.getLogger("shardchat.provision.scalein")

TERMINATING_WAIT = "Terminating:Wait"
TERMINATING_HOOK = "autoscaling:EC2_INSTANCE_TERMINATING"

Say = Callable[[str], None]


@dataclass(frozen=True)
class Leaving:
    """One instance a termination hook holds: what completing its action needs."""

    instance_id: str
    group: str
    hook: str
    number: int | None  # its shardchat instance, None when it is none


@dataclass(frozen=True)
class Outcome:
    leaving: Leaving
    completed: bool
    rooms_moved: int
    rooms_left: int | None
    note: str


def leaving_instances(autoscaling: Any, cfg: Config) -> list[Leaving]:
    """Instances of the configured groups held in ``Terminating:Wait`` by a hook."""
    numbers = {i.ec2_instance_id: i.number for i in cfg.instances if i.ec2_instance_id}
    out: list[Leaving] = []
    for group in cfg.aws.autoscaling_groups:
        hooks = [h["LifecycleHookName"] for h in autoscaling.describe_lifecycle_hooks(
            AutoScalingGroupName=group)["LifecycleHooks"]
            if h["LifecycleTransition"] == TERMINATING_HOOK]
        if not hooks:
            continue
        for asg in paginate(autoscaling, "describe_auto_scaling_groups", "AutoScalingGroups",
                            AutoScalingGroupNames=[group]):
            for inst in asg.get("Instances", []):
                if inst.get("LifecycleState") == TERMINATING_WAIT:
                    iid = inst["InstanceId"]
                    out.append(Leaving(iid, group, hooks[0], numbers.get(iid)))
    return out


def _complete(autoscaling: Any, leaving: Leaving) -> None:
    autoscaling.complete_lifecycle_action(
        LifecycleHookName=leaving.hook, AutoScalingGroupName=leaving.group,
        InstanceId=leaving.instance_id, LifecycleActionResult="CONTINUE")


async def _heartbeats(autoscaling: Any, leaving: Leaving, every: float) -> None:
    """Keep the hook waiting while the drain runs (one heartbeat at once, then every
    ``every`` seconds); a failed heartbeat is logged, the drain goes on."""
    while True:
        try:
            await asyncio.to_thread(
                autoscaling.record_lifecycle_action_heartbeat,
                LifecycleHookName=leaving.hook, AutoScalingGroupName=leaving.group,
                InstanceId=leaving.instance_id)
        except Exception as exc:  # an AWS hiccup must not stop a drain
            log.warning("lifecycle heartbeat for %s failed: %s", leaving.instance_id, exc)
        await asyncio.sleep(every)


async def handle(autoscaling: Any, cfg: Config, leaving: Leaving,
                 say: Say | None = None) -> Outcome:
    """Drain one leaving instance and complete its lifecycle action when it is empty."""
    if leaving.number is None:
        await asyncio.to_thread(_complete, autoscaling, leaving)
        return Outcome(leaving, True, 0, 0, "not a shardchat instance: nothing to drain")
    beating = asyncio.create_task(_heartbeats(autoscaling, leaving, cfg.aws.lifecycle_heartbeat))
    try:
        report = await drain(cfg, leaving.number, say=say)
    except Refused as exc:
        return Outcome(leaving, False, 0, None, str(exc))
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
    moved = len(report.moved)
    if report.remaining != 0:
        left = "unknown" if report.remaining is None else str(report.remaining)
        return Outcome(leaving, False, moved, report.remaining,
                       f"{left} rooms still on instance {leaving.number}"
                       f"{': ' + report.note if report.note else ''}; tried again next round")
    await asyncio.to_thread(_complete, autoscaling, leaving)
    return Outcome(leaving, True, moved, 0, "drained; lifecycle action completed")


async def _renew(keep: Callable[[], None], lost: asyncio.Event) -> None:
    """Renew the scale-in lock once; one that is no longer ours sets ``lost``."""
    try:
        await asyncio.to_thread(keep)
    except LockLost as exc:
        log.warning("%s", exc.message)
        lost.set()


async def _keeping(keep: Callable[[], None], every: float, lost: asyncio.Event) -> None:
    """Renew the scale-in lock every ``every`` seconds until cancelled or lost."""
    while not lost.is_set():
        await asyncio.sleep(every)
        try:
            await _renew(keep, lost)
        except Exception as exc:  # an AWS hiccup: the lease has two more tries before it ends
            log.warning("could not renew the scale-in lock: %s", exc)


async def scale_in_round(autoscaling: Any, cfg: Config, say: Say | None = None,
                         keep: Callable[[], None] | None = None) -> list[Outcome]:
    """One round: every leaving instance, one after the other (each drain already moves
    rooms in parallel, and two drains at once would fight over the same targets).
    ``keep`` renews the caller's scale-in lock (LockLost when it is no longer ours); it is
    called before each instance and every third of ``aws.lock_lease`` while one drains."""
    outcomes: list[Outcome] = []
    lost = asyncio.Event()
    keeper = (asyncio.create_task(_keeping(keep, cfg.aws.lock_lease / 3, lost))
              if keep is not None else None)
    try:
        for leaving in await asyncio.to_thread(leaving_instances, autoscaling, cfg):
            if keep is not None and not lost.is_set():  # still ours before each drain
                await _renew(keep, lost)
            if lost.is_set():
                outcomes.append(Outcome(leaving, False, 0, None, "the scale-in lock was "
                                        "taken over: left to its new holder"))
                continue
            try:
                outcomes.append(await handle(autoscaling, cfg, leaving, say))
            except ClientError as exc:  # this one waits for the next round; the others go on
                outcomes.append(Outcome(leaving, False, 0, None,
                                        f"AWS refused: {error_code(exc)}: {exc}"))
    finally:
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
    return outcomes
