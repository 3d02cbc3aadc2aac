"""The newest messages kept in memory (``store/recent.py``) answer what the store's file would:
every ``newest`` request, over a long random run of sends and reads with pruning, gives
exactly what a read of the file gives, while joins' pages are served from memory.

Real Stores on their own directories; the oracle is a separate SQLite connection to the
same file.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import pytest

from shardchat.node.store import MessageRecord, Store
from shardchat.node.store.reader import newest_within
from shardchat.node.store.recent import RecentMessages
from shardchat.node.store.schema import MESSAGE_COLUMNS
from tests.conftest import acreate_room
from tests.test_prometheus import scrape, value
from tests.test_store import opened, room, send, seqs

pytestmark = pytest.mark.timeout(120)


def text_bytes(m: MessageRecord) -> int:
    return len(m.text)


def from_file(path: Path, room_id: str, after: int, before: int | None, limit: int,
              max_bytes: int) -> tuple[list[int], bool]:
    """What ``Store.newest`` must answer, read from the file itself."""
    conn = sqlite3.connect(path)
    try:
        top = before - 1 if before is not None else 10**12
        rows = conn.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = ?"
                            " AND seq > ? AND seq <= ? ORDER BY seq DESC LIMIT ?",
                            (room_id, after, top, limit)).fetchall()
    finally:
        conn.close()
    page, cut = newest_within((MessageRecord(room_id, *r) for r in rows), max_bytes,
                              text_bytes)
    return seqs(page), cut


async def settled(s: Store) -> None:
    """Everything sent is committed and pruned, so the file is the truth to compare with."""
    await s.flush()


@pytest.mark.parametrize("retention", [25, 10_000])
async def test_every_page_is_what_the_file_holds(tmp_path: Path, retention: int) -> None:
    rnd = random.Random(retention)
    s = await opened(tmp_path, fsync=False, retention=retention, prune_interval=0.0)
    rooms = ["a", "b", "c"]
    for rid in rooms:
        await s.create_room(room(rid))
    try:
        for step in range(600):
            rid = rnd.choice(rooms)
            if rnd.random() < 0.5:
                for _ in range(rnd.choice((1, 1, 2, 5, 30))):
                    await send(s, rid, "m" * rnd.randint(1, 300))
                continue
            await settled(s)
            top = s.last_seq(rid)
            after = rnd.choice((0, 0, 0, max(0, top - rnd.randint(0, 80))))
            before = rnd.choice((None, None, None, rnd.randint(1, top + 2)))
            limit = rnd.choice((50, 50, 1, 10, 64, 200))
            max_bytes = rnd.choice((10**6, 10**6, 2000))
            page, cut = await s.newest(rid, after=after, before=before, limit=limit,
                                       max_bytes=max_bytes, size=text_bytes)
            expected = from_file(s.path, rid, after, before, limit, max_bytes)
            assert (seqs(page), cut) == expected, (step, rid, after, before, limit, max_bytes)
        stats = s.recent.stats()
        assert stats["hits"] > 100 and stats["misses"] > 0, stats
    finally:
        await s.close()


async def test_a_join_page_is_served_from_memory_after_the_first_read(tmp_path: Path) -> None:
    s = await opened(tmp_path, fsync=False)
    await s.create_room(room("a"))
    for i in range(80):
        await send(s, "a", f"message {i}")
    first, _ = await s.newest("a", limit=50, max_bytes=10**6, size=text_bytes)
    assert s.recent.stats()["misses"] == 1
    await send(s, "a", "one more")  # committed: joins the entry, no read needed
    second, _ = await s.newest("a", limit=50, max_bytes=10**6, size=text_bytes)
    assert s.recent.stats()["hits"] == 1
    assert seqs(first) == list(range(31, 81)) and seqs(second) == list(range(32, 82))
    assert [m.text for m in second] == [m.text for m in await s.history("a", limit=50)]
    await s.close()


def msg(seq: int, text: str = "x") -> MessageRecord:
    return MessageRecord("r", seq, "sid", "name", text, seq, None, "member")


def test_a_gap_in_the_seqs_drops_the_entry() -> None:
    recent = RecentMessages(keep=10)
    recent.seed("r", [msg(1), msg(2)], complete=True)
    recent.committed(msg(4))  # 3 never reached this cache: it may not answer for 1-4
    assert recent.get("r", 1, 4) is None and len(recent) == 0


def test_the_oldest_falls_out_and_the_entry_is_then_incomplete() -> None:
    recent = RecentMessages(keep=3)
    recent.seed("r", [msg(1), msg(2)], complete=True)
    assert seqs(recent.get("r", 0, 2)) == [1, 2]  # complete: nothing older is stored
    recent.committed(msg(3))
    recent.committed(msg(4))
    assert seqs(recent.get("r", 2, 4)) == [2, 3, 4]
    assert recent.get("r", 1, 4) is None  # 1 fell out, so it is not answered from memory


def test_memory_is_bounded_the_least_recently_read_room_going_first() -> None:
    recent = RecentMessages(keep=10, max_bytes=3 * (120 + 100 + 16))
    for rid in ("a", "b", "c"):
        recent.seed(rid, [MessageRecord(rid, 1, "sid", "name", "x" * 100, 1, None,
                                        "member")], complete=True)
    assert recent.get("a", 1, 1) is not None  # "a" read last: "b" is the oldest now
    recent.seed("d", [MessageRecord("d", 1, "sid", "name", "x" * 100, 1, None, "member")],
                complete=True)
    assert recent.get("b", 1, 1) is None
    assert all(recent.get(r, 1, 1) is not None for r in ("a", "c", "d"))


async def test_joins_after_the_first_take_their_welcome_from_memory(node1, connect,
                                                                    transport) -> None:
    """On a real node: the second joiner's welcome holds the same 50 newest messages as the
    first's, read from memory where the first's was read from the file, and the scrape
    says so."""
    room_ = await acreate_room(node1, "remembered")
    writer = await connect(node1, room_, name="writer", transport=transport)
    for i in range(60):
        await writer.send_ok(f"kept {i}")
    before = await asyncio.to_thread(scrape, node1)
    first = await connect(node1, room_, name="first", transport=transport)
    second = await connect(node1, room_, name="second", transport=transport)
    history = [[m["text"] for m in c.welcome["history"]] for c in (first, second)]
    assert history[0] == history[1] == [f"kept {i}" for i in range(10, 60)]
    after = await asyncio.to_thread(scrape, node1)
    served = {src: value(after, "shardchat_newest_pages_total", source=src)
              - value(before, "shardchat_newest_pages_total", source=src)
              for src in ("memory", "store")}
    assert served == {"memory": 1, "store": 1}  # the first joiner's page was read
