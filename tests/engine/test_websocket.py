"""The fast engine's own WebSocket (engine/websocket.py, engine/session.py), byte by byte.

After the handshake the engine takes each connection from aiohttp and speaks the frames
itself, so what aiohttp's server did must still happen: fragments joined, PING answered,
permessage-deflate inflated where it was agreed, a client's CLOSE answered, and frames the
RFC forbids refused with the RFC's close code. And what the take-over is for must hold: an
idle websocket keeps no task and no HTTP state of aiohttp's.

The engine runs in this process on a loopback port behind the node's own listener, as the
node runs it; the clients are raw TCP sockets writing frames by hand (and aiohttp's client,
which compresses what it sends once deflate is agreed).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from shardchat.config import NodeSettings
from shardchat.listener import ListenerTimeouts, start_site
from shardchat.node import engine as engine_mod
from shardchat.node.engine.session import EngineSession
from tests.conftest import EVENT_TIMEOUT
from tests.support import async_wait_until

NAMESPACE = "/i1/room/frames"
PATH = "/socket.io"
MAX_PACKET = 4096


@dataclass
class Served:
    engine: engine_mod.Engine
    runner: web.AppRunner
    port: int


async def serve(compression: bool) -> tuple[Served, web.AppRunner]:
    built = engine_mod.build(NodeSettings(websocket_compression=compression,
                                          max_packet_bytes=MAX_PACKET))
    sio = built.sio

    @sio.on("connect", namespace="*")
    async def connect(namespace, sid, environ, auth=None):
        return None

    @sio.on("echo", namespace="*")
    async def echo(namespace, sid, data):
        return data

    app = web.Application()
    sio.attach(app, socketio_path=PATH)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await start_site(runner, "127.0.0.1", 0, ListenerTimeouts())
    return Served(built, runner, runner.addresses[0][1]), runner


@pytest.fixture(params=[False, True], ids=["plain", "compression-on"])
async def served(request) -> AsyncIterator[Served]:
    srv, runner = await serve(request.param)
    try:
        yield srv
    finally:
        await srv.engine.close_sessions(1.0)
        await runner.cleanup()
        await srv.engine.sio.shutdown()


def client_frame(payload: bytes, opcode: int = 0x1, fin: bool = True, rsv: int = 0,
                 masked: bool = True) -> bytes:
    """A client frame, masked unless told otherwise."""
    b0 = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", b0, mask_bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mask_bit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawClient:
    """An Engine.IO websocket over a bare TCP connection: frames in and out by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.head = ""
        self.inflater = zlib.decompressobj(-15)  # for the server's compressed messages

    @classmethod
    async def connect(cls, port: int, extensions: str | None = None,
                      behind: bytes = b"", key: str | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = key or base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {PATH}/?EIO=4&transport=websocket HTTP/1.1", f"Host: 127.0.0.1:{port}",
                 "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13"]
        if extensions:
            lines.append(f"Sec-WebSocket-Extensions: {extensions}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + behind)
        client = cls(reader, writer)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), EVENT_TIMEOUT)
        client.head = head.decode("latin-1")
        return client

    async def frame(self) -> tuple[int, bytes, bool]:
        """(opcode, payload, rsv1) of the next server frame."""
        async with asyncio.timeout(EVENT_TIMEOUT):
            b0, b1 = await self.reader.readexactly(2)
            assert not b1 & 0x80, "server frames are never masked"
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            return b0 & 0x0F, await self.reader.readexactly(n), bool(b0 & 0x40)

    async def text(self) -> bytes:
        """The next text frame's payload, answering Engine.IO pings."""
        for _ in range(20):
            opcode, payload, deflated = await self.frame()
            if deflated:
                payload = self.inflater.decompress(payload + b"\x00\x00\xff\xff")
            if opcode == 0x1 and payload == b"2":
                self.send(b"3")
                continue
            assert opcode == 0x1, (opcode, payload)
            return payload
        raise AssertionError("too many pings")

    async def close_code(self) -> int:
        """The code of the CLOSE the server sends next (after any text frames)."""
        for _ in range(20):
            opcode, payload, _ = await self.frame()
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0]
        raise AssertionError("no CLOSE frame")

    async def ended(self) -> bool:
        """True once the server has closed the TCP (EOF), within the timeout."""
        async with asyncio.timeout(EVENT_TIMEOUT):
            while await self.reader.read(65536):
                pass
        return True

    def send(self, payload: bytes, **kw) -> None:
        self.writer.write(client_frame(payload, **kw))

    async def join(self) -> None:
        assert (await self.text()).startswith(b"0{")  # Engine.IO OPEN
        self.send(f"40{NAMESPACE},{{}}".encode())
        assert (await self.text()).startswith(f"40{NAMESPACE},".encode())

    def close(self) -> None:
        self.writer.close()


