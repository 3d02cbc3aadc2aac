"""One chat node: the public aiohttp app with its Socket.IO server, and its lifecycle.

The public listener serves SPEC sections 2-4 for instance N; the internal listener
(``internal.py``) answers peers. ``run_node`` wires both, handles SIGTERM/SIGINT by draining,
and returns the process exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import re
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import socketio
from aiohttp import web
from socketio import packet as sio_packet
from socketio.exceptions import ConnectionRefusedError as SioRefused

from shardchat import listener, urls
from shardchat.cluster.placement import NoCapacity, Placer, Refused
from shardchat.config import Config
from shardchat.http_errors import json_error
from shardchat.node import gctune, idempotency, internal, ratelimit, shutdown, transport
from shardchat.node.clientaddr import ClientAddresses
from shardchat.node.fanout import Fanout
from shardchat.node.inbound import UNAVAILABLE, BoundedJson, Inbound, packet_head
from shardchat.node.limits import Refusal, check_room_name
from shardchat.node.rooms import RoomService
from shardchat.node.store import Store, StoreError

log = logging.getLogger("shardchat.node")

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
CLIENT_JS_ENV = "SHARDCHAT_CLIENT_JS"
CLIENT_JS_REL = Path("node_modules/socket.io-client/dist/socket.io.min.js")


# Security headers on every answer (``security_headers``). The pages load only their own
# scripts, styles and images (no inline script or style, no data: URLs) and talk only to
# their own origin: fetch for the API, Socket.IO over long-polling and WebSocket. CSP 3
# lets 'self' match ws:/wss: of the same host, but not every browser in use does, so the
# page's own host is named for WebSockets as well. Anything that is not a page gets a policy
# that allows nothing. The room URL carries its invite in ``?invite=`` until the page takes
# it out of the address bar, so no Referer is ever sent: not to our own assets, not to a
# site a person follows a link to.
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
               "connect-src 'self'{sockets}; object-src 'none'; base-uri 'none'; "
               "form-action 'self'; frame-ancestors 'none'")
OTHER_POLICY = "default-src 'none'; frame-ancestors 'none'"
COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                  "X-Frame-Options": "DENY"}
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
                   r"(?::\d{1,5})?")


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: CSP, nosniff, no Referer, no framing (see above)."""
    if isinstance(response, web.WebSocketResponse):
        return  # a 101 switch: nothing of it is rendered
    headers = response.headers
    for name, value in COMMON_HEADERS.items():
        headers.setdefault(name, value)
    if "Content-Security-Policy" in headers:
        return
    if response.content_type == "text/html":
        host = request.headers.get("Host", "")
        sockets = f" ws://{host} wss://{host}" if _HOST.fullmatch(host) else ""
        headers["Content-Security-Policy"] = PAGE_POLICY.format(sockets=sockets)
    else:
        headers["Content-Security-Policy"] = OTHER_POLICY


def find_client_js() -> Path | None:
    """The official socket.io-client build, installed by npm at set-up (never in git)."""
    if os.environ.get(CLIENT_JS_ENV):
        return Path(os.environ[CLIENT_JS_ENV])
    for base in (Path.cwd(), *Path(__file__).resolve().parents):
        candidate = base / CLIENT_JS_REL
        if candidate.is_file():
            return candidate
    return None


