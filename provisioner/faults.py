"""Fault injection for the provisioner: ``apply`` killing itself (SIGKILL) mid-plan.

What the state lock promises after a crash (its lease ends, the next apply takes it and
finishes from what exists) can only be shown by crashing at an exact step; killing the
process from outside when enough resources exist is a race with the apply. The switch is
the node's (``shardchat/node/faults.py``), with a point of the provisioner's own:
``SHARDCHAT_FAULT=provision.after_action SHARDCHAT_FAULT_AT=n`` dies once the n-th action of
the plan is done, before the next starts. The provisioner may not import the node, so the
few lines of the switch are here again. Read once at import; an unknown ``provision.``
point is refused at start (``check``); unset, ``reach`` costs one comparison.
"""

from __future__ import annotations

import os
import signal

ENV = "SHARDCHAT_FAULT"
AT_ENV = "SHARDCHAT_FAULT_AT"
POINTS = frozenset({"provision.after_action"})

_armed: str | None = os.environ.get(ENV) or None
_left = int(os.environ.get(AT_ENV) or "1")


def check() -> None:
    """Refuse a ``provision.`` point that does not exist (other points are the node's)."""
    if _armed is not None and _armed.startswith("provision.") and _armed not in POINTS:
        raise ValueError(f"{ENV}={_armed!r} names no provisioner fault point; known: "
                         + ", ".join(sorted(POINTS)))


def reach(point: str) -> None:
    """Die here, without cleanup, when the switch names ``point`` (the
    ``SHARDCHAT_FAULT_AT``-th time it is reached)."""
    global _left
    if point == _armed:
        _left -= 1
        if _left <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
