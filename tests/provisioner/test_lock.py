"""The state lock (provisioner/lock.py) on moto's DynamoDB: one holder at a time, the
refusal names the holder and its expiry, a crashed holder's lease ends, a holder whose lease
was taken over stops, and many threads racing for it get exactly one winner per round.

moto evaluates a conditional write in several Python steps with no lock around them, so
two threads can both pass the condition; DynamoDB makes every single-item write atomic.
The ``atomic_moto`` fixture serialises moto's item writes, for this module only, so moto
behaves like DynamoDB here; the product relies on nothing but DynamoDB's own guarantee.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.dynamodb.models import DynamoDBBackend

from provisioner.lock import Lock, LockHeld, LockLost, ensure_table

from .conftest import REGION

TABLE = "shardchat-locks"


@pytest.fixture
def atomic_moto(monkeypatch: pytest.MonkeyPatch) -> None:
    guard = threading.Lock()
    for name in ("put_item", "update_item", "delete_item", "get_item"):
        original = getattr(DynamoDBBackend, name)

        def serialised(self, *args: Any, _original=original, **kwargs: Any) -> Any:
            with guard:
                return _original(self, *args, **kwargs)
        monkeypatch.setattr(DynamoDBBackend, name, serialised)


@pytest.fixture
def dynamodb(atomic_moto) -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("dynamodb", region_name=REGION)
        ensure_table(client, TABLE)
        yield client


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_table_is_created_once_even_by_two_at_once(atomic_moto):
    with mock_aws():
        client = boto3.client("dynamodb", region_name=REGION)
        threads = [threading.Thread(target=ensure_table, args=(client, TABLE))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert client.list_tables()["TableNames"] == [TABLE]
        ensure_table(client, TABLE)  # present: nothing to do


def test_a_held_lock_refuses_naming_its_holder_and_expiry(dynamodb):
    clock = Clock()
    first = Lock(dynamodb, TABLE, "demo", lease=120, clock=clock)
    second = Lock(dynamodb, TABLE, "demo", lease=120, clock=clock)
    first.acquire("apply")
    clock.now += 30
    with pytest.raises(LockHeld) as err:
        second.acquire("plan")
    assert err.value.holder is not None and err.value.holder.holder == first.id
    assert first.id in err.value.message and "(apply)" in err.value.message
    assert "in 90 s" in err.value.message and "lease ends" in err.value.message
    # another cluster's lock is its own
    Lock(dynamodb, TABLE, "other", lease=120, clock=clock).acquire("apply")

    first.release()
    assert first.holder() is None
    second.acquire("plan")
    assert second.holder().command == "plan"


def test_a_crashed_holder_is_taken_over_when_its_lease_ends(dynamodb):
    clock = Clock()
    crashed = Lock(dynamodb, TABLE, "demo", lease=60, clock=clock)
    crashed.acquire("apply")  # ... and is never heard of again
    late = Lock(dynamodb, TABLE, "demo", lease=60, clock=clock)
    clock.now += 59
    with pytest.raises(LockHeld):
        late.acquire("watch")
    clock.now += 2
    late.acquire("watch")

    with pytest.raises(LockLost):  # the old holder wakes up: it must stop, not go on
        crashed.renew()
    crashed.release()  # leaves the new holder's lock alone
    assert late.holder().holder == late.id


def test_renewal_keeps_a_long_run_s_lease(dynamodb):
    clock = Clock()
    held = Lock(dynamodb, TABLE, "demo", lease=60, clock=clock)
    held.acquire("apply")
    for _ in range(5):  # five minutes of steps, each renewing when due
        clock.now += 25
        held.renew_if_due()
    with pytest.raises(LockHeld):
        Lock(dynamodb, TABLE, "demo", lease=60, clock=clock).acquire("plan")


def race(dynamodb: Any, threads: int) -> tuple[list[Lock], list[LockHeld]]:
    """``threads`` locks trying to take the lock at the same moment."""
    start = threading.Barrier(threads)
    winners: list[Lock] = []
    refused: list[LockHeld] = []

    def contend() -> None:
        lock = Lock(dynamodb, TABLE, "demo", lease=120)
        start.wait(timeout=30)
        try:
            lock.acquire("apply")
            winners.append(lock)
        except LockHeld as exc:
            refused.append(exc)
    workers = [threading.Thread(target=contend) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    return winners, refused


def test_many_threads_racing_get_one_holder_per_round(dynamodb):
    threads = 12
    for _ in range(5):
        winners, refused = race(dynamodb, threads)
        assert len(winners) == 1 and len(refused) == threads - 1
        assert {exc.holder.holder for exc in refused if exc.holder} <= {winners[0].id}
        winners[0].release()
