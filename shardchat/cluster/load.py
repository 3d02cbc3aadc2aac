"""The one load measure: what a room, and so an instance, costs. Placement and the
rebalancer both rank instances by it, so a room placed today is not moved away tomorrow.

Rooms are kept forever, so the number of rooms says little: most of them are idle, and an
idle room costs a row on disk and nothing else. What a node spends its CPU and memory on is
its connected members (a socket, a send queue, a ping every 25 s each) and the messages it
stores and fans out. A room's weight is therefore::

    weight = CONNECTION_WEIGHT * connections
           + MESSAGE_WEIGHT * activity
           + IDLE_FLOOR + (LIVE_ROOM_WEIGHT - IDLE_FLOOR) * exp(-idle_seconds / IDLE_TIME_CONSTANT)

* ``connections``: members connected now.
* ``activity``: messages per minute, exponentially decayed (``node/activity.py``, time
  constant ``ACTIVITY_TIME_CONSTANT`` = 10 minutes): a burst of chatter fades within the
  hour, a steady 6 messages per minute reads as 6.
* the last term is the room itself: a room used a moment ago counts ``LIVE_ROOM_WEIGHT``
  (its people are likely to be back: a fresh room's creator has not joined yet, a lunch
  break is not the end of a team chat), decaying to ``IDLE_FLOOR`` over hours of silence.

An instance's load is the sum of its rooms' weights (``instance_load``).

The constants, and why:

``CONNECTION_WEIGHT = 1``
    The unit. One connected member is what the old measure counted as 1 too, so loads stay
    readable as "about this many members' worth of work".
``MESSAGE_WEIGHT = 1`` (per message per minute)
    A message costs a store write (group-committed) plus an encode and one frame per member.
    For the small and medium rooms shardchat is built for, one message a minute costs about
    what one member's connection costs in pings and memory over that minute. Fan-out is not
    multiplied in (members times rate): a room's members already count once each, a product
    would let one large room drown every other signal, and the rebalancer can move a large
    room only as a whole anyway.
``LIVE_ROOM_WEIGHT = 1``
    A room just created or just used counts like one member: the old measure counted a room
    as 1, and a reservation of placement (a room placed but not yet in the target's stats)
    counts ``RESERVED_ROOM_WEIGHT`` = this, so a burst of creations spreads as before.
``IDLE_TIME_CONSTANT = 3600`` s
    The room term falls to about a third after an hour of silence, to a fiftieth after four
    hours and to the floor within a day: "idle for long" means hours, not minutes.
``IDLE_FLOOR = 0.0001``
    Ten thousand rooms idle for days weigh 1, one connected member: they still tell two
    otherwise equal instances apart (the one with fewer rooms wins a tie) but never
    outweigh a single room in use. It is not 0 because an idle room is not free (its row,
    its place in the store's in-memory index), and a positive weight keeps every room
    movable by the rebalancer's arithmetic.

Compatibility: ``GET /internal/stats`` gains a ``load`` field (this measure, summed over the
node's rooms). A node whose stats lack it (an older version during a rolling upgrade) is
measured as before, ``connections + rooms`` (``placement_load``); placement then measures
every candidate the old way, because the two scales cannot be compared (``placement.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

CONNECTION_WEIGHT = 1.0
MESSAGE_WEIGHT = 1.0
LIVE_ROOM_WEIGHT = 1.0
IDLE_TIME_CONSTANT = 3600.0
IDLE_FLOOR = 0.0001
RESERVED_ROOM_WEIGHT = LIVE_ROOM_WEIGHT
# the idle time of a room nobody used since its node started: its room term is the floor
# (the node does not know better, and guessing "busy" would make every restarted node look
# full). node/activity.py reports the same value (the cluster does not import the node, so
# each spells it; tests/test_activity.py holds them equal).
UNKNOWN_IDLE_SECONDS = 7 * 24 * 3600.0


class RoomStats(Protocol):
    """Anything with a room's load fields (a ``RoomLoad``, an activity snapshot row)."""

    @property
    def room_id(self) -> str: ...
    @property
    def connections(self) -> int: ...
    @property
    def activity(self) -> float: ...
    @property
    def idle_seconds(self) -> float: ...


