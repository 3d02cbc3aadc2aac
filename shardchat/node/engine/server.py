"""The fast engine's Socket.IO server: python-socketio's AsyncServer with five overrides.

python-socketio keeps what it does well (the Engine.IO handshake, long-polling, upgrades,
namespace CONNECT/DISCONNECT, binary packets); this subclass changes five of its private
methods, each listed in the engine's self-check (``engine/__init__.py``):

* ``_send_packet``: CONNECT, CONNECT_ERROR, DISCONNECT and ACK go through the delivery's
  direct-write rule (``FastDelivery.send_packet``), encoded with orjson like broadcasts;
* ``_handle_connect``: once CONNECT is out, the ``on_connected`` hook runs (the room's
  ``welcome`` must follow the CONNECT packet, and python-socketio sends it only after the
  connect handler returns);
* ``_handle_event``: the event names of ``refusals.REFUSED_EVENTS`` are refused with a
  ``bad_request`` ack instead of reaching a lifecycle handler;
* ``_handle_eio_message``: a packet python-socketio cannot decode is answered from its
  header (``_unreadable``) instead of raising out of the library;
* ``_handle_eio_disconnect``: a connection that ends disconnects the namespaces its session
  is in (``IndexedManager.namespaces_of``), each as the library does it
  (``_handle_disconnect``), instead of visiting every namespace of the node: every room
  with a member here is a namespace, so that visit cost O(rooms of the node) per lost
  connection, seconds when thousands are lost at once on a node of many rooms.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import socketio
from socketio import packet as sio_packet

from shardchat.config import NodeSettings
from shardchat.node.engine.delivery import FastDelivery
from shardchat.node.engine.manager import IndexedManager
from shardchat.node.engine.refusals import (
    JOIN_FAILED,
    REFUSED_EVENTS,
    UNREADABLE_CONNECT,
    UNREADABLE_EVENT,
    refused_event_ack,
)
from shardchat.node.engine.wire import BoundedJson, packet_head

log = logging.getLogger("shardchat.node")

# What runs once a member's CONNECT went out: (namespace, Socket.IO sid). The room service's
# ``connected`` (the welcome, then the join's presence).
ConnectedHook = Callable[[str, str], Awaitable[None]]


def server_options(settings: NodeSettings) -> dict[str, Any]:
    """python-socketio's options for a node, whichever engine: a catch-all namespace (every
    room is accepted at run time), the node's ping and packet-size settings, JSON whose
    nesting errors are plain ValueErrors, and no logging of every packet."""
    return {"async_mode": "aiohttp", "namespaces": "*",
            "ping_interval": settings.ping_interval, "ping_timeout": settings.ping_timeout,
            "max_http_buffer_size": settings.max_packet_bytes, "json": BoundedJson,
            "cors_allowed_origins": None, "logger": False, "engineio_logger": False}


def session_counts(sio: Any) -> dict[str, int]:
    """What the Socket.IO server holds now, whichever engine: Engine.IO sessions and
    namespaces with a member (each room with someone here is one). Through public
    attributes only; both fall back to what they were once everyone left, so the metrics
    show a leave that left something behind."""
    return {"engineio_sessions": len(sio.eio.sockets),
            "namespaces": len(sio.manager.get_namespaces())}


class NodeSocketServer(socketio.AsyncServer):
    """AsyncServer with the fast engine's delivery and a hook that runs once a namespace
    CONNECT has been sent.

    ``delivery`` is made here, with the server, since it writes through it;
    ``on_connected`` is set once by the node when its room service exists."""

    refused_events = REFUSED_EVENTS

    def __init__(self, settings: NodeSettings) -> None:
        # its own manager: a leave costs O(1), not O(members) (manager.py)
        super().__init__(client_manager=IndexedManager(), **server_options(settings))
        self.delivery = FastDelivery(self, settings)
        self.on_connected: ConnectedHook | None = None
        # event name -> a handler the websocket path runs in the frame's own callback,
        # with no task (``inbound.DirectHandler``); set by the node, read by ``Inbound``
        self.direct_handlers: dict[str, Any] = {}

    async def _send_packet(self, eio_sid, pkt):
        """CONNECT, CONNECT_ERROR, DISCONNECT, ACK: through the fan-out's direct path (it
        falls back to the Engine.IO queue itself; binary packets are left to us)."""
        if not await self.delivery.send_packet(eio_sid, pkt):
            await super()._send_packet(eio_sid, pkt)

    async def _handle_event(self, eio_sid, namespace, id, data):
        """Refuse the ``refused_events`` with a ``bad_request`` ack; hand the rest on."""
        if data and data[0] in self.refused_events:
            ns = namespace or "/"
            sid = self.manager.sid_from_eio_sid(eio_sid, ns)
            if id is not None and sid is not None and self.manager.is_connected(sid, ns):
                await self._send_packet(eio_sid, self.packet_class(
                    sio_packet.ACK, namespace=ns, id=id, data=[refused_event_ack(data[0])]))
            return
        await super()._handle_event(eio_sid, namespace, id, data)

    async def _handle_connect(self, eio_sid, namespace, data):
        await super()._handle_connect(eio_sid, namespace, data)
        ns = namespace or "/"
        sid = self.manager.sid_from_eio_sid(eio_sid, ns)
        if sid is not None and self.manager.is_connected(sid, ns) and self.on_connected:
            try:
                await self.on_connected(ns, sid)
            except Exception:
                log.exception("welcoming %s to %s failed", sid, ns)
                await self.delivery.disconnect(ns, sid, JOIN_FAILED)

    async def _handle_eio_disconnect(self, eio_sid, reason):
        """python-socketio's end of a connection, over the session's own namespaces."""
        for namespace in self.manager.namespaces_of(eio_sid):
            await self._handle_disconnect(eio_sid, namespace, reason)
        environ = getattr(self, "environ", None)  # optional in the self-check
        if environ is not None:
            environ.pop(eio_sid, None)

    async def _handle_eio_message(self, eio_sid, data):
        """python-socketio's packet dispatch, but a packet it cannot read is answered."""
        try:
            await super()._handle_eio_message(eio_sid, data)
        except Exception as exc:
            await self._unreadable(eio_sid, data, exc)

    async def _unreadable(self, eio_sid: str, data: Any, exc: Exception) -> None:
        """Answer what can be answered of a packet that failed to decode (see inbound.py):
        a CONNECT gets CONNECT_ERROR ``bad_request``, an EVENT with an ack id an ack
        ``bad_request``; anything else is dropped. The connection stays up."""
        head = packet_head(data) if isinstance(data, str | bytes) else None
        log.info("unreadable Socket.IO packet from %s (%s): %s", eio_sid,
                 exc.__class__.__name__, "answered bad_request" if head else "dropped")
        if head is None:
            return
        kind, namespace, ack_id = head
        if kind == sio_packet.CONNECT:
            await self._send_packet(eio_sid, self.packet_class(
                sio_packet.CONNECT_ERROR, namespace=namespace,
                data=UNREADABLE_CONNECT.connect_error()))
            return
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
        if ack_id is None or sid is None or not self.manager.is_connected(sid, namespace):
            return
        await self._send_packet(eio_sid, self.packet_class(
            sio_packet.ACK, namespace=namespace, id=ack_id, data=[UNREADABLE_EVENT.ack()]))
