"""Python's cyclic garbage collector, tuned for a long-running node, and its pauses counted.

Why: a node holds many long-lived objects per connection (sockets, sessions, members) and
creates short-lived ones per message (dicts, futures, frames) that reference counting alone
frees. With the default thresholds the collector runs every 700 net allocations and, every
so often, walks every live object of the process while the event loop waits, which shows
up directly in the tail of delivery latency. So, once the node is up:

* ``gc.freeze()`` moves everything created at start-up (modules, classes, the app) out of
  the collector's sight for good: later full collections do not walk it again;
* the young-generation threshold is raised so collections are rarer, and the older
  generations' thresholds so a full walk of every connection's objects happens seldom
  (cycles are still found; they just live a little longer);
* a full collection still runs at least every ``FULL_INTERVAL`` seconds (``sweep_old``):
  with the raised thresholds a churning node (connections closing and opening for minutes)
  ran young collections only, so cycles left by closed connections, by then promoted to the
  oldest generation, were never freed and memory grew ~20 % in a 5-minute soak; one timed
  full walk a minute frees them at a cost the pause counters show;
* every collection is timed (``gc.callbacks``), so ``GET /internal/metrics`` shows how
  many ran and the longest pause, and a regression is measured instead of guessed.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from typing import Any

from shardchat.node.buckets import GC_BOUNDS, Buckets

THRESHOLDS = (20_000, 20, 50)
FULL_INTERVAL = float(os.environ.get("SHARDCHAT_GC_FULL_INTERVAL", "60"))


class GcWatch:
    """Counts collections per generation and their pause times (seconds)."""

    def __init__(self) -> None:
        self.pauses = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self.pause_seconds = Buckets(GC_BOUNDS)  # every generation's pauses, for /metrics
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        gen = info.get("generation", 2)
        took = time.perf_counter() - self._started
        self.count[gen] += 1
        self.pauses[gen] += took
        self.pause_seconds.observe(took)
        if took > self.longest[gen]:
            self.longest[gen] = took

    def stats(self) -> dict[str, Any]:
        return {"collections": list(self.count),
                "pause_ms_total": [round(p * 1000, 2) for p in self.pauses],
                "pause_ms_longest": [round(p * 1000, 2) for p in self.longest],
                "thresholds": list(gc.get_threshold()), "frozen": gc.get_freeze_count()}


WATCH = GcWatch()


def install(thresholds: tuple[int, int, int] = THRESHOLDS, *, tune: bool = True) -> GcWatch:
    """Freeze what start-up created, raise the thresholds, start timing collections.
    ``tune=False`` (env ``SHARDCHAT_GC_TUNE=0``) only times them: the comparison run."""
    if tune:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*thresholds)
    if WATCH not in gc.callbacks:
        gc.callbacks.append(WATCH)
    return WATCH


async def sweep_old(interval: float = FULL_INTERVAL) -> None:
    """Run a full collection whenever none ran in the last ``interval`` seconds.

    A background task for the node's lifetime (cancelled at shutdown). A full collection
    the thresholds already triggered resets the clock, so a busy node pays no extra walk."""
    if interval <= 0:
        return
    seen = WATCH.count[2]
    while True:
        await asyncio.sleep(interval)
        if WATCH.count[2] == seen:
            gc.collect(2)
        seen = WATCH.count[2]
