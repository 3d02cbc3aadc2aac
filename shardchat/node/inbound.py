"""The fast inbound path: a client's Socket.IO EVENT, from WebSocket frame to handler.

python-socketio receives an event like this: the Engine.IO packet is decoded into an object,
the Socket.IO packet is decoded again (stdlib JSON, then a recursive scan for binary
attachments), and the handler runs in a task of its own; its ack is encoded with the Packet
class, put on the client's Engine.IO queue and written by the client's writer task.

Here the frame's bytes are parsed once: ``42[/namespace,][ack id][json array]`` with orjson,
the handler is the very one python-socketio would pick (``sio._get_event_handler``, so the
``@sio.on`` registrations in ``app.py`` stay the one source of truth) and its ack is a
pre-built frame sent by ``Fanout.send_payload`` (straight to the socket when the client has
nothing else in flight).

What is left to python-socketio, by returning False from ``dispatch``: every packet that
is not plainly a text EVENT (CONNECT, DISCONNECT, ACK, binary events and their attachments),
JSON orjson would read differently from the stdlib (integers beyond 64 bits, NaN) or not at
all, an event without a coroutine handler, and anything odd in the header. python-socketio
then does exactly what it always did, so a malformed packet costs this path nothing.

A packet python-socketio cannot read either (JSON nested deeper than any parser goes:
orjson stops at 1024 levels, the stdlib at Python's recursion limit, which ``BoundedJson``
turns into the ValueError of any other bad JSON) is never an exception that leaves the
sender waiting: ``NodeSocketServer`` in ``app.py`` catches the failure and,
from the header alone (``packet_head``), acks an EVENT that asked for an ack with
``bad_request`` or refuses a CONNECT with ``bad_request``; anything else is dropped. The
connection stays up either way.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from typing import Any

import orjson
from engineio import json as engineio_json
from socketio import packet as sio_packet

from shardchat.node.fanout import Fanout, sio_payload

log = logging.getLogger("shardchat.inbound")

_DIGITS = frozenset(b"0123456789")
_MAX_ID_DIGITS = 18  # fits in 63 bits; longer ids go the normal way
_LONG_NUMBER = re.compile(rb"\d{19}")  # may be a number orjson would turn into a float
_COMMA, _SLASH, _BRACKET = ord(","), ord("/"), ord("[")
UNAVAILABLE = {"ok": False, "error": "unavailable",
               "message": "The server failed to handle this request; try again in a moment."}


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
    """Split ``42[/ns,][id][...]`` into (namespace, ack id, args), or None when the frame
    must take python-socketio's path (see the module docstring)."""
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


CONNECT, EVENT = sio_packet.CONNECT, sio_packet.EVENT


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


class Inbound:
    """Dispatches clients' text EVENT frames to the room service's handlers."""

    def __init__(self, sio: Any, fanout: Fanout) -> None:
        self.sio = sio
        self.fanout = fanout
        self.manager = sio.manager
        self.fast = 0
        self._running: set[asyncio.Task] = set()

    def dispatch(self, eio_sid: str, data: bytes) -> bool:
        """Handle one Engine.IO MESSAGE frame (``4...``) if it is a plain text EVENT;
        False means "not mine": give it to the Engine.IO socket's ``receive``."""
        if len(data) < 3 or data[0] != 0x34 or data[1] != 0x32:  # "4" MESSAGE, "2" EVENT
            return False
        parsed = parse_event(data)
        if parsed is None:
            return False
        namespace, ack_id, args = parsed
        event = args[0]
        if event in self.sio.refused_events:
            return False  # refused by NodeSocketServer._handle_event on the normal path
        manager = self.manager
        sid = manager.sid_from_eio_sid(eio_sid, namespace)
        if sid is None or not manager.is_connected(sid, namespace):
            return True  # python-socketio drops events for namespaces not joined, too
        handler, hargs = self.sio._get_event_handler(event, namespace, (sid, *args[1:]))
        if handler is None or not inspect.iscoroutinefunction(handler):
            return False
        self.fast += 1
        task = asyncio.get_running_loop().create_task(
            self._run(handler, hargs, eio_sid, namespace, ack_id))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return True

    async def _run(self, handler: Any, args: tuple, eio_sid: str, namespace: str,
                   ack_id: int | None) -> None:
        """Run the handler and send its ack, as python-socketio's ``_handle_event_internal``
        does (a tuple is several ack arguments, None none). One task per event, as with
        python-socketio's ``async_handlers``: a message waits for its group commit without
        holding up the client's next frames, and handlers start in frame order, which is
        what orders a client's messages (the store assigns seq when the handler starts)."""
        try:
            result = await handler(*args)
        except Exception:  # app.py's handlers answer their own errors: this is a last resort
            log.exception("handler for an event on %s failed", namespace)
            result = UNAVAILABLE
        if ack_id is None or result is self.sio.not_handled:
            return
        if result is None:
            data: list = []
        elif isinstance(result, tuple):
            data = list(result)
        else:
            data = [result]
        payload = sio_payload(sio_packet.ACK, namespace, data, ack_id)
        if payload is None:
            await self.sio._send_packet(eio_sid, self.sio.packet_class(
                sio_packet.ACK, namespace=namespace, id=ack_id, data=data))
        else:
            await self.fanout.send_payload(eio_sid, payload)

    def stats(self) -> dict[str, int]:
        return {"fast_events": self.fast}
