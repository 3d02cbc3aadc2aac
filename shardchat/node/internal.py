"""The internal listener: what peers ask of this node, behind the cluster secret.

It listens on ``internal_port``, which no load balancer ever targets, and every request must
carry ``Authorization: Bearer <cluster secret>`` (compared in constant time, as the bytes
that arrived: a header that is not UTF-8 is just a wrong secret). A wrong or missing secret
is answered 401 and logged with the caller's address. Every answer is JSON, an unexpected
error in a handler included (500 ``internal_error``). The paths, the secret check and the
room request are the peer contract (``shardchat/internal_api.py``), which the callers
(``cluster/peers.py``) import as well.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Protocol

from aiohttp import web

from shardchat import urls
from shardchat.config import Config
from shardchat.http_errors import json_error
from shardchat.internal_api import (
    ADMIN_PATH,
    AUTH_HEADER,
    DRAINED_PATH,
    KEYS_PATH,
    METRICS_PATH,
    PROMETHEUS_PATH,
    ROOM_LOAD_PATH,
    ROOM_STATE_PATH,
    ROOMS_PATH,
    STATS_PATH,
    CreationFailed,
    authorized,
    authorized_person,
    read_creation_key,
    read_room_request,
)
from shardchat.node import admin, prometheus
from shardchat.node.buckets import Buckets
from shardchat.node.loads import NodeLoads, chunks, row_json

log = logging.getLogger("shardchat.internal")


class PeerFacing(Protocol):
    """What the internal listener asks of its node (``node/main.py``'s ``Node``)."""

    number: int
    loads: NodeLoads

    @property
    def draining(self) -> bool: ...

    @property
    def drained(self) -> bool: ...

    def set_drained(self, drained: bool) -> None: ...

    def refuses_rooms(self) -> str | None:
        """Why this node takes no new room now (shutting down, drained), or None."""

    def stats(self) -> dict[str, Any]: ...

    def unreached_for(self, number: int) -> float:
        """Seconds since this node last reached instance ``number`` (0 while it does)."""

    def metrics(self) -> dict[str, Any]: ...

    def commit_seconds(self) -> Buckets: ...

    def peer_health(self) -> list[dict[str, Any]]: ...

    async def create_room(self, name: str, private: bool,
                          key: str | None = None) -> dict[str, Any]: ...

    async def find_keyed_room(self, key: str) -> dict[str, Any] | None: ...

    # what this node is to a room (``whereabouts.RoomState``'s JSON), None for nothing
    def room_state(self, room_id: str) -> dict[str, Any] | None: ...


def build_app(cfg: Config, node: PeerFacing) -> web.Application:
    secret = cfg.cluster.secret

    @web.middleware
    async def check_secret(request: web.Request, handler):
        given = request.headers.get(AUTH_HEADER)
        page = request.path == ADMIN_PATH or request.path.startswith(ADMIN_PATH + "/")
        if not (authorized(given, secret) or (page and authorized_person(given, secret))):
            log.warning("internal request %s %s from %s refused: wrong or missing secret",
                        request.method, request.path, request.remote)
            if page:  # a browser: have it ask the person for the secret
                resp = json_error(401, "unauthorized", "The ops page needs the cluster "
                                  "secret as the password (any user name).")
                resp.headers["WWW-Authenticate"] = 'Basic realm="shardchat ops", charset="UTF-8"'
                return resp
            return json_error(401, "unauthorized", "Internal calls need the cluster secret "
                              "(Authorization: Bearer ...).")
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("internal request %s %s failed", request.method, request.path)
            return json_error(500, "internal_error", "This node failed to answer; its log "
                              "has the details.")

    async def stats(request: web.Request) -> web.Response:
        """SPEC section 5's stats; asked by peer N (``?from=N``, its stats poll), also how
        long this node has not reached N, which N's lease reads (a cut one way only)."""
        body = node.stats()
        caller = request.query.get("from", "")
        if caller.isdigit() and int(caller) != node.number:
            body["unreached_for_caller"] = round(node.unreached_for(int(caller)), 3)
        return web.json_response(body)

    async def metrics(request: web.Request) -> web.Response:
        """Counters for operators and the benchmark: store commits and batches, fan-out
        paths, inbound fast events, garbage collections."""
        return web.json_response(node.metrics())

    registry = prometheus.registry_for(node)

    async def prometheus_metrics(request: web.Request) -> web.Response:
        """The same counters for Prometheus (``node/prometheus.py``), read at scrape time.
        On the loop, not in a thread: the counters it reads are the loop's (a few dozen
        families, well under a millisecond)."""
        body = prometheus.render(registry)
        return web.Response(body=body, headers={"Content-Type": prometheus.CONTENT_TYPE})

    async def create_room(request: web.Request) -> web.Response:
        """Create a room here; with an Idempotency-Key, the room already made under it."""
        refused = node.refuses_rooms()
        if refused is not None:
            return json_error(503, "draining", refused)
        key, refusal = read_creation_key(request)
        if refusal:
            return refusal
        body, refusal = await read_room_request(request, cfg.node.max_body_bytes)
        if refusal:
            return refusal
        try:
            room = await node.create_room(body["name"], body["private"], key)
        except CreationFailed as exc:  # the key made another room here: 422
            return exc.response()
        return web.json_response(room, status=201)

    async def keyed_room(request: web.Request) -> web.Response:
        """``{"room", "fingerprint"}`` of the room created here under the key, or 404."""
        found = await node.find_keyed_room(request.match_info["key"])
        if found is None:
            return json_error(404, "not_found", "No room was created here under that key.")
        return web.json_response(found)

    async def room_state(request: web.Request) -> web.Response:
        """What this node is to the room (``whereabouts.RoomState``: owner, forwarded,
        incoming), or 404 when it knows nothing of it. The directory asks this."""
        room_id = request.match_info["room_id"]
        if not urls.valid_room_id(room_id):
            return json_error(400, "bad_request", f"{room_id!r} is not a room id.")
        state = node.room_state(room_id)
        if state is None:
            return json_error(404, "not_found", f"Instance {node.number} knows no room "
                              f"{room_id!r}.")
        return web.json_response(state)

    async def list_rooms(request: web.Request) -> web.StreamResponse:
        """Every owned room with its load, streamed: ``{"instance", "rooms", "load",
        "active": [RoomLoad fields...], "idle": [room id, ...]}``. ``idle`` rooms have
        nobody connected and no numbers: each weighs the floor (``cluster/load.py``)."""
        active, idle = node.loads.listing()
        head = {"instance": node.number, "rooms": len(active) + len(idle),
                "load": node.stats().get("load"), "drained": node.drained}
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(json.dumps(head)[:-1].encode() + b', "active": '
                         + json.dumps([row_json(r) for r in active]).encode()
                         + b', "idle": [')
        for i, part in enumerate(chunks(idle)):
            text = json.dumps(list(part))[1:-1]
            await resp.write(((", " if i else "") + text).encode())
        await resp.write(b"]}")
        await resp.write_eof()
        return resp

    def _room_id(request: web.Request) -> str | None:
        room_id = request.match_info["room_id"]
        return room_id if urls.valid_room_id(room_id) else None

    async def room_load(request: web.Request) -> web.Response:
        """One owned room's load (RoomLoad fields), or 404 when it is not a room here."""
        room_id = _room_id(request)
        row = node.loads.room(room_id) if room_id else None
        if row is None:
            return json_error(404, "not_found", f"Instance {node.number} owns no room "
                              f"{request.match_info['room_id']!r}.")
        return web.json_response(row_json(row))

    async def restore_load(request: web.Request) -> web.Response:
        """``{"activity", "idle_seconds"}`` of a room that moved here: its old owner's
        numbers, so the load measured here is the one a rebalance planned with."""
        room_id = _room_id(request)
        try:
            body = await request.json()
        except ValueError:
            body = None
        values = [body.get(k) if isinstance(body, dict) else None
                  for k in ("activity", "idle_seconds")]
        if not all(isinstance(v, int | float) and not isinstance(v, bool)
                   and math.isfinite(v) and v >= 0 for v in values):
            return json_error(400, "bad_request", 'The body must be {"activity": <messages '
                              'per minute>, "idle_seconds": <seconds>}, numbers >= 0.')
        if room_id is None or not node.loads.restore(room_id, *values):
            return json_error(404, "not_found", f"Instance {node.number} owns no room "
                              f"{request.match_info['room_id']!r}.")
        return web.json_response({"room_id": room_id, "restored": True})

    async def drained(request: web.Request) -> web.Response:
        """``{"drained": bool}``: out of placement and of moves' targets, or back in."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        value = body.get("drained") if isinstance(body, dict) else None
        if not isinstance(value, bool):
            return json_error(400, "bad_request", 'The body must be {"drained": true} or '
                              '{"drained": false}.')
        node.set_drained(value)
        return web.json_response({"instance": node.number, "drained": node.drained,
                                  "rooms": node.stats()["rooms"]})

    app = web.Application(middlewares=[check_secret], client_max_size=cfg.node.max_body_bytes)
    app.router.add_get(ROOM_STATE_PATH, room_state)
    app.router.add_get(STATS_PATH, stats)
    app.router.add_post(ROOMS_PATH, create_room)
    app.router.add_get(ROOMS_PATH, list_rooms)
    app.router.add_get(ROOM_LOAD_PATH, room_load)
    app.router.add_post(ROOM_LOAD_PATH, restore_load)
    app.router.add_post(DRAINED_PATH, drained)
    app.router.add_get(METRICS_PATH, metrics)
    app.router.add_get(PROMETHEUS_PATH, prometheus_metrics)
    admin.add_routes(app, cfg, node)
    app.router.add_get(KEYS_PATH + "{key}", keyed_room)
    return app
