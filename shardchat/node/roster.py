"""A room's members, in join order: who is in, the welcome's first members, ``members`` pages.

A dict finds a member by sid in O(1) but cannot be read "from this sid on", and a welcome or
a page that copies the whole member list costs O(members) per call: in a room of thousands,
every join would cost every member. So the roster numbers each member as it joins (a
counter per room) and also keeps the members in a sorted map from that number
(``sortedcontainers.SortedDict``): a join or a leave costs O(log n), the first members of
the room and a page after any sid cost O(log n + page), never O(members).

A page may be asked for after a sid that has left meanwhile (typically the member that
ended the previous page). The roster remembers the join numbers of the latest departures,
at least ``MIN_DEPARTED`` and at most as many as there are members, so such a page goes on
from where that member was in join order; a sid it never knew (or has forgotten: that many
others left since) is ``UnknownCursor``, and the client starts again from the first page.

Every welcome lists the same first members, and in a large room that list changes rarely
(a join lands in it only while the room is smaller than it; a leave changes it only when
the one who leaves is in it). So the roster keeps the head's JSON, encoded once per
change (``head``), and a welcome splices those bytes in: a join no longer builds and
encodes ``welcome_members`` member objects for its welcome.

Every message goes to every member, and the members of a room change far less often than
it gets messages: so the roster also keeps the broadcast's recipient list, (sid, Engine.IO
sid) of every member in join order, built once per change of who is in or who is ready
(``recipients``), instead of a loop over the members building it for each message.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import orjson
from sortedcontainers import SortedDict

MIN_DEPARTED = 256  # departed sids remembered as page cursors, whatever the room's size


class UnknownCursor(LookupError):
    """A page was asked for after a sid that is not, and was not lately, in the room."""


@dataclass
class Member:
    sid: str
    name: str
    limit_key: Any  # whose per-member rate limits it spends (ratelimit.limit_identity)
    address: str  # the client address its limits are also counted against
    eio_sid: str | None = None  # the connection's Engine.IO session, fixed for its life
    # Who this is, as the server issued it (members.py): the same across reconnects that
    # pass the member token back, never taken from what the client claims. Key anything
    # per person (dedup, rate limits) on (room, identity), never on the display name.
    identity: str = ""
    ready: bool = False
    floor: int = 0  # highest seq the welcome already carried
    typing: bool = False
    typing_at: float = 0.0
    buffered: list[tuple[str, Any]] = field(default_factory=list)
    joined: int = 0  # its place in the room's join order (Roster.add)

    def public(self) -> dict[str, str]:
        """How others see this member; the public member id, never the token."""
        return {"sid": self.sid, "name": self.name, "member": self.identity}


@dataclass(frozen=True)
class _Head:
    """The encoded first ``size`` members: ``listed`` of them (fewer while the room is
    smaller), the last with join number ``last``."""

    size: int
    listed: int
    last: int
    encoded: orjson.Fragment


class Roster:
    """The members of one room: by sid, and in join order."""

    def __init__(self) -> None:
        self._by_sid: dict[str, Member] = {}  # insertion order is join order
        self._order: SortedDict = SortedDict()  # join number -> Member
        self._departed: OrderedDict[str, int] = OrderedDict()  # sid -> join number
        self._joins = 0
        self._head: _Head | None = None  # the welcome's first members, encoded (``head``)
        # (sid, Engine.IO sid) of every member while all are ready, and the highest seq a
        # welcome of theirs carried; None until asked for after a change (``recipients``)
        self._recipients: list[tuple[str, str | None]] | None = None
        self._floor = 0

    def __len__(self) -> int:
        return len(self._by_sid)

    def __bool__(self) -> bool:
        return bool(self._by_sid)

    def get(self, sid: str) -> Member | None:
        return self._by_sid.get(sid)

    def values(self) -> Iterator[Member]:
        """Every member, in join order."""
        return iter(self._by_sid.values())

    def items(self) -> Iterator[tuple[str, Member]]:
        """(sid, member) of every member, in join order (the broadcast loop)."""
        return iter(self._by_sid.items())

    def add(self, member: Member) -> None:
        """``member`` joins: it comes last in join order."""
        self._joins += 1
        member.joined = self._joins
        self._recipients = None
        self._by_sid[member.sid] = member
        self._order[member.joined] = member
        head = self._head
        if head is not None and head.listed < head.size:
            self._head = None  # the head had room: the joiner is in it now

    def remove(self, sid: str) -> Member | None:
        """``sid`` leaves (None when it was not in); its place is remembered as a cursor."""
        member = self._by_sid.pop(sid, None)
        if member is None:
            return None
        self._recipients = None
        del self._order[member.joined]
        head = self._head
        if head is not None and member.joined <= head.last:
            self._head = None  # it was listed: the next member moves up into the head
        if not self._by_sid:
            self._departed.clear()  # nobody is left to page
            return member
        departed = self._departed
        departed[sid] = member.joined
        while len(departed) > max(MIN_DEPARTED, len(self._by_sid)):
            departed.popitem(last=False)
        return member

    def clear(self) -> list[Member]:
        """Everyone leaves at once (the room moved); returns who was in."""
        members = list(self._by_sid.values())
        self._by_sid.clear()
        self._order.clear()
        self._departed.clear()
        self._head = None
        self._recipients = None
        return members

    def mark_ready(self, member: Member, floor: int) -> None:
        """``member`` was welcomed with the messages up to ``floor``: from now on it gets
        broadcasts (the only place a member becomes ready, so the recipient list follows)."""
        member.floor = floor
        member.ready = True
        self._recipients = None

    def recipients(self, seq: int) -> list[tuple[str, str | None]] | None:
        """(sid, Engine.IO sid) of every member, in join order, for the broadcast of
        message ``seq``; None when some member is not ready yet or its welcome may already
        hold ``seq`` (then the caller looks at each member). The list is shared: read it,
        never change it."""
        ready = self._recipients
        if ready is None:
            members = self._by_sid.values()
            if not all(m.ready for m in members):
                return None
            ready = self._recipients = [(m.sid, m.eio_sid) for m in members]
            self._floor = max((m.floor for m in members), default=0)
        return ready if seq > self._floor else None

    def first(self, n: int) -> list[Member]:
        """The ``n`` earliest members still in the room."""
        return list(islice(self._order.values(), n))

    def head(self, n: int) -> orjson.Fragment:
        """The JSON list of the ``n`` earliest members as others see them (``public``),
        encoded once and reused until a join or a leave changes who is in it."""
        head = self._head
        if head is None or head.size != n:
            listed = self.first(n)
            head = self._head = _Head(
                n, len(listed), listed[-1].joined if listed else 0,
                orjson.Fragment(orjson.dumps([m.public() for m in listed])))
        return head.encoded

    def after(self, sid: str | None) -> Iterator[Member]:
        """The members after ``sid`` in join order (from the first when None), lazily: a
        page takes what it needs. ``UnknownCursor`` when ``sid`` is not a known cursor."""
        if sid is None:
            start = 0
        else:
            member = self._by_sid.get(sid)
            if member is not None:
                start = member.joined
            elif sid in self._departed:
                start = self._departed[sid]
            else:
                raise UnknownCursor(sid)
        order = self._order
        return (order[k] for k in order.irange(minimum=start, inclusive=(False, True)))
