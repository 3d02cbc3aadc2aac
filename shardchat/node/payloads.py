"""Store records as the protocol shows them (SPEC §3-4): the one place that builds them.

The store hands out typed records (``shardchat/node/store/records.py``) and knows nothing
of JSON; what a client sees of a message or a room is decided here, so the protocol's shape
changes in one module and the store's in another. Pure functions, run wherever the room
service runs them (the event loop, or the store's reader thread while it measures a page).

A message's payload is built once per message: the room service broadcasts that one dict
(encoded once for every member) and pages reuse the dict they measured.
"""

from __future__ import annotations

from typing import Any

from shardchat import urls
from shardchat.node.store import MessageRecord, RoomRecord


def message(m: MessageRecord) -> dict[str, Any]:
    """A message as clients get it (``message`` events, welcome and history pages).
    ``from.member`` is None for messages stored before member identities existed."""
    return {"seq": m.seq, "room": m.room_id,
            "from": {"sid": m.sender_sid, "name": m.sender_name, "member": m.sender_member},
            "text": m.text, "ts": m.ts, "client_id": m.client_id}


def room(r: RoomRecord) -> dict[str, Any]:
    """A room as its members see it (``welcome.room``)."""
    return {"id": r.id, "name": r.name, "private": r.private}


def placed_room(r: RoomRecord, *, instance: int, public_url: str,
                invite: str | None = None) -> dict[str, Any]:
    """A room as its creation answers it: where it lives (on ``instance``, reached at
    ``public_url``) and how to join it; ``invite`` for private rooms only."""
    path = urls.room_path(instance, r.id)
    out = {**room(r), "instance": instance, "path": path,
           "url": urls.join_url(public_url, path),
           "namespace": urls.room_namespace(instance, r.id),
           "socketio_path": urls.socketio_path(instance)}
    if invite is not None:
        out["invite"] = invite
    return out
