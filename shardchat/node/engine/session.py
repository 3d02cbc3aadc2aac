"""The fast engine's WebSocket transport under Engine.IO: our own session loop.

python-engineio's aiohttp driver hands each WebSocket to the Engine.IO socket's
``_websocket_handler``, which reads every frame through a fresh task wrapped in
``asyncio.wait_for``, decodes it into a Packet object and lets python-socketio decode it
again; its writer task polls the queue through another ``wait_for`` task; and a third task
per connection sleeps until the next ping. Here the driver runs the same session itself:

* the upgrade handshake is engineio's (probe PING -> PONG, NOOP to end the pending poll,
  then UPGRADE) and so is the close (the writer is stopped, then the socket is closed with
  reason "transport close"), so python-socketio sees the same connection states;
* frames are read with ``ws.receive()`` directly, as bytes (no task, no timer per frame);
  a text EVENT goes to ``Inbound.dispatch``, everything else to the Engine.IO socket's own
  ``receive`` (CONNECT, DISCONNECT, ACK, binary, PONG, CLOSE ...), so python-socketio keeps
  full ownership of connection state;
* liveness needs no read timeout: each socket's ping is a timer (``liveness.py``), and a
  PING that gets no PONG within ``ping_timeout`` aborts the connection;
* the writer runs only while the socket's ``SessionQueue`` (``sessionqueue.py``) holds
  something, so an idle connection keeps no task;
* compression is off unless ``node.websocket_compression`` asks for it (aiohttp's default
  of accepting permessage-deflate would compress every frame for every recipient);
* once the handshake is done, the HTTP state aiohttp keeps for the request is shed and the
  WSGI-style environ trimmed (``shed_http_state``, ``trim_environ``).

The driver replaces engineio's (``AsyncServer._async["websocket"]``), and it recognises
engineio's own handler (``AsyncSocket._websocket_handler``) to take over its session; both
names are in the engine's self-check list. How sessions end is ``closing.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import deque
from typing import Any

from aiohttp import WSCloseCode, WSMsgType
from aiohttp.web import WebSocketResponse
from engineio import exceptions as eio_exceptions
from engineio import packet as eio_packet
from engineio.async_socket import AsyncSocket

from shardchat.node.engine import sessionqueue
from shardchat.node.engine.delivery import FastDelivery
from shardchat.node.engine.inbound import Inbound

_TEXT, _BINARY = WSMsgType.TEXT, WSMsgType.BINARY
GOING_AWAY_REASON = b"server shutting down"


class SessionLoop:
    """Reads, dispatches and writes for one Engine.IO socket on the websocket transport.

    It lives as long as the connection, so it keeps few fields (``__slots__``), and the
    read loop is inline in ``run``: every coroutine frame of the await chain stays
    allocated for the connection's life."""

    __slots__ = ("fanout", "inbound", "sock", "writer", "ws")

    def __init__(self, sock: Any, ws: WebSocketResponse, fanout: FastDelivery,
                 inbound: Inbound) -> None:
        self.sock = sock
        self.ws = ws
        self.fanout = fanout
        self.inbound = inbound
        self.writer: asyncio.Task | None = None

    async def serve(self, request: Any) -> WebSocketResponse:
        """Accept the WebSocket, shed the HTTP state it no longer needs, run the session.

        One coroutine from handshake to close: the upgrade and the writer are awaited only
        briefly, the read loop is right here."""
        ws, sock = self.ws, self.sock
        await ws.prepare(request)
        shed_http_state(request)
        if sock.connected:
            if not await self._upgrade():
                return ws
            if sock.closed:  # the session was ended (shutdown) while it upgraded
                with contextlib.suppress(Exception):
                    await ws.close(code=WSCloseCode.GOING_AWAY, message=GOING_AWAY_REASON)
                return ws
        else:
            sock.connected = True
            sock.upgraded = True
        eio_sid = sock.sid
        self.fanout.register(eio_sid, ws)
        queue = sock.queue
        if isinstance(queue, sessionqueue.SessionQueue):
            queue.consumer = self  # a writer task only while there is something to write
            self.wake()
        else:
            self.writer = asyncio.get_running_loop().create_task(self._write_forever())
        # The read loop: frames until the client goes away. A frame Engine.IO cannot decode
        # closes this connection only (engineio would fail the request handler the same way).
        receive, dispatch = ws.receive, self.inbound.dispatch
        limit, for_engineio = sock.server.max_http_buffer_size, sock.receive
        try:
            while True:
                msg = await receive()
                kind = msg.type
                if kind is not _TEXT and kind is not _BINARY:
                    break  # CLOSE, CLOSING, CLOSED, ERROR (aiohttp answers control frames)
                data = msg.data
                if len(data) > limit:
                    break
                if kind is _TEXT and dispatch(eio_sid, data):
                    continue
                try:
                    pkt = eio_packet.Packet(
                        encoded_packet=data.decode() if kind is _TEXT else data)
                except (ValueError, UnicodeDecodeError):
                    break
                try:
                    await for_engineio(pkt)
                except eio_exceptions.UnknownPacketError:
                    pass
                except eio_exceptions.SocketIsClosedError:
                    break
                except Exception:  # python-socketio refused the packet: it logged why
                    sock.server.logger.exception("Unknown receive error")
                msg = data = pkt = None  # not kept alive while the connection idles
        finally:
            self.fanout.unregister(eio_sid)
            if self.writer is None and isinstance(queue, sessionqueue.SessionQueue):
                queue.consumer = None  # nothing will write any more
            queue.put_nowait(None)  # lets a running writer finish
        if self.writer is not None:
            await self.writer
        with contextlib.suppress(Exception):
            await ws.close()
        await sock.close(wait=False, abort=True, reason=sock.server.reason.TRANSPORT_CLOSE)
        return ws

    # -- writing -------------------------------------------------------------------------

    def idle(self) -> bool:
        return self.writer is None

    def wake(self) -> None:
        """Something was queued: start a writer unless one is running (it will see it)."""
        if self.writer is None and not self.sock.queue.empty():
            self.writer = asyncio.get_running_loop().create_task(self._write_queued())

    async def _write_queued(self) -> None:
        """engineio's writer, but only while packets are queued: an idle connection keeps
        no task. Stops the connection after a CLOSE packet (or the reader's end)."""
        queue = self.sock.queue
        stop = False
        try:
            while not stop and not queue.empty():
                pkt = queue.get_nowait()
                queue.task_done()
                stop = pkt is None or not await self._send(pkt)
        finally:
            self.writer = None
        if stop:
            with contextlib.suppress(Exception):
                await self.ws.close()
        elif not queue.empty():
            self.wake()  # put while the last send was being drained

    async def _write_forever(self) -> None:
        """engineio's writer for a queue that is not a SessionQueue (a waiting ``get``)."""
        queue = self.sock.queue
        while True:
            pkt = await queue.get()
            queue.task_done()
            if pkt is None or not await self._send(pkt):
                break
        with contextlib.suppress(Exception):
            await self.ws.close()

    async def _send(self, pkt: Any) -> bool:
        """Write one packet; False when the connection is done (CLOSE sent, or failed)."""
        encoded = pkt.encode()
        try:
            if isinstance(encoded, str):
                await self.ws.send_str(encoded)
            else:
                await self.ws.send_bytes(encoded)
        except Exception:
            return False
        return pkt.packet_type != eio_packet.CLOSE

    async def _upgrade(self) -> bool:
        """engineio's upgrade from long-polling: probe, end the poll, wait for UPGRADE."""
        sock, ws = self.sock, self.ws
        sock.upgrading = True  # holds polling sends during the upgrade
        msg = await ws.receive()
        if msg.type is not _TEXT or msg.data != b"2probe":
            sock.upgrading = False
            return False
        await ws.send_str("3probe")
        await sock.queue.put(eio_packet.Packet(eio_packet.NOOP))  # ends the pending poll
        msg = await ws.receive()
        if msg.type is not _TEXT or msg.data[:1] != b"5":
            sock.upgraded = False
            sock.upgrading = False
            return False
        sock.upgraded = True
        sock.upgrading = False
        return True


