"""``[node] engine = "stock"``: plain python-socketio behind the same delivery interface.

No bypass: python-engineio's own websocket driver, queue, writer task and ping task,
python-socketio's own dispatch, and every delivery through ``sio.emit``. Nothing here reads
or overrides a private attribute or method, so the libraries can be upgraded under it; it
is the fallback when an upgrade fails the fast engine's self-check (``engine/__init__.py``),
and the reference the fast engine's behaviour is tested against.

What the node's rules need from Socket.IO is still here, through documented extension
points only:

* handlers registered with ``sio.on(..., namespace="*")`` are routed through one
  class-based ``AsyncNamespace("*")`` (``StockRoutes``), whose ``trigger_event`` python-
  socketio documents for custom dispatch. It refuses the event names of
  ``refusals.REFUSED_EVENTS`` (a ``connect`` or ``disconnect`` a member sends is told apart from
  the real one by the manager's public ``is_connected``: a joining or leaving member is not
  connected yet / any more), and runs the ``on_connected`` hook once the CONNECT is out;
* packets are encoded and decoded by ``StockPacket``, the Packet subclass python-socketio
  takes as its ``serializer``: orjson for events and acks (so pages have the size they were
  measured at, as on the fast engine), and a packet whose JSON cannot be read becomes an
  ``unreadable`` event or connect that is answered ``bad_request``, as the fast engine does;
* shutdown closes each session the way a lost connection ends (``close_sessions``).

What it gives up, besides speed: there is no slow-reader cut-off by backlog (python-
engineio's queue is unbounded and its size is not public; a reader that stops answering is
closed by the ping timeout instead, and ``backlogged`` is always False), aiohttp
negotiates permessage-deflate whenever a client offers it (``node.websocket_compression``
is the fast engine's switch), and a long-polling client that leaves keeps its last GET
waiting until engineio's poll timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import socketio
from engineio import packet as eio_packet
from socketio import packet as sio_packet
from socketio.exceptions import ConnectionRefusedError as SioRefused

from shardchat.config import NodeSettings
from shardchat.node.engine.refusals import (
    JOIN_FAILED,
    REFUSED_EVENTS,
    UNREADABLE_CONNECT,
    UNREADABLE_EVENT,
    refused_event_ack,
)
from shardchat.node.engine.server import ConnectedHook, server_options, session_counts
from shardchat.node.engine.wire import packet_head, sio_payload
from shardchat.refusal import Refusal

log = logging.getLogger("shardchat.node")

_KNOWN_TYPES = frozenset({sio_packet.CONNECT, sio_packet.DISCONNECT, sio_packet.EVENT,
                          sio_packet.ACK, sio_packet.BINARY_EVENT, sio_packet.BINARY_ACK})
UNREADABLE = "\x00unreadable"  # the event name a packet that could not be read becomes
CONNECT_TURNS = 100  # loop turns the welcome waits for python-socketio to finish a CONNECT


class _UnreadableAuth:
    """The auth of a CONNECT whose JSON could not be read (truthy, so python-socketio
    passes it to the connect handler, which refuses it)."""

    def __repr__(self) -> str:
        return "<unreadable auth>"


UNREADABLE_AUTH = _UnreadableAuth()


class StockPacket(socketio.packet.Packet):
    """python-socketio's Packet with orjson for events and acks, and no exception for a
    packet it cannot read (``serializer=`` takes a Packet subclass for exactly this)."""

    def encode(self) -> Any:
        if self.packet_type in (sio_packet.EVENT, sio_packet.ACK) and self.data is not None:
            payload = sio_payload(self.packet_type, self.namespace or "/", self.data, self.id)
            if payload is not None:
                return payload[1:].decode()
        return super().encode()

    def decode(self, encoded_packet: Any) -> int:
        """A packet that cannot be read (bad JSON, JSON nested too deeply, an unknown type)
        becomes a CONNECT with ``UNREADABLE_AUTH`` or an ``UNREADABLE`` event with the ack
        id its header had, both answered ``bad_request``; anything without a readable
        header becomes an ``UNREADABLE`` event to "/", which python-socketio drops."""
        try:
            count = super().decode(encoded_packet)
        except Exception as exc:
            why = exc.__class__.__name__
        else:
            if self.packet_type in _KNOWN_TYPES:
                return count
            why = f"packet type {self.packet_type!r}"
        head = packet_head(encoded_packet) if isinstance(encoded_packet, str | bytes) else None
        log.info("unreadable Socket.IO packet (%s): %s", why,
                 "answered bad_request" if head else "dropped")
        self.attachment_count, self.attachments = 0, []
        if head is not None and head[0] == sio_packet.CONNECT:
            self.packet_type, self.namespace, self.id = sio_packet.CONNECT, head[1], None
            self.data = UNREADABLE_AUTH
        else:
            self.packet_type = sio_packet.EVENT
            self.namespace, self.id = (head[1], head[2]) if head else ("/", None)
            self.data = [UNREADABLE]
        return 0


Handler = Callable[..., Awaitable[Any]]


class StockRoutes(socketio.AsyncNamespace):
    """The catch-all namespace's handlers, dispatched by ``trigger_event``."""

    def __init__(self) -> None:
        super().__init__("*")
        self.handlers: dict[str, Handler] = {}
        self._welcomes: set[asyncio.Task] = set()

    async def trigger_event(self, event: str, *args: Any) -> Any:
        """``args`` is (namespace, sid, *the event's arguments), as python-socketio passes
        them to a catch-all namespace."""
        namespace, sid = args[0], args[1]
        server: StockServer = self.server
        if event in REFUSED_EVENTS:
            if event == "connect" and not server.manager.is_connected(sid, namespace):
                return await self._admit(*args)
            if event == "disconnect" and not server.manager.is_connected(sid, namespace):
                handler = self.handlers.get("disconnect")
                return await handler(*args) if handler else None
            return refused_event_ack(event)  # a member sent it
        if event == UNREADABLE:
            return UNREADABLE_EVENT.ack()
        handler = self.handlers.get(event)
        if handler is not None:
            return await handler(*args)
        catch_all = self.handlers.get("*")
        if catch_all is not None:
            return await catch_all(event, *args)
        return server.not_handled

    async def _admit(self, namespace: str, sid: str, environ: Any, auth: Any = None,
                       *rest: Any) -> Any:
        if auth is UNREADABLE_AUTH:
            raise SioRefused(UNREADABLE_CONNECT.message,
                             UNREADABLE_CONNECT.connect_error()["data"])
        handler = self.handlers.get("connect")
        result = await handler(namespace, sid, environ, auth, *rest) if handler else None
        if result is not False:
            task = self.server.start_background_task(self._welcome, namespace, sid)
            self._welcomes.add(task)
            task.add_done_callback(self._welcomes.discard)
        return result

    async def _welcome(self, namespace: str, sid: str) -> None:
        """Once python-socketio has sent the CONNECT (it does so right after the connect
        handler returns, then marks the member connected): the ``on_connected`` hook."""
        server: StockServer = self.server
        manager = server.manager
        for _ in range(CONNECT_TURNS):
            if manager.is_connected(sid, namespace):
                break
            if not manager.is_pre_connected(sid, namespace):
                return  # refused or gone meanwhile
            await asyncio.sleep(0)
        else:
            log.warning("%s on %s was not connected after %d loop turns: no welcome", sid,
                        namespace, CONNECT_TURNS)
            return
        if server.on_connected is None:
            return
        try:
            await server.on_connected(namespace, sid)
        except Exception:
            log.exception("welcoming %s to %s failed", sid, namespace)
            await server.refuse_connected(sid, namespace, JOIN_FAILED)


