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
* every collection is timed (``gc.callbacks``), so ``GET /internal/metrics`` shows how
  many ran and the longest pause, and a regression is measured instead of guessed.
"""

from __future__ import annotations

import gc
import time
from typing import Any

THRESHOLDS = (20_000, 20, 50)


class GcWatch:
    """Counts collections per generation and their pause times (seconds)."""

    def __init__(self) -> None:
        self.pauses = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        gen = info.get("generation", 2)
        took = time.perf_counter() - self._started
        self.count[gen] += 1
        self.pauses[gen] += took
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
