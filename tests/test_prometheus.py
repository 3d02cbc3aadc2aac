"""``GET /metrics``: the node's counters as Prometheus scrapes them, from real nodes.

A scrape is parsed with prometheus-client's own parser, so what is asserted is what a
Prometheus server would read: names, labels, counter and histogram shapes."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardchat.node.buckets import Buckets
from tests.conftest import acreate_room
from tests.support import (
    AUTH,
    async_wait_until,
    http_json,
    in_thread,
    running_nodes,
    wait_until,
)


def scrape(node, headers=AUTH) -> dict[tuple[str, tuple], float]:
    """Every sample of one scrape: (name, sorted labels) -> value."""
    req = urllib.request.Request(f"{node.internal_url}/metrics", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_need_the_cluster_secret(node1):
    status, body = http_json("GET", f"{node1.internal_url}/metrics",
                             headers={"Authorization": "Bearer wrong"})
    assert status == 401 and body["error"] == "unauthorized"


async def test_a_scrape_counts_messages_deliveries_commits_and_connections(node1, connect,
                                                                           transport):
    room = await acreate_room(node1, "scraped")
    before = await asyncio.to_thread(scrape, node1)
    alice = await connect(node1, room, name="alice", transport=transport)
    bob = await connect(node1, room, name="bob", transport=transport)
    for i in range(4):
        await alice.send_ok(f"scraped {i}")
        await bob.next("message")
    after = await asyncio.to_thread(scrape, node1)
    assert value(after, "shardchat_messages_stored_total") - \
        value(before, "shardchat_messages_stored_total") == 4
    # every commit is timed: the histogram's count follows the commits counter
    commits = value(after, "shardchat_store_commits_total")
    assert value(after, "shardchat_store_commit_seconds_count") == commits
    assert value(after, "shardchat_store_commit_seconds_bucket", le="+Inf") == commits
    assert value(after, "shardchat_store_commit_seconds_sum") > 0
    delivered = sum(value(after, "shardchat_deliveries_total", path=p) for p in ("fast", "slow"))
    was = sum(value(before, "shardchat_deliveries_total", path=p) for p in ("fast", "slow"))
    assert delivered - was >= 8  # 4 messages to 2 members
    assert value(after, "shardchat_connections") >= 2
    assert value(after, "process_resident_memory_bytes") > 10_000_000
    assert value(after, "process_open_fds") > 0


async def test_rate_limit_refusals_are_counted_by_kind(tmp_path, connect):
    with running_nodes(tmp_path, 1, node={"rate_limit_messages": 3}) as (node,):
        room = await acreate_room(node, "limited")
        alice = await connect(node, room, name="alice")
        acks = [await alice.send(f"flood {i}") for i in range(5)]
        assert [a.get("error") for a in acks if not a.get("ok")] == ["rate_limited"] * 2
        samples = await asyncio.to_thread(scrape, node)
        refused = {labels: v for (name, labels), v in samples.items()
                   if name == "shardchat_rate_limited_total"}
        assert sum(refused.values()) == 2
        assert all(dict(labels)["kind"] == "messages" for labels in refused), refused


def test_a_peer_that_stops_answering_shows_as_down(tmp_path):
    with running_nodes(tmp_path, 2) as (one, two):
        wait_until(lambda: value(scrape(one), "shardchat_peer_up", peer="2") == 1,
                   timeout=20, what="instance 2 seen up by instance 1")
        two.kill()
        wait_until(lambda: value(scrape(one), "shardchat_peer_up", peer="2") == 0,
                   timeout=20, what="instance 2 seen down by instance 1")


@pytest.mark.parametrize(("observed", "bucket"), [(0.001, "0.001"), (0.0011, "0.0025"),
                                                   (5.0, "+Inf")])
def test_a_duration_counts_in_the_first_bucket_at_or_above_it(observed, bucket):
    b = Buckets((0.001, 0.0025, 1.0))
    b.observe(observed)
    pairs, total = b.snapshot()
    first = next(le for le, count in pairs if count == 1)
    assert first == bucket and total == observed and pairs[-1] == ("+Inf", 1)


async def test_replication_lag_is_scraped_from_the_owner_and_the_follower(tmp_path, connect):
    with running_nodes(tmp_path, 2, node={"replication": "async"}) as (one, two):
        wait_until(lambda: value(scrape(one), "shardchat_replication_follower_connected") == 1,
                   timeout=20, what="instance 2 reading instance 1's stream")
        room = await acreate_room(one, "replicated")
        alice = await connect(one, room, name="alice")
        for i in range(3):
            await alice.send_ok(f"copied {i}")
        await async_wait_until(in_thread(
            lambda: value(scrape(one), "shardchat_replication_lag_records") == 0),
            timeout=20, what="the follower caught up")
        follower = await asyncio.to_thread(scrape, two)
        assert value(follower, "shardchat_following_lag_records", owner="1") == 0
        assert value(await asyncio.to_thread(scrape, one),
                     "shardchat_replication_lag_seconds") == 0
