"""The fast engine's WebSocket transport under Engine.IO: the session owns its connection.

python-engineio's aiohttp driver hands each WebSocket to the Engine.IO socket's
``_websocket_handler``, which reads every frame through a fresh task wrapped in
``asyncio.wait_for``, decodes it into a Packet object and lets python-socketio decode it
again; its writer task polls the queue through another ``wait_for`` task; a third task per
connection sleeps until the next ping; and aiohttp keeps the upgrade request, its two tasks
and the whole await chain of middlewares and handlers suspended for the connection's life.
Here the driver answers the handshake itself and then takes the connection:

* the 101 is written by ``websocket.handshake``; then the transport is taken from aiohttp
  (``detach``: aiohttp forgets the connection and its request handler returns at once,
  which frees the request, its tasks and every frame of the chain) and given to an
  ``EngineSession``, an asyncio Protocol with slots: an idle connection is that object,
  the transport, the Engine.IO socket and python-socketio's maps, and nothing else;
* frames are parsed in ``data_received`` (``websocket.py``); a text EVENT goes to
  ``Inbound.dispatch`` there and then, a PONG re-arms the ping timer; everything else
  (CONNECT, DISCONNECT, ACK, binary, CLOSE ...) is awaited in order through the Engine.IO
  socket's own ``receive`` by a task that runs only while such packets wait (frames behind
  them wait too, so the order a client sent is the order they are handled in), so
  python-socketio keeps full ownership of connection state;
* the upgrade from long-polling is engineio's (probe PING -> PONG, NOOP to end the pending
  poll, then UPGRADE) and so is the close (the socket is closed with reason "transport
  close" once the connection is gone), so python-socketio sees the same connection states;
* liveness needs no read timeout: each socket's ping is a timer (``liveness.py``), and a
  PING that gets no PONG within ``ping_timeout`` aborts the connection;
* queued packets are written by a callback scheduled when something is queued, so an idle
  connection has neither a writer task nor a pending callback;
* compression is off unless ``node.websocket_compression`` asks for it (aiohttp's default
  of accepting permessage-deflate would compress every frame for every recipient);
* the WSGI-style environ engineio built from the headers is trimmed (``trim_environ``).

The driver replaces engineio's (``AsyncServer._async["websocket"]``), and it recognises
engineio's own handler (``AsyncSocket._websocket_handler``) to take over its session; both
names, and the request handler fields ``detach`` reads, are in the engine's self-check
list. How sessions end is ``closing.py``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.web import WebSocketResponse
from engineio import exceptions as eio_exceptions
from engineio import packet as eio_packet
from engineio.async_socket import AsyncSocket

from shardchat.node.engine import sessionqueue
from shardchat.node.engine.delivery import FastDelivery
from shardchat.node.engine.inbound import Inbound
from shardchat.node.engine.websocket import (
    CLOSE_GOING_AWAY,
    OP_TEXT,
    Deflate,
    HandshakeRefused,
    WebSocketConnection,
    handshake,
)

_TEXT, _BINARY = WSMsgType.TEXT, WSMsgType.BINARY
GOING_AWAY_REASON = b"server shutting down"
_PROBE, _UPGRADE, _OPEN, _ENDED = 0, 1, 2, 3  # an EngineSession's states
_PONG = b"3"
INBOX_PAUSE = 64  # packets waiting for the Engine.IO path before reading pauses
_ending: set[asyncio.Task] = set()  # sessions closing their Engine.IO socket


class EngineSession(WebSocketConnection):
    """One Engine.IO socket on the websocket transport, on a connection it owns.

    It lives as long as the connection, so it keeps few fields (``__slots__``) and
    allocates only while it has work: the inbox and its task while packets wait for the
    Engine.IO path, a scheduled write while packets are queued."""

    __slots__ = ("_inbox", "_paused", "_state", "_worker", "_writer", "eio_sid", "fanout",
                 "inbound", "sock")

    def __init__(self, sock: Any, fanout: FastDelivery, inbound: Inbound,
                 deflate: Deflate | None) -> None:
        super().__init__(sock.server.max_http_buffer_size, deflate)
        self.sock = sock
        self.eio_sid: str = sock.sid
        self.fanout = fanout
        self.inbound = inbound
        self._state = _PROBE if sock.connected else _OPEN
        self._inbox: deque | None = None  # (opcode, payload) for the Engine.IO path
        self._worker: asyncio.Task | None = None  # drains the inbox
        self._paused = False  # reading paused while the inbox is full
        self._writer: Any = None  # True: a write is scheduled; a Task: the fallback writer

    def start(self, transport: asyncio.Transport, tail: bytes) -> None:
        """The 101 is out and the transport is this session's: open (or await the upgrade
        probe of a long-polling session), then read what arrived behind the handshake."""
        self.transport = transport
        sock = self.sock
        if self._state == _OPEN:
            sock.connected = True
            sock.upgraded = True
            self._open()
        else:
            sock.upgrading = True  # holds polling sends during the upgrade
        if not transport.is_reading():
            transport.resume_reading()  # aiohttp may have paused it for its own buffer
        if tail:
            self.data_received(tail)

    def _open(self) -> None:
        self._state = _OPEN
        self.fanout.register(self.eio_sid, self)
        queue = self.sock.queue
        if isinstance(queue, sessionqueue.SessionQueue):
            queue.consumer = self  # a write only while there is something to write
            self.wake()
        else:
            self._writer = asyncio.get_running_loop().create_task(self._write_forever())

    # -- reading -------------------------------------------------------------------------

    def on_message(self, opcode: int, payload: bytes) -> None:
        if self._inbox is None:
            if self._state != _OPEN:
                self._upgrade_step(opcode, payload)
                return
            if opcode == OP_TEXT:
                if self.inbound.dispatch(self.eio_sid, payload):
                    return
                if payload == _PONG:  # what engineio's receive does with a PONG
                    self.sock.schedule_ping()
                    return
        if self._state == _ENDED:
            return
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = deque()
        inbox.append((opcode, payload))
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._drain())
        if len(inbox) >= INBOX_PAUSE and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    async def _drain(self) -> None:
        """Hand the inbox's packets, in order, to the Engine.IO socket's ``receive``."""
        inbox = self._inbox
        try:
            while inbox and self._state == _OPEN:
                opcode, payload = inbox.popleft()
                if self._paused and len(inbox) < INBOX_PAUSE // 2:
                    self._resume()
                if not await self._receive(opcode, payload):
                    self.close()  # a packet Engine.IO cannot decode: this connection ends
                    break
        finally:
            self._inbox = self._worker = None
            self._resume()
            if self._state == _ENDED:
                await self._end_socket()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

    async def _receive(self, opcode: int, payload: bytes) -> bool:
        """One packet on the Engine.IO path; False when the connection must end."""
        if opcode == OP_TEXT:
            if self.inbound.dispatch(self.eio_sid, payload):
                return True
            if payload == _PONG:
                self.sock.schedule_ping()
                return True
        try:
            pkt = eio_packet.Packet(
                encoded_packet=payload.decode() if opcode == OP_TEXT else payload)
        except (ValueError, UnicodeDecodeError):
            return False
        sock = self.sock
        try:
            await sock.receive(pkt)
        except eio_exceptions.UnknownPacketError:
            pass
        except eio_exceptions.SocketIsClosedError:
            return False
        except Exception:  # python-socketio refused the packet: it logged why
            sock.server.logger.exception("Unknown receive error")
        return True

    def _upgrade_step(self, opcode: int, payload: bytes) -> None:
        """engineio's upgrade from long-polling: "2probe" -> "3probe" and a NOOP that ends
        the pending poll, then "5" (UPGRADE) switches the session to this connection."""
        sock = self.sock
        if self._state == _PROBE:
            if opcode != OP_TEXT or payload != b"2probe":
                sock.upgrading = False
                self.close()
                return
            self.send(b"3probe")
            self._state = _UPGRADE
            sock.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))
            return
        if opcode != OP_TEXT or payload[:1] != b"5":
            sock.upgraded = False
            sock.upgrading = False
            self.close()
            return
        sock.upgraded = True
        sock.upgrading = False
        if sock.closed:  # the session was ended (shutdown) while it upgraded
            self.close(CLOSE_GOING_AWAY, GOING_AWAY_REASON)
            return
        self._open()

    # -- the end -------------------------------------------------------------------------

    def on_end(self) -> None:
        state, self._state = self._state, _ENDED
        sock = self.sock
        if state != _OPEN:  # a failed upgrade: the long-polling session goes on
            sock.upgrading = False
            return
        self.fanout.unregister(self.eio_sid)
        queue = sock.queue
        if isinstance(queue, sessionqueue.SessionQueue):
            queue.consumer = None  # nothing will write any more
            queue.discard()
        elif isinstance(self._writer, asyncio.Task):
            queue.put_nowait(None)  # lets the fallback writer finish
        if self._worker is None:  # else the worker ends the socket once it is done
            task = asyncio.get_running_loop().create_task(self._end_socket())
            _ending.add(task)
            task.add_done_callback(_ending.discard)

    async def _end_socket(self) -> None:
        """What engineio does when its websocket handler returns: close the socket
        ("transport close") and forget it."""
        sock = self.sock
        await sock.close(wait=False, abort=True, reason=sock.server.reason.TRANSPORT_CLOSE)
        sockets = sock.server.sockets
        if sockets.get(self.eio_sid) is sock:
            del sockets[self.eio_sid]

    # -- writing -------------------------------------------------------------------------

    def idle(self) -> bool:
        return self._writer is None

    def direct(self) -> Any:
        """The transport, when a frame written to it now overtakes nothing: no write of
        queued packets is scheduled or running (a fallback writer task counts as running),
        nothing is queued, the socket is upgraded and not closing, our CLOSE is not out.
        The broadcast loop's direct-write test, in one call per recipient; it implies
        ``FastDelivery._direct_transport``'s rule (None: take the queue)."""
        if self._writer is not None or self.close_sent:
            return None
        sock = self.sock
        if sock.closing or not sock.upgraded or not sock.queue.empty():
            return None
        transport = self.transport
        if transport is None or transport.is_closing():
            return None
        return transport

    def wake(self) -> None:
        """Something was queued: write it in a callback of its own, after this tick's
        direct writes (``FastDelivery._flush`` was scheduled first), so order is kept."""
        if self._writer is None and not self.sock.queue.empty():
            self._writer = True
            asyncio.get_running_loop().call_soon(self._write_queued)

    def _write_queued(self) -> None:
        """engineio's writer, as one callback: everything queued goes out now. Stops the
        connection after a CLOSE packet."""
        self._writer = None
        queue = self.sock.queue
        while not queue.empty():
            pkt = queue.get_nowait()
            queue.task_done()
            if not self._send_packet(pkt):
                self.close()
                return

    async def _write_forever(self) -> None:
        """engineio's writer for a queue that is not a SessionQueue (a waiting ``get``)."""
        queue = self.sock.queue
        while True:
            pkt = await queue.get()
            queue.task_done()
            if not self._send_packet(pkt):
                break
        self.close()

    def _send_packet(self, pkt: Any) -> bool:
        """Write one packet; False when the connection is done (CLOSE, or closing)."""
        if pkt is None:
            return False
        encoded = pkt.encode()
        if isinstance(encoded, str):
            sent = self.send(encoded.encode())
        else:
            sent = self.send(encoded, binary=True)
        return sent and pkt.packet_type != eio_packet.CLOSE


