"""The WebSocket transport under Engine.IO, with compression under our control.

python-engineio's aiohttp driver builds ``WebSocketResponse()`` with aiohttp's default of
accepting permessage-deflate. Every browser offers it, and then aiohttp compresses every
frame for every recipient: a broadcast to 500 members would deflate the same bytes 500
times. We install our own driver class that turns compression off unless the config asks
for it (``node.websocket_compression``), and that exposes the response so the fast
broadcast path can write pre-built frames.
"""

from __future__ import annotations

import inspect
from typing import Any

from aiohttp.web import WebSocketResponse


def websocket_class(compress: bool) -> type:
    """An engineio-compatible aiohttp WebSocket wrapper class."""

    class NodeWebSocket:
        def __init__(self, handler: Any, server: Any):
            self.handler = handler
            self.server = server
            self._sock: WebSocketResponse | None = None

        async def __call__(self, environ: dict) -> WebSocketResponse:
            request = environ["aiohttp.request"]
            self._sock = WebSocketResponse(
                max_msg_size=self.server.max_http_buffer_size, compress=compress)
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
            if not isinstance(msg.data, (bytes, str)):
                raise OSError()
            return msg.data

    return NodeWebSocket


def install(sio: Any, compress: bool) -> None:
    """Replace the Engine.IO server's websocket driver with ours."""
    sio.eio._async = dict(sio.eio._async, websocket=websocket_class(compress))
