"""``shardchat-provision watch``: the reconcile loop, run continuously.

The shape of a Kubernetes controller (the AWS Load Balancer Controller's): every round
reads the desired state afresh (the config file, and with ``aws.discover = "ec2-tags"`` the
running EC2 instances, so new instances get their target group and rule, and stopped or
terminated ones lose theirs), diffs it against every shard's ALB and applies the
difference, under the state lock (``lock.py``) so a round never interleaves with an apply
or another watcher. Each round's outcome is recorded in the lock table for ``status``.

Throttling: botocore's adaptive retry mode (``shardchat/aws/clients.py``) slows every
client down while AWS throttles; a round that still fails on throttling, or on any AWS
error, waits an exponentially longer, jittered time before the next, up to
``MAX_BACKOFF``. A round that finds the lock held just waits for the next one.

Scale-in does not back off with the reconcile: while a long wait runs, the leaving
instances are still drained every interval (``_pause``), because a termination hook only
waits its heartbeat timeout (minutes) before AWS terminates the instance, drained or not.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from provisioner import reconcile
from provisioner.actions import Action
from provisioner.apply import THROTTLE_CODES
from provisioner.lock import Lock, LockHeld, LockLost
from provisioner.plan import ConflictError
from shardchat.aws.clients import error_code, error_message
from shardchat.config import Config, ConfigError

MAX_BACKOFF = 600.0  # seconds: the longest wait after failed rounds
JITTER = 0.2  # each wait is its length times a random factor in [1 - JITTER, 1 + JITTER]

OK, CHANGED, FAILED, LOCKED = "ok", "changed", "failed", "locked"


@dataclass
class Round:
    """How one round ended."""

    outcome: str  # OK (nothing to change), CHANGED, FAILED or LOCKED
    summary: str
    code: str = ""  # the error code of a failed round
    actions: int = 0


@dataclass
class Watcher:
    """Runs rounds until ``stop`` is set or ``max_rounds`` have run."""

    load: Callable[[], Config]  # the config of this round (discovery included)
    elbv2: Any
    lock: Lock
    interval: float
    max_rounds: int | None = None
    say: Callable[[str], None] = print
    # after each round's reconcile: drain the instances a termination lifecycle hook holds
    # (``scalein.py``), outside the state lock, under the scale-in lock the callable takes
    # (a drain moves rooms, not ALB resources, and may take minutes); run in LOCKED rounds
    # too; None when no Auto Scaling group is watched
    scale_in: Callable[[Config], None] | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    clock: Callable[[], float] = time.monotonic
    # waits up to its argument, True when stopped meanwhile; None: ``stop.wait``
    wait: Callable[[float], bool] | None = None
    failures: int = 0  # rounds in a row that failed
    rounds: list[Round] = field(default_factory=list)
    _cfg: Config | None = None  # this round's config, once it loaded and checked

    def delay(self) -> float:
        """The wait before the next round: the interval, or after failures the interval
        doubled per failure in a row (at most MAX_BACKOFF), jittered either way."""
        base = self.interval if not self.failures else min(
            MAX_BACKOFF, self.interval * 2 ** self.failures)
        return base * random.uniform(1 - JITTER, 1 + JITTER)

    def run(self) -> Round | None:
        """Rounds until stopped; returns the last round (None when stopped before any)."""
        while not self.stop.is_set():
            done = self.round()
            self.rounds.append(done)
            self.say(f"round {len(self.rounds)}: {done.outcome}: {done.summary}")
            if self.max_rounds is not None and len(self.rounds) >= self.max_rounds:
                break
            self._pause(self.delay())
        return self.rounds[-1] if self.rounds else None

    def _pause(self, total: float) -> None:
        """Wait ``total`` seconds before the next round. A wait longer than one jittered
        interval (a backoff) is cut into intervals, and after each the leaving instances
        are drained, so a failing reconcile never starves a termination hook."""
        wait = self.wait or self.stop.wait
        if self.scale_in is None or total <= self.interval * (1 + JITTER):
            wait(total)
            return
        deadline = self.clock() + total
        while (left := deadline - self.clock()) > 0:
            if wait(min(left, self.interval)):
                return
            if deadline - self.clock() > 0:
                self._scale_in_only()

    def _scale_in_only(self) -> None:
        try:
            cfg = self.load()
        except (ConfigError, ClientError, BotoCoreError) as exc:
            self.say(f"could not read the instances for the leaving ones: {exc}")
            return
        self._drain(cfg)

    def _drain(self, cfg: Config) -> None:
        if self.scale_in is None:
            return
        try:
            self.scale_in(cfg)
        except (ClientError, BotoCoreError) as exc:
            self.say(f"could not handle the leaving instances: {exc}")

    def round(self) -> Round:
        """One reconcile; its outcome is recorded for ``status`` unless the lock was held
        (then the holder's round is the one that counts)."""
        done = self._round()
        if self._cfg is not None:
            self._drain(self._cfg)
        if done.outcome != LOCKED:
            try:
                self.lock.record(done.outcome, {"summary": done.summary, "code": done.code,
                                                "actions": done.actions})
            except (ClientError, BotoCoreError) as exc:
                self.say(f"could not record the round's outcome: {exc}")
        return done

    def _round(self) -> Round:
        self._cfg = None
        try:
            cfg = self.load()
            # scale-in needs only the instances: a round the provisioner refuses (an
            # instance past the shard tables, a quota) must still drain the leaving ones,
            # or their hooks time out and AWS terminates them with their rooms
            self._cfg = cfg
            reconcile.checked_desired(cfg)
        except ConfigError as exc:
            return self._failed("config", f"config error at {exc.key}: {exc.message}")
        except (ClientError, BotoCoreError) as exc:
            return self._aws_failed(exc, "reading the instances")
        try:
            self.lock.acquire("watch")
        except LockHeld as exc:
            return Round(LOCKED, exc.message)
        except (ClientError, BotoCoreError) as exc:
            return self._aws_failed(exc, "taking the lock")
        try:
            return self._reconcile(cfg)
        except (LockLost, ConflictError) as exc:
            return self._failed(exc.code, exc.message)
        except ConfigError as exc:
            return self._failed("config", f"config error at {exc.key}: {exc.message}")
        except (ClientError, BotoCoreError) as exc:
            return self._aws_failed(exc, "reconciling")
        finally:
            self._release()

    def _release(self) -> None:
        try:
            self.lock.release()
        except (ClientError, BotoCoreError) as exc:  # its lease ends it anyway
            self.say(f"could not release the lock (its lease will end it): {exc}")

    def _reconcile(self, cfg: Config) -> Round:
        fleet = reconcile.plan_for(cfg, self.elbv2)
        shards = len(fleet.parts)
        if fleet.empty:
            self.failures = 0
            return Round(OK, f"{len(cfg.instances)} instance(s) on {shards} load "
                         "balancer(s) match the config")

        def step(idx: int, total: int, action: Action) -> None:
            self.lock.renew_if_due()
            self.say(f"  [{idx}/{total}] {action.line()}")
        reconcile.run(fleet, self.elbv2, step)
        self.failures = 0
        c = fleet.counts()
        return Round(CHANGED, f"{c['create']} created, {c['change']} changed, "
                     f"{c['delete']} deleted on {shards} load balancer(s)",
                     actions=len(fleet.actions))

    def _failed(self, code: str, message: str) -> Round:
        self.failures += 1
        return Round(FAILED, message, code=code)

    def _aws_failed(self, exc: ClientError | BotoCoreError, doing: str) -> Round:
        if isinstance(exc, ClientError):
            code = error_code(exc)
            what = "throttled" if code in THROTTLE_CODES else "refused"
            return self._failed(code, f"AWS {what} ({code}) while {doing}: "
                                f"{error_message(exc)}")
        return self._failed("aws", f"AWS call failed while {doing}: {exc}")
