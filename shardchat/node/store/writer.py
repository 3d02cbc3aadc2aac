"""Group commit: one writer thread owns the write connection and commits batches.

The event loop never waits for a disk flush. Every write is queued with the future its
caller awaits (a message: a callback, ``write_message_then``); the writer thread takes
*everything* queued, writes it in one transaction and commits once, then hands the batch
back to the loop, which settles every future of it. While one commit is on disk, new writes
pile up and share the next one, so a burst of N writes costs far fewer than N fsyncs, with
no artificial delay added to a quiet room. Messages reach the thread once per loop tick
(staged, then one hand-off and one wake-up for all of the tick's), so the thread does not
take the GIL mid-tick to commit a batch of one.

The unit of work is the ``Batch``: the writes of one transaction, committed together or not
at all. The owner learns of each one on the event loop, before any waiter wakes:
``on_committed(batch)`` after its commit (the store publishes rooms and advances counters
there; a follower stream would ship exactly this batch), ``on_refused(batch)`` when a commit
fails. A failed commit refuses its batch *and everything queued behind it*, and the writer
takes nothing new until the loop has seen the refusal: the owner can then undo whatever it
assigned ahead (seqs), knowing that nothing is in flight. ``housekeeping(conn, batch)`` runs
in the writer thread after a commit, on the same connection (pruning, ``retention.py``);
a barrier resolves only once the work queued before it is committed and housekept.

A ``Job`` is a write of its own transaction (the steps of a room's move, ``moves.py``): the
writer runs it after its batch's commit and housekeeping, between BEGIN IMMEDIATE and
COMMIT, and a job that fails fails alone (its caller gets the error, the writer goes on).
Its ``done`` runs on the loop just before its future resolves, so the owner's view changes
exactly when the job is durable. Jobs in a refused batch are refused with it.

The writer knows rooms and messages only as the rows of the batch it commits: counters,
dedup and which rooms exist are the owner's (``Store``).

``post_commit``: the replication seam. Each callback added there receives every committed
batch on the loop, right after ``on_committed`` and before any waiter wakes, in commit
order: the follower stream ships exactly these batches (``node/replication/stream.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shardchat.node import faults
from shardchat.node.buckets import COMMIT_BOUNDS, Buckets
from shardchat.node.store import schema
from shardchat.node.store.errors import MoveConflict, StoreError
from shardchat.node.store.records import CreationKey, MessageRecord, RoomRecord
from shardchat.node.store.threads import name_os_thread

log = logging.getLogger("shardchat.node.store")

JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes of WAL kept after a checkpoint resets it


@dataclass(eq=False, slots=True)
class RoomWrite:
    """A new room (with the key it was created under), and who waits for its commit."""

    room: RoomRecord
    key: CreationKey | None
    future: asyncio.Future[None]


# Told on the loop how a message write ended: (the record, None) once it is committed,
# (None, the error) when its commit failed.
MessageDone = Callable[[MessageRecord | None, BaseException | None], None]


@dataclass(eq=False, slots=True)
class MessageWrite:
    """A new message, and who is told of its commit: ``done`` (a callback, not a future,
    so the message hot path needs no future per message)."""

    message: MessageRecord
    done: MessageDone


@dataclass(eq=False, slots=True)
class Job:
    """``run(conn)`` in a transaction of its own; ``done(result)`` on the loop once it is
    committed, then the future gives the result. A ``MoveConflict`` it raises is its
    answer (rolled back, handed to the caller as is); any other failure a StoreError."""

    run: Callable[[sqlite3.Connection], object]
    done: Callable[[object], None] | None
    future: asyncio.Future


@dataclass(eq=False, slots=True)
class _Barrier:
    future: asyncio.Future[None]


_Queued = RoomWrite | MessageWrite | Job | _Barrier


@dataclass(slots=True)
class Batch:
    """The writes of one transaction, each kind in queue order. ``barriers`` are the flushes
    queued among them; they write nothing."""

    rooms: list[RoomWrite] = field(default_factory=list)
    messages: list[MessageWrite] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)  # after the commit, one transaction each
    barriers: list[_Barrier] = field(default_factory=list)

    @classmethod
    def of(cls, queued: list[_Queued]) -> Batch:
        batch = cls()
        for item in queued:
            if type(item) is MessageWrite:
                batch.messages.append(item)
            elif type(item) is RoomWrite:
                batch.rooms.append(item)
            elif type(item) is Job:
                batch.jobs.append(item)
            else:
                batch.barriers.append(item)  # type: ignore[arg-type]
        return batch

    def extend(self, other: Batch) -> None:
        self.rooms += other.rooms
        self.messages += other.messages
        self.jobs += other.jobs
        self.barriers += other.barriers

    def __len__(self) -> int:
        """Rows it writes."""
        return len(self.rooms) + len(self.messages)


@dataclass(slots=True)
class WriterStats:
    """Counters for the node's metrics; written by the writer thread, read by the loop."""

    commits: int = 0
    messages: int = 0
    rooms: int = 0
    failed_commits: int = 0
    max_batch: int = 0
    jobs: int = 0  # transactions of their own (moves)
    # BEGIN to COMMIT of every batch, fsync included: what each ack and broadcast waits on
    commit_seconds: Buckets = field(default_factory=lambda: Buckets(COMMIT_BOUNDS))


