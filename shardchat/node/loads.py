"""This node's rooms as the load measure sees them: what ``/internal/stats`` reports as
``load``, and what ``GET /internal/rooms`` lists for a drain or a rebalance to plan on.

The numbers come from the room service (connections per room) and its activity tracker
(``activity.py``: decayed message rate, last use); the measure itself is the cluster's
(``cluster/load.py``), handed in by ``node/main.py`` as ``measure``, since the node does
not import the cluster.

Three costs are kept in bounds:

* the stats answer is asked for by every peer each ``stats_interval`` and by this node's
  placer for every room it places, so the total is cached for ``MAX_AGE`` seconds. Rooms
  created here since are added to the cached total at once, at the weight of a fresh room
  (``fresh_room``), so a burst of creations on this node is never invisible to placement;
  any other change (connections, messages, a room that left) waits at most ``MAX_AGE``;
* a node may own 100,000 rooms, almost all idle. Only the rooms in use (an entry in the
  tracker or members connected) are listed with their numbers; every other room weighs the
  floor and is listed by id alone (``idle``), and ``GET /internal/rooms`` streams that list
  in chunks of ``CHUNK`` ids instead of building one large document;
* a room that left this node (moved away) is dropped from the tracker the first time the
  numbers are read without it in the store, so the tracker never counts another node's
  room, whichever way the room left.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from shardchat.node.activity import RoomActivity

MAX_AGE = 0.25  # seconds a computed total is reused for (see the module docstring)
CHUNK = 2000  # room ids per write of the streamed listing


class OwnedRooms(Protocol):
    """The store, as far as loads go."""

    def get_room(self, room_id: str) -> Any: ...

    def room_count(self) -> int: ...

    def room_ids(self) -> list[str]: ...


class RoomService(Protocol):
    """The room service, as far as loads go."""

    @property
    def activity(self) -> Any: ...  # ActivityTracker

    def connections_by_room(self) -> dict[str, int]: ...


Measure = Callable[[Iterable[RoomActivity], int], float]


class NodeLoads:
    """The load of this node's rooms, per room and in total."""

    def __init__(self, store: OwnedRooms, rooms: RoomService, measure: Measure,
                 fresh_room: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._rooms = rooms
        self._measure = measure  # cluster.load.node_load
        self._fresh_room = fresh_room  # the weight of a room just created, nobody in it yet
        self._clock = clock
        self._cached: tuple[float, float, int] | None = None  # (at, total, room count)
        self._most = 0  # the most rooms seen since: fewer now means a room left

    def active(self) -> list[RoomActivity]:
        """The owned rooms in use, with their numbers, in room id order; forgets the
        tracker's entries of rooms that are not this node's any more."""
        tracker = self._rooms.activity
        out = []
        for row in tracker.snapshot(self._rooms.connections_by_room()):
            if self._store.get_room(row.room_id) is None:
                tracker.forget(row.room_id)  # moved away: another node's load now
            else:
                out.append(row)
        return out

    def total(self) -> float:
        """This node's load (``cluster.load.node_load`` over its rooms), at most
        ``MAX_AGE`` old, with the rooms created since counted at once."""
        now = self._clock()
        count = self._store.room_count()
        cached = self._cached
        if cached is not None and now - cached[0] < MAX_AGE and count >= self._most:
            self._most = count
            return cached[1] + (count - cached[2]) * self._fresh_room
        total = self._measure(self.active(), count)
        self._cached, self._most = (now, total, count), count
        return total

    def room(self, room_id: str) -> RoomActivity | None:
        """One owned room's numbers now; None when this node does not own it."""
        if self._store.get_room(room_id) is None:
            return None
        tracker = self._rooms.activity
        connected = self._rooms.connections_by_room().get(room_id, 0)
        return RoomActivity(room_id, connected, tracker.rate(room_id),
                            tracker.idle_seconds(room_id))

    def restore(self, room_id: str, activity: float, idle_seconds: float) -> bool:
        """Take over a room's numbers from the node it moved from; False when this node
        does not own the room (it moved on, or never arrived)."""
        if self._store.get_room(room_id) is None:
            return False
        self._rooms.activity.restore(room_id, activity, idle_seconds)
        self._cached = None
        return True

    def listing(self) -> tuple[list[RoomActivity], list[str]]:
        """``(active, idle)``: the rooms in use with their numbers, and the ids of every
        other owned room (each weighs the floor: no entry, nobody connected)."""
        active = self.active()
        used = {row.room_id for row in active}
        idle = [rid for rid in self._store.room_ids() if rid not in used]
        return active, idle


def row_json(row: RoomActivity) -> dict[str, Any]:
    """One listed room, with the field names of ``cluster.load.RoomLoad``."""
    return {"room_id": row.room_id, "connections": row.connections,
            "activity": _finite(row.activity), "idle_seconds": _finite(row.idle_seconds)}


def _finite(value: float) -> float:
    return round(value, 6) if math.isfinite(value) else 0.0


def chunks(ids: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), size):
        yield ids[start:start + size]
