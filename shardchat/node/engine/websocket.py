"""The server side of a WebSocket (RFC 6455, RFC 7692) as a bare asyncio Protocol.

aiohttp runs a WebSocket inside the request that upgraded it: the request, its parser
state, two tasks and the whole await chain of middlewares and handlers stay allocated for
the connection's life, beside a response, a reader, a message queue and a writer, about
11 KB per idle connection. Once the handshake is answered, the fast engine takes the
transport from aiohttp (``session.py``) and speaks the frames itself with this class: one
object with slots per connection, no task, no buffer while no frame is half-read.

What it does, as aiohttp's server did for the node: it reads masked or unmasked client
frames, joins fragments, answers PING with PONG, inflates permessage-deflate messages when
that was negotiated, and refuses what the RFC forbids by closing with the RFC's code
(1002 protocol error, 1007 invalid UTF-8 in a close reason, 1009 a message over
``max_size``, checked from the frame header before any payload is kept). A text message's
UTF-8 is not checked here: its consumer decodes it (and closes the connection if it
cannot), as with aiohttp's ``decode_text=False``. It writes unmasked frames, compressed
when deflate was negotiated (broadcasts bypass this and write the same uncompressed frame
to everyone, which RFC 7692 allows: RSV1 is per message).

A subclass handles messages (``on_message``) and the end of the connection (``on_end``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import struct
import zlib
from typing import Any

from aiohttp.http import WS_KEY, ws_ext_gen, ws_ext_parse

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
CLOSE_OK, CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR = 1000, 1001, 1002
CLOSE_INVALID_TEXT, CLOSE_TOO_BIG = 1007, 1009
# Close codes a peer may send (RFC 6455 7.4.1; 1004-1006 and 1015 are never sent), plus
# the range left to applications and libraries.
_VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                          1014))
CLOSE_TIMEOUT = 10.0  # seconds the peer has to answer our CLOSE before the TCP is aborted
_DEFLATE_TAIL = b"\x00\x00\xff\xff"
_DATA_OPS = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY))
_CONTROL_OPS = frozenset((OP_CLOSE, OP_PING, OP_PONG))


class HandshakeRefused(ValueError):
    """The upgrade request is not a valid WebSocket opening handshake (answer 400)."""


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed with ``code``."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


class Deflate:
    """The permessage-deflate parameters one handshake agreed on (RFC 7692)."""

    __slots__ = ("no_takeover", "window_bits")

    def __init__(self, window_bits: int, no_takeover: bool) -> None:
        self.window_bits = window_bits
        self.no_takeover = no_takeover


def handshake(headers: Any, compress: bool) -> tuple[bytes, Deflate | None]:
    """The 101 response to an opening handshake with request ``headers``, and the deflate
    parameters when ``compress`` allows them and the client offered them. Raises
    HandshakeRefused with the reason when the request is not a WebSocket upgrade."""
    if headers.get("Upgrade", "").strip().lower() != "websocket":
        raise HandshakeRefused("Can \"Upgrade\" only to \"WebSocket\".")
    tokens = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    if "upgrade" not in tokens:
        raise HandshakeRefused("No \"Connection: Upgrade\" header.")
    version = headers.get("Sec-WebSocket-Version", "")
    if version not in ("13", "8", "7"):
        raise HandshakeRefused(f"Unsupported WebSocket version: {version!r}.")
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise HandshakeRefused("Sec-WebSocket-Key is not 16 bytes in base64.")
    except binascii.Error:
        raise HandshakeRefused("Sec-WebSocket-Key is not base64.") from None
    accept = base64.b64encode(hashlib.sha1(key.encode() + WS_KEY).digest()).decode()
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket",
             "Connection: upgrade", f"Sec-WebSocket-Accept: {accept}"]
    deflate = None
    if compress:
        bits, no_takeover = ws_ext_parse(headers.get("Sec-WebSocket-Extensions"),
                                         isserver=True)
        if bits:
            deflate = Deflate(bits, no_takeover)
            lines.append("Sec-WebSocket-Extensions: " + ws_ext_gen(
                compress=bits, isserver=True, server_notakeover=no_takeover))
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), deflate


def frame(payload: bytes, opcode: int = OP_TEXT, rsv1: bool = False) -> bytes:
    """A server frame: unmasked, unfragmented."""
    b0 = 0x80 | opcode | (0x40 if rsv1 else 0)
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", b0, n) + payload
    if n < 65536:
        return struct.pack("!BBH", b0, 126, n) + payload
    return struct.pack("!BBQ", b0, 127, n) + payload


def unmask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte masking ``key`` (one big-integer XOR, in C)."""
    n = len(payload)
    if not n:
        return b""
    mask = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")).to_bytes(
        n, "little")


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason[:123]


