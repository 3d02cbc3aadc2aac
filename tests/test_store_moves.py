"""The store's side of moving rooms (shardchat/node/store/moves.py): incoming copies that
are never served, forwards as the commit point, and all of it surviving a reopen.

Real Store objects on real SQLite files; two stores in one test play source and target.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from shardchat.node.store import (
    Incoming,
    KeyRow,
    MessageRecord,
    MoveConflict,
    RoomRecord,
    Store,
    StoreError,
)
from tests.test_store import opened, room, send

pytestmark = pytest.mark.timeout(60)

MOVE = "move-0001"


def arriving(rid: str = "room-1", move_id: str = MOVE, source: int = 1) -> Incoming:
    return Incoming(RoomRecord(rid, f"Room {rid}", True, 1_700_000_000_000), source, move_id)


async def source_with(tmp: Path, count: int) -> tuple[Store, list[MessageRecord]]:
    s = await opened(tmp / "i1")
    await s.create_room(room("room-1"))
    for i in range(count):
        await send(s, "room-1", f"m{i}", client_id=f"c{i}")
    return s, await s.moves.copy_page("room-1", 0, 1000, 1 << 20)


async def test_an_incoming_copy_is_served_only_once_activated_and_keeps_seq_and_dedup(
        tmp_path):
    source, page = await source_with(tmp_path, 5)
    target = await opened(tmp_path / "i2")
    try:
        assert await target.moves.begin_incoming(arriving(), [KeyRow("key-1", "fp", 5)])
        assert await target.moves.import_messages("room-1", MOVE, page) == 5
        assert target.get_room("room-1") is None and target.room_count() == 0
        assert target.moves.incoming("room-1") is not None
        with pytest.raises(ValueError):
            await send(target, "room-1", "too early")
        assert await target.moves.activate("room-1", MOVE, 5) == "activated"
        assert target.get_room("room-1") is not None and target.moves.incoming("room-1") is None
        again, duplicate = await send(target, "room-1", "m4", client_id="c4")
        assert duplicate and again.seq == 5
        fresh, _ = await send(target, "room-1", "new")
        assert fresh.seq == 6
        assert await target.moves.activate("room-1", MOVE, 5) == "already_active"
    finally:
        await source.close()
        await target.close()


async def test_copies_are_idempotent_and_a_pruned_gap_never_leaves_a_hole(tmp_path):
    source, page = await source_with(tmp_path, 10)
    target = await opened(tmp_path / "i2")
    try:
        await target.moves.begin_incoming(arriving(), [])
        assert not await target.moves.begin_incoming(arriving(), [])  # the same move: no-op
        assert await target.moves.import_messages("room-1", MOVE, page[:3]) == 3
        assert await target.moves.import_messages("room-1", MOVE, page[:3]) == 3  # a retry
        # the source pruned 4..6 between two pages: what is held below 7 is older than
        # anything it keeps, and goes, so the held seqs stay one range
        assert await target.moves.import_messages("room-1", MOVE, page[6:]) == 10
        with pytest.raises(MoveConflict) as hole:
            await target.moves.import_messages("room-1", MOVE, [page[7], page[9]])
        assert hole.value.code == "bad_page"
        assert await target.moves.activate("room-1", MOVE, 10) == "activated"
        assert [m.seq for m in await target.history("room-1")] == [7, 8, 9, 10]
    finally:
        await source.close()
        await target.close()


async def test_activation_needs_every_message_up_to_the_last_seq(tmp_path):
    source, page = await source_with(tmp_path, 4)
    target = await opened(tmp_path / "i2")
    try:
        await target.moves.begin_incoming(arriving(), [])
        await target.moves.import_messages("room-1", MOVE, page[:3])
        with pytest.raises(MoveConflict) as short:
            await target.moves.activate("room-1", MOVE, 4)
        assert short.value.code == "incomplete"
        with pytest.raises(MoveConflict) as other:
            await target.moves.activate("room-1", "another-move", 3)
        assert other.value.code == "not_incoming"
        assert target.get_room("room-1") is None
    finally:
        await source.close()
        await target.close()


async def test_the_forward_takes_the_room_out_at_once_and_its_data_once_activated(tmp_path):
    source, _ = await source_with(tmp_path, 3)
    try:
        forward = await source.moves.write_forward("room-1", 2, MOVE, 3)
        assert source.get_room("room-1") is None and source.room_count() == 0
        assert source.moves.forward("room-1") == forward and not forward.activated
        with pytest.raises(ValueError):
            await send(source, "room-1", "after the forward")
        with pytest.raises(MoveConflict):
            await source.moves.write_forward("room-1", 2, MOVE, 3)
        # the messages stay on disk until the target confirmed
        assert len(await source.moves.copy_page("room-1", 0, 100, 1 << 20)) == 3
        assert await source.moves.finish_forward("room-1", MOVE)
        assert source.moves.forward("room-1").activated
        assert await source.moves.copy_page("room-1", 0, 100, 1 << 20) == []
    finally:
        await source.close()


async def test_incoming_rooms_and_forwards_survive_a_reopen(tmp_path):
    source, _ = await source_with(tmp_path, 2)
    await source.create_room(room("room-2"))
    await source.moves.write_forward("room-2", 3, "move-0002", 0)
    await source.moves.begin_incoming(arriving("room-3", "move-0003", 2), [])
    await source.close()
    again = await opened(tmp_path / "i1")
    try:
        assert again.room_count() == 1 and again.get_room("room-1") is not None
        assert again.last_seq("room-1") == 2
        assert again.moves.forward("room-2").instance == 3 and again.get_room("room-2") is None
        assert again.moves.incoming("room-3").move_id == "move-0003"
        assert again.get_room("room-3") is None
        assert await again.moves.drop_incoming("room-3", "move-0003")
        assert not await again.moves.drop_incoming("room-3", "move-0003")
    finally:
        await again.close()


async def test_a_room_served_here_is_never_replaced_by_an_incoming_copy(tmp_path):
    source, _ = await source_with(tmp_path, 1)
    try:
        with pytest.raises(MoveConflict) as owned:
            await source.moves.begin_incoming(arriving("room-1"), [])
        assert owned.value.code == "owned"
        assert source.last_seq("room-1") == 1
    finally:
        await source.close()


async def test_a_move_replaces_a_stale_copy_of_an_earlier_move(tmp_path):
    source, page = await source_with(tmp_path, 3)
    target = await opened(tmp_path / "i2")
    try:
        await target.moves.begin_incoming(arriving(move_id="old-move-1"), [])
        await target.moves.import_messages("room-1", "old-move-1", page)
        assert await target.moves.begin_incoming(arriving(), [])
        assert await target.moves.import_messages("room-1", MOVE, []) == 0  # nothing left over
        with pytest.raises(MoveConflict):
            await target.moves.import_messages("room-1", "old-move-1", page)
    finally:
        await source.close()
        await target.close()


def test_a_schema_2_store_gets_the_move_columns_and_keeps_its_rooms(tmp_path):
    directory = tmp_path / "i1"
    directory.mkdir()
    with sqlite3.connect(directory / "store.sqlite3") as conn:
        conn.executescript("""
            CREATE TABLE rooms (id TEXT PRIMARY KEY, name TEXT NOT NULL,
                                private INTEGER NOT NULL, created_at INTEGER NOT NULL);
            INSERT INTO rooms VALUES ('kept', 'Kept', 0, 1);
            PRAGMA user_version = 2;""")
    conn.close()

    async def check() -> None:
        s = await opened(directory)
        try:
            assert s.get_room("kept") is not None and s.moves.forwards() == []
        finally:
            await s.close()

    for _ in range(2):  # the second open finds nothing to migrate
        asyncio.run(check())


async def test_a_failed_write_of_a_move_is_a_store_error_and_the_writer_goes_on(tmp_path):
    source, _ = await source_with(tmp_path, 1)
    try:
        with sqlite3.connect(source.path) as conn:
            conn.execute("CREATE TRIGGER no_forwards BEFORE INSERT ON forwards"
                         " BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
        conn.close()
        with pytest.raises(StoreError):
            await source.moves.write_forward("room-1", 2, MOVE, 1)
        assert source.get_room("room-1") is not None and source.moves.forward("room-1") is None
        msg, _ = await send(source, "room-1", "still here")
        assert msg.seq == 2
    finally:
        await source.close()
