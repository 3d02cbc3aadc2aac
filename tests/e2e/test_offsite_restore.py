"""SPEC section 9, off the machine: an instance lost with its disk comes back from its
Litestream replica with every message acked a sync interval before the loss.

Real processes throughout: a node replicating to a directory or to a moto S3 server,
Socket.IO clients, ``kill -9`` of Litestream and the node together (the machine is gone:
neither gets to upload anything more), the data directory deleted, ``shardchat restore``,
and the node started again on what came back. What was acked and seen in the replica
(polled by restoring it, not by a sleep) is all there with its seq, the rooms and member
identities too (a retry with a ``client_id`` still deduplicates), and replication goes on
from the restored store. The messages acked in the last moment before the kill are the
loss window: the test prints how many of them came back, and checks that what came back
is a prefix (the lost ones are the newest, with no hole before them).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal

import pytest

from shardchat.node.replication import litestream
from tests.conftest import acreate_room
from tests.offsite import AWS_ENV, moto_s3, node_settings, shardchat, wait_for_replica
from tests.support import AUTH, NodeProcess, http_json, make_cluster_config, start_nodes

pytestmark = pytest.mark.timeout(180)
moto_s3 = moto_s3  # the module-scoped moto server fixture

ACKED = 30  # messages acked and seen in the replica before the loss
LAST_MOMENT = 20  # messages acked right before the kill: the loss window


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
    settings = node_settings(kind, tmp_path, moto, prefix=f"lost-{tmp_path.name}")
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

        for i in range(ACKED + 1, ACKED + LAST_MOMENT + 1):
            await alice.send_ok(f"m{i}", client_id=f"c{i}")
        lose_the_machine(node)
        await alice.close()
        await bob.close()
        shutil.rmtree(data)

        done = await asyncio.to_thread(shardchat, "restore", "--config", str(cfg_path),
                                       "--instance", "1")
        assert done.returncode == 0, done.stderr
        assert "2 rooms" in done.stdout and room["id"] in done.stdout, done.stdout
        await asyncio.to_thread(node.start)

        back = await connect(node, room, name="alice", token=alice.token)
        top = back.welcome["last_seq"]
        assert ACKED <= top <= ACKED + LAST_MOMENT
        print(f"[{kind}] of the {LAST_MOMENT} messages acked in the last moment before the "
              f"kill, {top - ACKED} came back")
        history = await back.call("history", {"before": top + 1, "limit": 100})
        assert [m["seq"] for m in history["messages"]] == list(range(1, top + 1))
        assert all(m["text"] == f"m{m['seq']}" for m in history["messages"])
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
