"""The fast engine's client manager: a member's leave costs O(its rooms), not O(the node).

python-socketio keeps, per namespace, a table of rooms, and every connected sid is a room
of its own in it. Its ``basic_disconnect`` finds the rooms of the sid that leaves by copying
that table and looking for the sid in every room: O(members of the namespace) per leave,
so a room of n members that empties (a lecture ending, a node's clients reconnecting
elsewhere) costs O(n^2), seconds of blocked event loop at a few thousand members. And when
a connection ends, its server visits every namespace the manager has (here: every room
with a member on the node) to find the ones that connection was in: O(rooms of the node)
per lost connection, O(n x rooms) for n of them lost at once.

``IndexedManager`` is python-socketio's ``AsyncManager`` (handed to the server as its
documented ``client_manager``) that also remembers

* which rooms each sid is in, so a disconnect leaves exactly those rooms;
* which namespaces each Engine.IO session is connected to (``namespaces_of``), so the
  server's end of a connection (``server.py``) disconnects exactly those;

both kept up to date where the manager itself enters and leaves rooms (a namespace
connection is its room ``None``). Its lists of sids connecting and disconnecting, which
every ``is_connected`` looks through, are kept as counted sets (``_PendingSids``). The rest
of what a disconnect does (its pending callbacks) is done as the library does it. What it
reads of the manager is in the engine's self-check (``INTERNALS``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import socketio


class _PendingSids:
    """The sids of one namespace that are connecting (or disconnecting): the list the
    library keeps there, with its ``append``, ``remove``, ``in`` and ``len``, in O(1).

    A sid is counted as often as it was appended, as a list would hold it."""

    __slots__ = ("_count",)

    def __init__(self, sids: Iterable[str] = ()) -> None:
        self._count: dict[str, int] = {}
        for sid in sids:
            self.append(sid)

    def append(self, sid: str) -> None:
        self._count[sid] = self._count.get(sid, 0) + 1

    def remove(self, sid: str) -> None:
        """Take one ``sid`` out; ValueError when there is none (as ``list.remove``)."""
        n = self._count.get(sid)
        if n is None:
            raise ValueError(f"{sid!r} is not pending")
        if n > 1:
            self._count[sid] = n - 1
        else:
            del self._count[sid]

    def __contains__(self, sid: object) -> bool:
        return sid in self._count

    def __len__(self) -> int:
        return sum(self._count.values())

    def __bool__(self) -> bool:
        return bool(self._count)

    def __iter__(self) -> Iterator[str]:
        for sid, n in self._count.items():
            for _ in range(n):
                yield sid

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Iterable) else NotImplemented

    def __repr__(self) -> str:
        return f"_PendingSids({list(self)!r})"


class _PendingByNamespace(dict):
    """namespace -> ``_PendingSids``: whatever list the library stores is kept as one."""

    def __setitem__(self, namespace: str, sids: Any) -> None:
        if not isinstance(sids, _PendingSids):
            sids = _PendingSids(sids)
        super().__setitem__(namespace, sids)


class IndexedManager(socketio.AsyncManager):
    """``AsyncManager`` with an index (namespace, sid) -> the rooms that sid is in, one
    Engine.IO sid -> its namespaces, and pending lists that answer ``in`` in O(1)."""

    def __init__(self) -> None:
        super().__init__()
        self._rooms_of: dict[tuple[str, str], set[Any]] = {}
        # Engine.IO sid -> {namespace: Socket.IO sid} of the namespaces it is connected to
        self._namespaces_of: dict[str, dict[str, str]] = {}
        self.pending_connect = _PendingByNamespace()
        self.pending_disconnect = _PendingByNamespace()

    def basic_enter_room(self, sid: str, namespace: str, room: Any,
                         eio_sid: str | None = None) -> None:
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        key = (namespace, sid)
        rooms = self._rooms_of.get(key)
        if rooms is None:
            rooms = self._rooms_of[key] = set()
        rooms.add(room)
        if room is None:  # the namespace connection itself (pre_connect)
            eio = self.rooms[namespace][None][sid]
            spaces = self._namespaces_of.get(eio)
            if spaces is None:
                spaces = self._namespaces_of[eio] = {}
            spaces[namespace] = sid

    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        eio = self.rooms.get(namespace, {}).get(None, {}).get(sid) if room is None else None
        super().basic_leave_room(sid, namespace, room)
        key = (namespace, sid)
        rooms = self._rooms_of.get(key)
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self._rooms_of[key]
        if eio is not None:
            spaces = self._namespaces_of.get(eio)
            if spaces is not None and spaces.get(namespace) == sid:
                del spaces[namespace]
                if not spaces:
                    del self._namespaces_of[eio]

    def get_rooms(self, sid: str, namespace: str) -> list[Any]:
        """The rooms a client is in (its own sid room included, as the library answers)."""
        return [r for r in self._rooms_of.get((namespace, sid), ()) if r is not None]

    def namespaces_of(self, eio_sid: str) -> list[str]:
        """The namespaces Engine.IO session ``eio_sid`` is connected to (or connecting or
        disconnecting), in the order it connected them: what the library finds by visiting
        every namespace."""
        return list(self._namespaces_of.get(eio_sid, ()))

    def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        """The library's disconnect, leaving only the rooms the index has for ``sid``."""
        if namespace not in self.rooms:
            return
        for room in list(self._rooms_of.get((namespace, sid), ())):
            self.basic_leave_room(sid, namespace, room)
        self.callbacks.pop(sid, None)
        for pending in (self.pending_connect, self.pending_disconnect):
            sids = pending.get(namespace)
            if sids is not None and sid in sids:
                sids.remove(sid)
                if not sids:
                    del pending[namespace]
