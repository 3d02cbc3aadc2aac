"""The fault switch: a process that kills itself (SIGKILL) on reaching a named point.

``SHARDCHAT_FAULT=<point>`` (and ``SHARDCHAT_FAULT_AT=n``: the n-th time it is reached) arms
it; both are read once, when the switch is made. The node (``node/faults.py``) and the
provisioner (``provisioner/faults.py``) each make one with their own points, and this is
the one place that reads the variables and kills. Unset, ``reach`` costs one comparison.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

ENV = "SHARDCHAT_FAULT"
AT_ENV = "SHARDCHAT_FAULT_AT"  # die the n-th time the point is reached (default: the first)


class FaultSwitch:
    """The armed point of this process among ``points``."""

    def __init__(self, points: Iterable[str], what: str = "fault point",
                 owns: Callable[[str], bool] = lambda _name: True) -> None:
        self.points = frozenset(points)
        self.what = what  # how a refusal names the points ("fault point")
        self._owns = owns  # names this switch answers for (others belong to another's)
        self.armed: str | None = os.environ.get(ENV) or None
        self._left = int(os.environ.get(AT_ENV) or "1")  # reaches until it fires

    def check(self) -> None:
        """Refuse an armed name that is this switch's to know but names no point of it, so
        a misspelt point in a test fails loudly instead of never firing."""
        armed = self.armed
        if armed is not None and self._owns(armed) and armed not in self.points:
            raise ValueError(f"{ENV}={armed!r} names no {self.what}; known: "
                             + ", ".join(sorted(self.points)))

    def reach(self, point: str) -> None:
        """Die here, at once and without cleanup, when the switch names ``point`` (the
        ``SHARDCHAT_FAULT_AT``-th time it is reached)."""
        if point != self.armed:
            return
        self._left -= 1
        if self._left > 0:
            return
        log.warning("fault point %s reached: killing this process", point)
        os.kill(os.getpid(), signal.SIGKILL)
