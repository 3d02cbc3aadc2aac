"""The messages table's two layouts side by side: the writer's CPU per message and a
history page's read, in one run.

    python -m bench.storelayout                 # ~1 minute
    python -m bench.storelayout --history 0     # new stores only

Arrival order (a rowid table, this release) against the layout of earlier releases
(WITHOUT ROWID, clustered by room; ``schema.migrate_layout`` says why it changed). Each
round builds a store of each layout with the same ``--history`` messages over 2,000 rooms,
then commits, with fsync on, the shape of the small-room benchmark: 175 commits of 69
messages, each commit to 69 of 200 busy rooms, a WAL checkpoint every 50 commits as the
node's checkpointer would make. It reports the committing thread's CPU per message (user
and kernel: SQLite's b-tree work, the WAL's page writes and fsyncs) and the CPU of reading
the newest 50 messages of 1,000 rooms, and of the same pages from the node's memory
(``store/recent.py``), where a join finds them once its room was read. Layouts alternate
within each round; the figures are each layout's median round.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from shardchat.node.store import schema
from shardchat.node.store.reader import newest_within
from shardchat.node.store.recent import RecentMessages
from shardchat.node.store.records import MessageRecord

# The messages table of earlier releases, as they created it.
CLUSTERED = """CREATE TABLE messages (
    room_id TEXT NOT NULL, seq INTEGER NOT NULL, sender_sid TEXT NOT NULL,
    sender_name TEXT NOT NULL, text TEXT NOT NULL, ts INTEGER NOT NULL, client_id TEXT,
    sender_member TEXT, PRIMARY KEY (room_id, seq)) WITHOUT ROWID"""
LAYOUTS = ("arrival order", "clustered by room")
ROOMS, BUSY, COMMITS, PER_COMMIT = 2000, 200, 175, 69


def to_clustered(conn: sqlite3.Connection) -> None:
    """Give a store the messages table of earlier releases, with the same rows and its
    dedup index, in one transaction (the benchmark's old layout; the upgrade tests' store
    of an earlier release)."""
    columns = "room_id, " + schema.MESSAGE_COLUMNS
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(f"CREATE TABLE messages_new AS SELECT {columns} FROM messages")
    conn.execute("DROP TABLE messages")
    conn.execute(CLUSTERED)
    conn.execute(f"INSERT INTO messages ({columns}) SELECT {columns} FROM messages_new")
    conn.execute("DROP TABLE messages_new")
    conn.execute(schema.DEDUP_INDEX)
    conn.execute("COMMIT")


def _open(path: Path, layout: str) -> sqlite3.Connection:
    conn = schema.connect(path)
    schema.create(conn)
    if layout == LAYOUTS[1]:
        to_clustered(conn)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


class _Room:
    __slots__ = ("id", "seq")

    def __init__(self, rid: str) -> None:
        self.id, self.seq = rid, 0


def _commit(conn: sqlite3.Connection, rooms: list[_Room], ts: int) -> int:
    batch = []
    for r in rooms:
        r.seq += 1
        batch.append(MessageRecord(r.id, r.seq, "sid-" + "x" * 16, "member name", "x" * 120,
                                   ts, None, "member-" + "y" * 16))
    conn.execute("BEGIN IMMEDIATE")
    schema.insert_messages(conn, batch)
    conn.execute("COMMIT")
    return len(batch)


def one(layout: str, history: int, seed: int) -> dict[str, float]:
    rnd = random.Random(seed)
    directory = Path(tempfile.mkdtemp(prefix="shardchat-layout-"))
    try:
        conn = _open(directory / schema.DB_NAME, layout)
        rooms = [_Room(f"room-{rnd.randrange(10**12):012d}") for _ in range(ROOMS)]
        conn.execute("PRAGMA synchronous = OFF")  # the history is set-up, not measured
        for i in range(history // 1000):
            _commit(conn, rnd.choices(rooms, k=1000), i)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA synchronous = FULL")  # the node's default, node.fsync
        busy = rnd.sample(rooms, BUSY)
        written, t0 = 0, time.thread_time()
        for i in range(COMMITS):
            written += _commit(conn, rnd.sample(busy, PER_COMMIT), history + i)
            if i % 50 == 49:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        write_us = (time.thread_time() - t0) / written * 1e6
        t0 = time.thread_time()
        for r in rooms[:1000]:
            conn.execute(f"SELECT {schema.MESSAGE_COLUMNS} FROM messages WHERE room_id = ?"
                         " AND seq <= ? ORDER BY seq DESC LIMIT 50", (r.id, r.seq)).fetchall()
        read_us = (time.thread_time() - t0) / 1000 * 1e6
        conn.close()
        return {"write_us_per_message": write_us, "read_us_per_page": read_us,
                "memory_us_per_page": _from_memory(rooms[:1000])}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _from_memory(rooms: list[_Room]) -> float:
    """CPU µs of the same pages from the node's memory (``store/recent.py``), as a join's
    welcome is served once its room was read: the lookup and the byte bound's walk."""
    recent = RecentMessages()
    for r in rooms:
        recent.seed(r.id, [MessageRecord(r.id, s, "sid", "member name", "x" * 120, s, None,
                                         "member") for s in range(max(1, r.seq - 49),
                                                                  r.seq + 1)], False)
    t0 = time.thread_time()
    for r in rooms:
        page = recent.get(r.id, max(1, r.seq - 49), r.seq)
        if page is not None:
            newest_within(reversed(page), 10**6, lambda m: len(m.text))
    return (time.thread_time() - t0) / len(rooms) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--history", type=int, default=400_000,
                    help="messages each store holds before the measured commits")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in LAYOUTS}
    for r in range(args.rounds):
        for layout in LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]:
            runs[layout].append(one(layout, args.history, seed=r))
    print(f"| layout ({args.history:,} messages held) | writer CPU µs per message "
          "| CPU µs per history page of 50 |")
    print("|---|---|---|")
    med = {k: {f: statistics.median(x[f] for x in v) for f in v[0]} for k, v in runs.items()}
    for layout in LAYOUTS:
        m = med[layout]
        print(f"| {layout} | {m['write_us_per_message']:.1f} | {m['read_us_per_page']:.0f} |")
    memory = statistics.median(x["memory_us_per_page"] for v in runs.values() for x in v)
    print(f"| the newest 50 from memory (a join's welcome once its room was read) | - "
          f"| {memory:.0f} |")
    new, old = med[LAYOUTS[0]], med[LAYOUTS[1]]
    writes = new["write_us_per_message"] / old["write_us_per_message"]
    reads = new["read_us_per_page"] / old["read_us_per_page"]
    print(f"\narrival order / clustered: writes {writes:.2f}x the CPU, history pages "
          f"{reads:.2f}x")


if __name__ == "__main__":
    main()
