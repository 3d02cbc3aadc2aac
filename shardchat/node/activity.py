"""How busy each room of this node is: a decayed message rate and the time of last use.

The load measure (``cluster/load.py``) weighs a room by its connections, its recent messages
and how long it has been idle. This module measures the last two, on the hot path of every
message, so it must cost next to nothing there: one dict lookup, one ``exp`` and a few float
operations per message, no timer and no task per room. Decay is computed lazily, when a
message arrives or when someone reads the rate.

The rate is an exponentially weighted count. Each room keeps ``count``, the number of its
messages with each one weighted ``exp(-age / tau)``; a message at time t does
``count = count * exp(-(t - t_prev) / tau) + 1``. A room that sends r messages a minute
steadily settles at ``count = r * tau_minutes``, so ``rate = count / tau_minutes`` reads r
messages per minute, and once it goes quiet the rate falls by e every ``tau``.
``ACTIVITY_TIME_CONSTANT`` (tau) is 10 minutes: long enough that one lively quarter of an
hour does not make a room look like a heavy one to the rebalancer (moving a room
disconnects its members), short enough that a room that went quiet stops counting within
the hour.

Memory stays bounded by the rooms used lately, not by every room ever made (rooms are kept
forever): an entry idle for ``PRUNE_AFTER`` is dropped at the next ``snapshot``, and a room
without an entry reads as idle for ``UNKNOWN_IDLE_SECONDS`` and quiet, which weighs the
same (the floor) as a room idle for a day.

A room that moves to another instance should take its numbers along (``export`` on the old
owner, ``restore`` on the new one); otherwise the new owner would see a quiet room, and the
next rebalance would plan on loads its own moves had falsified.

Times are ``time.monotonic()`` seconds unless ``now=`` is passed (tests, replay); exported
values are relative (a rate, an idle time), so they mean the same on another machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

ACTIVITY_TIME_CONSTANT = 600.0  # seconds; see the module docstring
PRUNE_AFTER = 24 * 3600.0  # an entry idle this long weighs the floor: drop it
# idle time reported for a room this node has not seen used since it started
UNKNOWN_IDLE_SECONDS = 7 * 24 * 3600.0  # as cluster/load.py has it (tests hold them equal)

# one entry per room: [decayed count, time the count was taken at, last use]
_COUNT, _COUNTED_AT, _LAST_USED = 0, 1, 2


class RoomActivity(NamedTuple):
    """One room's numbers, field for field a ``cluster.load.RoomLoad``."""

    room_id: str
    connections: int
    activity: float  # decayed messages per minute
    idle_seconds: float


