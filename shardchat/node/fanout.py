"""Broadcast of one event to the members of a room: the hot path.

python-socketio delivers a broadcast by creating one asyncio task per recipient, each of
which puts the packet on that client's Engine.IO queue and wakes the client's writer task,
which then builds a WebSocket frame for it (and, with permessage-deflate, compresses it)
on its own. For a room of 500 that is 500 tasks, 500 wake-ups and 500 identical frames.

Here a broadcast encodes its Socket.IO packet once, builds the WebSocket frame once and
writes the same bytes straight to the transport of every recipient for which that cannot
reorder anything: the client is on the websocket transport, nothing is waiting in its
Engine.IO queue, and its writer task is parked waiting for the queue (so nothing it took
is still being written). Everyone else (long-polling clients, clients in the middle of an
upgrade, clients with queued packets) takes python-socketio's normal path, so every client
still sees its packets in the order they were produced. An uncompressed frame is valid on
a connection that negotiated permessage-deflate (RSV1 clear), so the same bytes serve
browser clients too.

Back-pressure: a recipient whose unsent bytes (transport buffer plus queued packets) pass
``write_buffer_cap`` is cut off, logged and counted, instead of letting a slow reader grow
the node's memory without bound.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import orjson
import socketio
from engineio import packet as eio_packet
from socketio import packet as sio_packet

from shardchat.config import NodeSettings

log = logging.getLogger("shardchat.fanout")


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


class Fanout:
    """Delivers events to room members; the room service calls ``emit`` for every one."""

    def __init__(self, sio: socketio.AsyncServer, settings: NodeSettings) -> None:
        self.sio = sio
        self.settings = settings
        self.cap = settings.write_buffer_cap
        self.fast = 0
        self.slow = 0
        self.dropped = 0
        self.direct = 0  # single-recipient packets written straight to the transport
        self.queued = 0  # single-recipient packets that took the Engine.IO queue
        self._ws: dict[str, Any] = {}  # Engine.IO sid -> aiohttp WebSocketResponse
        self._pending: dict[Any, list[bytes]] = {}  # transport -> frames of this loop tick
        self._flush_scheduled = False

    # -- knowing each client's websocket -------------------------------------------------

    def register(self, eio_sid: str, ws: Any) -> None:
        """The transport's session loop announces a client's aiohttp response once the
        client is on the websocket transport (and withdraws it when the loop ends)."""
        self._ws[eio_sid] = ws

    def unregister(self, eio_sid: str) -> None:
        self._ws.pop(eio_sid, None)

    def _direct_transport(self, eio_sid: str, sock: Any) -> Any:
        """The transport to write to directly, or None when the normal path must be used.

        Direct is safe only while the Engine.IO writer task is parked on an empty queue:
        then everything it took earlier has been handed to the transport, and anything
        queued later wakes the writer after this tick's flush, so order is kept."""
        ws = self._ws.get(eio_sid)
        if ws is None or not sock.upgraded or sock.closing:
            return None
        if not _parked(sock.queue):
            return None
        writer = ws._writer
        if writer is None or writer._closing or writer._send_lock.locked():
            return None  # closing, or a large compressed frame is being sent
        transport = writer.transport
        if transport is None or transport.is_closing():
            return None
        return transport

    def _write(self, transport: Any, frame: bytes) -> None:
        """Queue ``frame`` for ``transport``; all frames of one loop tick for the same
        client go out in one write (group commit completes several messages at once)."""
        frames = self._pending.get(transport)
        if frames is None:
            self._pending[transport] = [frame]
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        else:
            frames.append(frame)

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        self._flush_scheduled = False
        for transport, frames in pending.items():
            if not transport.is_closing():
                transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    # -- broadcast -----------------------------------------------------------------------

    async def emit(self, namespace: str, event: str, data: Any,
                   recipients: list[tuple[str, str | None]]) -> None:
        """Send ``event`` with ``data`` to each (Socket.IO sid, Engine.IO sid) recipient.

        The room service keeps each member's Engine.IO sid, which saves a lookup per
        recipient. No task per recipient: fast recipients get one ``transport.write`` of a
        shared frame; the rest are queued in order, one after the other."""
        payload = sio_payload(sio_packet.EVENT, namespace, [event, data])
        if payload is None:
            encoded = self.sio.packet_class(sio_packet.EVENT, namespace=namespace,
                                            data=[event, data]).encode()
            if isinstance(encoded, list):  # binary attachments: leave them to python-socketio
                for sid, _eio_sid in recipients:
                    self.slow += 1
                    await self.sio.emit(event, data, to=sid, namespace=namespace)
                return
            payload = ("4" + encoded).encode()
        size = len(payload)
        frame: bytes | None = None
        slow: list[str] = []
        dropped: list[tuple[str, Any, Any]] = []
        sockets = self.sio.eio.sockets
        cap = self.cap
        for sid, eio_sid in recipients:
            sock = sockets.get(eio_sid) if eio_sid is not None else None
            if sock is None or sock.closing:
                continue
            transport = self._direct_transport(eio_sid, sock)
            if transport is not None:
                if transport.get_write_buffer_size() + size > cap:
                    dropped.append((f"{sid} in {namespace}", sock, transport))
                    continue
                if frame is None:
                    frame = text_frame(payload)
                self._write(transport, frame)
                self.fast += 1
            else:
                if self._pending_bytes(eio_sid, sock, size) > cap:
                    dropped.append((f"{sid} in {namespace}", sock,
                                    self._transport_of(eio_sid)))
                    continue
                slow.append(eio_sid)
        if slow:
            pkt = eio_packet.Packet(eio_packet.MESSAGE, payload[1:].decode())
            send = self.sio._send_eio_packet
            for eio_sid in slow:
                self.slow += 1
                await send(eio_sid, pkt)
        for who, sock, transport in dropped:
            self._drop(who, sock, transport)

    # -- one recipient -------------------------------------------------------------------

    async def send_packet(self, eio_sid: str, pkt: Any) -> bool:
        """python-socketio's ``_send_packet`` (CONNECT, CONNECT_ERROR, DISCONNECT, ACK and
        single emits) through the same direct-write rule as broadcasts. False when the
        packet has binary attachments: python-socketio then sends it as usual."""
        encoded = pkt.encode()
        if isinstance(encoded, list):
            return False
        await self.send_payload(eio_sid, ("4" + encoded).encode(), encoded)
        return True

    async def send_payload(self, eio_sid: str, payload: bytes, encoded: str | None = None
                           ) -> None:
        """Send one Engine.IO MESSAGE payload (``4...``) to one client: written straight to
        the transport when that cannot reorder anything (see ``_direct_transport``), else
        put on the client's Engine.IO queue like python-socketio does."""
        sock = self.sio.eio.sockets.get(eio_sid)
        if sock is not None and self.write_now(eio_sid, sock, payload):
            return
        if encoded is None:
            encoded = payload[1:].decode()
        self.queued += 1
        await self.sio.eio.send_packet(eio_sid, eio_packet.Packet(eio_packet.MESSAGE, encoded))

    def _transport_of(self, eio_sid: str) -> Any:
        ws = self._ws.get(eio_sid)
        writer = getattr(ws, "_writer", None) if ws is not None else None
        return writer.transport if writer is not None else None

    def _pending_bytes(self, eio_sid: str, sock: Any, size: int) -> int:
        """Bytes this client has not taken yet, if this packet were queued: its transport
        buffer (websocket) plus its queued packets, estimated at this packet's size."""
        transport = self._transport_of(eio_sid)
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return buffered + (sock.queue.qsize() + 1) * size

    def write_now(self, eio_sid: str, sock: Any, payload: bytes) -> bool:
        """Write ``payload`` to the client's socket now if the direct rule allows it (also
        when it cuts off a reader over the cap); False: use the Engine.IO queue."""
        if sock.closing:
            return False
        transport = self._direct_transport(eio_sid, sock)
        if transport is None:
            return False
        if transport.get_write_buffer_size() + len(payload) > self.cap:
            self._drop(f"session {eio_sid}", sock, transport)
            return True
        self._write(transport, text_frame(payload))
        self.direct += 1
        return True

    # -- back-pressure -------------------------------------------------------------------

    def _drop(self, who: str, sock: Any, transport: Any) -> None:
        """Cut off a reader that fell too far behind; the normal disconnect path (leave,
        presence) follows from the closed connection."""
        self.dropped += 1
        log.warning("disconnecting slow reader %s: more than %d bytes unsent", who, self.cap)
        if transport is not None and not transport.is_closing():
            transport.abort()
        else:
            task = asyncio.ensure_future(sock.close(wait=False, abort=True))
            task.add_done_callback(_ignore_result)

    def stats(self) -> dict[str, int]:
        return {"fast": self.fast, "slow": self.slow, "direct": self.direct,
                "queued": self.queued, "dropped_slow_readers": self.dropped}


def _parked(queue: Any) -> bool:
    """Nothing queued and the writer waiting in ``get`` (SessionQueue or asyncio.Queue)."""
    parked = getattr(queue, "parked", None)
    if parked is not None:
        return parked()
    getters = queue._getters
    return not queue._queue and bool(getters) and not getters[0].done()


def _ignore_result(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
