"""The peer contract: what nodes say to each other, and what a room creation is anywhere.

Peers talk over the internal listener: ``node/internal.py`` serves it, ``cluster/peers.py``
calls it, and ``cluster/placement.py`` decides whom to call. Everything both ends must agree
on lives here, so that neither end imports the other (the node is below the cluster, and the
cluster never imports the node):

* the paths, and the cluster secret every internal request carries
  (``Authorization: Bearer <secret>``, compared in constant time);
* the room request: ``POST /api/rooms`` and ``POST /internal/rooms`` take the same body,
  read and checked by the same code (``read_room_request``), so a request the receiving node
  accepted is one its peers accept too, and both answer the same faults in the same words;
* the ``Idempotency-Key``: the header, the form of a key, the fingerprint of what was asked,
  and ``replay`` (the room of an earlier creation, or ``IdempotencyConflict`` when the key
  asked for another room). The owner's side, storing a key with its room, is
  ``node/idempotency.py``;
* the paths of loads and drains (``ROOMS_PATH`` listing, ``ROOM_LOAD_PATH``,
  ``DRAINED_PATH``); the listing's shape is ``node/loads.py``'s and ``cluster/moves.py``'s;
* the paths of moves (``MOVE_PATH``, ``HANDOFF_*``; ``ROOM_STATE_PATH`` says where a room
  is during and after one); what they carry is
  ``node/handoff/api.py``'s;
* the paths of the follower stream, adoption and reachability (``REPLICATION_*``,
  ``ADOPT*_PATH``, ``REACHABILITY_PATH``); what they carry is ``node/replication/``'s;
* how a creation ends when it does not end in a room (``CreationFailed``): each kind carries
  the HTTP answer it becomes, whichever listener gives it.

It imports neither ``shardchat.node`` nor ``shardchat.cluster`` (``tests/test_layering.py``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from typing import Any

from aiohttp import web

from shardchat.http_errors import json_error
from shardchat.refusal import Refusal, check_text

# -- paths and the secret ------------------------------------------------------------------

STATS_PATH = "/internal/stats"
ROOMS_PATH = "/internal/rooms"
METRICS_PATH = "/internal/metrics"
PROMETHEUS_PATH = "/metrics"  # the same counters in Prometheus's text format
ADMIN_PATH = "/admin"  # the ops page (a person's browser: Basic auth, see below)
ADMIN_DATA_PATH = "/admin/cluster.json"  # what the page shows, every few seconds
KEYS_PATH = "/internal/creation-keys/"  # + an Idempotency-Key: the room created under it
# GET: what the node is to one room (owner, forwarded, incoming: ``whereabouts.RoomState``)
ROOM_STATE_PATH = "/internal/rooms/{room_id}"


def room_state_path(room_id: str) -> str:
    return ROOM_STATE_PATH.format(room_id=room_id)

# Load and drains (cluster/moves.py asks, node/internal.py answers). ``GET`` of ROOMS_PATH
# lists the owned rooms with their load (``POST`` on it creates one); ROOM_LOAD_PATH: one
# room's load (``GET``), or a moved room's numbers handed to its new owner (``POST``);
# DRAINED_PATH: ``POST {"drained": bool}`` takes the node out of placement or back in.
ROOM_LOAD_PATH = "/internal/rooms/{room_id}/load"
DRAINED_PATH = "/internal/drained"


def room_load_path(room_id: str) -> str:
    return ROOM_LOAD_PATH.format(room_id=room_id)


# Rooms that move (SPEC section 8; ``node/handoff/``). On the owner, a move: POST {"to": N}
# -> the move's report. Node to node, the steps of one move (the source calls the target).
MOVE_PATH = "/internal/rooms/{room_id}/move"
HANDOFF_BEGIN_PATH = "/internal/handoff/begin"
HANDOFF_COPY_PATH = "/internal/handoff/copy"
HANDOFF_ACTIVATE_PATH = "/internal/handoff/activate"
HANDOFF_ABORT_PATH = "/internal/handoff/abort"


def move_path(room_id: str) -> str:
    """``POST {"to": N}`` to this on the room's owner: move it, live, to instance N."""
    return MOVE_PATH.format(room_id=room_id)


# On-line replication (SPEC section 9; ``node/replication/``). The follower opens the
# stream (a websocket) on its owner; an operator (``shardchat adopt``) or the follower
# itself POSTs ``{"instance": N}`` to adopt N; a starting node asks its peers which of its
# rooms they adopted (``?instance=N`` -> ``{"rooms": {room id: instance now}}``); peers
# tell how long they have not reached each instance (``{"unreached_for": {N: seconds}}``).
REPLICATION_STREAM_PATH = "/internal/replication/stream"
ADOPT_PATH = "/internal/replication/adopt"
ADOPTED_PATH = "/internal/replication/adopted"
REACHABILITY_PATH = "/internal/reachability"


AUTH_HEADER = "Authorization"


def auth_header(secret: str) -> dict[str, str]:
    """The header a peer sends; used by placement, the benchmark and tests alike."""
    return {AUTH_HEADER: f"Bearer {secret}"}


