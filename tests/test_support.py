"""The test support's own promises, since every node test leans on them: a node start
survives a port another process took after it was picked, and the async waiter leaves the
event loop running."""

from __future__ import annotations

import asyncio
import socket
import tomllib

import pytest

from tests.support import (
    GiveUp,
    NodeProcess,
    async_wait_until,
    http_json,
    make_cluster_config,
    start_nodes,
    wait_until,
)


def test_a_node_whose_port_was_taken_starts_on_fresh_ports(tmp_path):
    cfg_path, instances = make_cluster_config(tmp_path, 2)
    nodes = [NodeProcess(cfg_path, inst, tmp_path) for inst in instances]
    taken = instances[1]["internal_port"]
    with socket.socket() as squatter:  # another process got there first
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            start_nodes(nodes)
            assert nodes[1].internal_port != taken
            written = tomllib.loads(cfg_path.read_text())["instances"]
            assert [(i["port"], i["internal_port"]) for i in written] == \
                [(n.port, n.internal_port) for n in nodes]
            # the nodes know each other's new ports: rooms created through node 1 land on
            # node 2 too, once node 1's stats poll has found it
            def placed_on_peer() -> bool:
                status, room = http_json("POST", f"{nodes[0].base_url}/api/rooms",
                                         {"name": "r"})
                assert status == 201, room
                return room["instance"] == 2
            wait_until(placed_on_peer, timeout=10, what="a room placed on node 2")
        finally:
            for node in nodes:
                node.stop()


async def test_async_wait_until_keeps_the_loop_running():
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(ticker())
    try:
        assert await async_wait_until(lambda: ticks >= 5, timeout=5) is True
    finally:
        task.cancel()


async def test_give_up_ends_a_wait_at_once():
    loop = asyncio.get_running_loop()
    started = loop.time()

    def never() -> bool:
        raise GiveUp("the process this waits for has exited")

    with pytest.raises(GiveUp):
        await async_wait_until(never, timeout=30)
    assert loop.time() - started < 5
