"""Fault injection: a node that kills itself (SIGKILL) on reaching a named point.

Crash safety of a multi-step protocol (the room handoff, ``node/handoff/``; a message's
commit and its ack, ``store/writer.py``) can only be shown by crashing at each step. Sleeps
and races would make such tests flaky and slow; a named point is exact:
``SHARDCHAT_FAULT=handoff.after_forward`` makes the node die the moment the forward row is
durable and nothing after it has happened. SIGKILL, not an exception: nothing
may be flushed, answered or cleaned up, exactly as when the machine loses power.

The switch (``shardchat/faultswitch.py``) is read once, when this module is imported; an
unknown name is refused at node start (``check``), so a misspelt point in a test fails
loudly instead of never firing. Unset, ``reach`` costs one comparison.
"""

from __future__ import annotations

import logging

from shardchat.faultswitch import AT_ENV as AT_ENV  # the variables, for tests that arm it
from shardchat.faultswitch import ENV as ENV
from shardchat.faultswitch import FaultSwitch

log = logging.getLogger(__name__)


# Every point a node can be told to die at. Source side of a move: after each step has done
# its work (and, where it writes, after the write is durable). Target side: after the state
# is written, before the answer is sent.
SOURCE_POINTS = (
    "handoff.after_begin",      # the target holds the room as incoming
    "handoff.after_copy",       # the live copy is done; the room still serves
    "handoff.after_freeze",     # new messages wait; in-flight ones are committed
    "handoff.after_delta",      # the target holds every committed message
    "handoff.after_forward",    # the commit point: the forward is durable here
    "handoff.after_activate",   # the target serves; activated not yet recorded here
)
TARGET_POINTS = (
    "handoff.target_after_begin",     # incoming room written, answer not sent
    "handoff.target_after_copy",      # a copied page written, answer not sent
    "handoff.target_after_activate",  # room active, answer not sent
)
HANDOFF_POINTS = frozenset(SOURCE_POINTS + TARGET_POINTS)
# The store's writer thread, at a commit holding messages: before its COMMIT (nothing of
# the batch is stored, nobody was acked) and after it (stored, nobody acked yet: the
# batch has not been handed back to the loop). ``SHARDCHAT_FAULT_AT=n`` dies at the n-th.
STORE_POINTS = (
    "store.before_commit",
    "store.after_commit",
)
# Opening a store of an earlier release: every message copied into the new layout, the
# transaction not committed (``schema.migrate_layout``).
LAYOUT_POINTS = ("store.layout_copied",)
# On-line replication (``node/replication/``): after each durable step, before what follows.
REPLICATION_POINTS = (
    "replication.after_adopt",   # the adopted rooms are durable here, the answer not sent
    "replication.after_fence",   # the fenced rooms are forwards, the node not serving yet
)
POINTS = (HANDOFF_POINTS | frozenset(STORE_POINTS) | frozenset(LAYOUT_POINTS)
          | frozenset(REPLICATION_POINTS))

_SWITCH = FaultSwitch(POINTS)
reach = _SWITCH.reach


def check() -> None:
    """Refuse a switch that names no known point (called once at node start)."""
    _SWITCH.check()
    if _SWITCH.armed is not None:
        log.warning("fault injection armed: this node dies (SIGKILL) at %s", _SWITCH.armed)


def armed() -> str | None:
    """The point this process will die at, or None."""
    return _SWITCH.armed
