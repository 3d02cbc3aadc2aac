"""``GET /metrics``: the node's counters in Prometheus's text format (``prometheus-client``).

Nothing here sits on a hot path. The node already counts what it does (the store's writer,
the fan-out, the rate limiter, the garbage collector's callback, the peer poller) for
``GET /internal/metrics``; a scrape reads those counters and turns them into metric families
then (``NodeCollector.collect``), so a node that is never scraped pays nothing, and the JSON
and the Prometheus views can never disagree. Each node has a registry of its own (several
nodes may share a process in tests), holding this collector and the library's process
collector (CPU seconds, resident memory, open file descriptors).

Names follow Prometheus's conventions: a ``shardchat_`` prefix, ``_total`` on counters,
base units (seconds, bytes). ``docs/operations.md`` lists them; ``docs/grafana-dashboard.json``
charts them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from shardchat.node import gctune
from shardchat.node.buckets import Buckets

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# the fan-out counters of ``engine.stats()["fanout"]``: (key, metric, what it counts)
_FANOUT = (
    ("fast", "deliveries", "path", "Packets delivered to room members, by fan-out path."),
    ("slow", "deliveries", "path", None),
    ("direct", "single_deliveries", "path",
     "Packets to one client (acks, welcome, history), written straight or queued."),
    ("queued", "single_deliveries", "path", None),
)


class Observed(Protocol):
    """What the collector reads of a node (``node/main.py``'s ``Node``)."""

    number: int

    def stats(self) -> dict[str, Any]: ...

    def metrics(self) -> dict[str, Any]: ...

    def commit_seconds(self) -> Buckets: ...

    def peer_health(self) -> list[dict[str, Any]]:
        """One row per peer: ``instance``, ``healthy``, ``age`` (seconds since its stats)."""


class NodeCollector(Collector):
    """Builds every ``shardchat_*`` family from the node's counters at scrape time."""

    def __init__(self, node: Observed) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        stats, m = node.stats(), node.metrics()
        yield from _node_families(stats)
        yield from _store_families(m["store"], node.commit_seconds())
        yield from _fanout_families(m["fanout"])
        yield from _limit_families(m["rate_limits"])
        yield _gauge("presence_pending_batches",
                     "Rooms whose batched presence event waits for the next tick.",
                     m["presence"]["pending_batches"])
        yield from _gc_families(gctune.WATCH)
        yield from _peer_families(node.peer_health())
        if "replication" in m:
            yield from _replication_families(m["replication"])
        if "online_replication" in m:
            yield from _online_families(m["online_replication"])


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"shardchat_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"shardchat_{name}", doc, value=value)


def _histogram(name: str, doc: str, buckets: Buckets,
               labels: Mapping[str, str] | None = None) -> HistogramMetricFamily:
    pairs, total = buckets.snapshot()
    family = HistogramMetricFamily(f"shardchat_{name}", doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), pairs, sum_value=total)
    return family


def _node_families(stats: Mapping[str, Any]) -> Iterator[Metric]:
    yield _gauge("connections", "Socket.IO clients connected to this node.",
                 stats["connections"])
    yield _gauge("rooms", "Rooms this node owns (never its forwards).", stats["rooms"])
    yield _gauge("load", "This node's load, the measure placement ranks instances by.",
                 stats.get("load") or 0.0)
    yield _gauge("draining", "1 while the node shuts down or is drained.",
                 int(bool(stats["draining"])))


def _store_families(store: Mapping[str, Any], commits: Buckets) -> Iterator[Metric]:
    yield _counter("messages_stored", "Messages committed to this node's store.",
                   store["messages"])
    yield _counter("rooms_created", "Rooms committed to this node's store.", store["rooms"])
    yield _counter("store_commits", "Group commits of the store's writer.", store["commits"])
    yield _counter("store_failed_commits", "Commits that failed (their writes were refused).",
                   store["failed_commits"])
    yield _counter("messages_pruned", "Messages removed by retention.", store["pruned"])
    yield _histogram("store_commit_seconds",
                     "BEGIN to COMMIT of each group commit, fsync included: what every ack "
                     "and broadcast waits on.", commits)
    recent = store["recent"]
    pages = CounterMetricFamily("shardchat_newest_pages",
                                "Pages of a room's messages (welcomes, reconnect gaps, "
                                "history requests) by where they came from: memory (the "
                                "newest 64 of rooms read lately) or the store's file.",
                                labels=["source"])
    pages.add_metric(["memory"], recent["hits"])
    pages.add_metric(["store"], recent["misses"])
    yield pages
    yield _gauge("recent_messages_bytes", "Bytes of the newest messages kept in memory "
                 "(at most 8 MiB).", recent["bytes"])