class HandedOver(web.StreamResponse):
    """What aiohttp's request handler gets back once the connection is the session's:
    nothing to send, and no keep-alive (its request loop ends)."""

    async def prepare(self, request: Any) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def detach(protocol: Any) -> bytes:
    """Make aiohttp's request handler let go of its connection without closing it, and
    return the bytes it read behind the upgrade request (usually none).

    The handler forgets its transport (so nothing of aiohttp closes or writes to it any
    more), stops its request loop after this request, and leaves its server's list of
    connections (the session's ``close_sessions`` ends it on shutdown); its keep-alive
    timer is cancelled, and its HTTP parser dropped, which also keeps aiohttp from
    reading the tail as a next request as it does for a declined upgrade."""
    tail = bytes(protocol._message_tail)
    protocol._message_tail = b""
    protocol._parser = None
    protocol.transport = None
    protocol.force_close()
    manager = protocol._manager
    if manager is not None:
        manager.connection_lost(protocol, None)
    handle = protocol._keepalive_handle
    if handle is not None:
        handle.cancel()
        protocol._keepalive_handle = None
    return tail


async def take_over(request: Any, sock: Any, compress: bool, fanout: FastDelivery,
                    inbound: Inbound) -> web.StreamResponse:
    """Answer the opening handshake, take the connection from aiohttp and start the
    session on it; aiohttp gets ``HandedOver``. A request that is no valid handshake
    gets 400, as aiohttp's own WebSocketResponse answers it."""
    try:
        response, deflate = handshake(request.headers, compress)
    except HandshakeRefused as exc:
        if not sock.connected:  # a session made for this request alone
            await sock.close(wait=False, abort=True)
        raise web.HTTPBadRequest(text=str(exc)) from None
    protocol, transport = request.protocol, request.transport
    if transport is None or transport.is_closing():  # the client left meanwhile
        if not sock.connected:
            await sock.close(wait=False, abort=True,
                             reason=sock.server.reason.TRANSPORT_CLOSE)
        return HandedOver()
    session = EngineSession(sock, fanout, inbound, deflate)
    transport.write(response)
    tail = detach(protocol)
    transport.set_protocol(session)
    session.start(transport, tail)
    return HandedOver()