class NodeSocketServer(socketio.AsyncServer):
    """AsyncServer with a hook that runs once a namespace CONNECT has been sent.

    The ``welcome`` must follow the CONNECT packet, and python-socketio sends CONNECT only
    after the connect handler returns; this hook is the first moment the client is in.
    """

    on_connected: Any = None
    direct_send: Any = None  # Fanout.send_packet: one packet straight to an idle websocket

    async def _send_packet(self, eio_sid, pkt):
        """CONNECT, CONNECT_ERROR, DISCONNECT, ACK: through the fan-out's direct path (it
        falls back to the Engine.IO queue itself; binary packets are left to us)."""
        if self.direct_send is None or not await self.direct_send(eio_sid, pkt):
            await super()._send_packet(eio_sid, pkt)

    # Event names a client may not send. ``connect``/``disconnect``: python-socketio would
    # run the node's own lifecycle handler for them, so one client could make its room
    # announce a leave (and drop it from the member list) while it stays connected. ``*``:
    # it would match the catch-all handler by name, which then gets its arguments shifted.
    refused_events = frozenset({"connect", "disconnect", "*"})

    async def _handle_event(self, eio_sid, namespace, id, data):
        """Refuse the ``refused_events`` with a ``bad_request`` ack; hand the rest on."""
        if data and data[0] in self.refused_events:
            ns = namespace or "/"
            sid = self.manager.sid_from_eio_sid(eio_sid, ns)
            if id is not None and sid is not None and self.manager.is_connected(sid, ns):
                refusal = {"ok": False, "error": "bad_request",
                           "message": f"{data[0]!r} is not an event a client may send: "
                                      "use message, typing or history."}
                await self._send_packet(eio_sid, self.packet_class(
                    socketio.packet.ACK, namespace=ns, id=id, data=[refusal]))
            return
        await super()._handle_event(eio_sid, namespace, id, data)

    async def _handle_connect(self, eio_sid, namespace, data):
        await super()._handle_connect(eio_sid, namespace, data)
        ns = namespace or "/"
        sid = self.manager.sid_from_eio_sid(eio_sid, ns)
        if sid is not None and self.manager.is_connected(sid, ns) and self.on_connected:
            try:
                await self.on_connected(ns, sid)
            except Exception:
                log.exception("welcoming %s to %s failed", sid, ns)
                await self.refuse_connected(sid, ns, JOIN_FAILED)

    async def refuse_connected(self, sid: str, namespace: str, refusal: Refusal) -> None:
        """Refuse a join after its CONNECT went out (the welcome could not be built):
        CONNECT_ERROR with the refusal's code, then the namespace is closed. Both official
        clients treat a CONNECT_ERROR as the end of that namespace whenever it comes."""
        eio_sid = self.manager.eio_sid_from_sid(sid, namespace)
        if eio_sid is not None:
            with contextlib.suppress(Exception):
                await self._send_packet(eio_sid, self.packet_class(
                    sio_packet.CONNECT_ERROR, namespace=namespace,
                    data=refusal.connect_error()))
        with contextlib.suppress(Exception):
            await self.disconnect(sid, namespace=namespace)

    async def _handle_eio_message(self, eio_sid, data):
        """python-socketio's packet dispatch, but a packet it cannot read is answered."""
        try:
            await super()._handle_eio_message(eio_sid, data)
        except Exception as exc:
            await self._unreadable(eio_sid, data, exc)

    async def _unreadable(self, eio_sid: str, data: Any, exc: Exception) -> None:
        """Answer what can be answered of a packet that failed to decode (see inbound.py):
        a CONNECT gets CONNECT_ERROR ``bad_request``, an EVENT with an ack id an ack
        ``bad_request``; anything else is dropped. The connection stays up."""
        head = packet_head(data) if isinstance(data, str | bytes) else None
        log.info("unreadable Socket.IO packet from %s (%s): %s", eio_sid,
                 exc.__class__.__name__, "answered bad_request" if head else "dropped")
        if head is None:
            return
        kind, namespace, ack_id = head
        if kind == sio_packet.CONNECT:
            await self._send_packet(eio_sid, self.packet_class(
                sio_packet.CONNECT_ERROR, namespace=namespace,
                data=UNREADABLE_CONNECT.connect_error()))
            return
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
        if ack_id is None or sid is None or not self.manager.is_connected(sid, namespace):
            return
        await self._send_packet(eio_sid, self.packet_class(
            sio_packet.ACK, namespace=namespace, id=ack_id, data=[UNREADABLE_EVENT.ack()]))