class StockServer(socketio.AsyncServer):
    """python-socketio's AsyncServer, catch-all handlers routed through ``StockRoutes``."""

    def __init__(self, settings: NodeSettings) -> None:
        super().__init__(**server_options(settings), serializer=StockPacket)
        self.on_connected: ConnectedHook | None = None
        self.routes = StockRoutes()
        self.register_namespace(self.routes)

    def on(self, event: str, handler: Handler | None = None, namespace: str | None = None
           ) -> Any:
        """``sio.on``, except that handlers of the catch-all namespace go to ``routes``."""
        if namespace != "*":
            return super().on(event, handler, namespace)

        def register(fn: Handler) -> Handler:
            self.routes.handlers[event] = fn
            return fn

        return register if handler is None else register(handler)

    async def refuse_connected(self, sid: str, namespace: str, refusal: Refusal) -> None:
        """Refuse a join after its CONNECT went out: CONNECT_ERROR with the refusal's code
        (an Engine.IO message, ``eio.send``), then the namespace is closed."""
        eio_sid = self.manager.eio_sid_from_sid(sid, namespace)
        if eio_sid is not None:
            with contextlib.suppress(Exception):
                await self.eio.send(eio_sid, self.packet_class(
                    sio_packet.CONNECT_ERROR, namespace=namespace,
                    data=refusal.connect_error()).encode())
        with contextlib.suppress(Exception):
            await self.disconnect(sid, namespace=namespace)


