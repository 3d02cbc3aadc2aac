"""A store written by an earlier release (messages clustered by room, WITHOUT ROWID) opens
with every message, its seq and its dedup record, and its messages in arrival order; a
kill -9 in the middle of that rebuild leaves the old table whole, and the next open does it;
a store too large to rebuild at start keeps its layout and works the same.

Real Stores on their own directories, a real child process for the kill (the fault switch,
``store.layout_copied``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

from bench.storelayout import to_clustered
from shardchat.node import faults
from shardchat.node.store import DB_NAME, schema
from shardchat.node.store.schema import clustered
from tests.support import ROOT
from tests.test_store import opened, room, send

pytestmark = pytest.mark.timeout(60)

ROOMS = ("a", "b", "c")
PER_ROOM = 40


def to_old_layout(path: Path) -> None:
    """Give a closed store the messages table of earlier releases: the same rows, clustered."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        to_clustered(conn)
        assert clustered(conn)
    finally:
        conn.close()


async def old_store(directory: Path) -> dict[str, list[tuple[int, str]]]:
    """A closed store of the old layout with ``PER_ROOM`` messages in each room, sent in turns
    (so arrival order differs from room order), every fifth with a client_id."""
    s = await opened(directory)
    sent: dict[str, list[tuple[int, str]]] = {r: [] for r in ROOMS}
    for rid in ROOMS:
        await s.create_room(room(rid))
    for i in range(PER_ROOM):
        for rid in ROOMS:
            text = f"{rid}-{i}"
            msg, _ = await send(s, rid, text, client_id=f"c{i}" if i % 5 == 0 else None)
            sent[rid].append((msg.seq, text))
    await s.close()
    to_old_layout(directory / DB_NAME)
    return sent


def table_state(path: Path) -> tuple[bool, int]:
    """(clustered, rows) of a closed store file."""
    conn = sqlite3.connect(path)
    try:
        (rows,) = conn.execute("SELECT count(*) FROM messages").fetchone()
        return clustered(conn), rows
    finally:
        conn.close()


async def test_a_old_store_keeps_every_message_seq_and_dedup_record(tmp_path) -> None:
    sent = await old_store(tmp_path)
    s = await opened(tmp_path)
    try:
        for rid in ROOMS:
            history = await s.history(rid, limit=PER_ROOM)
            assert [(m.seq, m.text) for m in history] == sent[rid]
            again, duplicate = await send(s, rid, "resent", client_id="c5")
            assert duplicate and again.text == f"{rid}-5"  # the stored copy, not a new one
            new, duplicate = await send(s, rid, "after the upgrade")
            assert not duplicate and new.seq == PER_ROOM + 1
    finally:
        await s.close()
    assert table_state(tmp_path / DB_NAME) == (False, len(ROOMS) * (PER_ROOM + 1))
    conn = sqlite3.connect(tmp_path / DB_NAME)
    try:  # arrival order: the rows interleave the rooms as the messages did
        first = [r for (r,) in conn.execute("SELECT room_id FROM messages ORDER BY rowid"
                                            " LIMIT 6")]
        assert first == list(ROOMS) * 2
    finally:
        conn.close()


OPEN = """
import asyncio, sys
from pathlib import Path
from shardchat.node.store import Store

async def main():
    store = Store(Path(sys.argv[1]))
    await store.open()
    print("opened", flush=True)
    await store.close()

asyncio.run(main())
"""


async def test_a_kill_in_the_middle_of_the_rebuild_leaves_the_old_table_whole(
        tmp_path: Path) -> None:
    sent = await old_store(tmp_path)
    env = {**os.environ, faults.ENV: "store.layout_copied"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OPEN, str(tmp_path), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == -signal.SIGKILL and b"opened" not in out
    assert table_state(tmp_path / DB_NAME) == (True, len(ROOMS) * PER_ROOM)

    s = await opened(tmp_path)  # the next start rebuilds it
    try:
        for rid in ROOMS:
            assert [(m.seq, m.text) for m in await s.history(rid, limit=PER_ROOM)] == sent[rid]
    finally:
        await s.close()
    assert table_state(tmp_path / DB_NAME) == (False, len(ROOMS) * PER_ROOM)


async def test_a_new_store_is_in_arrival_order(tmp_path: Path) -> None:
    s = await opened(tmp_path)
    await s.close()
    assert table_state(tmp_path / DB_NAME) == (False, 0)


async def test_a_store_too_large_to_rebuild_at_start_keeps_its_layout_and_works(
        tmp_path: Path, monkeypatch, caplog) -> None:
    sent = await old_store(tmp_path)
    monkeypatch.setattr(schema, "LAYOUT_REBUILD_MAX_ROWS", len(ROOMS) * PER_ROOM - 1)
    s = await opened(tmp_path)
    try:
        assert "kept the store's messages table clustered by room" in caplog.text
        assert "drain the instance and restart it" in caplog.text
        for rid in ROOMS:
            assert [(m.seq, m.text) for m in await s.history(rid, limit=PER_ROOM)] == sent[rid]
            again, duplicate = await send(s, rid, "resent", client_id="c10")
            assert duplicate and again.text == f"{rid}-10"
            new, _ = await send(s, rid, "still writable")
            assert new.seq == PER_ROOM + 1
    finally:
        await s.close()
    assert table_state(tmp_path / DB_NAME) == (True, len(ROOMS) * (PER_ROOM + 1))
    monkeypatch.setattr(schema, "LAYOUT_REBUILD_MAX_ROWS", len(ROOMS) * (PER_ROOM + 1))
    s = await opened(tmp_path)  # within the limit now (a drained store is): rebuilt
    await s.close()
    assert table_state(tmp_path / DB_NAME) == (False, len(ROOMS) * (PER_ROOM + 1))
