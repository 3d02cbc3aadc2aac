"""The WebSocket transport under Engine.IO: our own session loop, pings on timers.

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
* liveness needs no read timeout: each socket's ping is a ``loop.call_later`` timer (the
  Engine.IO socket asks for a ``_send_ping`` task, which ``install`` turns into a timer),
  and a PING that gets no PONG within ``ping_timeout`` aborts the connection;
* compression is off unless ``node.websocket_compression`` asks for it (aiohttp's default
  of accepting permessage-deflate would compress every frame for every recipient).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from typing import Any

from aiohttp import WSMsgType
from aiohttp.web import WebSocketResponse
from engineio import exceptions as eio_exceptions
from engineio import packet as eio_packet
from engineio.async_socket import AsyncSocket

from shardchat.node import sessionqueue
from shardchat.node.fanout import Fanout
from shardchat.node.inbound import Inbound

log = logging.getLogger("shardchat.transport")

_TEXT, _BINARY = WSMsgType.TEXT, WSMsgType.BINARY
_PING_FRAME = b"2"


class SessionLoop:
    """Reads, dispatches and writes for one Engine.IO socket on the websocket transport."""

    def __init__(self, sock: Any, ws: WebSocketResponse, fanout: Fanout,
                 inbound: Inbound) -> None:
        self.sock = sock
        self.ws = ws
        self.fanout = fanout
        self.inbound = inbound
        self.writer: asyncio.Task | None = None

    async def run(self) -> None:
        sock = self.sock
        if sock.connected:
            if not await self._upgrade():
                return
        else:
            sock.connected = True
            sock.upgraded = True
        eio_sid = sock.sid
        self.fanout.register(eio_sid, self.ws)
        queue = sock.queue
        if isinstance(queue, sessionqueue.SessionQueue):
            queue.consumer = self  # a writer task only while there is something to write
            self.wake()
        else:
            self.writer = asyncio.get_running_loop().create_task(self._write_forever())
        try:
            await self._read()
        finally:
            self.fanout.unregister(eio_sid)
            if self.writer is None and isinstance(queue, sessionqueue.SessionQueue):
                queue.consumer = None  # nothing will write any more
            queue.put_nowait(None)  # lets a running writer finish
        if self.writer is not None:
            await self.writer
        with contextlib.suppress(Exception):
            await self.ws.close()
        await sock.close(wait=False, abort=True, reason=sock.server.reason.TRANSPORT_CLOSE)

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

    async def _read(self) -> None:
        """Frames until the client goes away; a frame Engine.IO cannot decode closes this
        connection only (engineio would fail the request handler the same way)."""
        sock, receive, dispatch = self.sock, self.ws.receive, self.inbound.dispatch
        eio_sid, limit = sock.sid, sock.server.max_http_buffer_size
        for_engineio = sock.receive
        while True:
            msg = await receive()
            kind = msg.type
            if kind is not _TEXT and kind is not _BINARY:
                return  # CLOSE, CLOSING, CLOSED, ERROR (aiohttp answers control frames)
            data = msg.data
            if len(data) > limit:
                return
            if kind is _TEXT and dispatch(eio_sid, data):
                continue
            try:
                pkt = eio_packet.Packet(encoded_packet=data.decode() if kind is _TEXT else data)
            except (ValueError, UnicodeDecodeError):
                return
            try:
                await for_engineio(pkt)
            except eio_exceptions.UnknownPacketError:
                pass
            except eio_exceptions.SocketIsClosedError:
                return
            except Exception:  # python-socketio refused the packet: it logged why
                sock.server.logger.exception("Unknown receive error")


def websocket_class(compress: bool, fanout: Fanout, inbound: Inbound) -> type:
    """An engineio-compatible aiohttp WebSocket driver class that runs ``SessionLoop``."""

    class NodeWebSocket:
        __slots__ = ("_sock", "environ", "handler", "server")

        def __init__(self, handler: Any, server: Any):
            self.handler = handler
            self.server = server
            self._sock: WebSocketResponse | None = None

        async def __call__(self, environ: dict) -> WebSocketResponse:
            request = environ["aiohttp.request"]
            ws = WebSocketResponse(max_msg_size=self.server.max_http_buffer_size,
                                   compress=compress, decode_text=False)
            self._sock = ws
            await ws.prepare(request)
            sock = getattr(self.handler, "__self__", None)
            if getattr(self.handler, "__func__", None) is AsyncSocket._websocket_handler:
                await SessionLoop(sock, ws, fanout, inbound).run()
            else:  # someone wrapped engineio's handler: serve it the driver interface
                self.environ = environ
                await self.handler(self)
            return ws

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


class PingTimers:
    """Engine.IO pings as ``loop.call_later`` timers instead of one sleeping task per socket.

    ``AsyncSocket.schedule_ping`` asks the server to start ``_send_ping`` (sleep
    ``ping_interval``, stamp ``last_ping``, send PING) whenever the client answered the
    previous PING; the server's ``start_background_task`` is wrapped to schedule a timer
    that does the same. A websocket client whose PONG does not come within ``ping_timeout``
    is cut off (engineio's read timeout did that); long-polling clients keep engineio's own
    checks (the poll timeout and the service task)."""

    def __init__(self, eio: Any, fanout: Fanout) -> None:
        self.eio = eio
        self.fanout = fanout
        self._start = eio.start_background_task
        eio.start_background_task = self.start_background_task

    def start_background_task(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(target, "__func__", None) is AsyncSocket._send_ping:
            sock = target.__self__
            sock.ping_timer = asyncio.get_running_loop().call_later(
                self.eio.ping_interval, self._ping, sock)
            return None  # schedule_ping ignores what it gets back
        return self._start(target, *args, **kwargs)

    def _ping(self, sock: Any) -> None:
        if sock.closing or sock.closed:
            return
        sent = sock.last_ping = time.time()
        if not self.fanout.write_now(sock.sid, sock, _PING_FRAME):
            sock.queue.put_nowait(eio_packet.Packet(eio_packet.PING))
        sock.ping_timer = asyncio.get_running_loop().call_later(
            self.eio.ping_timeout, self._overdue, sock, sent)

    def _overdue(self, sock: Any, sent: float) -> None:
        """No PONG for the PING sent at ``sent``: the client is gone."""
        if sock.last_ping != sent:
            return
        transport = self.fanout._transport_of(sock.sid)
        if transport is None:
            return  # long-polling: engineio's checks close it
        log.info("%s: no PONG within %ss, closing", sock.sid, self.eio.ping_timeout)
        if not sock.closing:
            task = asyncio.ensure_future(sock.close(
                wait=False, abort=True, reason=self.eio.reason.PING_TIMEOUT))
            task.add_done_callback(_ignore_result)
        transport.abort()


def _ignore_result(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def install(sio: Any, compress: bool, fanout: Fanout, inbound: Inbound) -> None:
    """Replace the Engine.IO server's websocket driver, ping tasks and queues with ours."""
    sio.eio._async = dict(sio.eio._async, websocket=websocket_class(compress, fanout, inbound))
    PingTimers(sio.eio, fanout)
    sessionqueue.install(sio.eio)
