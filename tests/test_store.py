"""The embedded store: seq without gaps, group commit, history, recovery, dedup, durability.

Every test runs a real Store on its own tmp directory (real SQLite file, real writer
thread). Failures are injected with a real SQLite trigger, and the crash test SIGKILLs a
real process that is writing.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shardchat.node import store as store_mod
from shardchat.node.store import MessageRecord, RoomRecord, Store, StoreError
from tests.support import ROOT

pytestmark = pytest.mark.timeout(60)

_ts = itertools.count(1_700_000_000_000)


def room(rid: str = "room-1", *, private: bool = False) -> RoomRecord:
    return RoomRecord(id=rid, name=f"Room {rid}", private=private, created_at=next(_ts))


async def send(store: Store, rid: str, text: str, *, name: str = "ann",
               client_id: str | None = None) -> tuple[MessageRecord, bool]:
    """One message from the member called ``name`` (one member per name here)."""
    return await store.append_message(rid, sender_sid=f"sid-{name}", sender_name=name,
                                      sender_member=f"member-{name}", text=text,
                                      client_id=client_id, ts=next(_ts))


async def opened(directory: Path, **kwargs) -> Store:
    s = Store(directory, **kwargs)
    await s.open()
    return s


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await opened(tmp_path / "i1")
    await s.create_room(room())
    yield s
    await s.close()


def seqs(messages: list[MessageRecord]) -> list[int]:
    return [m.seq for m in messages]


# -- seq and group commit ---------------------------------------------------------------


async def test_concurrent_appends_get_gapless_seqs_in_call_order(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    rooms = ["a", "b", "c"]
    for rid in rooms:
        await s.create_room(room(rid))
    calls = [(rooms[i % 3], f"msg {i}") for i in range(1000)]
    results = await asyncio.gather(*(send(s, rid, text) for rid, text in calls))
    for rid in rooms:
        mine = [msg for (r, _), (msg, dup) in zip(calls, results, strict=True) if r == rid]
        assert seqs(mine) == list(range(1, len(mine) + 1))  # call order, no gap
        stored = await s.history(rid, limit=1000)
        assert [(m.seq, m.text) for m in stored] == [(m.seq, m.text) for m in mine]
        assert s.last_seq(rid) == len(mine)
    await s.close()


async def test_a_burst_shares_commits(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    await s.create_room(room("a"))
    before = s.stats()
    await asyncio.gather(*(send(s, "a", f"m{i}") for i in range(2000)))
    after = s.stats()
    commits = after["commits"] - before["commits"]
    assert after["messages"] - before["messages"] == 2000
    assert commits * 10 <= 2000, f"2000 messages took {commits} commits"
    print(f"group commit: 2000 messages in {commits} commits, "
          f"largest batch {after['max_batch']}")
    await s.close()


# -- rooms ------------------------------------------------------------------------------


async def test_rooms_survive_reopen_and_duplicates_are_refused(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    r = room("keep", private=True)
    await s.create_room(r)
    with pytest.raises(ValueError, match="already exists"):
        await s.create_room(room("keep"))
    assert s.get_room("keep") == r
    assert s.get_room("nope") is None
    await s.close()

    s2 = await opened(tmp_path)
    assert s2.get_room("keep") == r
    assert s2.room_count() == 1
    await s2.close()


async def test_a_second_process_cannot_open_the_same_store(store: Store) -> None:
    other = Store(store.directory)
    with pytest.raises(StoreError, match="in use by another process"):
        await other.open()


async def test_unknown_room_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        await send(store, "ghost", "hello")


# -- history ----------------------------------------------------------------------------


async def test_history_pages_backwards_in_ascending_order(store: Store) -> None:
    for i in range(1, 121):
        await send(store, "room-1", f"t{i}")
    latest = await store.history("room-1")
    assert seqs(latest) == list(range(71, 121))
    page = await store.history("room-1", before=71, limit=30)
    assert seqs(page) == list(range(41, 71))
    assert [m.text for m in page] == [f"t{i}" for i in range(41, 71)]
    assert seqs(await store.history("room-1", before=5, limit=100)) == [1, 2, 3, 4]
    assert await store.history("room-1", before=1) == []
    assert seqs(await store.history("room-1", before=10_000, limit=2)) == [119, 120]
    assert await store.history("empty-room") == []


async def test_message_shape_and_text_stored_as_given(store: Store) -> None:
    text = "héllo 👋 — 中文 \n\t 'quotes' \"double\" \x00nul " + "x" * 3900
    msg, dup = await store.append_message("room-1", sender_sid="s1", sender_name="Zoë",
                                          sender_member="m1", text=text, client_id="c-1",
                                          ts=1234)
    assert not dup
    assert msg == MessageRecord(room_id="room-1", seq=1, sender_sid="s1", sender_name="Zoë",
                                text=text, ts=1234, client_id="c-1", sender_member="m1")
    assert await store.history("room-1") == [msg]


async def test_text_sqlite_cannot_store_is_refused_without_hurting_others(store: Store
                                                                          ) -> None:
    good = [send(store, "room-1", f"ok {i}") for i in range(5)]
    results = await asyncio.gather(*good[:2], send(store, "room-1", "bad \ud800"), *good[2:],
                                   return_exceptions=True)
    assert isinstance(results[2], ValueError)
    assert [r[0].seq for i, r in enumerate(results) if i != 2] == [1, 2, 3, 4, 5]


# -- since (reconnect recovery) ---------------------------------------------------------


async def test_since_returns_the_gap_or_none(tmp_path: Path) -> None:
    s = await opened(tmp_path, max_recovery=20)
    await s.create_room(room("a"))
    assert await s.since("a", 0) == []
    for i in range(1, 31):
        await send(s, "a", f"t{i}")
    assert await s.since("a", 30) == []  # up to date
    got = await s.since("a", 25)
    assert seqs(got) == [26, 27, 28, 29, 30]
    assert [m.text for m in got] == ["t26", "t27", "t28", "t29", "t30"]
    assert seqs(await s.since("a", 10)) == list(range(11, 31))  # exactly max_recovery
    assert await s.since("a", 9) is None  # longer than max_recovery
    assert await s.since("a", 31) is None  # a client from the future
    with pytest.raises(ValueError):
        await s.since("a", -1)
    await s.close()


async def test_since_reads_a_long_gap_completely(tmp_path: Path) -> None:
    s = await opened(tmp_path, max_recovery=1000, fsync=False)
    await s.create_room(room("a"))
    n = store_mod.LOOP_READ_ROWS * 3
    await asyncio.gather(*(send(s, "a", f"t{i}") for i in range(1, n + 1)))
    got = await s.since("a", 1)
    assert seqs(got) == list(range(2, n + 1))
    await s.close()


def text_bytes(message: MessageRecord) -> int:
    return len(message.text)


async def test_newest_stops_at_the_byte_bound_and_says_so(tmp_path: Path) -> None:
    s = await opened(tmp_path, fsync=False)
    await s.create_room(room("a"))
    for i in range(1, 21):
        await send(s, "a", "x" * (100 * i))  # seq i has 100 * i characters
    page, more = await s.newest("a", limit=100, max_bytes=5000, size=text_bytes)
    assert seqs(page) == [19, 20] and more is True  # 2000 + 1900 fit, 1800 more would not
    page, more = await s.newest("a", limit=2, max_bytes=10**6, size=text_bytes)
    assert seqs(page) == [19, 20] and more is False  # the limit, not the bytes
    page, more = await s.newest("a", before=5, limit=100, max_bytes=10**6, size=text_bytes)
    assert seqs(page) == [1, 2, 3, 4] and more is False
    page, more = await s.newest("a", after=17, limit=100, max_bytes=10, size=text_bytes)
    assert seqs(page) == [20] and more is True  # the newest always, whatever its size
    page, more = await s.newest("a", after=17, before=18, limit=100, max_bytes=10,
                                size=text_bytes)
    assert page == [] and more is False
    await s.close()


async def test_newest_reads_a_long_range_off_the_loop_the_same_way(tmp_path: Path) -> None:
    s = await opened(tmp_path, fsync=False, max_recovery=1000)
    await s.create_room(room("a"))
    n = store_mod.LOOP_READ_ROWS * 2
    await asyncio.gather(*(send(s, "a", "y" * 10) for _ in range(n)))
    page, more = await s.newest("a", after=0, limit=n, max_bytes=10 * 250, size=text_bytes)
    assert seqs(page) == list(range(n - 249, n + 1)) and more is True
    page, more = await s.newest("a", after=0, limit=n, max_bytes=10**6, size=text_bytes)
    assert seqs(page) == list(range(1, n + 1)) and more is False
    await s.close()


async def test_gap_counts_what_since_would_return(tmp_path: Path) -> None:
    s = await opened(tmp_path, retention=10, prune_interval=0, max_recovery=15)
    await s.create_room(room("a"))
    assert s.gap("a", 0) == 0
    for i in range(1, 31):
        await send(s, "a", f"t{i}")
    await s.flush()  # 1..20 pruned
    assert s.gap("a", 30) == 0
    assert s.gap("a", 20) == 10
    assert s.gap("a", 19) is None  # 20 is gone
    assert s.gap("a", 31) is None  # a client from the future
    with pytest.raises(ValueError):
        s.gap("a", -1)
    s.max_recovery = 5
    assert s.gap("a", 20) is None  # longer than max_recovery
    await s.close()


async def test_retention_prunes_and_since_reports_the_pruned_gap(tmp_path: Path) -> None:
    s = await opened(tmp_path, retention=10, prune_interval=0, max_recovery=1000)
    await s.create_room(room("a"))
    for i in range(1, 31):
        await send(s, "a", f"t{i}")
    await s.flush()  # the writer has committed and pruned what was queued
    assert seqs(await s.history("a", limit=100)) == list(range(21, 31))
    assert s.stats()["pruned"] == 20
    assert await s.since("a", 5) is None  # 6..20 are gone
    assert await s.since("a", 19) is None
    assert seqs(await s.since("a", 20)) == list(range(21, 31))
    await s.close()

    s2 = await opened(tmp_path, retention=10)
    assert s2.last_seq("a") == 30  # pruning never loses the counter
    msg, _ = await send(s2, "a", "after")
    assert msg.seq == 31
    await s2.close()


# -- dedup ------------------------------------------------------------------------------


async def test_dedup_sequential_retry_gets_the_first_message(store: Store) -> None:
    first, dup1 = await send(store, "room-1", "hello", client_id="k1")
    again, dup2 = await send(store, "room-1", "hello (retry)", client_id="k1")
    assert (dup1, dup2) == (False, True)
    assert again == first
    other_name, dup3 = await send(store, "room-1", "hello", name="bob", client_id="k1")
    no_id, dup4 = await send(store, "room-1", "hello")
    no_id2, dup5 = await send(store, "room-1", "hello")
    assert not (dup3 or dup4 or dup5)
    assert seqs([first, other_name, no_id, no_id2]) == [1, 2, 3, 4]
    assert len(await store.history("room-1")) == 4


async def test_dedup_holds_for_concurrent_appends_in_flight(store: Store) -> None:
    results = await asyncio.gather(*(send(store, "room-1", f"try {i}", client_id="same")
                                     for i in range(20)))
    assert [dup for _, dup in results] == [False] + [True] * 19
    assert all(msg == results[0][0] for msg, _ in results)
    assert seqs(await store.history("room-1")) == [1]
    assert store.last_seq("room-1") == 1


async def test_dedup_survives_reopen(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    await s.create_room(room("a"))
    await s.create_room(room("b"))
    first, _ = await send(s, "a", "once", client_id="c-9")
    await s.close()

    s2 = await opened(tmp_path)
    again, dup = await send(s2, "a", "twice", client_id="c-9")
    assert dup and again == first
    elsewhere, dup_b = await send(s2, "b", "once", client_id="c-9")  # other room: new
    assert not dup_b and elsewhere.seq == 1
    assert s2.last_seq("a") == 1
    await s2.close()


# -- failures ---------------------------------------------------------------------------


def add_failing_trigger(db: Path, when: str, table: str = "messages") -> None:
    """Make every INSERT of a matching row fail inside the writer's transaction."""
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TRIGGER fail_insert BEFORE INSERT ON {table} WHEN {when} "
                     "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")