def websocket_class(compress: bool, fanout: FastDelivery, inbound: Inbound,
                    sio_environ: dict | None = None) -> type:
    """An engineio-compatible aiohttp WebSocket driver class that runs ``SessionLoop``.

    ``sio_environ`` is python-socketio's ``environ`` map (Engine.IO sid -> environ): the
    environ of a websocket session is trimmed to ``ENVIRON_KEEP`` once the socket is open."""

    class NodeWebSocket:
        __slots__ = ("_sock", "environ", "handler", "server")

        def __init__(self, handler: Any, server: Any):
            self.handler = handler
            self.server = server
            self._sock: WebSocketResponse | None = None

        def __call__(self, environ: dict) -> Any:
            """The coroutine engineio awaits: ``SessionLoop.serve`` itself, so the session
            adds no frame of its own to the request's await chain."""
            request = environ["aiohttp.request"]
            ws = WebSocketResponse(max_msg_size=self.server.max_http_buffer_size,
                                   compress=compress, decode_text=False)
            self._sock = ws
            sock = getattr(self.handler, "__self__", None)
            if getattr(self.handler, "__func__", None) is AsyncSocket._websocket_handler:
                trim_environ(environ)
                if sio_environ is not None:
                    kept = sio_environ.get(sock.sid)
                    if kept is not None and kept is not environ:
                        trim_environ(kept)  # upgraded from long-polling
                return SessionLoop(sock, ws, fanout, inbound).serve(request)
            return self._serve_wrapped(environ, request)

        async def _serve_wrapped(self, environ: dict, request: Any) -> WebSocketResponse:
            """Someone wrapped engineio's handler: serve it the driver interface."""
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
_NO_MESSAGES: deque = deque(maxlen=0)  # takes nothing: appends are dropped


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


def shed_http_state(request: Any) -> None:
    """After the WebSocket handshake, drop what aiohttp keeps for HTTP on this connection.

    The HTTP parser (~760 B) and the pipelined-request deque (~620 B) are read only while
    the connection speaks HTTP; once ``prepare`` has installed the WebSocket reader, aiohttp
    feeds every byte to that reader and reads neither again (``connection_lost`` sets the
    parser to None itself). Skipped if aiohttp's internals are not what this expects."""
    protocol = getattr(request, "_protocol", None)
    if (protocol is None or getattr(protocol, "_payload_parser", None) is None
            or not getattr(protocol, "_upgraded", False)):
        return
    if hasattr(protocol, "_parser"):
        protocol._parser = None
    messages = getattr(protocol, "_messages", None)
    if isinstance(messages, deque) and not messages:
        protocol._messages = _NO_MESSAGES