class GroupCommitWriter:
    """The one thread that writes ``path``; see the module docstring.

    ``write_room``, ``write_message``, ``barrier`` and ``close`` are called from the event
    loop that ran ``start``; the callbacks run on that loop too (``housekeeping`` excepted).
    """

    def __init__(self, path: Path, *, fsync: bool = True,
                 on_committed: Callable[[Batch], None] = lambda batch: None,
                 on_refused: Callable[[Batch], None] = lambda batch: None,
                 housekeeping: Callable[[sqlite3.Connection, Batch], None] | None = None
                 ) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.stats = WriterStats()
        self._on_committed = on_committed
        self.post_commit: list[Callable[[Batch], None]] = []  # see the module docstring
        self._on_refused = on_refused
        self._housekeeping = housekeeping
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # shared with the writer thread, guarded by _cond
        self._cond = threading.Condition()
        self._queue: list[_Queued] = []
        # loop side only: messages of this loop tick, handed to the thread in one go
        self._staged: list[MessageWrite] = []
        self._halted = False  # a commit failed; the loop has not seen the refusal yet
        self._stopping = False
        self._done = False  # the thread took its last batch: nothing more is written

    # -- event loop side ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the write connection in a new thread; StoreError if it cannot be opened."""
        self._loop = asyncio.get_running_loop()
        self._queue, self._halted, self._stopping, self._done = [], False, False, False
        self._staged = []
        started = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._main, args=(started, failure),
                                        name=f"store-writer:{self.path.parent}", daemon=True)
        self._thread.start()
        await asyncio.to_thread(started.wait)
        if failure:
            self._done = True
            raise StoreError(f"cannot open {self.path} for writing: {failure[0]}")

    def write_room(self, room: RoomRecord, key: CreationKey | None = None
                   ) -> asyncio.Future[None]:
        """Queue a new room; the future resolves once it is committed."""
        write = RoomWrite(room, key, self._future())
        self._enqueue(write)
        return write.future

    def write_message(self, message: MessageRecord) -> asyncio.Future[MessageRecord]:
        """Queue a new message; the future gives it back once it is committed."""
        future = self._future()
        self.write_message_then(message, functools.partial(_settle_message, future))
        return future

    def write_message_then(self, message: MessageRecord, done: MessageDone) -> None:
        """Queue a new message; ``done`` runs on the loop once it is committed or refused.

        Staged for the loop tick: the messages of one tick reach the thread in one
        hand-off (``_hand_off``, one lock and one wake-up per tick instead of per message),
        so the thread is not woken mid-tick to commit a batch of one while the rest of the
        tick's messages wait for the next fsync. Anything else queued (a room, a job, a
        barrier, ``close``) hands the staged messages off first, so queue order is kept."""
        if self._done:
            raise StoreError(f"the writer of {self.path} has stopped.")
        staged = self._staged
        staged.append(MessageWrite(message, done))
        if len(staged) == 1:
            assert self._loop is not None, "start() the writer first"
            self._loop.call_soon(self._hand_off)

    def write_job(self, run: Callable[[sqlite3.Connection], object],
                  done: Callable[[object], None] | None = None) -> asyncio.Future:
        """Queue a job (see the module docstring); the future gives its result."""
        job = Job(run, done, self._future())
        self._enqueue(job)
        return job.future

    def barrier(self) -> asyncio.Future[None]:
        """A future that resolves once everything queued before it is committed (or
        refused) and housekept; at once when the writer has stopped."""
        future = self._future()
        with self._cond:
            if self._done:
                future.set_result(None)
            else:
                self._take_staged()
                self._queue.append(_Barrier(future))
                self._cond.notify()
        return future

    async def close(self) -> None:
        """Commit everything queued (every future is settled), then stop the thread."""
        if self._thread is None:
            return
        self._hand_off()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        await asyncio.to_thread(self._thread.join)
        # The thread's last call_soon_threadsafe callbacks were queued before join
        # returned, so they have run by now: every future is settled.

    def _future(self) -> asyncio.Future:
        assert self._loop is not None, "start() the writer first"
        return self._loop.create_future()

    def _enqueue(self, item: _Queued) -> None:
        with self._cond:
            if self._done:
                raise StoreError(f"the writer of {self.path} has stopped.")
            self._take_staged()
            self._queue.append(item)
            self._cond.notify()

    def _take_staged(self) -> None:
        """Under ``_cond``: the staged messages join the queue (before what comes next)."""
        if self._staged:
            self._queue += self._staged
            self._staged = []

    def _hand_off(self) -> None:
        """Once per loop tick with messages staged: all of them to the thread, one wake-up.
        A writer that stopped meanwhile refuses them (their callbacks run now)."""
        if not self._staged:
            return  # taken by an ``_enqueue`` or a refusal in the same tick
        with self._cond:
            if not self._done:
                self._take_staged()
                self._cond.notify()
                return
            staged, self._staged = self._staged, []
        exc = StoreError(f"the writer of {self.path} has stopped.")
        for m in staged:
            m.done(None, exc)

    def _committed(self, batch: Batch) -> None:
        """Loop side of a commit: tell the owner, then wake every waiter of the batch."""
        self._on_committed(batch)
        for tap in self.post_commit:
            tap(batch)
        for r in batch.rooms:
            _settle(r.future, None)
        for m in batch.messages:
            m.done(m.message, None)

    def _refused(self, batch: Batch, error: BaseException) -> None:
        """Loop side of a failed commit: refuse it and everything queued behind it, then let
        the writer take new work."""
        with self._cond:
            self._take_staged()  # staged in this tick: their seqs were assigned ahead too
            batch.extend(Batch.of(self._queue))  # queued by the loop after the failure
            self._queue = []
            self._halted = False
            self._cond.notify_all()
        self._on_refused(batch)
        exc = StoreError(f"commit to {self.path} failed: {error}")
        for r in batch.rooms:
            _settle(r.future, error=exc)
        for m in batch.messages:
            m.done(None, exc)
        for j in batch.jobs:
            _settle(j.future, error=exc)
        _release(batch.barriers)

    def _call_soon(self, callback: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody waits
            self._loop.call_soon_threadsafe(callback, *args)

    # -- writer thread -----------------------------------------------------------------

    def _main(self, started: threading.Event, failure: list[BaseException]) -> None:
        name_os_thread(b"store-writer")
        try:
            conn = schema.connect(self.path)
            conn.execute(f"PRAGMA synchronous = {'FULL' if self.fsync else 'NORMAL'}")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
            # Checkpoints run in their own thread (``checkpoint.py``): SQLite's automatic
            # checkpoint would run inside a commit, with its fsyncs, and stall every ack and
            # broadcast waiting on that commit (seen as 50-130 ms latency spikes).
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        except BaseException as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                if not self._commit(conn, batch):
                    continue  # refused, jobs and barriers with it (``_refused``)
                if self._housekeeping is not None:
                    try:
                        self._housekeeping(conn, batch)
                    except Exception:  # the writer must outlive its housekeeping
                        log.exception("housekeeping after a commit to %s failed", self.path)
                for job in batch.jobs:
                    self._run_job(conn, job)
                if batch.barriers:
                    self._call_soon(_release, batch.barriers)
        finally:
            with self._cond:
                self._done = True
            conn.close()

    def _next_batch(self) -> Batch | None:
        """Everything queued, once there is something and no failure is being undone;
        None once stopping with nothing left."""
        with self._cond:
            while self._halted or (not self._queue and not self._stopping):
                self._cond.wait()
            if not self._queue:
                self._done = True
                return None
            queued, self._queue = self._queue, []
        return Batch.of(queued)

    def _commit(self, conn: sqlite3.Connection, batch: Batch) -> bool:
        """One transaction, one commit; False (and the batch refused) if it failed."""
        if not batch:
            return True
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            if batch.rooms:
                schema.insert_rooms(conn, ((r.room, r.key) for r in batch.rooms))
            if batch.messages:
                schema.insert_messages(conn, (m.message for m in batch.messages))
                faults.reach("store.before_commit")
            conn.execute("COMMIT")
            if batch.messages:
                faults.reach("store.after_commit")
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            with self._cond:
                self._halted = True
                rest, self._queue = self._queue, []
            self.stats.failed_commits += 1
            log.error("commit to %s failed, %d queued writes refused: %s", self.path,
                      len(batch) + sum(not isinstance(i, _Barrier) for i in rest), exc)
            batch.extend(Batch.of(rest))
            self._call_soon(self._refused, batch, exc)
            return False
        s = self.stats
        s.commit_seconds.observe(time.perf_counter() - started)
        s.commits += 1
        s.messages += len(batch.messages)
        s.rooms += len(batch.rooms)
        s.max_batch = max(s.max_batch, len(batch))
        self._call_soon(self._committed, batch)
        return True


    def _run_job(self, conn: sqlite3.Connection, job: Job) -> None:
        """Writer thread: one job, one transaction (see ``Job``)."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = job.run(conn)
            conn.execute("COMMIT")
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            if not isinstance(exc, MoveConflict):
                log.error("a write of its own transaction to %s failed: %s", self.path, exc)
                exc = StoreError(f"writing {self.path} failed: {exc}")
            self._call_soon(_fail, job.future, exc)
            return
        self.stats.jobs += 1
        self._call_soon(_job_done, job, result)


def _job_done(job: Job, result: object) -> None:
    """Loop side of a job's commit: the owner's view first, then its waiter."""
    if job.done is not None:
        job.done(result)
    _settle(job.future, result)


def _settle_message(future: asyncio.Future[MessageRecord], record: MessageRecord | None,
                    error: BaseException | None) -> None:
    """``write_message``'s callback: its future gives the record, or raises the error."""
    _settle(future, record, error=error)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    _settle(future, error=error)


def _settle(future: asyncio.Future, result: object = None, *,
            error: BaseException | None = None) -> None:
    if future.done():  # its waiter was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _release(barriers: list[_Barrier]) -> None:
    for b in barriers:
        _settle(b.future, None)
