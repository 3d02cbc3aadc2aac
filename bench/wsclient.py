"""A lean Engine.IO 4 / Socket.IO 5 client over a raw WebSocket, for the load generator.

One asyncio Protocol per connection, no task per client and no per-frame allocation beyond
the payload slice: the load generator runs thousands of these on one core and must not be
the bottleneck it is measuring. Only what the benchmark needs is spoken: the WebSocket
upgrade (optionally offering permessage-deflate as browsers do), the Engine.IO open and
ping/pong, the Socket.IO namespace CONNECT, EVENT with an ack id, and ACK.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

DEFLATE_TAIL = b"\x00\x00\xff\xff"
OFFER_DEFLATE = "permessage-deflate; client_max_window_bits"


class HandshakeError(RuntimeError):
    """The server refused the upgrade or the namespace connect (``refusal``: the
    CONNECT_ERROR's data, ``{"message", "data": {"code", ...}}``, when it sent one)."""

    refusal: Any = None


def _mask_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame: clients must mask (RFC 6455 5.3)."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    masked = (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")
    return header + key + masked


class SioClient(asyncio.Protocol):
    """One Socket.IO client connected to one namespace over WebSocket only.

    ``on_message(client, payload)`` is called for every ``message`` event of the namespace;
    other events (``welcome``, ``presence``, ...) are counted in ``other_events`` and, when
    ``on_event(client, packet)`` is given, handed to it as the raw packet (a client that
    follows its room when it moves reads ``welcome`` and ``moved``). ``on_leave(client)`` is
    called once when the namespace is closed: the server's DISCONNECT, or the connection's
    end.
    """

    def __init__(self, host: str, port: int, path: str, namespace: str, auth: dict[str, Any],
                 *, deflate: bool = False,
                 on_message: Callable[[SioClient, bytes], None] | None = None,
                 on_event: Callable[[SioClient, bytes], None] | None = None,
                 on_leave: Callable[[SioClient], None] | None = None) -> None:
        self.host, self.port = host, port
        self.path = path.rstrip("/") + "/"
        self.namespace = namespace
        self.auth = auth
        self.offer_deflate = deflate
        self.on_message = on_message
        self.on_event = on_event
        self.on_leave = on_leave
        self.transport: asyncio.Transport | None = None
        self.deflate_active = False
        self._inflate: Any = None
        self._buf = bytearray()
        self._upgraded = False
        self._ns_prefix = b"4" + self._ns_part()
        self._msg_prefix = self._ns_prefix.replace(b"4", b"42", 1) + b'["message"'
        self._ack_prefix = self._ns_prefix.replace(b"4", b"43", 1)
        self.event_prefix = self._ns_prefix.replace(b"4", b"42", 1)  # then ["name",data]
        self.connected: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.messages = 0
        self.received = 0  # bytes read from the socket, frames and upgrade response
        self.sample = True  # whether this client's latencies are recorded
        self.other_events = 0
        self.sid: str | None = None
        self.refusal: Any = None  # the CONNECT_ERROR's data, when the connect was refused
        self._next_ack = 1
        self._acks: dict[int, asyncio.Future] = {}

    def _ns_part(self) -> bytes:
        """``/ns,`` as it appears after the packet type (empty for the main namespace)."""
        return b"" if self.namespace in ("", "/") else self.namespace.encode() + b","

    # -- connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small sends must not wait for delayed ACKs (Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {self.path}?EIO=4&transport=websocket HTTP/1.1",
                 f"Host: {self.host}:{self.port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        if self.offer_deflate:
            lines.append(f"Sec-WebSocket-Extensions: {OFFER_DEFLATE}")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connected.done():
            self.connected.set_exception(HandshakeError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection lost"))
        self._acks.clear()
        self._left()

    def _left(self) -> None:
        """The namespace is closed (DISCONNECT or connection lost): tell ``on_leave`` once."""
        leave, self.on_leave = self.on_leave, None
        if leave is not None:
            leave(self)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        buf = self._buf
        buf += data
        if not self._upgraded and not self._read_upgrade():
            return
        pos, end = 0, len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            hl = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                hl = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 10], "big")
                hl = 10
            if end - pos < hl + n:
                break
            start = pos + hl
            pos = start + n
            if b0 == 0x81 and self.on_event is None and buf.startswith(self.event_prefix, start) \
                    and not buf.startswith(self._msg_prefix, start):
                # an event nobody reads (presence, typing ...): counted, never copied out
                self.other_events += 1
                continue
            self._frame(b0, bytes(buf[start:pos]))
        if pos:
            del buf[:pos]

    def _read_upgrade(self) -> bool:
        idx = self._buf.find(b"\r\n\r\n")
        if idx < 0:
            return False
        head = bytes(self._buf[:idx]).decode("latin-1")
        del self._buf[:idx + 4]
        status = head.split("\r\n", 1)[0]
        if " 101 " not in status + " ":
            self._fail(f"upgrade refused: {status}")
            return False
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-extensions" and "permessage-deflate" in value:
                self.deflate_active = True
                self._inflate = zlib.decompressobj(-15)
        self._upgraded = True
        return True

    def _fail(self, why: str) -> None:
        if not self.connected.done():
            self.connected.set_exception(HandshakeError(why))
        if self.transport:
            self.transport.abort()

    # -- frames and packets ---------------------------------------------------------------

    def _frame(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        if b0 & 0x40:  # RSV1: a compressed message (permessage-deflate)
            payload = self._inflate.decompress(payload + DEFLATE_TAIL)
        if opcode == 0x1:
            self._packet(payload)
        elif opcode == 0x9:  # WebSocket ping: answer with pong
            self._send_raw(payload, 0xA)
        elif opcode == 0x8 and self.transport:
            self.transport.close()

    def _packet(self, p: bytes) -> None:
        if p.startswith(self._msg_prefix):
            self.messages += 1
            if self.on_message is not None:
                self.on_message(self, p)
            return
        head = p[:1]
        if head == b"2":  # Engine.IO ping -> pong
            self.send_text(b"3")
        elif head == b"4":
            self._sio_packet(p)
        elif head == b"0":  # Engine.IO open: connect to the namespace
            self.send_text(self._ns_prefix.replace(b"4", b"40", 1) + json.dumps(self.auth).encode())
        elif head == b"1":
            self.close()

    def _sio_packet(self, p: bytes) -> None:
        kind = p[1:2]
        if kind == b"2":
            self.other_events += 1
            if self.on_event is not None and p.startswith(self.event_prefix):
                self.on_event(self, p)
        elif kind == b"3" and p.startswith(self._ack_prefix):
            rest = p[len(self._ack_prefix):]
            idx = rest.find(b"[")
            fut = self._acks.pop(int(rest[:idx]), None)
            if fut is not None and not fut.done():
                fut.set_result(json.loads(rest[idx:]))
        elif kind == b"0" and not self.connected.done():
            body = p[len(self._ns_prefix) + 1:]
            info = json.loads(body) if body else {}
            self.sid = info.get("sid")
            self.connected.set_result(info)
        elif kind == b"4" and not self.connected.done():
            body = p[len(self._ns_prefix) + 1:]
            self.refusal = _json_or_none(body)
            self._fail(f"connect refused: {body.decode(errors='replace')}")
        elif kind == b"1" and p.startswith(self._ns_prefix.replace(b"4", b"41", 1)):
            self._left()

    # -- sending --------------------------------------------------------------------------

    def _send_raw(self, payload: bytes, opcode: int) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_mask_frame(payload, opcode))

    def send_text(self, payload: bytes) -> None:
        self._send_raw(payload, 0x1)

    def emit(self, event: str, data: Any, ack: bool = False) -> asyncio.Future | None:
        """Send an EVENT; with ``ack`` returns a future for the server's ACK payload."""
        body = json.dumps([event, data], separators=(",", ":")).encode()
        ns = self._ns_prefix.replace(b"4", b"42", 1)
        if not ack:
            self.send_text(ns + body)
            return None
        ack_id = self._next_ack
        self._next_ack += 1
        fut = asyncio.get_running_loop().create_future()
        self._acks[ack_id] = fut
        self.send_text(ns + str(ack_id).encode() + body)
        return fut

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


