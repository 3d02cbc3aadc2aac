"""Instance N's public listener: pages, ``POST /api/rooms``, health, and Socket.IO's paths.

Everything the load balancer sends to a node arrives here: the landing page and the room
pages, ``/api/rooms`` (validated here, then handed to the placer, which puts the room on the
least-loaded instance), the health checks, the static assets, and Engine.IO's
``/i<N>/socket.io/`` (attached to the Socket.IO server), and where rooms live now (the
lookup ``GET /api/rooms/<id>`` and the redirects of pages of rooms that moved or whose
instance is gone, ``node/lookup.py``). One middleware (``_guard``) refuses what must not
reach a handler and answers every HTTP error in JSON. The node is wired in
``node/main.py``; this module never imports the cluster: the placer and the directory are
handed in.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import socketio
from aiohttp import web

from shardchat import urls, whereabouts
from shardchat.config import NodeSettings
from shardchat.http_errors import json_error
from shardchat.internal_api import CreationFailed, read_creation_key, read_room_request
from shardchat.node import ratelimit
from shardchat.node.clientaddr import ClientAddresses
from shardchat.node.lookup import LookupRoutes, RoomFinder, not_here, redirect
from shardchat.node.rooms import RoomService
from shardchat.node.store import Store

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


class RoomPlacer(Protocol):
    """Where ``POST /api/rooms`` goes once it is valid (``cluster/placement.py``'s Placer):
    a room on the best instance, or a ``CreationFailed`` that says why not."""

    async def create_room(self, name: str, private: bool,
                          key: str | None = None) -> dict[str, Any]: ...


class PublicApp:
    """The routes of instance N's public listener, over the node's parts."""

    def __init__(self, settings: NodeSettings, number: int, sio: socketio.AsyncServer,
                 store: Store, rooms: RoomService, addresses: ClientAddresses,
                 placer: RoomPlacer, finder: RoomFinder,
                 room_state: Callable[[str], dict[str, Any] | None]) -> None:
        self.settings = settings
        self.number = number
        self.sio = sio
        self.store = store
        self.rooms = rooms
        self.addresses = addresses
        self.placer = placer
        self.room_state = room_state  # what this node is to a room (owner, forwarded, ...)
        self.lookups = LookupRoutes(finder, rooms.limiter, addresses, functools.partial(
            rate_limited_response, window=settings.rate_limit_window))
        self.eio_path = urls.socketio_path(number)
        self.closing = False  # the node is closing its sessions: no new Engine.IO ones

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
        r.add_get("/api/rooms/{room_id:.*}", self.lookups.api)
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
        elsewhere = self._page_of_another_instance(request)
        if elsewhere is not None:
            return await self.lookups.page(request, elsewhere,
                                           lambda: self._misrouted(request, elsewhere.instance))
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
            return self._misrouted(request, other)
        return None

    def _misrouted(self, request: web.Request, other: int) -> web.Response:
        """421: a request for instance ``other``'s prefix reached this node."""
        if self.lookups.gone(other):
            why = (f"instance {other} is not part of this cluster (any more); a room that "
                   "lived there is found with GET /api/rooms/<room id>.")
        else:
            why = (f"the load balancer rule for {urls.path_pattern(other)} must point at "
                   f"instance {other}.")
        return json_error(421, "wrong_instance", f"{request.path} belongs to instance "
                          f"{other}, but this is instance {self.number}: {why}",
                          instance=self.number, requested_instance=other)

    def _page_of_another_instance(self, request: web.Request) -> urls.RoomAddress | None:
        """A GET of a room page under another instance's prefix: the load balancer's
        default rule sends those here when that instance is gone, and the node redirects
        them to where the room lives now (SPEC section 8); see ``LookupRoutes.page``."""
        if request.method not in ("GET", "HEAD"):
            return None
        address = urls.parse_room_namespace(request.path)
        return None if address is None or address.instance == self.number else address

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
        """The room's page; for a room that moved away from here, 308 to where it went
        (should it have moved on from there, that node redirects again, and so on)."""
        room_id = request.match_info["room_id"]
        state = self.room_state(room_id) if urls.valid_room_id(room_id) else None
        if state is None:  # unknown here: a mistyped link, not worth asking every peer
            return not_here(room_id, self.number)
        if state["state"] == whereabouts.FORWARDED:
            return redirect(request, urls.room_path(state["to"], room_id))
        return _html(WEB_DIR / "room.html")  # owner, or incoming: its socket is told to wait

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
        except CreationFailed as exc:  # no capacity, refused by peers, a reused key
            return exc.response()
        return web.json_response(room, status=201)


def rate_limited_response(limited: ratelimit.Limited, window: float) -> web.Response:
    """429 ``rate_limited``, with the wait both in the JSON and as ``Retry-After``."""
    refused = ratelimit.refusal(limited, window)
    response = json_error(429, refused.code, refused.message, retry_after=refused.retry_after)
    response.headers["Retry-After"] = str(max(1, math.ceil(refused.retry_after)))
    return response


def _html(path: Path) -> web.StreamResponse:
    if not path.is_file():
        return json_error(500, "missing_page", f"{path.name} is missing from the install.")
    return web.FileResponse(path, headers={"Content-Type": "text/html; charset=utf-8",
                                           "Cache-Control": "no-cache"})
