"""The state lock: one plan, apply, destroy or watch round of a cluster at a time.

Two of them interleaving would each plan from a state the other is changing (one creates a
rule the other deletes as unknown). The lock is one DynamoDB item per cluster, taken with a
conditional put that succeeds only when no item exists, the item's lease has run out, or we
already hold it. A lease, not a flag: a holder that crashed (kill -9, a lost host) stops
renewing and anyone may take the lock once its expiry has passed, so nothing waits forever.
A holder renews before each step of a long apply and each watch round, and gives the lock
up at the end with a delete conditional on still holding it.

Scale-in (``scalein.py``) has a lock of its own in the same table, ``<cluster>/scale-in``:
it drains nodes rather than changing the ALB, and a drain may take minutes, so it must not
hold the state lock (apply would wait for it), but two watchers must not drain the same
leaving instance at once either.

The same table keeps the last reconcile of ``watch`` (when, how it ended, what it changed)
in an item of its own, so ``status`` can show it whoever holds the lock. The table is
created (on demand billing) when absent. Expiry compares wall clocks of different hosts:
leases are minutes long, so the few seconds clocks drift never matter.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from shardchat.aws.clients import error_code

KEY = "lock_id"
STATE = "lock"  # the state lock's item: plan, apply, destroy, a watch round
SCALE_IN = "scale-in"  # the scale-in lock's item: draining the instances hooks hold
TABLE_ACTIVE_WAIT = 60.0  # seconds a new table may take to become usable
Clock = Callable[[], float]


def _label(name: str) -> str:
    return "lock" if name == STATE else f"{name} lock"


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Holder:
    """Who holds the lock, for what, and until when (epoch seconds)."""

    holder: str
    command: str
    expires: float

    def describe(self, now: float) -> str:
        left = self.expires - now
        until = (f"until {_when(self.expires)} (in {left:.0f} s)" if left > 0
                 else f"and its lease ran out at {_when(self.expires)}")
        return f"{self.holder} ({self.command}) {until}"


class LockHeld(Exception):
    """Someone else holds the lock; ``holder`` says who and until when."""

    code = "Locked"

    def __init__(self, cluster: str, table: str, holder: Holder | None, now: float,
                 name: str = STATE):
        self.holder = holder
        who = holder.describe(now) if holder else "another run (it just changed hands)"
        super().__init__(f"the {_label(name)} of cluster {cluster} (DynamoDB table {table}) "
                         "is held by "
                         f"{who}: wait for it to finish and run again; a holder that died "
                         "gives the lock up by itself when its lease ends")
        self.message = str(self)


class LockLost(Exception):
    """Our lease ran out and someone else took the lock: stop before changing more."""

    code = "LockLost"

    def __init__(self, cluster: str, name: str = STATE):
        self.message = (f"the {_label(name)} of cluster {cluster} was taken over after this "
                        "run's lease ran out (raise aws.lock_lease if steps take that "
                        "long): stopped before the next change; run again")
        super().__init__(self.message)


def me() -> str:
    """A holder id that names the host and process, unique per acquisition."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def ensure_table(dynamodb: Any, table: str, sleep: Callable[[float], None] = time.sleep
                 ) -> None:
    """Create the lock table when absent (two creators at once are fine) and wait, for a
    bounded time, until it is active."""
    try:
        state = dynamodb.describe_table(TableName=table)["Table"]["TableStatus"]
    except ClientError as exc:
        if error_code(exc) != "ResourceNotFoundException":
            raise
        try:
            dynamodb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                                  AttributeDefinitions=[{"AttributeName": KEY,
                                                         "AttributeType": "S"}],
                                  KeySchema=[{"AttributeName": KEY, "KeyType": "HASH"}],
                                  Tags=[{"Key": "shardchat:role", "Value": "lock"}])
        except ClientError as again:
            if error_code(again) != "ResourceInUseException":  # created meanwhile
                raise
        state = "CREATING"
    deadline = time.monotonic() + TABLE_ACTIVE_WAIT
    while state != "ACTIVE":
        if time.monotonic() > deadline:
            raise TimeoutError(f"DynamoDB table {table} is still {state} after "
                               f"{TABLE_ACTIVE_WAIT:g} s")
        sleep(1.0)
        state = dynamodb.describe_table(TableName=table)["Table"]["TableStatus"]


