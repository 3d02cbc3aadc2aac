"""The fast engine's client manager: a member's leave costs O(1), not O(members).

python-socketio keeps, per namespace, a table of rooms, and every connected sid is a room
of its own in it. Its ``basic_disconnect`` finds the rooms of the sid that leaves by copying
that table and looking for the sid in every room: O(members of the namespace) per leave,
so a room of n members that empties (a lecture ending, a node's clients reconnecting
elsewhere) costs O(n^2), seconds of blocked event loop at a few thousand members.

``IndexedManager`` is python-socketio's ``AsyncManager`` (handed to the server as its
documented ``client_manager``) that also remembers which rooms each sid is in, kept up to
date where the manager itself enters and leaves rooms, so a disconnect leaves exactly those
rooms. The rest of what a disconnect does (its pending callbacks and the pending connect
and disconnect lists) is done as the library does it. What it reads of the manager is in
the engine's self-check (``INTERNALS``).
"""

from __future__ import annotations

from typing import Any

import socketio


class IndexedManager(socketio.AsyncManager):
    """``AsyncManager`` with an index (namespace, sid) -> the rooms that sid is in."""

    def __init__(self) -> None:
        super().__init__()
        self._rooms_of: dict[tuple[str, str], set[Any]] = {}

    def basic_enter_room(self, sid: str, namespace: str, room: Any,
                         eio_sid: str | None = None) -> None:
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        key = (namespace, sid)
        rooms = self._rooms_of.get(key)
        if rooms is None:
            rooms = self._rooms_of[key] = set()
        rooms.add(room)

    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        super().basic_leave_room(sid, namespace, room)
        key = (namespace, sid)
        rooms = self._rooms_of.get(key)
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self._rooms_of[key]

    def get_rooms(self, sid: str, namespace: str) -> list[Any]:
        """The rooms a client is in (its own sid room included, as the library answers)."""
        return [r for r in self._rooms_of.get((namespace, sid), ()) if r is not None]

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
