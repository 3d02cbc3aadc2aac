"""SPEC section 4, durability: an acked message survives ``kill -9`` of its node and a
restart with the same seq, and the next message continues the count. SIGTERM drains and
exits 0 without losing anything."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import ENGINES, acreate_room, all_history, open_client
from tests.support import NodeProcess, make_cluster_config, running_nodes

pytestmark = pytest.mark.timeout(120)
ENGINES = ENGINES  # every test here runs on the fast and the stock engine


async def restart(node: NodeProcess) -> None:
    """Start the same node again on the same config and data directory."""
    await asyncio.to_thread(node.start)



async def test_acked_messages_survive_kill_9_with_the_same_seq(tmp_path, connect, transport,
                                                              engine):
    with running_nodes(tmp_path, 1, engine=engine,
                       node={"rate_limit_messages": 100_000}) as (node,):
        room = await acreate_room(node, "Durable")
        private = await acreate_room(node, "Durable private", private=True)
        alice = await connect(node, room, name="alice", transport=transport)
        acked = {}
        for i in range(1, 21):
            ack = await alice.send_ok(f"m{i}", client_id=f"c{i}")
            acked[ack["seq"]] = (f"m{i}", ack["ts"])
        assert sorted(acked) == list(range(1, 21))

        node.kill()
        await alice.close()
        await restart(node)

        bob = await connect(node, room, name="bob", transport=transport)
        assert bob.welcome["room"] == {"id": room["id"], "name": "Durable", "private": False}
        assert bob.welcome["last_seq"] == 20
        stored = {m["seq"]: (m["text"], m["ts"]) for m in await all_history(bob)}
        assert stored == acked

        ack = await bob.send_ok("after restart")
        assert ack["seq"] == 21
        # a retry of a message acked before the crash is still recognised (same member)
        alice2 = await connect(node, room, name="alice", transport=transport,
                               token=alice.token)
        assert (await alice2.send_ok("m5", client_id="c5"))["seq"] == 5

        # the private room and its invite survive too
        carol = await connect(node, private, name="carol", transport=transport)
        assert carol.welcome["room"]["private"] is True
        for c in (bob, alice2, carol):
            await c.close()


async def test_every_acked_message_survives_kill_9_mid_burst(tmp_path, connect, engine):
    """Several senders fire without waiting; the node is killed while writes are in flight.
    Whatever was acked is stored with its seq, and the stored seqs have no gap."""
    with running_nodes(tmp_path, 1, engine=engine,
                       node={"rate_limit_messages": 100_000}) as (node,):
        room = await acreate_room(node)
        senders = [await connect(node, room, name=f"s{i}") for i in range(3)]
        acked: dict[int, str] = {}
        enough = asyncio.Event()

        async def fire(client, n: int) -> None:
            for i in range(n):
                text = f"{client.welcome['you']['name']}-{i}"
                try:
                    ack = await client.call("message", {"text": text}, timeout=5)
                except Exception:  # the node is gone: stop sending
                    return
                if isinstance(ack, dict) and ack.get("ok"):
                    acked[ack["seq"]] = text
                    if len(acked) >= 60:
                        enough.set()

        tasks = [asyncio.create_task(fire(c, 400)) for c in senders]
        await asyncio.wait_for(enough.wait(), 30)
        node.kill()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        for c in senders:
            await c.close()

        await restart(node)
        reader = await connect(node, room, name="reader")
        stored = {m["seq"]: m["text"] for m in await all_history(reader)}
        for seq, text in acked.items():
            assert stored.get(seq) == text, f"acked seq {seq} ({text}) lost or changed"
        assert sorted(stored) == list(range(1, len(stored) + 1)), "stored seqs have a gap"
        ack = await reader.send_ok("next")
        assert ack["seq"] == len(stored) + 1
        await reader.close()


async def test_rooms_survive_kill_9(tmp_path, engine):
    with running_nodes(tmp_path, 1, engine=engine) as (node,):
        rooms = [await acreate_room(node, f"room {i}", private=i % 2 == 1) for i in range(5)]
        node.kill()
        await restart(node)
        for room in rooms:
            client = await open_client(node, room, name="back")
            assert client.welcome["room"]["name"] == room["name"]
            assert client.welcome["room"]["private"] == room["private"]
            await client.close()


async def test_sigterm_exits_zero_and_keeps_acked_messages(tmp_path, transport, engine):
    cfg_path, instances = make_cluster_config(tmp_path, 1, engine=engine)
    node = NodeProcess(cfg_path, instances[0], tmp_path)
    await asyncio.to_thread(node.start)
    try:
        room = await acreate_room(node)
        alice = await open_client(node, room, name="alice", transport=transport)
        for i in range(5):
            await alice.send_ok(f"m{i}")
        started = time.monotonic()
        code = await asyncio.to_thread(node.terminate, 60)
        took = time.monotonic() - started
        await alice.close()
        assert code == 0, node.log()
        # drain_grace_seconds is 1: a stop must not wait for idle long-polls to time out
        assert took < 10, f"SIGTERM took {took:.1f}s to exit with a {transport} client"

        await restart(node)
        bob = await open_client(node, room, name="bob", transport=transport)
        assert [m["text"] for m in bob.welcome["history"]] == [f"m{i}" for i in range(5)]
        await bob.close()
    finally:
        node.stop()


async def test_clients_are_disconnected_when_the_node_drains(tmp_path, transport, engine):
    with running_nodes(tmp_path, 1, engine=engine) as (node,):
        room = await acreate_room(node)
        alice = await open_client(node, room, name="alice", transport=transport)
        code = await asyncio.to_thread(node.terminate, 60)
        assert code == 0
        await asyncio.wait_for(alice.disconnected.wait(), 10)
        await alice.close()
