"""The internal API of moves: what its calls carry, and the checks of what peers send (the
paths are the peer contract's, ``shardchat/internal_api.py``).

Operator-facing (the CLI's ``move``/``drain``/``rebalance`` and the lookup call these):

* ``POST /internal/rooms/<room_id>/move`` ``{"to": N}`` on the owner: runs the move and
  answers the report (``records.MoveReport.to_json``).
* ``GET /internal/rooms/<room_id>`` on any node (``internal.py`` serves it from
  ``Handoff.state``): ``{"state": "owner" | "forwarded" | "incoming", ...}`` or 404, the
  shapes of ``shardchat/whereabouts.py`` with what a move adds.

Node to node, the steps of one move (the source calls, the target answers):

* ``POST /internal/handoff/begin``, ``/copy``, ``/activate``, ``/abort``.

Every one of them is behind the cluster secret like every internal call (``internal.py``).
"""

from __future__ import annotations

import re
from typing import Any

from shardchat import internal_api, urls
from shardchat.node.store import MessageRecord

MOVE_PATH = internal_api.MOVE_PATH
BEGIN_PATH = internal_api.HANDOFF_BEGIN_PATH
COPY_PATH = internal_api.HANDOFF_COPY_PATH
ACTIVATE_PATH = internal_api.HANDOFF_ACTIVATE_PATH
ABORT_PATH = internal_api.HANDOFF_ABORT_PATH
move_path, room_state_path = internal_api.move_path, internal_api.room_state_path

MAX_COPY_BYTES = 4 * 1024 * 1024  # largest copy request a target reads
_MOVE_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


class BadRequest(ValueError):
    """A request body that is not what the API takes; the message says what is wrong."""


def whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def field(body: Any, name: str, kind: str) -> Any:
    """``body[name]`` checked as ``kind``: room_id, move_id, instance, seq, str, bool, list,
    object."""
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    value = body.get(name)
    valid = {
        "room_id": lambda v: urls.valid_room_id(v),
        "move_id": lambda v: isinstance(v, str) and bool(_MOVE_ID.match(v)),
        "instance": lambda v: urls.valid_instance(v),
        "seq": lambda v: whole(v) and v >= 0,
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "list": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }[kind]
    if not valid(value):
        raise BadRequest(f"{name!r} is missing or is not a valid {kind.replace('_', ' ')}.")
    return value


# A copied message travels as its row: [seq, sender_sid, sender_name, text, ts, client_id,
# sender_member], the columns of the messages table after the room id (store/records.py).
_ROW_KINDS = (int, str, str, str, int, (str, type(None)), (str, type(None)))


def message_rows(messages: list[MessageRecord]) -> list[list[Any]]:
    return [[m.seq, m.sender_sid, m.sender_name, m.text, m.ts, m.client_id, m.sender_member]
            for m in messages]


def messages_of(room_id: str, rows: Any) -> list[MessageRecord]:
    """The records of copied rows; BadRequest when one is not a message row."""
    if not isinstance(rows, list):
        raise BadRequest("'messages' must be a list of message rows.")
    out = []
    for row in rows:
        if (not isinstance(row, list) or len(row) != len(_ROW_KINDS)
                or any(isinstance(v, bool) or not isinstance(v, kind)
                       for v, kind in zip(row, _ROW_KINDS, strict=True))
                or row[0] < 1):
            raise BadRequest("Each copied message must be [seq, sender_sid, sender_name, "
                             "text, ts, client_id, sender_member].")
        out.append(MessageRecord(room_id, *row))
    return out
