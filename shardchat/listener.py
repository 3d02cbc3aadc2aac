"""HTTP listeners with a header timeout and an idle timeout (public, internal, router).

aiohttp bounds how long an idle keep-alive connection may stay open (``keepalive_timeout``),
but it has no timeout for *reading a request's headers*: a client that sends one header byte
every few seconds keeps its socket, and its slot in the server, for as long as it likes
(slowloris). Thousands of such sockets cost nothing to the client and file descriptors and
memory to the node. So every listener here uses ``GuardedRequestHandler``, aiohttp's own
request handler plus one timer per connection:

* ``header_timeout`` (``node.header_timeout``, 10 s): from the moment a connection is
  accepted, and on a kept-alive connection from the first byte of the next request, until
  that request's headers are complete. Past it the connection is closed (after a 408 JSON
  answer when some bytes of a request had arrived).
* ``idle_timeout`` (``node.idle_timeout``, 75 s): how long a kept-alive connection may wait,
  with nothing sent, for its next request (aiohttp's ``keepalive_timeout``). It must outlast
  the load balancer's own idle timeout (ALB: 60 s): the ALB reuses its connections to the
  target, and a target that closes first races the ALB's next request on that connection,
  which the client then sees as a 502.

Neither timer runs while a request is being handled, so a long-polling GET that waits for
``ping_interval`` seconds, a slow download or an upgraded WebSocket is never cut by them;
those have their own liveness (Socket.IO pings, the write buffer cap).

Every listener asks the kernel for a listen queue of ``LISTEN_BACKLOG`` (1,024) connections
instead of aiohttp's 128. A connection waits in that queue between the kernel's handshake
and the event loop's accept; when it is full the kernel drops the client's SYN and the
client's TCP tries again only after its 1 s retransmission timeout (then 3 s, 7 s ...). A
crowd arriving at once (the start of a large room, every member of a moved room rejoining,
a node's clients reconnecting after a restart) fills 128 places while the loop is busy
welcoming the first of them, and the rest then wait seconds for nothing. The kernel caps the
figure at ``net.core.somaxconn`` (4,096 on current Linux).

The handler reads three private attributes of aiohttp's ``RequestHandler`` (the queue of
parsed requests, the "request in progress" flag and the upgraded flag). ``check_aiohttp``
verifies they exist before the first listener starts, so an aiohttp upgrade that renames
them fails at start-up with a message, never silently.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from shardchat.config import Config

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024  # connections the kernel queues until accept; see the module docstring

_PRIVATE = ("_messages", "_request_in_progress", "_upgraded")
_TIMEOUT_BODY = json.dumps({
    "error": "request_timeout",
    "message": "The request's headers did not arrive in time; send the whole request at once.",
}).encode()
REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                   b"Connection: close\r\nContent-Length: "
                   + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY)


@dataclass(frozen=True)
class ListenerTimeouts:
    """The two bounds every listener applies; see the module docstring."""

    header: float = 10.0
    idle: float = 75.0

    @classmethod
    def from_config(cls, cfg: Config) -> ListenerTimeouts:
        return cls(header=cfg.node.header_timeout, idle=cfg.keepalive_timeout)


def check_aiohttp() -> None:
    """Fail loudly if this aiohttp no longer has what the header timer reads."""
    missing = [name for name in _PRIVATE if not hasattr(RequestHandler, name)]
    if missing:
        raise RuntimeError(f"this aiohttp ({', '.join(missing)} missing from RequestHandler) "
                           "is not supported by shardchat's header timeout; install the "
                           "aiohttp version pinned in pyproject.toml")


class GuardedRequestHandler(RequestHandler):
    """aiohttp's request handler with a per-connection header timer."""

    __slots__ = ("_header_bytes", "_header_timeout", "_header_timer")

    def __init__(self, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = False

    def _awaiting_headers(self) -> bool:
        """No request of this connection is parsed, being handled or upgraded."""
        return not (self._messages or self._request_in_progress or self._upgraded)

    def _arm(self) -> None:
        if self._header_timer is None and self._header_timeout > 0:
            loop = asyncio.get_running_loop()
            self._header_timer = loop.call_later(self._header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._header_bytes = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()  # the first request's headers are due from the moment of accept

    def data_received(self, data: bytes) -> None:
        if data and self._awaiting_headers():
            self._arm()
            self._header_bytes = True
        super().data_received(data)
        if not self._awaiting_headers():
            self._disarm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _expired(self) -> None:
        self._header_timer = None
        if not self._awaiting_headers() or self.transport is None:
            return
        peer = self.transport.get_extra_info("peername")
        log.info("closed a connection from %s: no complete request headers within %g s",
                 peer[0] if peer else "?", self._header_timeout)
        if self._header_bytes:
            self.transport.write(REQUEST_TIMEOUT)
        self.force_close()


class GuardedSite(web.BaseSite):
    """A TCP site (like ``web.TCPSite``) whose connections use ``GuardedRequestHandler``."""

    __slots__ = ("_host", "_port", "_timeouts")

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 timeouts: ListenerTimeouts) -> None:
        super().__init__(runner, backlog=LISTEN_BACKLOG)
        self._host, self._port, self._timeouts = host, port, timeouts

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        check_aiohttp()
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        timeouts = self._timeouts

        def handler() -> GuardedRequestHandler:
            return GuardedRequestHandler(server, loop=loop, access_log=None,
                                         keepalive_timeout=timeouts.idle,
                                         header_timeout=timeouts.header)

        self._server = await loop.create_server(handler, self._host, self._port,
                                                backlog=self._backlog, reuse_address=True)


async def start_site(runner: web.BaseRunner, host: str, port: int,
                     timeouts: ListenerTimeouts) -> GuardedSite:
    """Listen on host:port with ``timeouts``; ``runner`` must be set up."""
    site = GuardedSite(runner, host, port, timeouts)
    await site.start()
    return site
