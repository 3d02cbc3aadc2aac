"""The wire formats the engine reads and writes by hand: pure functions, no I/O.

Socket.IO 5 over Engine.IO 4 puts a Socket.IO packet in an Engine.IO MESSAGE:
``4`` (MESSAGE) + the Socket.IO type digit + ``[/namespace,][ack id][json]``. The fast
engine parses a client's text EVENT straight from those bytes (``parse_event``), encodes
what it sends with orjson (``sio_payload``) and frames it itself (``text_frame``). Each
function here says when it declines (returns None): the caller then uses python-socketio's
own Packet class, so a declined input is never an error, only the slower way.

The stock engine uses ``sio_payload`` and ``packet_head`` too (through the Packet
subclass it hands python-socketio), so both engines put the same bytes on the wire.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import orjson
from engineio import json as engineio_json
from socketio import packet as sio_packet

CONNECT, EVENT, ACK = sio_packet.CONNECT, sio_packet.EVENT, sio_packet.ACK

_DIGITS = frozenset(b"0123456789")
_MAX_ID_DIGITS = 18  # fits in 63 bits; longer ids go the normal way
_LONG_NUMBER = re.compile(rb"\d{19}")  # may be a number orjson would turn into a float
_SLASH, _BRACKET = ord("/"), ord("[")


# -- outgoing ----------------------------------------------------------------------------


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented, uncompressed WebSocket text frame (server to client)."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def sio_payload(kind: int, namespace: str, data: Any, ack_id: int | None = None
                ) -> bytes | None:
    """The Engine.IO MESSAGE payload ``4<type>[<namespace>,][<ack id>]<json>`` as bytes.

    orjson encodes in one C call what python-socketio's Packet class does with a recursive
    binary scan plus the stdlib encoder. Returns None when orjson cannot represent ``data``
    exactly as the stdlib would (bytes, i.e. binary attachments; dict keys that are not
    strings; integers beyond 64 bits): the caller then uses the Packet class. The JSON
    differs only in form (UTF-8 instead of ``\\u`` escapes), never in value."""
    try:
        body = orjson.dumps(data)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return None
    head = "4" + str(kind)
    if namespace != "/":
        head += namespace + ","
    if ack_id is not None:
        head += str(ack_id)
    return head.encode() + body


def json_size(value: Any) -> int:
    """Bytes of ``value`` as JSON on the wire: orjson's form, which every path of this node
    uses; the stdlib's (what python-socketio falls back to when orjson cannot encode it)
    otherwise. Page bounds are measured with this."""
    try:
        return len(orjson.dumps(value))
    except TypeError:
        return len(json.dumps(value, separators=(",", ":")))


# -- incoming ----------------------------------------------------------------------------


def split_header(data: bytes, i: int) -> tuple[str, int | None, int] | None:
    """Read ``[/ns,][id]`` from offset ``i`` up to a JSON array: (namespace, ack id, offset
    of the ``[``), or None when the header is anything but that plain shape."""
    n = len(data)
    namespace = "/"
    if n > i and data[i] == _SLASH:
        sep = data.find(b",", i)
        if sep < 0:
            return None
        raw = data[i:sep]
        if b"?" in raw:
            return None
        try:
            namespace = raw.decode()
        except UnicodeDecodeError:
            return None
        i = sep + 1
    j = i
    while j < n and data[j] in _DIGITS:
        j += 1
    if j - i > _MAX_ID_DIGITS or j >= n or data[j] != _BRACKET:
        return None
    return namespace, (int(data[i:j]) if j > i else None), j


def parse_event(data: bytes) -> tuple[str, int | None, list] | None:
    """Split the Engine.IO MESSAGE ``42[/ns,][id][...]`` into (namespace, ack id, args), or
    None when the frame must take python-socketio's path: an odd header, an ack id over 18
    digits, a number orjson would read as a float, JSON orjson refuses (NaN, lone
    surrogates, nesting over 1024 levels), or a first element that is not an event name."""
    header = split_header(data, 2)
    if header is None:
        return None
    namespace, ack_id, j = header
    n = len(data)
    body = memoryview(data)[j:]
    if n - j >= 19 and _LONG_NUMBER.search(data, j):
        return None
    try:
        args = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not args or type(args[0]) is not str:
        return None
    return namespace, ack_id, args


def packet_head(data: str | bytes) -> tuple[int, str, int | None] | None:
    """(type, namespace, ack id) of a Socket.IO packet whose body could not be read.

    Used once python-socketio failed to decode a packet (JSON nested deeper than the
    parser goes, a body of the wrong shape), so that the sender still gets an answer: only
    CONNECT (``0[/ns,]{...}``) and EVENT (``2[/ns,][id][...]``) packets have one to get."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if not data or data[:1] not in (b"0", b"2"):
        return None
    kind = data[0] - 0x30
    if kind == CONNECT:
        namespace = "/"
        if data[1:2] == b"/":
            end = data.find(b",")
            raw = data[1:] if end < 0 else data[1:end]
            namespace = raw.split(b"?", 1)[0].decode("utf-8", "replace")
        return kind, namespace, None
    header = split_header(data, 1)
    if header is None:
        return None
    return kind, header[0], header[1]


class BoundedJson:
    """The JSON python-socketio and python-engineio decode packets with (their ``json=``
    option): engineio's own (which bounds integer literals), except that JSON nested deeper
    than the parser can recurse is a ValueError, the error both libraries expect from bad
    JSON, instead of a RecursionError that escapes them with a traceback."""

    dumps = staticmethod(engineio_json.dumps)

    @staticmethod
    def loads(*args: Any, **kwargs: Any) -> Any:
        try:
            return engineio_json.loads(*args, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None