def authorized(given: str | None, secret: str) -> bool:
    """Whether the ``Authorization`` value ``given`` carries ``secret``: compared in constant
    time, as the bytes that arrived. aiohttp hands header bytes that are not UTF-8 over as
    surrogate escapes; they are encoded back, so such a header is just a wrong secret."""
    expected = auth_header(secret)[AUTH_HEADER].encode()
    return hmac.compare_digest((given or "").encode("utf-8", "surrogateescape"), expected)


def authorized_person(given: str | None, secret: str) -> bool:
    """``authorized`` for a browser: ``Authorization: Basic`` with the cluster secret as the
    password (any user name), which a browser asks for once and then sends by itself, as it
    cannot send a bearer token to a page it opens. Also constant time."""
    scheme, _, encoded = (given or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (ValueError, binascii.Error):
        return False
    _, _, password = decoded.partition(b":")
    return hmac.compare_digest(password, secret.encode())


# -- the room request ----------------------------------------------------------------------

MAX_ROOM_NAME_CHARS = 100


def check_room_name(name: Any) -> Refusal | None:
    """None for a usable room name: 1 to ``MAX_ROOM_NAME_CHARS`` visible characters."""
    if not isinstance(name, str) or not name.strip():
        return Refusal("bad_request", "Give the room a name (1 to "
                       f"{MAX_ROOM_NAME_CHARS} characters).")
    if len(name.strip()) > MAX_ROOM_NAME_CHARS:
        return Refusal("bad_request", f"The room name has {len(name.strip())} characters; "
                       f"use at most {MAX_ROOM_NAME_CHARS}.")
    return check_text(name.strip(), "The room name")


async def read_room_request(request: web.Request, max_bytes: int
                            ) -> tuple[dict | None, web.Response | None]:
    """Read and validate a create-room body (public API and internal call alike)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raw = None
    if raw is None or len(raw) > max_bytes:
        return None, json_error(413, "too_large", f"The request body is larger than "
                                f"{max_bytes} bytes (node.max_body_bytes).")
    return parse_room_request(raw)


def parse_room_request(raw: bytes) -> tuple[dict | None, web.Response | None]:
    """Validate a POST /api/rooms body; returns (body, None) or (None, error response)."""
    try:
        body = json.loads(raw or b"null")
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json goes
        return None, json_error(400, "bad_request", 'The body must be JSON, e.g. '
                                '{"name": "Team chat", "private": false}.')
    if not isinstance(body, dict):
        return None, json_error(400, "bad_request", 'The body must be a JSON object with '
                                '"name" and optionally "private".')
    bad = check_room_name(body.get("name"))
    if bad:
        return None, json_error(400, bad.code, bad.message)
    private = body.get("private", False)
    if not isinstance(private, bool):
        return None, json_error(400, "bad_request", '"private" must be true or false.')
    return {"name": body["name"], "private": private}, None


# -- the Idempotency-Key -------------------------------------------------------------------

KEY_HEADER = "Idempotency-Key"
KEY_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")


def check_key(value: str | None) -> Refusal | None:
    """None when ``value`` (the header, or None when absent) is a usable key."""
    if value is None or KEY_RE.fullmatch(value):
        return None
    what = (f"this one is {len(value)} characters long" if not 16 <= len(value) <= 128
            else "this one holds other characters")
    return Refusal("bad_request", f"The {KEY_HEADER} header must be 16 to 128 letters, "
                   f"digits, '-' or '_' (for example a random UUID); {what}.")


def read_creation_key(request: web.Request) -> tuple[str | None, web.Response | None]:
    """The request's Idempotency-Key (None when it has none), or a 400 for a bad one."""
    key = request.headers.get(KEY_HEADER)
    bad = check_key(key)
    return (None, json_error(400, bad.code, bad.message)) if bad else (key, None)


def fingerprint(name: str, private: bool) -> str:
    """A digest of what was asked, so a key reused for another room is recognised."""
    canon = json.dumps({"name": name.strip(), "private": bool(private)}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def replay(found: dict[str, Any], name: str, private: bool) -> dict[str, Any]:
    """The room of an earlier creation with this key, if it asked for the same thing.

    ``found`` is ``{"room", "fingerprint"}``, as ``GET /internal/creation-keys/<key>``
    answers it (and the owner's ``KeyedCreations.find`` returns it)."""
    if found.get("fingerprint") != fingerprint(name, private):
        raise IdempotencyConflict()
    return found["room"]


# -- how a creation fails ------------------------------------------------------------------

class CreationFailed(Exception):
    """A room creation that ends in an answer other than a room: ``status`` (HTTP),
    ``code`` (SPEC error code) and ``message`` are that answer, on any listener."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def response(self) -> web.Response:
        return json_error(self.status, self.code, self.message)


class IdempotencyConflict(CreationFailed):
    """The key was used before for a room with another name or privacy (422). A peer says
    so with this code, and placement passes it on rather than trying another peer."""

    status = 422
    code = "idempotency_conflict"

    def __init__(self) -> None:
        super().__init__("This Idempotency-Key was already used to create a room with another "
                         "name or privacy setting; send a new key for a new room.")


class NoCapacity(CreationFailed):
    """No healthy, non-draining instance could take the room (503)."""

    status = 503
    code = "no_capacity"

    def __init__(self, message: str = "No instance can take a new room right now (all are "
                 "down or draining); try again in a few seconds."):
        super().__init__(message)


class Refused(CreationFailed):
    """Peers refused the request itself (400/413) and none took it: answer the same."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
