"""The follower's copy of an owner (``node/replication/copy.py``): records applied once,
room images, retention, the position kept with what it covers, a snapshot installed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from shardchat.node.replication.copy import FollowedCopy, copy_path


def record(pos: int, room: str, seqs: range, new_room: bool = False) -> dict:
    return {"t": "record", "pos": pos,
            "rooms": [[room, "Room", 0, 1]] if new_room else [], "keys": [],
            "messages": [[room, s, "sid", "name", f"m{s}", 1, f"c{s}", "member"]
                         for s in seqs]}


def seqs(copy: FollowedCopy, room: str) -> list[int]:
    return [s for (s,) in copy.conn.execute(
        "SELECT seq FROM messages WHERE room_id = ? ORDER BY seq", (room,))]


def test_records_apply_once_and_keep_their_position(tmp_path: Path):
    copy = FollowedCopy(copy_path(tmp_path, 2, 1), retention=100)
    copy.open()
    assert copy.position() == ("", 0)
    assert copy.apply("e1", [record(1, "r", range(1, 3), new_room=True)]) == 1
    assert copy.apply("e1", [record(2, "r", range(3, 5)), record(3, "r", range(5, 6))]) == 3
    copy.apply("e1", [record(3, "r", range(5, 6))])  # a repeat changes nothing
    assert seqs(copy, "r") == [1, 2, 3, 4, 5]
    assert copy.position() == ("e1", 3)
    copy.close()
    again = FollowedCopy(copy.path, retention=100)
    again.open()
    assert again.position() == ("e1", 3) and again.summary() == {"rooms": 1, "messages": 5}


def test_retention_and_room_images(tmp_path: Path):
    copy = FollowedCopy(tmp_path / "c.sqlite3", retention=3)
    copy.open()
    copy.apply("e", [record(1, "r", range(1, 7), new_room=True)])
    assert seqs(copy, "r") == [4, 5, 6]
    forward = ["r", 3, "move-1", 6, 1, 0]
    copy.apply("e", [{"t": "record", "pos": 2, "image": {
        "id": "r", "room": None, "forward": forward, "keys": [], "messages": []}}])
    assert seqs(copy, "r") == [] and copy.summary()["rooms"] == 0
    assert copy.conn.execute("SELECT instance FROM forwards").fetchall() == [(3,)]
    back = {"id": "r", "room": ["r", "Room", 0, 1, "active"], "forward": None, "keys": [],
            "messages": [["r", s, "sid", "name", f"m{s}", 1, None, "member"]
                         for s in range(6, 9)]}
    copy.apply("e", [{"t": "record", "pos": 3, "image": back}])
    assert seqs(copy, "r") == [6, 7, 8] and copy.summary()["rooms"] == 1
    assert copy.conn.execute("SELECT COUNT(*) FROM forwards").fetchone() == (0,)


def test_a_snapshot_replaces_the_copy(tmp_path: Path):
    copy = FollowedCopy(tmp_path / "c.sqlite3", retention=100)
    copy.open()
    copy.apply("old", [record(1, "gone", range(1, 3), new_room=True)])
    owner = tmp_path / "owner.sqlite3"
    other = FollowedCopy(owner, retention=100)  # any file of the store's schema
    other.open()
    other.apply("x", [record(1, "kept", range(1, 4), new_room=True)])
    other.close()
    copy.install(owner, "new", 7)
    assert copy.position() == ("new", 7)
    assert seqs(copy, "kept") == [1, 2, 3] and seqs(copy, "gone") == []
    assert not owner.exists()
    sqlite3.connect(copy.path).execute("PRAGMA quick_check").fetchone()
