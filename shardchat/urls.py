"""The ``/i<N>/`` URL scheme, in one place.

Every path that carries an instance number is spelled here and nowhere else: the node, the
local router, the rule set and the AWS provisioner all import these helpers, so a change of
scheme is a single edit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_INSTANCE = 1
MAX_INSTANCE = 9999

ROOM_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_ROOM_ID_RE = re.compile(rf"^{ROOM_ID_PATTERN}$")

# "/i<N>" followed by "/" or the end of the path. N has no leading zero, so "/i01/" is not
# instance 1: a load balancer pattern "/i1/*" would not match it either.
_PREFIX_RE = re.compile(r"^/i([1-9][0-9]{0,3})(?=/|$)")
_ROOM_NS_RE = re.compile(rf"^/i([1-9][0-9]{{0,3}})/room/({ROOM_ID_PATTERN})$")


def valid_instance(n: int) -> bool:
    """True when ``n`` is an instance number the scheme can express."""
    return isinstance(n, int) and not isinstance(n, bool) and MIN_INSTANCE <= n <= MAX_INSTANCE


def valid_room_id(room_id: str) -> bool:
    return isinstance(room_id, str) and _ROOM_ID_RE.match(room_id) is not None


def checked_instance(n: int) -> int:
    """``n`` itself when it is a valid instance number; ValueError otherwise."""
    if not valid_instance(n):
        raise ValueError(f"instance number must be {MIN_INSTANCE}..{MAX_INSTANCE}, got {n!r}")
    return n


def prefix(n: int) -> str:
    """``/i<N>``: the path prefix that routes to instance N (no trailing slash)."""
    return f"/i{checked_instance(n)}"


def path_pattern(n: int) -> str:
    """The ALB path-pattern condition that sends everything of instance N to it."""
    return f"{prefix(n)}/*"


def room_path(n: int, room_id: str) -> str:
    """``/i<N>/room/<id>``: the room page and, identically, its Socket.IO namespace."""
    return f"{prefix(n)}/room/{room_id}"


room_namespace = room_path


def socketio_path(n: int) -> str:
    """The Engine.IO endpoint of node N, as passed to clients (``path`` option)."""
    return f"{prefix(n)}/socket.io"


def healthz_path(n: int) -> str:
    return f"{prefix(n)}/healthz"


def static_prefix(n: int) -> str:
    return f"{prefix(n)}/static"


def instance_of_path(path: str) -> int | None:
    """The instance a request path is addressed to, or None for default-routed paths."""
    m = _PREFIX_RE.match(path)
    return int(m.group(1)) if m else None


def strip_prefix(path: str) -> str:
    """The path below ``/i<N>``: ``/i3/static/app.js`` -> ``/static/app.js``."""
    m = _PREFIX_RE.match(path)
    if not m:
        return path
    rest = path[m.end():]
    return rest or "/"


@dataclass(frozen=True)
class RoomAddress:
    instance: int
    room_id: str


def parse_room_namespace(namespace: str) -> RoomAddress | None:
    """``/i3/room/abc`` -> RoomAddress(3, "abc"); anything else -> None."""
    m = _ROOM_NS_RE.match(namespace or "")
    if not m:
        return None
    return RoomAddress(int(m.group(1)), m.group(2))


def join_url(base: str, path: str) -> str:
    """Absolute URL of ``path`` under the public base URL (which may carry its own path)."""
    return base.rstrip("/") + path
