"""The fast inbound path: a client's Socket.IO EVENT, from WebSocket frame to handler.

python-socketio receives an event like this: the Engine.IO packet is decoded into an object,
the Socket.IO packet is decoded again (stdlib JSON, then a recursive scan for binary
attachments), and the handler runs in a task of its own; its ack is encoded with the Packet
class, put on the client's Engine.IO queue and written by the client's writer task.

Here the frame's bytes are parsed once (``wire.parse_event``: ``42[/namespace,][ack id]
[json array]`` with orjson), the handler is the very one python-socketio would pick
(``sio._get_event_handler``, a private method in the engine's self-check list, so the
node's ``@sio.on`` registrations stay the one source of truth) and its ack is a pre-built
frame sent by ``FastDelivery.send_payload`` (straight to the socket when the client has
nothing else in flight).

What is left to python-socketio, by returning False from ``dispatch``: every packet that
is not plainly a text EVENT (CONNECT, DISCONNECT, ACK, binary events and their attachments),
JSON orjson would read differently from the stdlib (integers beyond 64 bits, NaN) or not at
all, an event without a coroutine handler, and anything odd in the header. python-socketio
then does exactly what it always did, so a malformed packet costs this path nothing.

A packet python-socketio cannot read either (JSON nested deeper than any parser goes:
orjson stops at 1024 levels, the stdlib at Python's recursion limit, which ``BoundedJson``
turns into the ValueError of any other bad JSON) is never an exception that leaves the
sender waiting: ``NodeSocketServer`` (``server.py``) catches the failure and, from the
header alone (``wire.packet_head``), acks an EVENT that asked for an ack with
``bad_request`` or refuses a CONNECT with ``bad_request``; anything else is dropped. The
connection stays up either way.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any

from socketio import packet as sio_packet

from shardchat.node.engine.delivery import FastDelivery
from shardchat.node.engine.refusals import UNAVAILABLE
from shardchat.node.engine.wire import parse_event, sio_payload

if TYPE_CHECKING:
    from shardchat.node.engine.server import NodeSocketServer

log = logging.getLogger("shardchat.inbound")

class Inbound:
    """Dispatches clients' text EVENT frames to the room service's handlers."""

    def __init__(self, sio: NodeSocketServer, fanout: FastDelivery) -> None:
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
        except Exception:  # the node's handlers answer their own errors: this is a last resort
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
