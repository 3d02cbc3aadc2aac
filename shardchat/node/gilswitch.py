"""The interpreter's thread switch interval, shortened for the store's writer thread.

A node runs two busy threads: the event loop and the store's writer (``store/writer.py``).
When a commit returns from its fsync, the writer needs the GIL to hand the batch back to
the loop, and CPython makes a thread that wants the GIL wait for the holder to release it
or for the switch interval to pass: 5 ms by default. The loop holds the GIL through a
whole tick of fan-out, so every commit, and every ack and broadcast waiting on it, could
be that much later. At 1 ms the writer gets its turn within a millisecond; the loop pays a
few more switch requests per second, not per message.

``SHARDCHAT_SWITCH_INTERVAL`` (seconds) overrides it; ``0`` or empty leaves Python's
default.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

ENV = "SHARDCHAT_SWITCH_INTERVAL"
DEFAULT = 0.001  # seconds


def install() -> float:
    """Set the switch interval (``DEFAULT``, or ``SHARDCHAT_SWITCH_INTERVAL``) and return
    the one in force. A value that is not a positive number is logged and ignored."""
    raw = os.environ.get(ENV)
    interval = DEFAULT
    if raw is not None:
        try:
            interval = float(raw) if raw.strip() else 0.0
        except ValueError:
            log.warning("%s=%r is not a number of seconds; using %g s", ENV, raw, DEFAULT)
            interval = DEFAULT
    if interval > 0:
        sys.setswitchinterval(interval)
    return sys.getswitchinterval()
