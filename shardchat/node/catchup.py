"""A presence batch encoded once per tick: the shared batch and every joiner's catch-up.

At the end of a tick (``presence.py``) the room gets the batch of the tick's log, and every
member welcomed during the tick gets, instead, what happened after its welcome was cut: the
summary of the log from its cut on. Built as dicts, each of those summaries costs a pass
over the rest of the log and the JSON encoding of every member in it, so n joiners of one
tick cost O(n^2) encodings: in a room filling up, most of the node's time.

The summary of any suffix of the log is a slice of the same thing, because a sid joins once
and leaves at most once, after its join:

* a join is listed (in ``joined``) iff that member did not leave later in the tick, from any
  cut at or before it; a leave is always listed (in ``left``), from any cut at or before it;
* so the summary from cut ``c`` is the listed joins logged at or after ``c`` and the listed
  leaves logged at or after ``c``, each in log order.

``Catchup`` encodes every listed member once, into one byte string per list (members
separated by commas), and remembers where each cut falls in them. Any batch is then a few
byte slices spliced into the event as ``orjson.Fragment`` (both engines encode events with
orjson, so the bytes on the wire are the same as from a dict): O(log) encodings per tick,
and O(1) Python work plus a copy of its bytes per recipient.

Events are bounded like pages: one that would exceed ``max_bytes`` is split in the same
places as a member-by-member fill would split it (each member counts its JSON and a
comma), found by bisection instead of a walk.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

import orjson

from shardchat.node.engine import json_size

# one logged event: (is it a join?, the member as others see it: sid, name, member)
Logged = tuple[bool, dict[str, str]]


class _Listed:
    """One list of the batch (``joined`` or ``left``) for the whole log: its members' JSON,
    each followed by a comma, and where each member starts."""

    def __init__(self) -> None:
        self.blob: bytearray | bytes = bytearray()  # bytes once complete (``freeze``)
        self.starts: list[int] = [0]  # starts[k]: offset of member k; the last is the end

    def add(self, member: dict[str, str]) -> None:
        self.blob += orjson.dumps(member)
        self.blob += b","
        self.starts.append(len(self.blob))

    def freeze(self) -> None:
        """Every member is in: from now on the bytes are only sliced."""
        self.blob = bytes(self.blob)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def take(self, first: int, stop: int, room: int, empty: bool) -> int:
        """The end of the run of members from ``first`` (up to ``stop``) that fits in
        ``room`` bytes (each member counts its JSON and a comma); at least one member when
        the event is ``empty``, so a member larger than any event still goes out, alone."""
        starts = self.starts
        end = max(first, bisect_right(starts, starts[first] + room, lo=first, hi=stop + 1) - 1)
        if end == first and empty and first < stop:
            end = first + 1
        return min(end, stop)

    def fragment(self, first: int, end: int) -> orjson.Fragment:
        """The JSON list of members ``first`` to ``end`` (exclusive)."""
        if first == end:
            return _EMPTY
        starts = self.starts
        # one copy of the members' bytes (a join of a view), not one per concatenation:
        # a joiner's catch-up can be a few hundred KiB in a room filling up
        members = memoryview(self.blob)[starts[first]:starts[end] - 1]
        return orjson.Fragment(b"".join((b"[", members, b"]")))


_EMPTY = orjson.Fragment(b"[]")


class Catchup:
    """A tick's log of joins and leaves, each listed member encoded once."""

    def __init__(self, log: Sequence[Logged]) -> None:
        gone = {member["sid"] for is_join, member in log if not is_join}
        self.joined, self.left = _Listed(), _Listed()
        # at[i]: (listed joins, listed leaves) logged before log position i
        self._at: list[tuple[int, int]] = []
        for is_join, member in log:
            self._at.append((len(self.joined), len(self.left)))
            if not is_join:
                self.left.add(member)
            elif member["sid"] not in gone:
                self.joined.add(member)
        self._at.append((len(self.joined), len(self.left)))
        self.joined.freeze()
        self.left.freeze()

    def events(self, count: int, max_bytes: int, start: int = 0, end: int | None = None
               ) -> list[dict[str, Any]]:
        """The ``presence`` batch events telling the log from position ``start`` to ``end``
        (default: to its end; 0: the whole tick; a joiner's cut: its catch-up), each at
        most about ``max_bytes`` of JSON and with the same final ``count``; none when
        nothing happened there. A member is listed in the window of its listed event, so
        the events of consecutive windows, applied in order, say what those of the two
        together say."""
        last = len(self._at) - 1
        j, lv = self._at[min(start, last)]
        j_stop, lv_stop = self._at[last if end is None else min(end, last)]
        joined, left = self.joined, self.left
        base = json_size({"event": "batch", "joined": [], "left": [], "count": count})
        events: list[dict[str, Any]] = []
        while j < j_stop or lv < lv_stop:
            room = max_bytes - base
            j_end = joined.take(j, j_stop, room, empty=True) if j < j_stop else j
            room -= joined.starts[j_end] - joined.starts[j]
            lv_end = lv
            if j_end == j_stop and lv < lv_stop:
                lv_end = left.take(lv, lv_stop, room, empty=j_end == j)
            events.append({"event": "batch", "joined": joined.fragment(j, j_end),
                           "left": left.fragment(lv, lv_end), "count": count})
            j, lv = j_end, lv_end
        return events