def echo_packet(ack: int, text: str) -> bytes:
    return f'42{NAMESPACE},{ack}["echo",{json.dumps(text)}]'.encode()


async def test_an_idle_websocket_keeps_no_task_and_no_http_state(served):
    """The reason for the take-over: once open, aiohttp has forgotten the connection (its
    server lists none, so no request, handler or task of its survives) and the session
    holds no task; the session still answers."""
    clients = [await RawClient.connect(served.port)]
    try:
        await clients[0].join()  # the first one also starts engineio's service task
        await asyncio.sleep(0)
        tasks_before = len(asyncio.all_tasks())
        for _ in range(9):
            clients.append(await RawClient.connect(served.port))
            await clients[-1].join()
        assert served.runner.server is not None
        await asyncio.sleep(0)  # the handlers' tasks finish in this turn
        assert served.runner.server.connections == []
        sessions = [served.engine.delivery.websocket(sid)
                    for sid in served.engine.delivery.websocket_sids()]
        assert len(sessions) == 10
        assert all(isinstance(s, EngineSession) and s.idle() for s in sessions)
        assert len(asyncio.all_tasks()) == tasks_before
        clients[3].send(echo_packet(7, "still here"))
        assert await clients[3].text() == f'43{NAMESPACE},7["still here"]'.encode()
    finally:
        for client in clients:
            client.close()


async def test_fragments_pings_and_unmasked_frames_are_read(served):
    client = await RawClient.connect(served.port)
    try:
        await client.join()
        packet = echo_packet(1, "in three parts")
        client.send(packet[:5], fin=False)
        client.send(b"ping!", opcode=0x9)  # a control frame between fragments
        client.send(packet[5:12], opcode=0x0, fin=False)
        client.send(packet[12:], opcode=0x0)
        assert await client.frame() == (0xA, b"ping!", False)
        assert await client.text() == f'43{NAMESPACE},1["in three parts"]'.encode()
        client.send(echo_packet(2, "unmasked"), masked=False)  # aiohttp took these too
        assert await client.text() == f'43{NAMESPACE},2["unmasked"]'.encode()
    finally:
        client.close()


async def test_bytes_sent_behind_the_handshake_are_not_lost(served):
    behind = client_frame(f"40{NAMESPACE},{{}}".encode()) + client_frame(echo_packet(3, "early"))
    client = await RawClient.connect(served.port, behind=behind)
    try:
        assert (await client.text()).startswith(b"0{")
        assert (await client.text()).startswith(f"40{NAMESPACE},".encode())
        assert await client.text() == f'43{NAMESPACE},3["early"]'.encode()
    finally:
        client.close()


async def test_a_client_close_is_answered_with_its_code(served):
    client = await RawClient.connect(served.port)
    try:
        await client.join()
        client.send(struct.pack("!H", 4001) + b"bye", opcode=0x8)
        assert await client.close_code() == 4001
        assert await client.ended()
    finally:
        client.close()
    # the session's Engine.IO socket is closed and forgotten (in a task of its own)
    await async_wait_until(lambda: served.engine.sio.eio.sockets == {}, timeout=1.0,
                           what="the closed session's Engine.IO socket forgotten")