class StockDelivery:
    """The ``Delivery`` of the stock engine: every event through ``sio.emit``."""

    def __init__(self, sio: StockServer) -> None:
        self.sio = sio
        self.sent = 0

    async def emit(self, namespace: str, event: str, data: Any,
                   recipients: list[tuple[str, str | None]]) -> None:
        """One ``sio.emit`` to the members' sids (each member is a room of its own in
        python-socketio): one encode, then python-socketio's task per recipient."""
        if not recipients:
            return  # to=[] would be the whole namespace
        self.sent += len(recipients)
        await self.sio.emit(event, data, to=[sid for sid, _ in recipients],
                            namespace=namespace)

    def emit_now(self, namespace: str, event: str, data: Any,
                 recipients: list[tuple[str, str | None]]) -> bool:
        """Never: python-socketio's emit must be awaited (callers then ``emit``)."""
        return False

    def transport_id(self, namespace: str, sid: str) -> str | None:
        return self.sio.manager.eio_sid_from_sid(sid, namespace)

    def backlogged(self, eio_sid: str | None) -> bool:
        return False  # python-engineio's queue does not say how much it holds

    async def disconnect(self, namespace: str, sid: str, refusal: Refusal) -> None:
        await self.sio.refuse_connected(sid, namespace, refusal)

    async def leave(self, namespace: str, sid: str) -> None:
        with contextlib.suppress(Exception):
            await self.sio.disconnect(sid, namespace=namespace)

    def stats(self) -> dict[str, int]:
        """The fast engine's counters, with every delivery on the normal path."""
        return {"fast": 0, "slow": self.sent, "direct": 0, "queued": 0,
                "dropped_slow_readers": 0, "backlogged": 0, "caught_up": 0,
                "backlog_refusals": 0}


class StockEngine:
    """The stock engine: ``StockServer`` and ``StockDelivery``."""

    kind = "stock"

    def __init__(self, settings: NodeSettings) -> None:
        self.sio = StockServer(settings)
        self.delivery = StockDelivery(self.sio)

    def stats(self) -> dict[str, Any]:
        return {"engine": self.kind, "fanout": self.delivery.stats(),
                "inbound": {"fast_events": 0}, "sessions": session_counts(self.sio)}

    def websocket_count(self) -> int:
        return sum(1 for sock in list(self.sio.eio.sockets.values())
                   if sock.upgraded and not sock.closed)

    async def close_sessions(self, timeout: float) -> dict[str, int]:
        """End every Engine.IO session so that its client reconnects (shutdown).

        Not with ``eio.disconnect``: its CLOSE packet tells both official clients not to
        reconnect. Each socket is closed as a lost connection is (``close(abort=True)``,
        which runs the disconnect handlers), then its queue gets what ends its transport
        at once: None stops a websocket's writer, which closes the WebSocket; a NOOP
        answers a long-poll's waiting GET, and its next request fails. ``timeout`` is the
        fast engine's bound for close handshakes; here aiohttp's shutdown bounds them."""
        counts = {"websocket": 0, "polling": 0, "aborted": 0}
        eio = self.sio.eio
        for sock in list(eio.sockets.values()):
            if sock.closed or sock.closing:
                continue
            on_websocket = bool(sock.upgraded)
            with contextlib.suppress(Exception):
                await sock.close(wait=False, abort=True, reason=eio.reason.SERVER_DISCONNECT)
            sock.queue.put_nowait(None if on_websocket else eio_packet.Packet(eio_packet.NOOP))
            counts["websocket" if on_websocket else "polling"] += 1
        return counts
