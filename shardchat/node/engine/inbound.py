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

The message hot path goes one step further: an event with a *direct handler*
(``NodeSocketServer.direct_handlers``; the node gives one for ``message``) runs in the
frame's own callback, with no task and no future, and gets a ``reply`` callable for its ack
(``_answer``, the same frame ``_run`` would send). What it bypasses, deliberately: asyncio's
task per event (a task, its coroutine frames, the store's future and a wake-up per
message, the same work for each of a small room's messages as its whole fan-out), python-socketio's
handler lookup (the direct handler is the node's own, set next to its ``@sio.on``
registration), and ``answers_errors`` (``_direct`` answers a raising handler
``unavailable`` the same way). The handler may decline (False: a frozen room must await its
gate), and then the event takes the task path; while a client has such an event on the
task path, its next ones take it too (``_behind``), so its messages start, and get their
seqs, in frame order. Long-polling and the stock engine never take the direct path; their
messages share the store's order with it, since both hand out seqs in the loop at start.

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
import functools
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from socketio import packet as sio_packet

from shardchat.node.engine.delivery import FastDelivery
from shardchat.node.engine.refusals import UNAVAILABLE
from shardchat.node.engine.wire import parse_event, sio_payload

if TYPE_CHECKING:
    from shardchat.node.engine.server import NodeSocketServer

log = logging.getLogger("shardchat.inbound")

# A direct handler: (namespace, sid, data, reply) -> whether it took the event. It runs in
# the frame's own callback and must not await: ``reply(result)`` sends the ack (at once or
# later, e.g. after a commit; a no-op when the client asked for none). False means "not
# now": nothing was done, and the event takes the task path and the node's ``@sio.on``
# handler instead.
DirectHandler = Callable[[str, str, Any, Callable[[Any], None]], bool]


def _no_reply(result: Any) -> None:
    """The reply of an event sent without an ack id."""


class Inbound:
    """Dispatches clients' text EVENT frames to the room service's handlers."""

    def __init__(self, sio: NodeSocketServer, fanout: FastDelivery) -> None:
        self.sio = sio
        self.fanout = fanout
        self.manager = sio.manager
        self.fast = 0
        self.direct_events = 0
        # event name -> its direct handler (``NodeSocketServer.direct_handlers``)
        self.direct: dict[str, DirectHandler] = sio.direct_handlers
        self._running: set[asyncio.Task] = set()
        # Engine.IO sid -> events with a direct handler now on the task path: while a
        # client has any, its next ones take that path too, so they start in frame order
        self._behind: dict[str, int] = {}

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
        direct = self.direct.get(event)
        if direct is not None and eio_sid not in self._behind and self._direct(
                direct, namespace, sid, args, eio_sid, ack_id):
            return True
        handler, hargs = self.sio._get_event_handler(event, namespace, (sid, *args[1:]))
        if handler is None or not inspect.iscoroutinefunction(handler):
            return False
        self.fast += 1
        task = asyncio.get_running_loop().create_task(
            self._run(handler, hargs, eio_sid, namespace, ack_id))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        if direct is not None:  # its followers wait for it (``_behind``)
            self._behind[eio_sid] = self._behind.get(eio_sid, 0) + 1
            task.add_done_callback(lambda _t: self._caught_up(eio_sid))
        return True

    def _direct(self, direct: DirectHandler, namespace: str, sid: str, args: list,
                eio_sid: str, ack_id: int | None) -> bool:
        """Run a direct handler in this callback: no task, no future. A handler that raises
        is answered ``unavailable`` (as ``answers_errors`` does on the task path)."""
        reply = (_no_reply if ack_id is None
                 else functools.partial(self._answer, eio_sid, namespace, ack_id))
        try:
            taken = direct(namespace, sid, args[1] if len(args) > 1 else None, reply)
        except Exception:
            log.exception("direct handler for %r on %s failed", args[0], namespace)
            reply(dict(UNAVAILABLE))
            return True
        if taken:
            self.direct_events += 1
        return taken

    def _caught_up(self, eio_sid: str) -> None:
        left = self._behind.get(eio_sid, 0) - 1
        if left > 0:
            self._behind[eio_sid] = left
        else:
            self._behind.pop(eio_sid, None)

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
        self._answer(eio_sid, namespace, ack_id, result)

    def _answer(self, eio_sid: str, namespace: str, ack_id: int, result: Any) -> None:
        """Send a handler's result as the ack ``ack_id``: one pre-built frame, direct or
        queued by the delivery's rule; data orjson cannot encode takes python-socketio's
        Packet class in a task (never a result of this node's handlers)."""
        if result is None:
            data: list = []
        elif isinstance(result, tuple):
            data = list(result)
        else:
            data = [result]
        payload = sio_payload(sio_packet.ACK, namespace, data, ack_id)
        if payload is not None:
            self.fanout.send_payload_now(eio_sid, payload)
            return
        task = asyncio.get_running_loop().create_task(self.sio._send_packet(
            eio_sid, self.sio.packet_class(sio_packet.ACK, namespace=namespace, id=ack_id,
                                           data=data)))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def stats(self) -> dict[str, int]:
        return {"fast_events": self.fast, "direct_events": self.direct_events}
