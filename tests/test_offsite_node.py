"""A node's Litestream (``node/replication/supervisor.py``) and ``shardchat restore``'s
refusals, on real processes with a directory replica.

Litestream that dies is restarted and counted while the node serves on; the node leaves
the WAL checkpoints to it; Litestream never outlives its node; a node stopped with SIGTERM
leaves every acked message in the replica; a node refuses to start empty over a replica
that holds a backup; ``shardchat restore`` refuses a directory that holds a store or that a
node uses (3), finds nothing in an empty replica (4), needs ``replicate_to`` (2) and puts
nothing in place from a damaged replica (1).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest

from shardchat.node.replication import litestream
from tests.conftest import acreate_room
from tests.offsite import AWS_ENV, node_settings, shardchat, wait_for_replica
from tests.support import (
    AUTH,
    NodeProcess,
    async_wait_until,
    http_json,
    make_cluster_config,
    start_nodes,
    wait_until,
)

pytestmark = pytest.mark.timeout(150)


class Replicated:
    """One node replicating to ``tmp/replica``; its data directory and Litestream config."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cfg_path, (inst,) = make_cluster_config(tmp, 1, node={
            **node_settings("file", tmp, None), "rate_limit_messages": 100_000})
        self.node = NodeProcess(self.cfg_path, inst, tmp, env=AWS_ENV)
        self.data = tmp / "data" / "i1"
        self.db = (self.data / "store.sqlite3").absolute()
        self.ls_config = self.data / litestream.CONFIG_NAME
        self.scratch = tmp / "scratch.sqlite3"

    def replication(self) -> dict:
        status, body = http_json("GET", f"{self.node.internal_url}/internal/metrics",
                                 headers=AUTH)
        assert status == 200, body
        return body["replication"]

    def restore(self, *extra: str):
        return shardchat("restore", "--config", str(self.cfg_path), "--instance", "1", *extra)

    def replica_holds(self, wanted: dict[str, int]) -> float:
        return wait_for_replica(self.ls_config, self.db, self.scratch, wanted)


@pytest.fixture
def replicated(tmp_path):
    setup = Replicated(tmp_path)
    start_nodes([setup.node])
    try:
        yield setup
    finally:
        setup.node.stop()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too: it only awaits its reaper
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


async def test_a_dead_litestream_is_restarted_and_counted_while_the_node_serves(
        replicated, connect):
    room = await acreate_room(replicated.node, "Restarts")
    alice = await connect(replicated.node, room, name="alice")
    first = replicated.replication()
    assert first["running"] and first["restarts"] == 0 and first["starts"] == 1
    os.kill(first["pid"], signal.SIGKILL)

    ack = await alice.send_ok("while litestream is down", client_id="down-1")
    await async_wait_until(lambda: replicated.replication()["starts"] == 2, timeout=20,
                           what="litestream restarted")
    now = replicated.replication()
    assert now["restarts"] == 1 and now["last_exit"] == -9 and now["pid"] != first["pid"]
    assert "litestream exited with code -9" in replicated.node.log()
    # what was committed while it was down is uploaded by the new one
    await asyncio.to_thread(replicated.replica_holds, {room["id"]: ack["seq"]})


async def test_a_replicating_node_leaves_the_wal_checkpoints_to_litestream(replicated):
    """The node's own checkpointer could truncate WAL frames Litestream has not shipped
    yet (``store/checkpoint.py``); with ``replicate_to`` it does not start, and says so."""
    assert "are left to Litestream (replication is on)" in replicated.node.run_log()
    assert replicated.replication()["running"]


async def test_litestream_does_not_outlive_its_node(replicated):
    pid = replicated.replication()["pid"]
    assert replicated.node.kill() == -9
    wait_until(lambda: gone(pid), timeout=10, what=f"litestream {pid} ending with its node")


async def test_a_stopped_node_leaves_every_acked_message_in_the_replica(replicated, connect):
    room = await acreate_room(replicated.node, "Stop")
    alice = await connect(replicated.node, room, name="alice")
    for i in range(1, 41):
        await alice.send_ok(f"m{i}", client_id=f"c{i}")
    pid = replicated.replication()["pid"]
    assert await asyncio.to_thread(replicated.node.stop) == 0
    assert gone(pid)
    # no wait: the stop itself uploaded the last commits
    await asyncio.to_thread(wait_for_replica, replicated.ls_config, replicated.db,
                            replicated.scratch, {room["id"]: 40}, 0.1)


async def test_restore_refuses_a_directory_in_use_or_holding_a_store(replicated):
    running = await asyncio.to_thread(replicated.restore)
    assert running.returncode == 3 and "in use" in running.stderr, running.stderr
    await asyncio.to_thread(replicated.node.stop)
    before = sorted(p.name for p in replicated.data.iterdir())
    held = await asyncio.to_thread(replicated.restore)
    assert held.returncode == 3 and "--force" in held.stderr, held.stderr
    assert sorted(p.name for p in replicated.data.iterdir()) == before

    forced = await asyncio.to_thread(replicated.restore, "--force")
    assert forced.returncode == 0, forced.stderr
    (aside,) = replicated.data.glob("replaced-*")
    assert (aside / "store.sqlite3").exists() and (replicated.data / "store.sqlite3").exists()
    await asyncio.to_thread(replicated.node.start)  # the restored store serves


async def test_a_node_will_not_start_empty_over_a_replica_with_a_backup(replicated,
                                                                        connect):
    room = await acreate_room(replicated.node, "Backed up")
    alice = await connect(replicated.node, room, name="alice")
    ack = await alice.send_ok("in the replica")
    await asyncio.to_thread(replicated.replica_holds, {room["id"]: ack["seq"]})
    await alice.close()
    await asyncio.to_thread(replicated.node.stop)
    shutil.rmtree(replicated.data)
    replicated.node.spawn()
    code = await replicated.node.wait_async(60)
    assert code == 1
    assert "shardchat restore" in replicated.node.run_log()
    assert not (replicated.data / "store.sqlite3").exists()


async def test_restore_from_an_empty_replica_finds_nothing(tmp_path):
    setup = Replicated(tmp_path)
    done = await asyncio.to_thread(setup.restore)
    assert done.returncode == 4 and "holds no backup" in done.stderr, done.stderr
    assert not (setup.data / "store.sqlite3").exists()


async def test_restore_needs_replicate_to(tmp_path):
    cfg_path, _ = make_cluster_config(tmp_path, 1)
    done = await asyncio.to_thread(shardchat, "restore", "--config", str(cfg_path),
                                   "--instance", "1")
    assert done.returncode == 2 and "node.replicate_to" in done.stderr, done.stderr


async def test_a_damaged_replica_puts_nothing_in_place(replicated):
    replica = replicated.tmp / "replica" / "i1"
    # a node stopped right after its start may not have shipped its first snapshot yet:
    # then there is nothing to damage, and restore rightly finds no backup (exit 4)
    await async_wait_until(lambda: any(replica.rglob("*.ltx")), timeout=30,
                           what="the node's first snapshot in the replica")
    await asyncio.to_thread(replicated.node.stop)
    shutil.rmtree(replicated.data)
    for ltx in replica.rglob("*.ltx"):
        raw = bytearray(ltx.read_bytes())
        for at in range(100, len(raw), 97):
            raw[at] ^= 0xFF
        ltx.write_bytes(bytes(raw))
    done = await asyncio.to_thread(replicated.restore)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert not (replicated.data / "store.sqlite3").exists()
    assert not list(replicated.data.glob("store.sqlite3*"))
