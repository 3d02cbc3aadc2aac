"""Instance N's Socket.IO server: the AsyncServer with the node's hooks, and its events.

``NodeSocketServer`` adds what python-socketio lacks for a chat room: a hook right after the
namespace CONNECT went out (the ``welcome``), answers to packets it cannot read, and a
refusal of event names a client may not send. ``register_events`` wires the events of every
room namespace (``/i<N>/room/<id>``, one catch-all namespace) to the room service; every
handler answers, an unexpected failure included (``answers_errors``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import socketio
from socketio import packet as sio_packet
from socketio.exceptions import ConnectionRefusedError as SioRefused

from shardchat.node.clientaddr import ClientAddresses
from shardchat.node.inbound import UNAVAILABLE, packet_head
from shardchat.node.rooms import RoomService
from shardchat.refusal import Refusal

log = logging.getLogger("shardchat.node")


class NodeSocketServer(socketio.AsyncServer):
    """AsyncServer with a hook that runs once a namespace CONNECT has been sent.

    The ``welcome`` must follow the CONNECT packet, and python-socketio sends CONNECT only
    after the connect handler returns; this hook is the first moment the client is in.
    """

    on_connected: Any = None
    direct_send: Any = None  # Fanout.send_packet: one packet straight to an idle websocket

    async def _send_packet(self, eio_sid, pkt):
        """CONNECT, CONNECT_ERROR, DISCONNECT, ACK: through the fan-out's direct path (it
        falls back to the Engine.IO queue itself; binary packets are left to us)."""
        if self.direct_send is None or not await self.direct_send(eio_sid, pkt):
            await super()._send_packet(eio_sid, pkt)

    # Event names a client may not send. ``connect``/``disconnect``: python-socketio would
    # run the node's own lifecycle handler for them, so one client could make its room
    # announce a leave (and drop it from the member list) while it stays connected. ``*``:
    # it would match the catch-all handler by name, which then gets its arguments shifted.
    refused_events = frozenset({"connect", "disconnect", "*"})

    async def _handle_event(self, eio_sid, namespace, id, data):
        """Refuse the ``refused_events`` with a ``bad_request`` ack; hand the rest on."""
        if data and data[0] in self.refused_events:
            ns = namespace or "/"
            sid = self.manager.sid_from_eio_sid(eio_sid, ns)
            if id is not None and sid is not None and self.manager.is_connected(sid, ns):
                refusal = {"ok": False, "error": "bad_request",
                           "message": f"{data[0]!r} is not an event a client may send: "
                                      "use message, typing or history."}
                await self._send_packet(eio_sid, self.packet_class(
                    socketio.packet.ACK, namespace=ns, id=id, data=[refusal]))
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
                await self.refuse_connected(sid, ns, JOIN_FAILED)

    async def refuse_connected(self, sid: str, namespace: str, refusal: Refusal) -> None:
        """Refuse a join after its CONNECT went out (the welcome could not be built):
        CONNECT_ERROR with the refusal's code, then the namespace is closed. Both official
        clients treat a CONNECT_ERROR as the end of that namespace whenever it comes."""
        eio_sid = self.manager.eio_sid_from_sid(sid, namespace)
        if eio_sid is not None:
            with contextlib.suppress(Exception):
                await self._send_packet(eio_sid, self.packet_class(
                    sio_packet.CONNECT_ERROR, namespace=namespace,
                    data=refusal.connect_error()))
        with contextlib.suppress(Exception):
            await self.disconnect(sid, namespace=namespace)

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


UNREADABLE_EVENT = Refusal("bad_request", "The event could not be read: its JSON is malformed "
                           "or nested too deeply. Send a flat object such as {\"text\": \"hi\"}.")
UNREADABLE_CONNECT = Refusal("bad_request", "The connect request could not be read: its auth "
                             "JSON is malformed or nested too deeply. Send {\"name\": \"...\"}.")
JOIN_FAILED = Refusal("unavailable", "The server could not let you into this room right now; "
                      "try again in a moment.")


def answers_errors(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """An event handler that never raises: a bug or an unexpected failure is logged once,
    with its traceback, and the client gets an ``unavailable`` ack instead of silence."""

    @functools.wraps(handler)
    async def run(*args: Any) -> Any:
        try:
            return await handler(*args)
        except Exception:
            log.exception("the %s handler failed", handler.__name__)
            return dict(UNAVAILABLE)

    return run


def register_events(sio: NodeSocketServer, rooms: RoomService,
                    addresses: ClientAddresses) -> None:
    """The handlers of every room namespace: connect, disconnect, message, typing, history,
    and an answer to any other event name."""

    @sio.on("connect", namespace="*")
    async def connect(namespace, sid, environ, auth=None):
        try:
            rooms.admit(namespace, sid, auth, addresses.of_environ(environ))
        except SioRefused:
            raise
        except Exception:  # a bug must still answer the join, not leave it hanging
            log.exception("admitting %s to %s failed", sid, namespace)
            raise SioRefused(JOIN_FAILED.message, {"code": JOIN_FAILED.code}) from None

    @sio.on("disconnect", namespace="*")
    async def disconnect(namespace, sid, reason=None):
        try:
            await rooms.disconnected(namespace, sid)
        except Exception:
            log.exception("cleaning up after %s left %s failed", sid, namespace)

    @sio.on("message", namespace="*")
    @answers_errors
    async def message(namespace, sid, data=None, *_):
        return await rooms.message(namespace, sid, data)

    @sio.on("typing", namespace="*")
    @answers_errors
    async def typing(namespace, sid, data=None, *_):
        await rooms.typing(namespace, sid, data)

    @sio.on("history", namespace="*")
    @answers_errors
    async def history(namespace, sid, data=None, *_):
        return await rooms.history(namespace, sid, data)

    @sio.on("*", namespace="*")
    @answers_errors
    async def unknown(event, namespace, sid, *args):
        log.debug("ignored unknown event %r on %s", event, namespace)
        return {"ok": False, "error": "bad_request",
                "message": f"Unknown event {event!r}: use message, typing or history."}

    sio.on_connected = rooms.connected
