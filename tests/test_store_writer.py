"""The group-commit writer on its own: batches, refusals, draining at close, housekeeping.

A real SQLite file and a real writer thread. To know which writes share a transaction, a
test holds SQLite's write lock from a second connection while it queues them: the writer's
first transaction waits on that lock, so everything queued meanwhile is in at most two
batches (whatever the writer took before it blocked, and the rest).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shardchat.node.store import schema
from shardchat.node.store.errors import StoreError
from shardchat.node.store.records import CreationKey, MessageRecord, RoomRecord
from shardchat.node.store.writer import Batch, GroupCommitWriter

pytestmark = pytest.mark.timeout(60)


def message(seq: int, text: str | None = None) -> MessageRecord:
    return MessageRecord("room", seq, "sid", "ann", text or f"m{seq}", 1000 + seq, f"c{seq}",
                         "member-ann")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / schema.DB_NAME
    with contextlib.closing(schema.connect(path)) as conn:
        schema.create(conn)
    return path


class Seen:
    """What the writer told its owner, in order."""

    def __init__(self) -> None:
        self.committed: list[Batch] = []
        self.refused: list[Batch] = []

    def seqs(self, batches: list[Batch]) -> list[int]:
        return [m.message.seq for b in batches for m in b.messages]


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
async def writer(db: Path, seen: Seen) -> AsyncIterator[GroupCommitWriter]:
    w = GroupCommitWriter(db, fsync=False, on_committed=seen.committed.append,
                          on_refused=seen.refused.append)
    await w.start()
    yield w
    await w.close()


@contextlib.contextmanager
def write_lock_held(db: Path) -> Iterator[None]:
    """SQLite's write lock, taken by another connection for the duration of the block."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")


def stored(db: Path) -> list[MessageRecord]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(f"SELECT {schema.MESSAGE_COLUMNS} FROM messages"
                            " WHERE room_id = 'room' ORDER BY seq").fetchall()
    return [MessageRecord("room", *row) for row in rows]


