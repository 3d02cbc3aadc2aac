"""Durations counted into fixed buckets: the shape of a Prometheus histogram, kept by the
code that measures (the store's writer thread, the garbage collector's callback) without
that code importing a metrics library or paying for more than a bisect and three additions.

``GET /metrics`` (``node/prometheus.py``) turns a ``Buckets`` into a histogram family at
scrape time. The bounds are seconds and inclusive (a value equal to a bound counts in it),
as Prometheus's ``le`` is.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable

# from a commit with fsync off (~50 us) to one stuck behind a disk flush (~1 s)
COMMIT_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0)
# a young collection is well under a millisecond; a full walk of a big node, tens of ms
GC_BOUNDS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Buckets:
    """Counts of observed durations per bucket, their sum and their number.

    Observed from any thread: the lock makes each observation whole (the collector's
    callback runs in whichever thread allocated last, the writer's in its own)."""

    __slots__ = ("_counts", "_lock", "_sum", "bounds")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self._counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        i = bisect_left(self.bounds, seconds)
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf``, and the sum."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out, running = [], 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), counts, strict=True):
            running += n
            out.append((bound, running))
        return out, total

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)
