"""``GET /metrics``: the node's counters as Prometheus scrapes them, from real nodes.

A scrape is parsed with prometheus-client's own parser, so what is asserted is what a
Prometheus server would read: names, labels, counter and histogram shapes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardchat.node import prometheus
from shardchat.node.buckets import Buckets
from tests.conftest import acreate_room
from tests.support import (
    AUTH,
    ROOT,
    NodeProcess,
    async_wait_until,
    http_json,
    in_thread,
    make_cluster_config,
    running_nodes,
    start_nodes,
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
    await acreate_room(node1, "one more")
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
    assert value(after, "shardchat_rooms") - value(before, "shardchat_rooms") == 1
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

        # the follower dies: what it has not acknowledged shows on the owner, and ages
        two.kill()
        await async_wait_until(in_thread(
            lambda: value(scrape(one), "shardchat_replication_follower_connected") == 0),
            timeout=20, what="instance 1 seeing its follower gone")
        for i in range(2):
            await alice.send_ok(f"not copied {i}")
        await async_wait_until(in_thread(
            lambda: value(scrape(one), "shardchat_replication_lag_seconds") > 0),
            timeout=20, what="the oldest unacknowledged batch ageing")
        owner = await asyncio.to_thread(scrape, one)
        assert value(owner, "shardchat_replication_lag_records") >= 1
        assert value(owner, "shardchat_replication_lag_bytes") > 0


def test_gc_pauses_are_counted_and_timed(tmp_path):
    """A node told to run a full collection every 0.1 s (SHARDCHAT_GC_FULL_INTERVAL):
    each shows as a generation-2 collection and as one more timed pause."""
    path, instances = make_cluster_config(tmp_path, 1)
    node = NodeProcess(path, instances[0], tmp_path,
                       env={**os.environ, "SHARDCHAT_GC_FULL_INTERVAL": "0.1"})
    start_nodes([node])
    try:
        first = scrape(node)
        wait_until(lambda: value(scrape(node), "shardchat_gc_collections_total",
                                 generation="2")
                   >= value(first, "shardchat_gc_collections_total", generation="2") + 3,
                   timeout=20, what="three more full collections")
        later = scrape(node)
        full = (value(later, "shardchat_gc_collections_total", generation="2")
                - value(first, "shardchat_gc_collections_total", generation="2"))
        timed = (value(later, "shardchat_gc_pause_seconds_count")
                 - value(first, "shardchat_gc_pause_seconds_count"))
        assert timed >= full >= 3
        assert value(later, "shardchat_gc_pause_seconds_sum") > \
            value(first, "shardchat_gc_pause_seconds_sum")
        assert value(later, "shardchat_gc_pause_seconds_bucket", le="+Inf") == \
            value(later, "shardchat_gc_pause_seconds_count")
    finally:
        node.stop()


METRIC = re.compile(r"\b((?:shardchat|process)_[a-z0-9_]*[a-z0-9])\b")


def documented_metrics() -> set[str]:
    """Every metric name docs/operations.md's Prometheus section mentions."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("### Prometheus: `GET /metrics`"):text.index("### The ops page")]
    return set(METRIC.findall(section))


def dashboard_metrics() -> set[str]:
    """Every metric name a query of docs/grafana-dashboard.json uses."""
    exprs: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            exprs.extend(v for k, v in node.items() if k == "expr")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text()))
    return {name for e in exprs for name in METRIC.findall(e)}


def served_families(node) -> set[str]:
    """The families one scrape announces, named as they are queried: a counter with its
    ``_total``, a histogram by its base name (a family may have no sample yet)."""
    req = urllib.request.Request(f"{node.internal_url}/metrics", headers=AUTH)
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    return {f.name + "_total" if f.type == "counter" else f.name
            for f in text_string_to_metric_families(text)}


def family_of(name: str, families: set[str]) -> str:
    """A histogram's series name (``_bucket``, ``_sum``, ``_count``) as its family's."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in families:
            return name.removesuffix(suffix)
    return name


def test_the_docs_and_the_dashboard_name_only_metrics_a_node_serves(tmp_path):
    """An empty Grafana panel or a documented metric nobody serves is a broken promise:
    every name the docs' table and the dashboard's queries use is in a real scrape (two
    nodes replicating in sync mode, so the follower's and the sync acks' metrics are there;
    the off-machine copy's come from the collector's own code, as they need Litestream),
    and every ``shardchat_`` family a node serves is documented."""
    with running_nodes(tmp_path, 2, node={"replication": "sync"}) as (one, two):
        wait_until(lambda: value(scrape(one), "shardchat_replication_follower_connected") == 1,
                   timeout=20, what="instance 2 reading instance 1's stream")
        served = served_families(one) | served_families(two)
    served |= {f.name + "_total" if f.type == "counter" else f.name
               for f in prometheus._replication_families(
                   {"running": True, "restarts": 0, "last_upload_age": 1.0})}
    documented = documented_metrics()
    assert {"shardchat_replication_lag_seconds", "shardchat_gc_pause_seconds",
            "shardchat_store_commit_seconds", "shardchat_peer_up"} <= documented
    for name in documented | dashboard_metrics():
        assert family_of(name, served) in served, f"{name} is not served"
    undocumented = {f for f in served if f.startswith("shardchat_")} - documented
    assert not undocumented, f"served but not in docs/operations.md: {sorted(undocumented)}"
    assert "shardchat_replication_lag_seconds" in dashboard_metrics()