class Lock:
    """One lock (``name``: STATE or SCALE_IN) of one cluster in one table."""

    def __init__(self, dynamodb: Any, table: str, cluster: str, lease: float,
                 clock: Clock = time.time, name: str = STATE):
        self.dynamodb, self.table, self.cluster, self.name = dynamodb, table, cluster, name
        self.lease, self.clock = lease, clock
        self.id: str | None = None  # our holder id while we hold it
        self.renewed = 0.0  # when we last took or renewed it

    @property
    def key(self) -> dict[str, Any]:
        return {KEY: {"S": f"{self.cluster}/{self.name}"}}

    def _get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The item at ``key``; None when absent or when the table does not exist yet."""
        try:
            return self.dynamodb.get_item(TableName=self.table, Key=key,
                                          ConsistentRead=True).get("Item")
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            return None

    def holder(self) -> Holder | None:
        """Who holds the lock (its lease may have run out), or None."""
        item = self._get(self.key)
        if not item:
            return None
        return Holder(item["holder"]["S"], item.get("command", {}).get("S", "?"),
                      float(item["expires"]["N"]))

    def acquire(self, command: str) -> None:
        """Take the lock or raise LockHeld naming its holder and expiry."""
        holder = me()
        now = self.clock()
        try:
            self.dynamodb.put_item(
                TableName=self.table,
                Item={**self.key, "holder": {"S": holder}, "command": {"S": command},
                      "expires": {"N": f"{now + self.lease:.3f}"},
                      "acquired": {"N": f"{now:.3f}"}},
                ConditionExpression="attribute_not_exists(#k) OR #e < :now",
                ExpressionAttributeNames={"#k": KEY, "#e": "expires"},
                ExpressionAttributeValues={":now": {"N": f"{now:.3f}"}})
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            raise LockHeld(self.cluster, self.table, self.holder(), self.clock(),
                           self.name) from None
        self.id, self.renewed = holder, now

    def renew_if_due(self) -> None:
        """``renew`` once a third of the lease has passed (not one write per step)."""
        if self.clock() - self.renewed >= self.lease / 3:
            self.renew()

    def renew(self) -> None:
        """Push our expiry a lease ahead, or raise LockLost when the lock is not ours."""
        if self.id is None:
            raise LockLost(self.cluster, self.name)
        now = self.clock()
        try:
            self.dynamodb.update_item(
                TableName=self.table, Key=self.key, UpdateExpression="SET #e = :e",
                ConditionExpression="#h = :me",
                ExpressionAttributeNames={"#e": "expires", "#h": "holder"},
                ExpressionAttributeValues={":e": {"N": f"{now + self.lease:.3f}"},
                                           ":me": {"S": self.id}})
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            self.id = None
            raise LockLost(self.cluster, self.name) from None
        self.renewed = now

    def release(self) -> None:
        """Give the lock up if it is still ours (a lock taken over is left alone)."""
        if self.id is None:
            return
        try:
            self.dynamodb.delete_item(
                TableName=self.table, Key=self.key, ConditionExpression="#h = :me",
                ExpressionAttributeNames={"#h": "holder"},
                ExpressionAttributeValues={":me": {"S": self.id}})
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
        finally:
            self.id = None

    @contextmanager
    def held(self, command: str) -> Iterator[Lock]:
        self.acquire(command)
        try:
            yield self
        finally:
            self.release()

    # -- the last reconcile ------------------------------------------------------------------

    @property
    def last_key(self) -> dict[str, Any]:
        return {KEY: {"S": f"{self.cluster}/last-reconcile"}}

    def record(self, outcome: str, detail: dict[str, Any]) -> None:
        """Keep how the last reconcile ended (``outcome``: "ok", "changed", "failed")."""
        self.dynamodb.put_item(TableName=self.table, Item={
            **self.last_key, "at": {"N": f"{self.clock():.3f}"}, "outcome": {"S": outcome},
            "detail": {"S": json.dumps(detail, sort_keys=True)}})

    def last(self) -> tuple[float, str, dict[str, Any]] | None:
        """The last reconcile recorded, or None (none yet, or no table: nothing ran)."""
        item = self._get(self.last_key)
        if not item:
            return None
        return (float(item["at"]["N"]), item["outcome"]["S"],
                json.loads(item.get("detail", {}).get("S", "{}")))


def describe_last(last: tuple[float, str, dict[str, Any]] | None, now: float) -> str:
    """One line for ``status``: when the last reconcile ran and how it ended."""
    if last is None:
        return "none recorded (shardchat-provision watch has not run)"
    at, outcome, detail = last
    extra = detail.get("summary", "")
    return (f"{_when(at)} ({now - at:.0f} s ago): {outcome}" + (f", {extra}" if extra else ""))
