"""The newest committed messages of the rooms read lately, kept in memory, so that a join's
welcome (the newest 50) and a reconnect's short gap are answered without reading the store.

Why: the messages table is in commit order (``schema.migrate_layout``), so a room's newest
50 messages are 50 lookups in SQLite, about 0.1 ms on the event loop per join. A committed
message never changes ((room, seq) names it on every node), so a copy here can only be
wrong by being incomplete, never by its content. These rules keep each entry exactly "every
stored message of the room from its first seq to its last", which is what a read would
return:

* an entry is seeded from a read of the room's newest messages, only when that read ended
  at the room's newest committed seq (``Store.newest`` checks it after the read);
* each committed message of the room is appended when it is the entry's next seq; any other
  seq drops the entry, and so do a refused commit (every entry), a job that changed the
  room (a move's steps, an adoption, a fence: ``Moves.changed``) and the room leaving;
* an entry holds at most ``keep`` messages and ``keep`` is at most the store's retention, so
  pruning, which keeps the newest ``retention``, never takes one of them;
* ``complete`` says that no older message of the room is stored (the read found fewer than it
  asked for), so a request reaching below the entry's first seq is answered by it too;
* at most ``max_bytes`` of message text in all, the least recently read room dropped first.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from shardchat.node.store.records import MessageRecord

KEEP = 64        # messages per room: the welcome's 50 and a short reconnect's gap
MAX_BYTES = 8 * 1024 * 1024  # of text, names and ids, over every room


def _weight(m: MessageRecord) -> int:
    """About what a record holds beyond its fixed fields."""
    return (len(m.text) + len(m.sender_name) + len(m.sender_sid) + len(m.sender_member or "")
            + len(m.client_id or "") + 120)


class _Entry:
    __slots__ = ("complete", "records", "weight")

    def __init__(self, records: deque[MessageRecord], complete: bool) -> None:
        self.records = records
        self.complete = complete
        self.weight = sum(_weight(m) for m in records)


class RecentMessages:
    """See the module docstring. Event-loop only, like the Store's counters."""

    def __init__(self, keep: int = KEEP, max_bytes: int = MAX_BYTES) -> None:
        self.keep = keep
        self.max_bytes = max_bytes
        self._rooms: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rooms)

    def get(self, room_id: str, lo: int, top: int) -> list[MessageRecord] | None:
        """Every message with ``lo <= seq <= top``, oldest first, or None when the entry
        does not hold all of them (or there is none)."""
        entry = self._rooms.get(room_id)
        if entry is None:
            self.misses += 1
            return None
        records = entry.records
        first, last = records[0].seq, records[-1].seq
        if top > last or (lo < first and not entry.complete):
            self.misses += 1
            return None
        self._rooms.move_to_end(room_id)
        self.hits += 1
        start = max(lo - first, 0)
        end = top - first + 1
        if start == 0 and end == len(records):
            return list(records)
        return [records[i] for i in range(start, end)]

    def seed(self, room_id: str, records: list[MessageRecord], complete: bool) -> None:
        """A read's result, oldest first and ending at the room's newest committed seq."""
        if self.keep <= 0 or not records:
            return
        self.drop(room_id)
        kept = deque(records[-self.keep:], maxlen=self.keep)
        entry = _Entry(kept, complete and len(kept) == len(records))
        self._rooms[room_id] = entry
        self._bytes += entry.weight
        self._evict()

    def committed(self, m: MessageRecord) -> None:
        """``m`` is durable: the next seq of its room's entry joins it; any other drops it."""
        entry = self._rooms.get(m.room_id)
        if entry is None:
            return
        records = entry.records
        if m.seq != records[-1].seq + 1:
            self.drop(m.room_id)
            return
        if len(records) == self.keep:  # the oldest falls out: older messages exist now
            gone = _weight(records[0])
            entry.weight -= gone
            self._bytes -= gone
            entry.complete = False
        records.append(m)
        w = _weight(m)
        entry.weight += w
        self._bytes += w
        if self._bytes > self.max_bytes:
            self._evict()

    def drop(self, room_id: str) -> None:
        entry = self._rooms.pop(room_id, None)
        if entry is not None:
            self._bytes -= entry.weight

    def clear(self) -> None:
        self._rooms.clear()
        self._bytes = 0

    def stats(self) -> dict[str, int]:
        return {"rooms": len(self._rooms), "bytes": self._bytes, "hits": self.hits,
                "misses": self.misses}

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._rooms:
            _, entry = self._rooms.popitem(last=False)
            self._bytes -= entry.weight