@pytest.mark.parametrize(("frame", "code"), [
    (client_frame(b"x", rsv=0x20), 1002),  # RSV2: no extension defines it
    (client_frame(b"x", opcode=0x3), 1002),  # a reserved opcode
    (client_frame(b"x", opcode=0x9, fin=False), 1002),  # a fragmented control frame
    (client_frame(b"x" * 126, opcode=0x9), 1002),  # a control frame over 125 bytes
    (client_frame(b"x", opcode=0x0), 1002),  # a continuation of nothing
    (client_frame(b"\x03", opcode=0x8), 1002),  # a close frame of one byte
    (client_frame(struct.pack("!H", 1005), opcode=0x8), 1002),  # a code never sent
    (client_frame(struct.pack("!H", 1000) + b"\xff", opcode=0x8), 1007),  # reason not UTF-8
    (client_frame(b"x" * (MAX_PACKET + 1)), 1009),
    # only a header announcing 1 GB: refused from the header, nothing is buffered
    (struct.pack("!BBQ", 0x81, 0xFF, 2**30), 1009),
], ids=["rsv2", "opcode", "fragmented-control", "long-control", "stray-continuation",
        "short-close", "close-1005", "close-reason", "too-big", "too-big-header"])
async def test_frames_the_rfc_forbids_close_with_its_code(served, frame, code):
    client = await RawClient.connect(served.port)
    try:
        await client.join()
        client.writer.write(frame)
        assert await client.close_code() == code
        assert await client.ended()
    finally:
        client.close()


async def test_compressed_frames_where_deflate_was_not_agreed_are_refused(served):
    client = await RawClient.connect(served.port)  # offers no deflate
    try:
        assert "permessage-deflate" not in client.head
        await client.join()
        client.send(b"x", rsv=0x40)
        assert await client.close_code() == 1002
    finally:
        client.close()


def deflated(payload: bytes, compressor: Any) -> bytes:
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4]  # without the 00 00 ff ff tail (RFC 7692 7.2.1)


async def test_deflate_is_agreed_only_when_configured_and_inflated_both_ways(served):
    compression = served.engine.delivery.settings.websocket_compression
    client = await RawClient.connect(served.port, extensions="permessage-deflate; "
                                                             "client_max_window_bits")
    try:
        agreed = "permessage-deflate" in client.head.lower()
        assert agreed is compression
        await client.join()
        if not agreed:
            return
        compressor = zlib.compressobj(wbits=-15)
        for i, text in enumerate(["first " * 50, "second " * 50]):  # the context carries on
            client.send(deflated(echo_packet(10 + i, text), compressor), rsv=0x40)
            assert await client.text() == f'43{NAMESPACE},{10 + i}["{text}"]'.encode()
        # inflating past node.max_packet_bytes is refused like a frame that long
        bomb = deflated(echo_packet(12, "z" * (MAX_PACKET * 4)), compressor)
        assert len(bomb) < MAX_PACKET
        client.send(bomb, rsv=0x40)
        assert await client.close_code() == 1009
    finally:
        client.close()


async def test_aiohttp_client_with_compression_talks_to_the_engine(served):
    """A real client library: aiohttp compresses what it sends once deflate is agreed, and
    inflates the node's compressed queued frames (the OPEN packet is one)."""
    url = f"ws://127.0.0.1:{served.port}{PATH}/?EIO=4&transport=websocket"
    async with aiohttp.ClientSession() as session, session.ws_connect(url, compress=15) as ws:
        opening = await ws.receive(timeout=EVENT_TIMEOUT)
        assert opening.data.startswith("0{")
        assert bool(ws.compress) is served.engine.delivery.settings.websocket_compression
        await ws.send_str(f"40{NAMESPACE},{{}}")
        assert (await ws.receive(timeout=EVENT_TIMEOUT)).data.startswith(f"40{NAMESPACE},")
        await ws.send_str(echo_packet(5, "over aiohttp " * 20).decode())
        for _ in range(5):
            msg = await ws.receive(timeout=EVENT_TIMEOUT)
            if msg.data == "2":
                await ws.send_str("3")
                continue
            break
        assert msg.data == f'43{NAMESPACE},5["{"over aiohttp " * 20}"]'
        await ws.close()
        assert ws.close_code == 1000


@pytest.mark.parametrize("key", ["not base64!", base64.b64encode(b"short").decode()])
async def test_a_bad_handshake_gets_400_and_leaves_no_session(served, key):
    client = await RawClient.connect(served.port, key=key)
    assert client.head.startswith("HTTP/1.1 400"), client.head
    client.close()
    await async_wait_until(lambda: served.engine.sio.eio.sockets == {}, timeout=1.0,
                           what="the refused session's Engine.IO socket forgotten")