UNREADABLE_EVENT = Refusal("bad_request", "The event could not be read: its JSON is malformed "
                           "or nested too deeply. Send a flat object such as {\"text\": \"hi\"}.")
UNREADABLE_CONNECT = Refusal("bad_request", "The connect request could not be read: its auth "
                             "JSON is malformed or nested too deeply. Send {\"name\": \"...\"}.")
JOIN_FAILED = Refusal("unavailable", "The server could not let you into this room right now; "
                      "try again in a moment.")


def answers_errors(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """An event handler that never raises: a bug or an unexpected failure is logged once,
    with its traceback, and the client gets an ``unavailable`` ack instead of silence."""

    @functools.wraps(handler)
    async def run(*args: Any) -> Any:
        try:
            return await handler(*args)
        except Exception:
            log.exception("the %s handler failed", handler.__name__)
            return dict(UNAVAILABLE)

    return run


class Node:
    """Everything of instance N inside one process."""

    def __init__(self, cfg: Config, number: int):
        self.cfg = cfg
        self.number = number
        self.settings = cfg.node
        self.instance = cfg.instance(number)
        self.store = Store(cfg.instance_data_dir(number), retention=cfg.node.history_retention,
                           fsync=cfg.node.fsync, max_recovery=cfg.node.max_recovery,
                           prune_interval=cfg.node.prune_interval)
        self.sio = NodeSocketServer(
            async_mode="aiohttp", namespaces="*",
            ping_interval=cfg.node.ping_interval, ping_timeout=cfg.node.ping_timeout,
            max_http_buffer_size=cfg.node.max_packet_bytes, json=BoundedJson,
            cors_allowed_origins=None, logger=False, engineio_logger=False)
        self.fanout = Fanout(self.sio, cfg.node)
        self.inbound = Inbound(self.sio, self.fanout)
        transport.install(self.sio, cfg.node.websocket_compression, self.fanout, self.inbound)
        self.sio.direct_send = self.fanout.send_packet
        self.rooms = RoomService(cfg, number, self.store, self.fanout)
        self.addresses = ClientAddresses(cfg.node.trusted_proxies)
        self.keyed = idempotency.KeyedCreations(self.store, self.rooms)
        self.placer: Any = None
        self.eio_path = urls.socketio_path(number)
        self.closing = False  # past the grace period: sockets are being closed
        self.runners: list[web.AppRunner] = []  # public, internal
        self.step = "serving"  # the shutdown step under way, for the watchdog's log
        self.store_closed = False
        self._register_events()

    # -- LocalNode protocol (used by placement) ------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"instance": self.number, "connections": self.rooms.connection_count(),
                "rooms": self.store.room_count(), "draining": self.rooms.draining}

    async def create_room(self, name: str, private: bool,
                          key: str | None = None) -> dict[str, Any]:
        if key is None:
            return await self.rooms.create_room(name, private)
        return await self.keyed.create(key, name, private)

    async def find_keyed_room(self, key: str) -> dict[str, Any] | None:
        """This node's room created under Idempotency-Key ``key``, with its fingerprint."""
        return await self.keyed.find(key)

    def metrics(self) -> dict[str, Any]:
        """Internal counters (``GET /internal/metrics``): where the work goes."""
        return {"instance": self.number, "store": self.store.stats(),
                "fanout": self.fanout.stats(), "inbound": self.inbound.stats(),
                "rate_limits": self.rooms.limiter.stats(),
                "gc": gctune.WATCH.stats()}

    @property
    def draining(self) -> bool:
        return self.rooms.draining

    # -- Socket.IO ----------------------------------------------------------------------

    def _register_events(self) -> None:
        sio, rooms, addresses = self.sio, self.rooms, self.addresses

        @sio.on("connect", namespace="*")
        async def connect(namespace, sid, environ, auth=None):
            try:
                rooms.admit(namespace, sid, auth, addresses.of_environ(environ))
            except SioRefused:
                raise
            except Exception:  # a bug must still answer the join, not leave it hanging
                log.exception("admitting %s to %s failed", sid, namespace)
                raise SioRefused(JOIN_FAILED.message, {"code": JOIN_FAILED.code}) from None

        @sio.on("disconnect", namespace="*")
        async def disconnect(namespace, sid, reason=None):
            try:
                await rooms.disconnected(namespace, sid)
            except Exception:
                log.exception("cleaning up after %s left %s failed", sid, namespace)

        @sio.on("message", namespace="*")
        @answers_errors
        async def message(namespace, sid, data=None, *_):
            return await rooms.message(namespace, sid, data)

        @sio.on("typing", namespace="*")
        @answers_errors
        async def typing(namespace, sid, data=None, *_):
            await rooms.typing(namespace, sid, data)

        @sio.on("history", namespace="*")
        @answers_errors
        async def history(namespace, sid, data=None, *_):
            return await rooms.history(namespace, sid, data)

        @sio.on("*", namespace="*")
        @answers_errors
        async def unknown(event, namespace, sid, *args):
            log.debug("ignored unknown event %r on %s", event, namespace)
            return {"ok": False, "error": "bad_request",
                    "message": f"Unknown event {event!r}: use message, typing or history."}

        sio.on_connected = rooms.connected

    # -- HTTP ---------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        # Engine.IO polling POSTs may carry up to max_packet_bytes; the API checks its own
        # (smaller) limit on the body it reads.
        app = web.Application(client_max_size=max(self.settings.max_body_bytes,
                                                   self.settings.max_packet_bytes) + 1024,
                              middlewares=[self._guard])
        app.on_response_prepare.append(security_headers)
        self.sio.attach(app, socketio_path=self.eio_path)
        n = self.number
        r = app.router
        r.add_get("/", self._landing)
        r.add_get("/healthz", self._healthz)
        r.add_get(urls.healthz_path(n), self._healthz)
        r.add_post("/api/rooms", self._api_create_room)
        r.add_get(urls.room_path(n, "{room_id}"), self._room_page)
        for base in ("/static", urls.static_prefix(n)):
            r.add_get(base + "/vendor/socket.io.min.js", self._client_js)
            r.add_static(base, WEB_DIR / "static", append_version=False)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """Refuse what must not reach a handler, and answer HTTP errors in JSON.

        One middleware rather than two: every open WebSocket keeps the whole middleware
        chain suspended for its lifetime, so each extra layer costs memory per connection."""
        refusal = self._refuse(request)
        if refusal is not None:
            return refusal
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400 or exc.content_type == "application/json":
                raise
            codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
            return json_error(exc.status, codes.get(exc.status, "error"),
                              exc.reason + f": {request.method} {request.path}")
        except Exception:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                raise  # the socket may be open already: no HTTP answer can follow
            log.exception("%s %s failed", request.method, request.path)
            return json_error(500, "internal_error", "The server failed to answer this "
                              "request; try again, and if it keeps failing tell its operator.")

    def _refuse(self, request: web.Request) -> web.Response | None:
        """Over-size polling payloads (413), handshakes while closing (503), and requests
        for another instance's prefix: a routing mistake, said as such (421)."""
        if request.path.rstrip("/") == self.eio_path:
            if (request.method == "POST" and request.content_length is not None
                    and request.content_length > self.settings.max_packet_bytes):
                # Engine.IO would refuse the payload and then wait on a long-poll that never
                # comes; answer at once instead.
                return json_error(413, "too_large", f"The long-polling payload is larger than "
                                  f"{self.settings.max_packet_bytes} bytes "
                                  "(node.max_packet_bytes).")
            closed = self._closed_session(request.query.get("sid"))
            if closed is not None:
                return closed
            if self.closing and "sid" not in request.query:
                # A new Engine.IO session. During the drain grace period it is accepted, so
                # its room connect gets the ``draining`` refusal; once the node is closing it
                # is refused outright, so fresh sockets cannot hold the shutdown open.
                return json_error(503, "draining", f"Instance {self.number} is shutting "
                                  "down; reconnect in a few seconds.")
        other = urls.instance_of_path(request.path)
        if other is not None and other != self.number:
            return json_error(421, "wrong_instance",
                              f"{request.path} belongs to instance {other}, but this is "
                              f"instance {self.number}: the load balancer rule for "
                              f"{urls.path_pattern(other)} must point at instance {other}.",
                              instance=self.number, requested_instance=other)
        return None

    def _closed_session(self, sid: str | None) -> web.Response | None:
        """A long-polling request for an Engine.IO session that has closed (the client sent
        CLOSE, or was disconnected) while a late POST was on its way: engineio's POST path
        raises on it and aiohttp would answer a plain-text 500. Say what happened instead,
        and forget the session as engineio's own lookup would."""
        if sid is None:
            return None
        sockets = self.sio.eio.sockets
        sock = sockets.get(sid)
        if sock is None or not sock.closed:
            return None
        sockets.pop(sid, None)
        return json_error(400, "bad_request", "This Engine.IO session is closed; open a new "
                          "connection.")

    async def _healthz(self, request: web.Request) -> web.Response:
        status = "draining" if self.rooms.draining else "ok"
        return web.json_response({"instance": self.number, "status": status},
                                 status=503 if self.rooms.draining else 200)

    async def _landing(self, request: web.Request) -> web.StreamResponse:
        return _html(WEB_DIR / "index.html")

    async def _room_page(self, request: web.Request) -> web.StreamResponse:
        room_id = request.match_info["room_id"]
        if not urls.valid_room_id(room_id) or self.store.get_room(room_id) is None:
            return json_error(404, "not_found", f"There is no room {room_id!r} on instance "
                              f"{self.number}: check the link, or create a new room at /.")
        return _html(WEB_DIR / "room.html")

    async def _client_js(self, request: web.Request) -> web.StreamResponse:
        path = find_client_js()
        if path is None:
            return json_error(500, "missing_client", "socket.io-client is not installed: run "
                              "`npm ci` (make install) in the project directory.")
        return web.FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})

    async def _api_create_room(self, request: web.Request) -> web.Response:
        key, refusal = read_creation_key(request)
        if refusal:
            return refusal
        body, refusal = await read_room_request(request, self.settings.max_body_bytes)
        if refusal:
            return refusal
        limited = self.rooms.limiter.take("rooms", address=self.addresses.of_request(request))
        if limited:
            return rate_limited_response(limited, self.settings.rate_limit_window)
        try:
            room = await self.placer.create_room(body["name"].strip(), body["private"], key)
        except Refused as exc:
            return json_error(exc.status, exc.code, exc.message)
        except NoCapacity as exc:
            return json_error(503, "no_capacity", str(exc) or "No instance can take a new room "
                              "right now (all are down or draining); try again shortly.")
        except idempotency.IdempotencyConflict as exc:
            return json_error(422, exc.code, str(exc))
        return web.json_response(room, status=201)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, start placement and both listeners."""
        await self.store.open()
        self.placer = Placer(self.cfg, self)
        await self.placer.start()
        inst = self.instance
        self.runners = [
            web.AppRunner(self.build_app(), access_log=None, handle_signals=False,
                          shutdown_timeout=shutdown.HTTP_TIMEOUT),
            web.AppRunner(internal.build_app(self.cfg, self), access_log=None,
                          handle_signals=False, shutdown_timeout=shutdown.HTTP_TIMEOUT)]
        for runner in self.runners:
            await runner.setup()
        public, private = self.runners
        timeouts = listener.ListenerTimeouts.from_config(self.cfg)  # header and idle bounds
        await listener.start_site(private, inst.host, inst.internal_port, timeouts)
        await listener.start_site(public, inst.host, inst.port, timeouts)

    async def drain(self, hurry: asyncio.Event | None = None) -> int:
        """Stop taking rooms and connections, let in-flight messages commit, close every
        session so that its client reconnects, stop the listeners, flush the store.

        Each step has its own bound (``shutdown.run_step``), and the whole stop after the
        grace period has ``SHUTDOWN_LIMIT`` (``shutdown.Watchdog``). Returns the exit code:
        0 once the store is flushed and closed, whatever else overran."""
        self.rooms.draining = True
        grace = self.settings.drain_grace_seconds
        log.info("instance %d draining: health answers 503 for %g s, then clients are "
                 "closed", self.number, grace)
        await self._grace(grace, hurry)
        watchdog = shutdown.Watchdog(shutdown.SHUTDOWN_LIMIT, self.open_state,
                                     lambda: 0 if self.store_closed else 1)
        watchdog.arm()
        public, private = self.runners
        steps = [
            ("in-flight messages", lambda: self.rooms.wait_idle(timeout=shutdown.IDLE_TIMEOUT),
             shutdown.IDLE_TIMEOUT + 1),
            ("closing sessions", self._close_sessions, shutdown.CLOSE_TIMEOUT + 1),
            ("public listener", public.cleanup, shutdown.LISTENER_TIMEOUT),
            ("internal listener", private.cleanup, shutdown.LISTENER_TIMEOUT),
            ("placement", self.placer.close, shutdown.PEERS_TIMEOUT),
            ("engine", self.sio.shutdown, shutdown.ENGINE_TIMEOUT),
            ("flushing the store", self.store.close, shutdown.STORE_TIMEOUT),
        ]
        finished = False
        for name, work, timeout in steps:
            self.step = name
            finished = await shutdown.run_step(name, work(), timeout)
        self.store_closed = finished  # the store is the last step
        self.step = "exiting"
        return 0 if self.store_closed else 1

    async def _close_sessions(self) -> None:
        """Refuse new Engine.IO sessions, then end every open one so its client reconnects
        (to this node once it is back, or wherever the load balancer sends it)."""
        self.closing = True
        counts = await transport.close_sessions(self.sio.eio, self.fanout,
                                                shutdown.CLOSE_TIMEOUT)
        log.info("instance %d closed its sessions: %s", self.number, counts)

    async def _grace(self, seconds: float, hurry: asyncio.Event | None) -> None:
        """Answer 503 on health for ``seconds`` so the load balancer stops sending new
        connections here, while the members go on chatting; a second signal ends it early."""
        if hurry is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), seconds)

    def open_state(self) -> str:
        """What a stop is still waiting on, for the watchdog's log line (read-only: it runs
        on the watchdog's thread)."""
        sessions = [s for s in list(self.sio.eio.sockets.values()) if not s.closed]
        websockets = len(self.fanout._ws)
        connections = sum(len(r.server.connections) for r in self.runners
                          if r.server is not None)
        return (f"step {self.step!r}; {len(sessions)} Engine.IO sessions ({websockets} on "
                f"websocket), {connections} HTTP connections, store "
                f"{'closed' if self.store_closed else 'not closed'}")