class WebSocketConnection(asyncio.Protocol):
    """One server-side WebSocket; ``on_message(opcode, payload)`` gets each whole TEXT or
    BINARY message (payload bytes, inflated), ``on_end()`` runs once the TCP is gone."""

    __slots__ = ("_buf", "_closed", "_deflate", "_deflater", "_frag", "_frag_deflated",
                 "_frag_op", "_inflater", "close_sent", "max_size", "transport")

    def __init__(self, max_size: int, deflate: Deflate | None = None) -> None:
        self.transport: Any = None
        self.max_size = max_size
        self.close_sent = False  # our CLOSE is out: nothing but the peer's CLOSE matters
        self._deflate = deflate
        self._buf: bytearray | None = None  # the start of a frame not complete yet
        self._frag: list[bytes] | None = None  # a fragmented message's frames so far
        self._frag_op = 0
        self._frag_deflated = False
        self._inflater: Any = None  # made at the first compressed message
        self._deflater: Any = None  # made at the first compressed send
        self._closed: asyncio.Future | None = None  # made when someone waits for the end

    # -- hooks ---------------------------------------------------------------------------

    def on_message(self, opcode: int, payload: bytes) -> None:
        """A whole TEXT or BINARY message arrived."""

    def on_end(self) -> None:
        """The connection is gone (called once, from ``connection_lost``)."""

    # -- asyncio -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None  # whatever runs later finds the connection gone
        self._buf = self._frag = None
        self._inflater = self._deflater = None
        closed = self._closed
        if closed is not None and not closed.done():
            closed.set_result(None)
        self.on_end()

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if buf is not None:
            buf += data
            data = buf  # type: ignore[assignment]
        try:
            pos = self._frames(data)
        except ProtocolError as exc:
            self._buf = None
            self.fail(exc.code, str(exc))
            return
        if pos >= len(data):
            self._buf = None
        elif buf is not None:
            del buf[:pos]
        else:
            self._buf = bytearray(data[pos:])

    # -- reading -------------------------------------------------------------------------

    def _frames(self, data: bytes | bytearray) -> int:
        """Handle every complete frame of ``data``; returns where the incomplete rest
        starts. Limits are checked from a frame's header, before its payload is here."""
        pos, end = 0, len(data)
        while end - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            opcode, n, head = b0 & 0x0F, b1 & 0x7F, 2
            if n == 126:
                if end - pos < 4:
                    break
                n = (data[pos + 2] << 8) | data[pos + 3]
                head = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(data[pos + 2:pos + 10], "big")
                head = 10
            self._check(b0, opcode, n)
            masked = b1 & 0x80
            if end - pos < head + (4 if masked else 0) + n:
                break
            if masked:
                key = bytes(data[pos + head:pos + head + 4])
                head += 4
                payload = unmask(bytes(data[pos + head:pos + head + n]), key)
            else:
                payload = bytes(data[pos + head:pos + head + n])
            pos += head + n
            if opcode >= OP_CLOSE:
                self._control(opcode, payload)
            elif not self.close_sent:
                self._data(b0, opcode, payload)
            if self.transport is None or self.transport.is_closing():
                return end  # closed by what that frame did: the rest is not read
        return pos

    def _check(self, b0: int, opcode: int, n: int) -> None:
        """What a frame's header alone can break (RFC 6455 5.2, 5.4, 5.5; RFC 7692 6)."""
        # RSV1 marks a compressed message: only where deflate was agreed, only on a
        # message's first frame; on a control frame it is ignored (never inflated), as
        # aiohttp did. RSV2 and RSV3 mean nothing here.
        if b0 & 0x70 and (b0 & 0x30 or (opcode < OP_CLOSE and (
                self._deflate is None or opcode == OP_CONTINUATION))):
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
        if opcode in _CONTROL_OPS:
            if not b0 & 0x80:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            if n > 125:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "control frame over 125 bytes")
            return
        if opcode not in _DATA_OPS:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        held = sum(map(len, self._frag)) if self._frag else 0
        if n + held > self.max_size:
            raise ProtocolError(CLOSE_TOO_BIG, f"message over {self.max_size} bytes")

    def _data(self, b0: int, opcode: int, payload: bytes) -> None:
        frag = self._frag
        if opcode == OP_CONTINUATION:
            if frag is None:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation of no message")
            frag.append(payload)
            if not b0 & 0x80:
                return
            self._frag = None
            opcode, deflated, payload = self._frag_op, self._frag_deflated, b"".join(frag)
        else:
            if frag is not None:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            deflated = bool(b0 & 0x40)
            if not b0 & 0x80:
                self._frag, self._frag_op, self._frag_deflated = [payload], opcode, deflated
                return
        if deflated:
            payload = self._inflate(payload)
        self.on_message(opcode, payload)

    def _inflate(self, payload: bytes) -> bytes:
        inflater = self._inflater
        if inflater is None:
            inflater = self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            out = inflater.decompress(payload + _DEFLATE_TAIL, self.max_size + 1)
        except zlib.error:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "undecodable compressed message") from None
        if len(out) > self.max_size or inflater.unconsumed_tail:
            raise ProtocolError(CLOSE_TOO_BIG, f"message over {self.max_size} bytes inflated")
        return out

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            if not self.close_sent:
                self.transport.write(frame(payload, OP_PONG))
        elif opcode == OP_CLOSE:
            code = CLOSE_OK
            if len(payload) == 1:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close frame of one byte")
            if payload:
                code = struct.unpack("!H", payload[:2])[0]
                if (code < 3000 and code not in _VALID_CLOSE) or code >= 5000:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
                try:
                    payload[2:].decode()
                except UnicodeDecodeError:
                    raise ProtocolError(CLOSE_INVALID_TEXT, "close reason not UTF-8") from None
            if not self.close_sent:  # the peer closes: answer, then end the TCP
                self.close_sent = True
                self.transport.write(frame(close_payload(code), OP_CLOSE))
            self.transport.close()
        # PONG: nothing to do (Engine.IO's own ping is what keeps a session alive)

    # -- writing -------------------------------------------------------------------------

    def send(self, payload: bytes, binary: bool = False) -> bool:
        """Write one message (compressed when deflate was agreed); False when closing."""
        transport = self.transport
        if self.close_sent or transport is None or transport.is_closing():
            return False
        opcode = OP_BINARY if binary else OP_TEXT
        deflate = self._deflate
        if deflate is None:
            transport.write(frame(payload, opcode))
            return True
        deflater = self._deflater
        if deflater is None:
            deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED,
                                        -deflate.window_bits)
        data = deflater.compress(payload) + deflater.flush(zlib.Z_SYNC_FLUSH)
        self._deflater = None if deflate.no_takeover else deflater
        if data.endswith(_DEFLATE_TAIL):
            data = data[:-4]
        transport.write(frame(data, opcode, rsv1=True))
        return True

    def writable(self) -> Any:
        """The transport while messages may be written to it, else None."""
        transport = self.transport
        if self.close_sent or transport is None or transport.is_closing():
            return None
        return transport

    def close(self, code: int = CLOSE_OK, message: bytes = b"") -> asyncio.Future:
        """Send CLOSE (once) and give the peer ``CLOSE_TIMEOUT`` seconds to answer, then
        abort; the returned future is done when the connection is gone."""
        loop = asyncio.get_running_loop()
        closed = self._closed
        if closed is None:
            closed = self._closed = loop.create_future()
            if self.transport is None:
                closed.set_result(None)
        transport = self.transport
        if transport is not None and not transport.is_closing() and not self.close_sent:
            self.close_sent = True
            transport.write(frame(close_payload(code, message), OP_CLOSE))
            loop.call_later(CLOSE_TIMEOUT, _abort_unless_done, transport, closed)
        return closed

    def fail(self, code: int, why: str) -> None:
        """Close at once for a broken protocol: CLOSE with ``code``, then the TCP."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.close_sent:
            self.close_sent = True
            transport.write(frame(close_payload(code, why.encode()[:100]), OP_CLOSE))
        transport.close()


def _abort_unless_done(transport: Any, closed: asyncio.Future) -> None:
    if not closed.done():
        transport.abort()