class ActivityTracker:
    """Decayed message rate and last use per room, O(1) per message."""

    __slots__ = ("_clock", "_inv_tau", "_per_minute", "_prune_after", "_rooms")

    def __init__(self, time_constant: float = ACTIVITY_TIME_CONSTANT,
                 clock: Callable[[], float] = time.monotonic,
                 prune_after: float = PRUNE_AFTER) -> None:
        if time_constant <= 0:
            raise ValueError("the activity time constant must be > 0 seconds")
        self._clock = clock
        self._inv_tau = 1.0 / time_constant
        self._per_minute = 60.0 / time_constant  # count -> messages per minute
        self._prune_after = prune_after
        self._rooms: dict[str, list[float]] = {}

    def __len__(self) -> int:
        """Rooms with an entry (used since start, and not idle for PRUNE_AFTER)."""
        return len(self._rooms)

    # -- the hot path ---------------------------------------------------------------------

    def message(self, room_id: str, now: float | None = None) -> None:
        """A message was stored in ``room_id``: count it and mark the room used."""
        t = self._clock() if now is None else now
        entry = self._rooms.get(room_id)
        if entry is None:
            self._rooms[room_id] = [1.0, t, t]
            return
        dt = t - entry[_COUNTED_AT]
        if dt > 0:
            entry[_COUNT] = entry[_COUNT] * math.exp(-dt * self._inv_tau) + 1.0
            entry[_COUNTED_AT] = t
        else:  # same instant (or a clock read out of order): no decay to apply
            entry[_COUNT] += 1.0
        if t > entry[_LAST_USED]:
            entry[_LAST_USED] = t

    def touch(self, room_id: str, now: float | None = None) -> None:
        """The room was used without a message (created, joined): it is not idle."""
        t = self._clock() if now is None else now
        entry = self._rooms.get(room_id)
        if entry is None:
            self._rooms[room_id] = [0.0, t, t]
        elif t > entry[_LAST_USED]:
            entry[_LAST_USED] = t

    # -- reading --------------------------------------------------------------------------

    def rate(self, room_id: str, now: float | None = None) -> float:
        """Decayed messages per minute of ``room_id`` (0 for a room without an entry)."""
        entry = self._rooms.get(room_id)
        if entry is None:
            return 0.0
        return self._rate(entry, self._clock() if now is None else now)

    def idle_seconds(self, room_id: str, now: float | None = None) -> float:
        """Seconds since ``room_id`` was last used; ``UNKNOWN_IDLE_SECONDS`` without entry."""
        entry = self._rooms.get(room_id)
        if entry is None:
            return UNKNOWN_IDLE_SECONDS
        return max(0.0, (self._clock() if now is None else now) - entry[_LAST_USED])

    def snapshot(self, connections: Mapping[str, int], rooms: Iterable[str] | None = None,
                 now: float | None = None) -> list[RoomActivity]:
        """Every room's numbers, in room id order, with its connections from
        ``connections`` (room id -> members connected now, missing = 0).

        ``rooms``: the rooms to report (all the node owns); None reports only the rooms
        that have an entry or connections, the others being known to weigh the floor
        (``cluster.load.node_load`` adds them by count). Drops stale entries first."""
        t = self._clock() if now is None else now
        self.prune(t)
        if rooms is None:
            wanted = set(self._rooms)
            wanted.update(r for r, c in connections.items() if c > 0)
        else:
            wanted = set(rooms)
        out = []
        for room_id in sorted(wanted):
            entry = self._rooms.get(room_id)
            if entry is None:
                out.append(RoomActivity(room_id, connections.get(room_id, 0), 0.0,
                                        UNKNOWN_IDLE_SECONDS))
            else:
                out.append(RoomActivity(room_id, connections.get(room_id, 0),
                                        self._rate(entry, t),
                                        max(0.0, t - entry[_LAST_USED])))
        return out

    def _rate(self, entry: list[float], now: float) -> float:
        dt = max(0.0, now - entry[_COUNTED_AT])
        return entry[_COUNT] * math.exp(-dt * self._inv_tau) * self._per_minute

    # -- upkeep and moves -----------------------------------------------------------------

    def prune(self, now: float | None = None) -> int:
        """Drop the entries idle for ``PRUNE_AFTER`` (they weigh the floor either way);
        returns how many. O(entries): called from ``snapshot``, never per message."""
        t = self._clock() if now is None else now
        stale = [r for r, e in self._rooms.items() if t - e[_LAST_USED] > self._prune_after]
        for room_id in stale:
            del self._rooms[room_id]
        return len(stale)

    def forget(self, room_id: str) -> None:
        """The room left this node (moved away): it no longer loads it."""
        self._rooms.pop(room_id, None)

    def export(self, room_id: str, now: float | None = None) -> tuple[float, float] | None:
        """``(messages per minute, idle seconds)`` of ``room_id`` to hand to its new
        owner, or None when it has no entry (then the new owner needs none either)."""
        entry = self._rooms.get(room_id)
        if entry is None:
            return None
        t = self._clock() if now is None else now
        return self._rate(entry, t), max(0.0, t - entry[_LAST_USED])

    def restore(self, room_id: str, rate: float, idle_seconds: float,
                now: float | None = None) -> None:
        """Take over a moved room's numbers (``export`` of its old owner).

        Added to what this node counted already: the room's members reconnect here as soon
        as it moves, and their first messages may be counted before the numbers arrive."""
        if not (math.isfinite(rate) and math.isfinite(idle_seconds)):
            raise ValueError("a room's activity must be finite numbers")
        t = self._clock() if now is None else now
        count = max(0.0, rate) / self._per_minute
        last_used = t - max(0.0, idle_seconds)
        entry = self._rooms.get(room_id)
        if entry is not None:
            count += self._rate(entry, t) / self._per_minute
            last_used = max(last_used, entry[_LAST_USED])
        self._rooms[room_id] = [count, t, last_used]