def rate_limited_response(limited: ratelimit.Limited, window: float) -> web.Response:
    """429 ``rate_limited``, with the wait both in the JSON and as ``Retry-After``."""
    refused = ratelimit.refusal(limited, window)
    response = json_error(429, refused.code, refused.message, retry_after=refused.retry_after)
    response.headers["Retry-After"] = str(max(1, math.ceil(refused.retry_after)))
    return response


async def read_room_request(request: web.Request, max_bytes: int
                            ) -> tuple[dict | None, web.Response | None]:
    """Read and validate a create-room body (public API and internal call alike)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raw = None
    if raw is None or len(raw) > max_bytes:
        return None, json_error(413, "too_large", f"The request body is larger than "
                                f"{max_bytes} bytes (node.max_body_bytes).")
    return parse_room_request(raw)


def read_creation_key(request: web.Request) -> tuple[str | None, web.Response | None]:
    """The request's Idempotency-Key (None when it has none), or a 400 for a bad one."""
    key = request.headers.get(idempotency.HEADER)
    bad = idempotency.check_key(key)
    return (None, json_error(400, bad.code, bad.message)) if bad else (key, None)


def parse_room_request(raw: bytes) -> tuple[dict | None, web.Response | None]:
    """Validate a POST /api/rooms body; returns (body, None) or (None, error response)."""
    try:
        body = json.loads(raw or b"null")
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json goes
        return None, json_error(400, "bad_request", 'The body must be JSON, e.g. '
                                '{"name": "Team chat", "private": false}.')
    if not isinstance(body, dict):
        return None, json_error(400, "bad_request", 'The body must be a JSON object with '
                                '"name" and optionally "private".')
    bad = check_room_name(body.get("name"))
    if bad:
        return None, json_error(400, bad.code, bad.message)
    private = body.get("private", False)
    if not isinstance(private, bool):
        return None, json_error(400, "bad_request", '"private" must be true or false.')
    return {"name": body["name"], "private": private}, None