def add_failing_trigger(db: Path, when: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"CREATE TRIGGER fail_insert BEFORE INSERT ON messages WHEN {when} "
                     "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
        conn.commit()


async def test_writes_queued_during_a_commit_share_one_transaction(
        writer: GroupCommitWriter, seen: Seen, db: Path) -> None:
    room = RoomRecord("room", "Room", False, 1)
    with write_lock_held(db):
        messages = [writer.write_message(message(seq)) for seq in range(1, 51)]
        created = writer.write_room(room, CreationKey("k" * 16, "fingerprint"))

    async def woken(future: asyncio.Future[MessageRecord]) -> bool:
        """Whether the owner had been told of the commit when this waiter woke."""
        m = await future
        return m.seq in seen.seqs(seen.committed)

    assert all(await asyncio.gather(*(woken(f) for f in messages)))
    assert await created is None
    assert writer.stats.commits <= 2  # the first write may have been taken on its own
    assert max(len(b) for b in seen.committed) >= 50  # 50 of the 51 writes, one commit
    assert seen.seqs(seen.committed) == list(range(1, 51))  # in queue order
    assert [r.room for b in seen.committed for r in b.rooms] == [room]
    assert stored(db) == [message(seq) for seq in range(1, 51)]
    assert seen.refused == []


async def test_a_failed_commit_reaches_every_waiter_of_its_batch_and_behind_it(
        writer: GroupCommitWriter, seen: Seen, db: Path) -> None:
    add_failing_trigger(db, "NEW.text = 'boom'")
    with write_lock_held(db):
        failing = writer.write_message(message(1, "boom"))  # always in the first batch
        behind = [writer.write_message(message(seq)) for seq in range(2, 21)]
        room = writer.write_room(RoomRecord("room", "Room", False, 1))
        barrier = writer.barrier()
    results = await asyncio.gather(failing, *behind, room, return_exceptions=True)
    assert all(isinstance(r, StoreError) and "injected failure" in str(r) for r in results)
    assert await asyncio.wait_for(barrier, 10) is None  # a flush is never left waiting
    assert seen.committed == [] and len(seen.refused) == 1  # the owner hears it once
    assert seen.seqs(seen.refused) == list(range(1, 21))
    assert [r.room.id for r in seen.refused[0].rooms] == ["room"]
    assert writer.stats.failed_commits == 1 and stored(db) == []

    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("DROP TRIGGER fail_insert")
    assert await writer.write_message(message(1)) == message(1)  # writing again
    assert stored(db) == [message(1)]


async def test_close_commits_everything_queued_then_refuses_more(
        writer: GroupCommitWriter, db: Path) -> None:
    futures = [writer.write_message(message(seq)) for seq in range(1, 301)]
    await writer.close()
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [message(seq) for seq in range(1, 301)]
    assert stored(db) == [message(seq) for seq in range(1, 301)]
    with pytest.raises(StoreError, match="stopped"):
        writer.write_message(message(301))
    assert await asyncio.wait_for(writer.barrier(), 1) is None  # nothing left to wait for


async def test_housekeeping_runs_in_the_writer_thread_before_the_barrier(
        db: Path) -> None:
    calls: list[tuple[str, list[int]]] = []

    def housekeeping(conn: sqlite3.Connection, batch: Batch) -> None:
        calls.append((threading.current_thread().name,
                      [m.message.seq for m in batch.messages]))
        if len(calls) == 1:
            raise RuntimeError("a bug in housekeeping")

    writer = GroupCommitWriter(db, fsync=False, housekeeping=housekeeping)
    await writer.start()
    try:
        await writer.write_message(message(1))
        await writer.barrier()
        assert calls[0] == (f"store-writer:{db.parent}", [1])
        # the writer outlives an error in its housekeeping
        assert await writer.write_message(message(2)) == message(2)
        await writer.barrier()
        assert [seqs for _, seqs in calls if seqs] == [[1], [2]]
    finally:
        await writer.close()


async def test_a_file_that_cannot_be_opened_fails_start(tmp_path: Path) -> None:
    writer = GroupCommitWriter(tmp_path / "missing" / schema.DB_NAME)
    with pytest.raises(StoreError, match=r"cannot open .* for writing"):
        await writer.start()


async def test_a_job_is_its_own_transaction_and_fails_alone(
        writer: GroupCommitWriter, db: Path) -> None:
    """Jobs (the steps of a move) commit after their batch; one that fails leaves the
    messages around it alone, and its owner hears of a success before its waiter does."""
    published: list[object] = []

    def fails(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO forwards (room_id, instance, move_id, last_seq, moved_at)"
                     " VALUES ('room', 2, 'move-1', 1, 0)")
        raise sqlite3.IntegrityError("the disk says no")

    def counts(conn: sqlite3.Connection) -> int:
        return conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    with write_lock_held(db):
        first = writer.write_message(message(1))
        failing = writer.write_job(fails)
        counted = writer.write_job(counts, published.append)
        second = writer.write_message(message(2))
    assert await first == message(1) and await second == message(2)
    with pytest.raises(StoreError, match="the disk says no"):
        await failing
    assert await counted == published[0]  # published before the waiter woke
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM forwards").fetchone()[0] == 0
    assert writer.stats.jobs == 1


async def test_a_job_queued_behind_a_failed_commit_is_refused_with_it(
        writer: GroupCommitWriter, db: Path) -> None:
    add_failing_trigger(db, "NEW.text = 'boom'")
    ran: list[bool] = []
    with write_lock_held(db):
        failing = writer.write_message(message(1, "boom"))
        job = writer.write_job(lambda conn: ran.append(True))
    for future in (failing, job):
        with pytest.raises(StoreError, match="injected failure"):
            await future
    assert ran == []
