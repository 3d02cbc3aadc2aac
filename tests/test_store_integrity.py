"""A damaged store is refused at start, and a room damaged at run time answers
``unavailable``: rooms are never lost silently, joins never dropped without a code.

Every store here was written by a real node through real clients; the damage is done to the
file on disk, as a failing disk or a bad copy would.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from shardchat.node.store import DB_NAME, LOCK_NAME, MARKER_NAME, RESTORE_DOC
from tests.conftest import acreate_room, assert_failed_ack, assert_refusal_shape, refusal
from tests.support import NodeProcess, make_cluster_config, wait_until

pytestmark = pytest.mark.timeout(120)

PAGE = 4096  # SQLite's default page size, which the store keeps
FAST = {"rate_limit_messages": 100_000}


def one_node(tmp: Path) -> NodeProcess:
    path, instances = make_cluster_config(tmp, 1, node=FAST)
    return NodeProcess(path, instances[0], tmp)


def store_file(tmp: Path) -> Path:
    return tmp / "data" / "i1" / DB_NAME


async def fill(node: NodeProcess, connect, rooms: dict[str, int]) -> dict[str, dict]:
    """Create one room per key and send it that many messages, each text starting with
    ``<key>-<seq>-`` so the damage can be aimed at one room's pages."""
    created = {}
    for key, count in rooms.items():
        room = created[key] = await acreate_room(node, key)
        client = await connect(node, room, name=f"writer-{key}")
        for n in range(1, count + 1):
            await client.send_ok(f"{key}-{n:05d}-" + "x" * 150)
        await client.close()
    return created


def varint(data: bytes, at: int) -> tuple[int, int]:
    """SQLite's big-endian varint at ``at``: (value, bytes used)."""
    value = 0
    for i in range(9):
        byte = data[at + i]
        if i == 8:
            return (value << 8) | byte, 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, i + 1
    raise AssertionError("unreachable")