# Source addresses for many connections to one port: the whole of 127/8 is loopback on
# Linux, and each (source address, destination) pair has its own ~28,000 ephemeral ports.
SOURCE_BASE, SOURCE_COUNT = "127.0.0.", 253  # 127.0.0.2 ... 127.0.0.254


def source_address(index: int, spread: int) -> tuple[str, int] | None:
    """The local address of client ``index`` when clients are spread over ``spread``
    loopback addresses (127.0.0.2 onwards, at most ``SOURCE_COUNT``); None: the kernel's
    choice (127.0.0.1 for a loopback destination)."""
    if spread <= 0:
        return None
    return f"{SOURCE_BASE}{2 + index % min(spread, SOURCE_COUNT)}", 0


async def connect(host: str, port: int, path: str, namespace: str, auth: dict[str, Any], *,
                  deflate: bool = False, timeout: float = 10.0,
                  on_message: Callable[[SioClient, bytes], None] | None = None,
                  on_event: Callable[[SioClient, bytes], None] | None = None,
                  on_leave: Callable[[SioClient], None] | None = None,
                  local_addr: tuple[str, int] | None = None) -> SioClient:
    """Open one client and wait (bounded) until its namespace CONNECT is acknowledged; a
    refused connect raises HandshakeError, with the refusal's data in ``exc.refusal``.
    ``local_addr`` binds the client's end (``source_address``)."""
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(loop.create_connection(
        lambda: SioClient(host, port, path, namespace, auth, deflate=deflate,
                          on_message=on_message, on_event=on_event, on_leave=on_leave),
        host, port, local_addr=local_addr), timeout)
    try:
        await asyncio.wait_for(asyncio.shield(client.connected), timeout)
    except HandshakeError as exc:
        client.close()
        exc.refusal = client.refusal
        raise
    except BaseException:
        # a handshake given up: its outcome, when it comes, is nobody's business
        client.connected.add_done_callback(_consume)
        client.close()
        raise
    return client


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def now_ns() -> int:
    """The send/receive clock: monotonic and shared by every process on the machine."""
    return time.monotonic_ns()
