"""Where a room lives: what a node says about a room, and what a lookup answers.

Two shapes, shared by the node (which answers ``GET /internal/rooms/<room_id>`` about
itself and serves the public lookup) and the cluster's directory (which asks the nodes and
puts their answers together). Neither side imports the other; both import this.

* ``RoomState``: one node's answer about one room, on the wire
  ``{"state": "owner", "room": {...}}`` (this node serves it), ``{"state": "forwarded",
  "to": N}`` (it moved from here to N), ``{"state": "incoming"}`` (a copy is arriving here and
  is not served yet; ``"from": N`` names the source when the node knows it), or a 404 (the
  node knows nothing of the room). More keys may come along; they are ignored here.
* ``Lookup``: the outcome of asking the cluster, as the public API answers it: 200 with the
  room, 404 ``not_found`` or 503 ``unavailable``, each with a sentence a person can act on.

``public_room`` is the only way a room description leaves a lookup: the fields of the
creation answer (SPEC section 3) except ``invite``. An invite is a credential for a private
room, and a lookup is open to anyone who knows a room id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardchat import urls

OWNER, FORWARDED, INCOMING = "owner", "forwarded", "incoming"
STATES = (OWNER, FORWARDED, INCOMING)

# The creation answer's fields, minus ``invite`` (SPEC section 8).
ROOM_FIELDS = ("id", "name", "private", "instance", "path", "url", "namespace",
               "socketio_path")


def public_room(room: dict[str, Any]) -> dict[str, Any]:
    """The room description a lookup may give out: ``ROOM_FIELDS`` only, never an invite."""
    return {key: room[key] for key in ROOM_FIELDS if key in room}


def owner_answer(instance: int, room: dict[str, Any]) -> dict[str, Any]:
    """What the owner of ``room`` answers when asked about it."""
    return {"state": OWNER, "instance": instance, "room": public_room(room)}


class BadState(ValueError):
    """A node's answer about a room that is not a ``RoomState``: a bug or a foreign server."""


@dataclass(frozen=True)
class RoomState:
    """What node ``instance`` is to one room (see the module docstring)."""

    instance: int
    state: str
    room: dict[str, Any] | None = None  # OWNER: where it lives (this node)
    to: int | None = None  # FORWARDED: where it went
    source: int | None = None  # INCOMING: where it comes from, when known

    @property
    def lead(self) -> int | None:
        """The instance worth asking next: a forward's target, an incoming copy's source."""
        return self.to if self.state == FORWARDED else self.source


def parse_state(instance: int, room_id: str, body: Any) -> RoomState:
    """Check node ``instance``'s answer about ``room_id``; raises BadState when it is not one
    (an owner that describes another room or another instance is not believed)."""
    if not isinstance(body, dict) or body.get("state") not in STATES:
        raise BadState(f"instance {instance} answered no room state")
    state = body["state"]
    if state == OWNER:
        room = body.get("room")
        if (not isinstance(room, dict) or room.get("id") != room_id
                or room.get("instance") != instance
                or room.get("namespace") != urls.room_namespace(instance, room_id)):
            raise BadState(f"instance {instance} claims room {room_id!r} with a description "
                           "of another room or instance")
        return RoomState(instance, OWNER, room=public_room(room))
    if state == FORWARDED:
        to = body.get("to")
        if not urls.valid_instance(to) or to == instance:
            raise BadState(f"instance {instance} forwards room {room_id!r} to {to!r}")
        return RoomState(instance, FORWARDED, to=to)
    source = body.get("from")
    return RoomState(instance, INCOMING,
                     source=source if urls.valid_instance(source) else None)


@dataclass(frozen=True)
class Lookup:
    """Where a room lives now, as ``GET /api/rooms/<room_id>`` answers it."""

    status: int  # 200, 404 or 503
    room: dict[str, Any] | None = None  # 200: ``public_room`` of its owner's description
    message: str = ""  # 404 and 503: a sentence for a person

    @property
    def code(self) -> str:
        return {200: "ok", 404: "not_found"}.get(self.status, "unavailable")

    @classmethod
    def found(cls, room: dict[str, Any]) -> Lookup:
        return cls(200, room=public_room(room))

    @classmethod
    def not_found(cls, room_id: str) -> Lookup:
        return cls(404, message=f"There is no room {room_id!r} on any instance of this "
                   "cluster: check the link (room ids are case-sensitive), or create a new "
                   "room at /.")

    @classmethod
    def unavailable(cls, room_id: str, why: str) -> Lookup:
        return cls(503, message=f"Where room {room_id!r} lives cannot be told right now: "
                   f"{why}. Try again in a few seconds.")