def _fanout_families(fanout: Mapping[str, int]) -> Iterator[Metric]:
    families: dict[str, CounterMetricFamily] = {}
    for key, name, label, doc in _FANOUT:
        if name not in families:
            families[name] = CounterMetricFamily(f"shardchat_{name}", doc or "",
                                                 labels=[label])
        families[name].add_metric([key], fanout.get(key, 0))
    yield from families.values()
    yield _counter("slow_readers_dropped", "Clients cut off because they stopped reading "
                   "and their backlog passed the cap.", fanout.get("dropped_slow_readers", 0))
    yield _gauge("backlogged_clients", "Clients above the write-buffer cap right now.",
                 fanout.get("backlogged", 0))
    yield _counter("backlog_refusals", "Requests refused because their client's backlog "
                   "was above the cap.", fanout.get("backlog_refusals", 0))


def _limit_families(limits: Mapping[str, Any]) -> Iterator[Metric]:
    refused = CounterMetricFamily("shardchat_rate_limited", "Requests refused by a rate "
                                  "limit, by kind and by what was counted (member identity, "
                                  "client address, the full table).", labels=["kind", "scope"])
    for key, count in sorted(limits["refused"].items()):
        kind, _, scope = key.partition(".")
        refused.add_metric([kind, scope], count)
    yield refused
    yield _gauge("rate_limit_keys", "Identities and addresses the rate limiter tracks.",
                 limits["keys"])


def _gc_families(watch: gctune.GcWatch) -> Iterator[Metric]:
    runs = CounterMetricFamily("shardchat_gc_collections",
                               "Cyclic garbage collections, by generation.",
                               labels=["generation"])
    for gen, count in enumerate(watch.count):
        runs.add_metric([str(gen)], count)
    yield runs
    yield _histogram("gc_pause_seconds", "How long each garbage collection stopped the "
                     "event loop.", watch.pause_seconds)


def _peer_families(peers: list[dict[str, Any]]) -> Iterator[Metric]:
    """Labelled ``peer`` (its instance number), not ``instance``: Prometheus gives every
    scraped sample an ``instance`` label of its own (the target) and renames a clashing one
    to ``exported_instance``, so a label called ``instance`` could never be queried as such."""
    up = GaugeMetricFamily("shardchat_peer_up", "1 when the peer's last stats poll "
                           "succeeded.", labels=["peer"])
    age = GaugeMetricFamily("shardchat_peer_stats_age_seconds", "Seconds since the peer's "
                            "stats were last taken.", labels=["peer"])
    for peer in peers:
        up.add_metric([str(peer["instance"])], int(peer["healthy"]))
        if peer["age"] is not None:
            age.add_metric([str(peer["instance"])], peer["age"])
    yield up
    yield age


def _replication_families(rep: Mapping[str, Any]) -> Iterator[Metric]:
    """The off-machine copy (Litestream): running, restarts, how far it got."""
    yield _gauge("litestream_running", "1 while Litestream runs beside the store.",
                 int(bool(rep.get("running"))))
    yield _counter("litestream_restarts", "Times the supervisor restarted Litestream.",
                   rep.get("restarts", 0))
    if rep.get("last_upload_age") is not None:
        yield _gauge("litestream_last_upload_age_seconds", "Seconds since Litestream last "
                     "shipped WAL to the replica.", rep["last_upload_age"])


def _online_families(online: Mapping[str, Any]) -> Iterator[Metric]:
    """The follower stream (SPEC section 9): how far this node's follower is behind it, and
    how far this node is behind each owner it follows."""
    ship = online.get("shipping")
    if ship is not None:
        yield _gauge("replication_follower_connected", "1 while this node's follower reads "
                     "its stream.", int(bool(ship["connected"])))
        yield _gauge("replication_lag_records", "Committed batches the follower has not "
                     "acknowledged yet.", ship["records_behind"])
        yield _gauge("replication_lag_bytes", "Bytes of those batches.", ship["bytes_behind"])
        yield _gauge("replication_lag_seconds", "Age of the oldest batch the follower has not "
                     "acknowledged (0 when it has them all).", ship["seconds_behind"])
        yield _counter("replication_snapshots_sent", "Snapshots sent to a follower too far "
                       "behind (or after a restart).", ship["snapshots"])
        for key, name, doc in (
                ("refused", "replication_acks_refused",
                 "Sync acks refused unavailable: the follower did not confirm in time."),
                ("fallback_acks", "replication_fallback_acks",
                 "Sync acks given as async (replication_fallback).")):
            if key in ship:
                yield _counter(name, doc, ship[key])
    behind = GaugeMetricFamily("shardchat_following_lag_records", "Batches of an owner this "
                               "node follows that it has not applied yet.", labels=["owner"])
    for owner, f in sorted(online.get("following", {}).items()):
        behind.add_metric([owner], f["records_behind"])
    yield behind


def registry_for(node: Observed) -> CollectorRegistry:
    """A registry of this node's own: its collector and the process's CPU, memory, fds."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
