"""The operator's view of a node: ``GET /internal/metrics`` counts where the work went."""

from __future__ import annotations

import asyncio

from shardchat.node import gctune
from tests.conftest import acreate_room
from tests.support import AUTH, http_json


def metrics(node, headers=AUTH):
    return http_json("GET", f"{node.internal_url}/internal/metrics", headers=headers)


def test_metrics_need_the_cluster_secret(node1):
    status, body = metrics(node1, headers={"Authorization": "Bearer not-the-secret"})
    assert status == 401 and body["error"] == "unauthorized"


async def test_metrics_count_stored_messages_and_deliveries(node1, connect, transport):
    room = await acreate_room(node1, "metrics")
    before = (await asyncio.to_thread(metrics, node1))[1]
    alice = await connect(node1, room, name="alice", transport=transport)
    bob = await connect(node1, room, name="bob", transport=transport)
    for i in range(3):
        await alice.send_ok(f"counted {i}")
        await bob.next("message")
    status, after = await asyncio.to_thread(metrics, node1)
    assert status == 200 and after["instance"] == 1
    assert after["store"]["messages"] - before["store"]["messages"] == 3
    assert after["store"]["commits"] > before["store"]["commits"]
    fanout_before = before["fanout"]["fast"] + before["fanout"]["slow"]
    # 3 messages to 2 members each, plus welcome/presence packets
    assert after["fanout"]["fast"] + after["fanout"]["slow"] - fanout_before >= 6
    assert after["engine"] == "fast"  # the default node.engine
    # the node runs with its collector tuned: start-up objects frozen, raised thresholds
    assert after["gc"]["thresholds"] == list(gctune.THRESHOLDS)
    assert after["gc"]["frozen"] > 0