def drop_failing_trigger(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER fail_insert")


async def test_failed_commit_fails_its_batch_and_leaves_no_gap(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    for rid in ("a", "b"):
        await s.create_room(room(rid))
    for i in range(3):
        await send(s, "a", f"before {i}")
    add_failing_trigger(s.path, "NEW.text = 'boom'")

    calls = [("a" if i % 2 else "b", "boom" if i == 30 else f"burst {i}", f"c{i}")
             for i in range(60)]
    results = await asyncio.gather(*(send(s, rid, text, client_id=cid)
                                     for rid, text, cid in calls), return_exceptions=True)
    ok = [not isinstance(r, BaseException) for r in results]
    kept = ok.index(False)
    assert kept <= 30
    assert ok == [True] * kept + [False] * (60 - kept)  # the failed batch and all behind it
    assert all(isinstance(r, StoreError) for r in results[kept:])
    assert s.stats()["failed_commits"] == 1

    drop_failing_trigger(s.path)
    expected = {"a": 3 + sum(1 for rid, _, _ in calls[:kept] if rid == "a"),
                "b": sum(1 for rid, _, _ in calls[:kept] if rid == "b")}
    for rid in ("a", "b"):
        assert s.last_seq(rid) == expected[rid]
        # a retry of a message whose commit failed is new, not a duplicate
        failed_cid = next(cid for r, _, cid in calls[kept:] if r == rid)
        msg, dup = await send(s, rid, "retry", client_id=failed_cid)
        assert not dup and msg.seq == expected[rid] + 1
        stored = await s.history(rid, limit=100)
        assert seqs(stored) == list(range(1, expected[rid] + 2))
    await s.close()


async def test_failed_commit_of_every_room_then_recovery(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    await s.create_room(room("a"))
    await send(s, "a", "one")
    add_failing_trigger(s.path, "1")
    with pytest.raises(StoreError, match="injected failure"):
        await send(s, "a", "two")
    results = await asyncio.gather(*(send(s, "a", f"x{i}") for i in range(10)),
                                   return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results)
    assert s.last_seq("a") == 1
    drop_failing_trigger(s.path)
    msg, _ = await send(s, "a", "two again")
    assert msg.seq == 2
    await s.close()
    s2 = await opened(tmp_path)
    assert [m.text for m in await s2.history("a")] == ["one", "two again"]
    await s2.close()


async def test_failed_room_commit_is_not_kept(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    add_failing_trigger(s.path, "1", table="rooms")
    with pytest.raises(StoreError):
        await s.create_room(room("r"))
    assert s.get_room("r") is None and s.room_count() == 0
    drop_failing_trigger(s.path)
    await s.create_room(room("r"))  # the id is free again
    assert s.get_room("r") is not None
    await s.close()


# -- lifecycle and durability -----------------------------------------------------------


async def test_close_flushes_pending_appends(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    await s.create_room(room("a"))
    tasks = [asyncio.create_task(send(s, "a", f"t{i}")) for i in range(300)]
    for _ in range(100):  # let every task reach the store (bounded scheduling passes)
        if s.last_seq("a") == 300:
            break
        await asyncio.sleep(0)
    assert s.last_seq("a") == 300
    await s.close()
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    assert sorted(seqs([m for m, _ in results])) == list(range(1, 301))
    await s.close()  # idempotent
    with pytest.raises(StoreError):
        await send(s, "a", "too late")

    s2 = await opened(tmp_path)
    assert s2.last_seq("a") == 300
    assert seqs(await s2.history("a", limit=300)) == list(range(1, 301))
    await s2.close()


WRITER = """
import asyncio, sys
from pathlib import Path
from shardchat.node.store import RoomRecord, Store

async def writer(store, w):
    for i in range(100_000):
        msg, _ = await store.append_message("r", sender_sid=f"s{w}", sender_name=f"w{w}",
                                            sender_member=f"m{w}", text=f"w{w}-{i}",
                                            client_id=None, ts=i)
        print(msg.seq, msg.text, flush=True)

async def main():
    store = Store(Path(sys.argv[1]), fsync=sys.argv[2] == "1")
    await store.open()
    if store.get_room("r") is None:
        await store.create_room(RoomRecord("r", "crash", False, 1))
    await asyncio.gather(*(writer(store, w) for w in range(4)))

asyncio.run(main())
"""


@pytest.mark.parametrize("fsync", [True, False])
async def test_acked_messages_survive_kill_9(tmp_path: Path, fsync: bool) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(tmp_path), "1" if fsync else "0",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    lines: list[bytes] = []
    try:
        for _ in range(400):
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
            assert line, "the writer process exited early"
            lines.append(line)
    finally:
        proc.send_signal(signal.SIGKILL)
    rest = await asyncio.wait_for(proc.stdout.read(), timeout=20)
    lines += [ln for ln in rest.splitlines(keepends=True) if ln.endswith(b"\n")]
    assert await asyncio.wait_for(proc.wait(), timeout=20) == -signal.SIGKILL
    acked = {int(seq): text for seq, text in (ln.decode().split() for ln in lines)}

    s = await opened(tmp_path)
    top = s.last_seq("r")
    assert top >= max(acked)
    stored = {m.seq: m.text for m in await s.history("r", limit=top)}
    assert sorted(stored) == list(range(1, top + 1))
    for seq, text in acked.items():
        assert stored[seq] == text
    msg, _ = await send(s, "r", "after the crash")
    assert msg.seq == top + 1
    await s.close()


@pytest.mark.parametrize("own", [True, False])
async def test_with_litestream_checkpointing_the_store_leaves_the_wal_alone(tmp_path, own):
    """``own_checkpoints=False`` (replication on): no checkpoint of ours, not even the
    TRUNCATE at close, so every frame stays in the WAL for Litestream to ship. Another
    connection stays open throughout, as Litestream's does (without one, SQLite's own
    checkpoint when the last connection closes would empty the WAL either way)."""
    store = Store(tmp_path, own_checkpoints=own)
    await store.open()
    other = sqlite3.connect(tmp_path / "store.sqlite3")
    other.execute("SELECT COUNT(*) FROM rooms").fetchall()  # now it uses the WAL too
    try:
        await store.create_room(room("r"))
        for i in range(20):
            await send(store, "r", f"m{i}")
        await store.close()
        wal = tmp_path / "store.sqlite3-wal"
        assert (wal.stat().st_size == 0) is own  # ours truncates it at close
    finally:
        other.close()
