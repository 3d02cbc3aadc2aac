"""WAL checkpoints, in a thread of their own, off the commit path.

A checkpoint copies committed WAL frames into the database file and fsyncs it. Run by
SQLite's automatic checkpoint it would happen inside a commit and stall every ack and
broadcast waiting on that commit (seen as 50-130 ms latency spikes), so the writer turns the
automatic one off and this thread does the work instead. A PASSIVE checkpoint never blocks
the writer or readers. It runs once the WAL passes ``CHECKPOINT_WAL_BYTES``, or
``CHECKPOINT_MAX_AGE`` seconds after the last one: on a shared disk its fsyncs queue with the
writer's, so fewer, larger checkpoints disturb commits least. Once the writer has stopped, a
final TRUNCATE checkpoint leaves a compact database behind.

When the store is replicated off the machine (``node.replicate_to``), this thread does not
run at all (``enabled=False``): Litestream owns the checkpoints. It ships WAL frames before
it checkpoints them, and it keeps a read transaction open between its own checkpoints so
that nobody else can restart the WAL under frames it has not copied yet; a checkpoint here
could then copy next to nothing (the WAL past Litestream's read mark stays put), and the
final TRUNCATE would wait on that reader with the writer lock held, or, in the gap between
two of its read transactions, truncate frames it had not shipped and force a full snapshot
upload. docs/architecture.md, "Off-machine copies", has the whole argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path

from shardchat.node.store import schema
from shardchat.node.store.threads import name_os_thread

log = logging.getLogger("shardchat.node.store")

CHECKPOINT_POLL = 1.0  # seconds between looks at the WAL's size
CHECKPOINT_WAL_BYTES = 8 * 1024 * 1024  # checkpoint once the WAL is this large ...
CHECKPOINT_MAX_AGE = 30.0  # ... or this many seconds after the last checkpoint


class Checkpointer:
    """The checkpoint thread of one store file, from ``start`` to ``close``."""

    def __init__(self, path: Path, *, fsync: bool = True, enabled: bool = True) -> None:
        self.path = path
        self.fsync = fsync
        self.enabled = enabled  # False: another process (Litestream) checkpoints this file
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.enabled:
            log.info("checkpoints of %s are left to Litestream (replication is on)",
                     self.path)
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._main,
                                        name=f"store-checkpoint:{self.path.parent}",
                                        daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop after a final TRUNCATE checkpoint; call once the writer has stopped."""
        if self._thread is None:
            return
        self._stop.set()
        await asyncio.to_thread(self._thread.join)

    def _main(self) -> None:
        name_os_thread(b"store-ckpt")
        try:
            conn = schema.connect(self.path)
            conn.execute(f"PRAGMA synchronous = {'FULL' if self.fsync else 'NORMAL'}")
        except sqlite3.Error:
            log.exception("cannot open a checkpoint connection to %s", self.path)
            return
        wal = self.path.with_name(self.path.name + "-wal")
        last = time.monotonic()
        try:
            while not self._stop.wait(CHECKPOINT_POLL):
                try:
                    size = wal.stat().st_size
                except OSError:
                    continue
                if size < CHECKPOINT_WAL_BYTES and time.monotonic() - last < CHECKPOINT_MAX_AGE:
                    continue
                last = time.monotonic()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # a busy moment: the next round catches up
                    log.debug("checkpoint of %s skipped: %s", self.path, exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            conn.close()