def leaf_rows(data: bytes) -> dict[int, list[tuple[str, int, int | None]]]:
    """(room key, seq, rowid) of the live rows on each b-tree leaf page, by 0-based page
    number (rowid None in a store of the old layout).

    Only live cells count: free space keeps stale copies of moved rows, so a plain search
    of the file would aim at the wrong pages. The messages table is a rowid table, whose
    leaf pages have type 0x0D and whose cells are a payload size, the rowid, then the row
    (a store of an earlier release kept its rows in an index b-tree, leaf type 0x0A, with no
    rowid); the rows' text is only in the table, so index pages never match."""
    pattern = re.compile(rb"(intact|olddamage|gone)-(\d{5})-")
    out: dict[int, list[tuple[str, int, int | None]]] = {}
    for page in range(1, len(data) // PAGE):
        base = page * PAGE
        if data[base] not in (0x0A, 0x0D):
            continue
        rows = []
        for i in range(int.from_bytes(data[base + 3:base + 5], "big")):
            ptr = base + int.from_bytes(data[base + 8 + 2 * i:base + 10 + 2 * i], "big")
            size, used = varint(data, ptr)
            rowid = None
            if data[base] == 0x0D:  # the rowid comes next
                rowid, more = varint(data, ptr + used)
                used += more
            found = pattern.search(data[ptr + used:ptr + used + size])
            if found:
                rows.append((found.group(1).decode(), int(found.group(2)), rowid))
        if rows:
            out[page] = rows
    return out


def inside_runs(leaves: dict[int, list[tuple[str, int, int | None]]], doomed,
                rooms: dict[str, dict]) -> set[int]:
    """The leaves holding only doomed rows whose neighbours in key order do too.

    The key is the b-tree's own: the rowid in a rowid table (commit order), (room id, seq)
    in the old layout. A seek may land on the leaf next to the one holding its key (the
    separator decides), so the leaves around every run of damage stay readable: the damage
    hits the doomed rooms' reads and no others. The last leaf is never wrecked either: in
    commit order it is where every room's next message goes."""
    def first_key(page: int) -> tuple:
        if leaves[page][0][2] is not None:
            return (min(r[2] for r in leaves[page]),)
        room, seq, _ = min(leaves[page], key=lambda r: (rooms[r[0]]["id"], r[1]))
        return rooms[room]["id"], seq

    order = sorted(leaves, key=first_key)
    bad = [all(doomed(r) for r in leaves[p]) for p in order]
    return {order[i] for i in range(1, len(order) - 1) if bad[i - 1] and bad[i] and bad[i + 1]}


def wreck_pages(path: Path, pages: set[int]) -> None:
    """Overwrite each page's b-tree header: SQLite can no longer read the page."""
    assert pages and 0 not in pages, pages
    with open(path, "r+b") as f:
        for page in pages:
            f.seek(page * PAGE)
            f.write(b"\xff" * 12)
        f.flush()
        os.fsync(f.fileno())


def assert_refuses_to_start(node: NodeProcess, *expected: str) -> str:
    """The node exits non-zero with one error line naming the file and the way back."""
    node.start(wait=False)
    wait_until(lambda: node.proc.poll() is not None, 30, what="the node to exit")
    assert node.proc.returncode != 0, node.log()
    log = node.log()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, log
    assert "Traceback" not in log, log
    for text in (str(store_file(node.log_path.parent)), RESTORE_DOC, *expected):
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture
async def written_store(tmp_path, connect) -> NodeProcess:
    """A node that stored two rooms and was stopped cleanly (its WAL checkpointed)."""
    node = one_node(tmp_path)
    node.start()
    try:
        await fill(node, connect, {"alpha": 30, "beta": 30})
    finally:
        assert node.terminate() == 0
    assert store_file(tmp_path).stat().st_size > 0
    return node


def test_a_fresh_data_directory_starts_empty_and_is_marked(tmp_path):
    node = one_node(tmp_path)
    try:
        node.start()
        assert node.healthz()[0] == 200
    finally:
        node.stop()
    assert (tmp_path / "data" / "i1" / MARKER_NAME).is_file()
    node.start()  # and it starts again on what it wrote
    node.stop()


async def test_an_empty_store_file_is_refused(written_store, tmp_path):
    store_file(tmp_path).write_bytes(b"")
    assert_refuses_to_start(written_store, "is empty")


async def test_an_empty_store_from_before_the_marker_is_refused(written_store, tmp_path):
    """A store created before ``store.created`` existed: its lock file gives it away."""
    (tmp_path / "data" / "i1" / MARKER_NAME).unlink()
    assert (tmp_path / "data" / "i1" / LOCK_NAME).exists()
    store_file(tmp_path).write_bytes(b"")
    assert_refuses_to_start(written_store, "is empty")


async def test_a_missing_store_file_is_refused(written_store, tmp_path):
    store_file(tmp_path).unlink()
    assert_refuses_to_start(written_store, "is missing")


def truncate_to_half(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def scramble_the_middle(path: Path) -> None:
    """Two pages of random bytes halfway through the file."""
    pages = path.stat().st_size // PAGE
    with open(path, "r+b") as f:
        f.seek(pages // 2 * PAGE)
        f.write(os.urandom(2 * PAGE))


async def test_a_truncated_store_file_is_refused(written_store, tmp_path):
    truncate_to_half(store_file(tmp_path))
    assert_refuses_to_start(written_store, "cannot be read")


async def test_garbage_in_the_middle_of_the_store_is_refused(written_store, tmp_path):
    scramble_the_middle(store_file(tmp_path))
    line = assert_refuses_to_start(written_store)
    assert "fails its integrity check" in line or "malformed" in line, line


async def test_moving_the_damaged_store_aside_starts_the_instance_empty(written_store, tmp_path):
    """What the refusal suggests when there is no copy to restore."""
    store_file(tmp_path).write_bytes(b"")
    assert_refuses_to_start(written_store)
    aside = tmp_path / "aside"
    aside.mkdir()
    for name in (DB_NAME, MARKER_NAME):
        (tmp_path / "data" / "i1" / name).rename(aside / name)
    try:
        written_store.start()
        assert written_store.healthz()[0] == 200
    finally:
        written_store.stop()


async def test_rooms_damaged_while_the_node_runs_answer_unavailable(tmp_path, connect):
    """The check at start passed; then pages go bad. Joins to a room whose latest pages are
    unreadable are refused ``unavailable`` (websocket and polling), a history request for
    a room's unreadable older pages is acked ``unavailable``, and other rooms carry on."""
    node = one_node(tmp_path)
    node.start()
    try:
        rooms = await fill(node, connect, {"intact": 60, "olddamage": 400, "gone": 200})
    finally:
        assert node.terminate() == 0
    node.start()  # passes its integrity check: nothing is damaged yet
    try:
        def doomed(row: tuple[str, int]) -> bool:
            return row[0] == "gone" or (row[0] == "olddamage" and row[1] <= 100)

        leaves = leaf_rows(store_file(tmp_path).read_bytes())
        wreck_pages(store_file(tmp_path), inside_runs(leaves, doomed, rooms))

        for transport in (["websocket"], ["polling"]):
            refused = await refusal(node, rooms["gone"], name="late", transport=transport)
            assert_refusal_shape(refused, "unavailable")

        reader = await connect(node, rooms["olddamage"], name="reader")
        assert reader.welcome["last_seq"] == 400  # the latest pages are fine
        ack = await reader.call("history", {"before": 81, "limit": 50})
        assert_failed_ack(ack, "unavailable")
        assert reader.connected

        alice = await connect(node, rooms["intact"], name="alice", transport=["polling"])
        bob = await connect(node, rooms["intact"], name="bob")
        assert [m["seq"] for m in bob.welcome["history"]] == list(range(11, 61))
        ack = await alice.send_ok("the other rooms carry on")
        assert (await bob.next("message"))["seq"] == ack["seq"] == 61
        assert node.proc.poll() is None
        await asyncio.to_thread(node.healthz)
    finally:
        node.stop()
    assert "Traceback" not in node.log(), node.log()