@dataclass(frozen=True)
class RoomLoad:
    """One room's load inputs, as its owner measured them at one moment.

    ``activity`` is decayed messages per minute; ``idle_seconds`` the time since the room
    was last used (created, joined or written to). Relative times, not clock readings, so a
    value means the same on every machine."""

    room_id: str
    connections: int = 0
    activity: float = 0.0
    idle_seconds: float = UNKNOWN_IDLE_SECONDS

    @property
    def weight(self) -> float:
        return room_weight(self)

    @classmethod
    def of(cls, room: RoomStats) -> RoomLoad:
        """A ``RoomLoad`` with the fields of any ``RoomStats``-shaped row."""
        return cls(room.room_id, room.connections, room.activity, room.idle_seconds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> RoomLoad:
        """A room's load from a peer's JSON; ValueError names the field at fault."""
        if not isinstance(data, Mapping):
            raise ValueError("a room load is not a JSON object")
        room_id = data.get("room_id")
        if not isinstance(room_id, str) or not room_id:
            raise ValueError("room load field 'room_id' is not a room id")
        connections = data.get("connections", 0)
        if not isinstance(connections, int) or isinstance(connections, bool) or connections < 0:
            raise ValueError("room load field 'connections' is not a whole number >= 0")
        return cls(room_id, connections, _non_negative(data, "activity", 0.0),
                   _non_negative(data, "idle_seconds", UNKNOWN_IDLE_SECONDS))


def _non_negative(data: Mapping[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"room load field {key!r} is not a finite number >= 0")
    return float(value)


def room_presence(idle_seconds: float) -> float:
    """The room term: ``LIVE_ROOM_WEIGHT`` when just used, down to ``IDLE_FLOOR``."""
    idle = UNKNOWN_IDLE_SECONDS if math.isnan(idle_seconds) else max(0.0, idle_seconds)
    return IDLE_FLOOR + (LIVE_ROOM_WEIGHT - IDLE_FLOOR) * math.exp(-idle / IDLE_TIME_CONSTANT)


def room_weight(room: RoomStats) -> float:
    """What one room costs its instance (see the module's formula). Always > 0."""
    return (CONNECTION_WEIGHT * max(0, room.connections)
            + MESSAGE_WEIGHT * max(0.0, room.activity)
            + room_presence(room.idle_seconds))


def instance_load(rooms: Iterable[RoomStats]) -> float:
    """An instance's load: the sum of its rooms' weights (``math.fsum``: exactly rounded,
    so the same rooms give the same number in any order)."""
    return math.fsum(room_weight(r) for r in rooms)


def node_load(active: Iterable[RoomStats], room_count: int) -> float:
    """The load of a node that owns ``room_count`` rooms, of which ``active`` lists the
    ones it has numbers for (``ActivityTracker.snapshot`` without ``rooms``): every other
    room is idle since before the node started and weighs the floor. So the stats answer
    costs O(rooms in use), not O(rooms ever made)."""
    listed = list(active)
    unlisted = max(0, room_count - len(listed))
    idle = room_weight(RoomLoad("", 0, 0.0, UNKNOWN_IDLE_SECONDS))
    return math.fsum([*(room_weight(r) for r in listed), unlisted * idle])


# -- an instance's stats answer -----------------------------------------------------------


def stats_load(stats: Mapping[str, Any]) -> float | None:
    """The ``load`` a stats answer reports, or None when it has none (an older node) or
    the value is not a finite number >= 0 (never trusted: it would steer placement)."""
    value = stats.get("load")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return float(value)


def legacy_load(stats: Mapping[str, Any]) -> float:
    """The measure of nodes that do not report ``load``: connections + rooms."""
    return float(_count(stats, "connections") + _count(stats, "rooms"))


def placement_load(stats: Mapping[str, Any]) -> float:
    """An instance's load for placement from its stats: ``load`` when it reports one,
    ``connections + rooms`` otherwise (see ``placement.rank`` for a mixed cluster)."""
    load = stats_load(stats)
    return legacy_load(stats) if load is None else load


def _count(stats: Mapping[str, Any], key: str) -> int:
    value = stats.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(0, value)
