"""Retention: each room keeps its newest ``retention`` messages; older ones are pruned.

Pruning is a write, so it runs where writes run: in the writer thread, on the writer's
connection, right after a commit (``GroupCommitWriter``'s ``housekeeping``), never
contending with a commit for SQLite's write lock. It looks only at the rooms the batch just
wrote, at most once every ``prune_interval`` seconds per room, and all due rooms share one
transaction, so a steady stream of messages costs an occasional small delete.

A room's stored seqs stay one unbroken range: a commit never leaves a hole, and pruning only
takes the oldest. ``Store.gap`` relies on that. Dedup covers what is still stored: a retry
of a message already pruned is stored as new.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from pathlib import Path

from shardchat.node.store import schema
from shardchat.node.store.writer import Batch

log = logging.getLogger("shardchat.node.store")


class Pruner:
    """Keeps the newest ``retention`` messages of every room the writer writes to."""

    def __init__(self, path: Path, *, retention: int, interval: float) -> None:
        self.path = path
        self.retention = retention
        self.interval = interval
        self.pruned = 0  # messages dropped so far
        # per room: when it was last pruned, and up to which seq
        self._cuts: dict[str, tuple[float, int]] = {}

    def after_commit(self, conn: sqlite3.Connection, batch: Batch) -> None:
        """Writer thread, after ``batch`` committed: prune the rooms it wrote that are due.
        A room with nothing new to drop costs nothing; errors wait for the next commit."""
        tops = {m.message.room_id: m.message.seq for m in batch.messages}  # seqs ascend
        if not tops:
            return
        now = time.monotonic()
        due: list[tuple[str, int]] = []
        for room_id, top in tops.items():
            when, done = self._cuts.get(room_id, (float("-inf"), 0))
            cut = top - self.retention
            if cut > done and now - when >= self.interval:
                due.append((room_id, cut))
        if not due:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            dropped = sum(schema.delete_through(conn, room_id, cut) for room_id, cut in due)
            conn.execute("COMMIT")
        except Exception as exc:  # the writer must survive housekeeping errors
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            log.warning("pruning old messages in %s failed, will retry: %s", self.path, exc)
            return
        self.pruned += dropped
        for room_id, cut in due:
            self._cuts[room_id] = (now, cut)