def websocket_class(compress: bool, fanout: FastDelivery, inbound: Inbound,
                    sio_environ: dict | None = None) -> type:
    """An engineio-compatible aiohttp WebSocket driver class that runs ``take_over``.

    ``sio_environ`` is python-socketio's ``environ`` map (Engine.IO sid -> environ): the
    environ of a websocket session is trimmed to ``ENVIRON_KEEP`` once the socket is open."""

    class NodeWebSocket:
        __slots__ = ("_sock", "environ", "handler", "server")

        def __init__(self, handler: Any, server: Any):
            self.handler = handler
            self.server = server
            self._sock: WebSocketResponse | None = None

        def __call__(self, environ: dict) -> Any:
            """The coroutine engineio awaits: ``take_over`` for engineio's own handler."""
            request = environ["aiohttp.request"]
            sock = getattr(self.handler, "__self__", None)
            if getattr(self.handler, "__func__", None) is AsyncSocket._websocket_handler:
                trim_environ(environ)
                if sio_environ is not None:
                    kept = sio_environ.get(sock.sid)
                    if kept is not None and kept is not environ:
                        trim_environ(kept)  # upgraded from long-polling
                return take_over(request, sock, compress, fanout, inbound)
            return self._serve_wrapped(environ, request)

        async def _serve_wrapped(self, environ: dict, request: Any) -> WebSocketResponse:
            """Someone wrapped engineio's handler: serve it the driver interface over
            aiohttp's own WebSocket (no direct writes: the fan-out does not know it)."""
            self._sock = WebSocketResponse(max_msg_size=self.server.max_http_buffer_size,
                                           compress=compress, decode_text=False)
            await self._sock.prepare(request)
            self.environ = environ
            await self.handler(self)
            return self._sock

        async def close(self) -> None:
            await self._sock.close()

        async def send(self, message: str | bytes) -> None:
            f = self._sock.send_bytes if isinstance(message, bytes) else self._sock.send_str
            r = f(message)
            if inspect.isawaitable(r):
                await r

        async def wait(self) -> str | bytes:
            msg = await self._sock.receive()
            if msg.type is _TEXT:
                return msg.data.decode()
            if msg.type is _BINARY:
                return msg.data
            raise OSError()

    return NodeWebSocket


# What stays of a websocket session's WSGI-style environ once the socket is open. The
# connect handler reads the client's address from it (REMOTE_ADDR, HTTP_X_FORWARDED_FOR);
# the other keys are those an operator's hook could reasonably want. The rest (every
# request header under an HTTP_ name, ~1 KB) would otherwise live as long as the connection.
ENVIRON_KEEP = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "RAW_URI", "SERVER_PROTOCOL",
                "REMOTE_ADDR", "wsgi.url_scheme", "HTTP_ORIGIN", "HTTP_USER_AGENT",
                "HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO")


def trim_environ(environ: dict) -> None:
    """Keep only ``ENVIRON_KEEP`` (in place: python-socketio and engineio hold this dict).
    The keys become this module's constants, so the trimmed dict owns no key strings.
    engineio's ``REMOTE_ADDR`` is a placeholder; it becomes the real peer first, since the
    request that knew it is dropped (the per-address rate limits read it at connect)."""
    request = environ.get("aiohttp.request")
    if request is not None and request.remote:
        environ["REMOTE_ADDR"] = request.remote
    kept = {key: environ[key] for key in ENVIRON_KEEP if key in environ}
    environ.clear()
    environ.update(kept)