def _html(path: Path) -> web.StreamResponse:
    if not path.is_file():
        return json_error(500, "missing_page", f"{path.name} is missing from the install.")
    return web.FileResponse(path, headers={"Content-Type": "text/html; charset=utf-8",
                                           "Cache-Control": "no-cache"})


class StopRequest:
    """Why and how urgently the node stops: the first SIGTERM/SIGINT begins the drain, a
    second one cuts the grace period short. SIGHUP (the parent-death signal, or a closed
    terminal) and a parent found gone begin it too, but never hurry it: the kernel may send
    the parent-death signal more than once."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.hurry = asyncio.Event()

    def __call__(self, why: str, can_hurry: bool = True) -> None:
        if not self.requested.is_set():
            log.info("stopping: %s", why)
            self.requested.set()
        elif can_hurry and not self.hurry.is_set():
            log.info("%s again: skipping the rest of the grace period", why)
            self.hurry.set()


async def serve(cfg: Config, number: int) -> int:
    """Run node N until SIGTERM/SIGINT (or its supervisor is gone); drain and return the
    exit code (0 after a clean drain). A store that cannot be opened (damaged, or in use by
    another process) is one logged line and exit code 1."""
    node = Node(cfg, number)
    try:
        await node.start()  # opens the store before anything listens
    except StoreError as exc:  # damaged, locked by another process, or unwritable
        log.error("instance %d cannot start: %s", number, exc)
        return 1
    tuned = os.environ.get("SHARDCHAT_GC_TUNE", "1") != "0"
    gctune.install(tune=tuned)
    sweeper = asyncio.create_task(gctune.sweep_old(), name="gc-sweep") if tuned else None
    inst = node.instance
    log.info("instance %d serving http://%s:%d%s/ (internal port %d)", number, inst.host,
             inst.port, urls.prefix(number), inst.internal_port)
    stop = StopRequest()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, signal.Signals(sig).name)
    loop.add_signal_handler(signal.SIGHUP, stop, "SIGHUP", False)
    parent = shutdown.expected_parent()
    watcher = None
    if parent is not None:
        watcher = asyncio.create_task(
            shutdown.watch_parent(parent, lambda why: stop(why, False)), name="parent")
    await stop.requested.wait()
    for task in (watcher, sweeper):
        if task is not None:
            task.cancel()
    code = await node.drain(stop.hurry)
    if code == 0:
        log.info("instance %d stopped cleanly", number)
    else:
        log.error("instance %d stopped, but its store could not be closed in time", number)
    return code


def run_node(cfg: Config, number: int) -> int:
    logging.basicConfig(level=cfg.node.log_level.upper(),
                        format=f"%(asctime)s i{number} %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    return runner(serve(cfg, number))
