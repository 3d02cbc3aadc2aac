"""SPEC section 9, off the machine: an instance lost with its disk comes back from its
Litestream replica with every message acked a sync interval before the loss.

Real processes throughout: a node replicating to a directory or to a moto S3 server,
Socket.IO clients, ``kill -9`` of Litestream and the node together (the machine is gone:
neither gets to upload anything more), the data directory deleted, ``shardchat restore``,
and the node started again on what came back. What was acked and seen in the replica
(polled by restoring it, not by a sleep) is all there with its seq, the rooms and member
identities too (a retry with a ``client_id`` still deduplicates), and replication goes on
from the restored store. Then the sender goes on for ``BOUND`` seconds and more right up to
the kill: every message acked ``BOUND`` seconds or more before the kill must come back
(that is the promise of the sync interval: Litestream looks at the WAL every monitor
interval, here the sync interval, uploads every sync interval, and the upload itself takes
a moment). The messages acked after that are the loss window: the test prints the age of
the oldest lost one at the kill, and checks that what came back is a prefix (the lost ones
are the newest, with no hole before them).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import time

import pytest

from shardchat.node.replication import litestream
from tests.conftest import acreate_room
from tests.offsite import AWS_ENV, moto_s3, node_settings, shardchat, wait_for_replica
from tests.support import AUTH, NodeProcess, http_json, make_cluster_config, start_nodes

pytestmark = pytest.mark.timeout(180)
moto_s3 = moto_s3  # the module-scoped moto server fixture

ACKED = 30  # messages acked and seen in the replica before the loss
SYNC_INTERVAL = 1.0  # node.replicate_sync_interval of the test (the default)
# Acked this long before the kill, a message is in the replica: the monitor interval (equal
# to the sync interval here), the sync interval, and a second for the upload on a busy
# machine (bench.offsite measured at most 1.02 s from the oldest lost ack to the kill).
BOUND = 2 * SYNC_INTERVAL + 1.0
SENDING = BOUND + 1.0  # seconds of sending right up to the kill


def replication(node: NodeProcess) -> dict:
    status, body = http_json("GET", f"{node.internal_url}/internal/metrics", headers=AUTH)
    assert status == 200, body
    return body["replication"]


def lose_the_machine(node: NodeProcess) -> None:
    """SIGKILL Litestream, then the node: nothing more reaches the replica."""
    pid = replication(node)["pid"]
    assert pid, "litestream is not running"
    os.kill(pid, signal.SIGKILL)
    assert node.kill() == -9


@pytest.mark.parametrize("kind", ["file", "s3"])
async def test_a_lost_instance_comes_back_from_its_replica(kind, request, tmp_path, connect):
    moto = request.getfixturevalue("moto_s3") if kind == "s3" else None
    settings = node_settings(kind, tmp_path, moto, prefix=f"lost-{tmp_path.name}",
                             sync_interval=SYNC_INTERVAL)
    cfg_path, (inst,) = make_cluster_config(tmp_path, 1, node={
        **settings, "rate_limit_messages": 100_000})
    node = NodeProcess(cfg_path, inst, tmp_path, env=AWS_ENV)
    data = tmp_path / "data" / "i1"
    ls_config, db = data / litestream.CONFIG_NAME, (data / "store.sqlite3").absolute()
    scratch = tmp_path / "scratch.sqlite3"
    try:
        await asyncio.to_thread(start_nodes, [node])
        room = await acreate_room(node, "Survivor")
        other = await acreate_room(node, "Other", private=True)
        alice = await connect(node, room, name="alice")
        bob = await connect(node, other, name="bob")
        acked = {}
        for i in range(1, ACKED + 1):
            ack = await alice.send_ok(f"m{i}", client_id=f"c{i}")
            acked[ack["seq"]] = f"m{i}"
        for i in range(1, 6):
            await bob.send_ok(f"b{i}", client_id=f"b{i}")
        assert sorted(acked) == list(range(1, ACKED + 1))
        waited = await asyncio.to_thread(wait_for_replica, ls_config, db, scratch,
                                         {room["id"]: ACKED, other["id"]: 5})
        print(f"\n[{kind}] the replica held message {ACKED} {waited:.2f} s after its ack")

        acked_at: dict[int, float] = {}  # seq -> when its ack arrived
        started = time.monotonic()
        while time.monotonic() - started < SENDING:  # acks pace the sender, nothing else
            i = ACKED + len(acked_at) + 1
            ack = await alice.send_ok(f"m{i}", client_id=f"c{i}")
            acked_at[ack["seq"]] = time.monotonic()
        lose_the_machine(node)
        killed_at = time.monotonic()
        await alice.close()
        await bob.close()
        shutil.rmtree(data)

        done = await asyncio.to_thread(shardchat, "restore", "--config", str(cfg_path),
                                       "--instance", "1")
        assert done.returncode == 0, done.stderr
        assert "2 rooms" in done.stdout and room["id"] in done.stdout, done.stdout

        restored = sqlite3.connect(f"file:{data / 'store.sqlite3'}?mode=ro", uri=True)
        try:
            rows = restored.execute("SELECT seq, text FROM messages WHERE room_id = ? "
                                    "ORDER BY seq", (room["id"],)).fetchall()
        finally:
            restored.close()
        top = rows[-1][0]
        assert rows == [(s, f"m{s}") for s in range(1, top + 1)]  # a prefix, no hole
        due = [s for s, at in acked_at.items() if killed_at - at >= BOUND]
        assert due, f"nothing was acked {BOUND:g} s before the kill"
        assert max(due) <= top, (f"message {max(due)} was acked "
                                 f"{killed_at - acked_at[max(due)]:.2f} s before the kill "
                                 f"but the restore stops at {top}")
        lost = [s for s in acked_at if s > top]
        window = killed_at - acked_at[min(lost)] if lost else 0.0
        print(f"[{kind}] {len(acked_at)} messages acked in the {SENDING:g} s before the kill: "
              f"{len(lost)} lost, the oldest of them acked {window:.2f} s before the kill")
        await asyncio.to_thread(node.start)

        back = await connect(node, room, name="alice", token=alice.token)
        assert back.welcome["last_seq"] == top
        history = await back.call("history", {"before": top + 1, "limit": 100})
        assert [m["seq"] for m in history["messages"]] == list(
            range(max(1, top - 99), top + 1))
        assert back.welcome["you"]["member"] == alice.welcome["you"]["member"]
        retry = await back.send_ok("m5", client_id="c5")
        assert retry["seq"] == 5  # the dedup record came back with the message
        fresh = await back.send_ok("after the restore", client_id="new-1")
        assert fresh["seq"] == top + 1

        bob_back = await connect(node, other, name="bob", token=bob.token)
        assert bob_back.welcome["last_seq"] == 5
        assert bob_back.welcome["room"]["private"] is True

        # replication goes on from the restored store, into the same place
        await asyncio.to_thread(wait_for_replica, ls_config, db, scratch,
                                {room["id"]: top + 1})
        assert replication(node)["restarts"] == 0
    finally:
        await asyncio.to_thread(node.stop)
