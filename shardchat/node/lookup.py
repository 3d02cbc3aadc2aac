"""The public side of "where does this room live now": the lookup API and page redirects.

* ``GET /api/rooms/<room_id>`` (default-routed, any node): the room's creation answer minus
  its invite, wherever it lives now (200), 404 ``not_found``, 503 ``unavailable``; 400 for
  something that is not a room id.
* ``GET /i<N>/room/<room_id>`` of another instance N (the load balancer's default rule
  brought it here because N is gone, or its rules are behind a change): 308 to the room's
  page where it lives now, query string kept (an invite link stays an invite link); the
  usual 404 when nobody has the room and N is gone; the 421 of a routing mistake when the
  room does live on N. (A room that moved away from this node is redirected by the page
  route itself, straight to its forward: no lookup needed.)

The finding itself is the cluster's (``cluster/directory.py``); this module only knows it as
a ``RoomFinder``. Every call that may ask the peers spends one of the client address's
``rate_limit_lookups``: a lookup costs the cluster one request per node, so it must not be
free to repeat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from aiohttp import web

from shardchat import urls
from shardchat.http_errors import json_error
from shardchat.node import ratelimit
from shardchat.whereabouts import Lookup

ROOM_ID_RULE = "room ids are 1 to 64 letters, digits, '-' or '_'"


class RoomFinder(Protocol):
    """Where rooms live (``cluster/directory.py``'s ``Directory``)."""

    def knows(self, instance: int) -> bool: ...

    async def find(self, room_id: str) -> Lookup: ...


class AddressOf(Protocol):
    def of_request(self, request: web.Request) -> str: ...


class LookupRoutes:
    """The lookup API and the redirects of one node."""

    def __init__(self, finder: RoomFinder, limiter: ratelimit.RateLimiter,
                 addresses: AddressOf, refuse: Callable[[ratelimit.Limited], web.Response]):
        self.finder = finder
        self._limiter = limiter
        self._addresses = addresses
        self._refuse = refuse  # the node's 429 answer

    def gone(self, instance: int) -> bool:
        """Instance ``instance`` is not part of the cluster (any more)."""
        return not self.finder.knows(instance)

    async def api(self, request: web.Request) -> web.Response:
        """``GET /api/rooms/<room_id>``."""
        room_id = request.match_info["room_id"]
        if not urls.valid_room_id(room_id):
            return json_error(400, "bad_request", f"{room_id[:80]!r} is not a room id: "
                              f"{ROOM_ID_RULE}, as in the room's link /i<N>/room/<id>.")
        found = await self._find(request, room_id)
        if isinstance(found, web.Response):
            return found
        if found.room is not None:
            return web.json_response(found.room, headers={"Cache-Control": "no-store"})
        return json_error(found.status, found.code, found.message)

    async def page(self, request: web.Request, address: urls.RoomAddress,
                   misrouted: Callable[[], web.Response]) -> web.Response:
        """The page of a room under another instance's prefix. The load balancer sends such
        a request here only by its default rule (the instance is gone, or the rules have not
        caught up with a change), or by mistake. 308 to where the room lives now when that
        is another instance; ``misrouted()`` (the 421) when it lives on the instance of the
        prefix, or nobody has it and that instance exists: then a rule points wrong; the
        usual 404 when nobody has it and the instance is gone."""
        found = await self._find(request, address.room_id)
        if isinstance(found, web.Response):
            return found
        if found.room is not None:
            if found.room["instance"] == address.instance:
                return misrouted()
            return redirect(request, found.room["path"])
        if found.status != 404:
            return json_error(found.status, found.code, found.message)
        return not_here(address.room_id, None) if self.gone(address.instance) else misrouted()

    async def _find(self, request: web.Request, room_id: str) -> Lookup | web.Response:
        limited = self._limiter.take("lookups", address=self._addresses.of_request(request))
        if limited:
            return self._refuse(limited)
        return await self.finder.find(room_id)


def not_here(room_id: str, instance: int | None) -> web.Response:
    """The 404 of a room page nobody serves (the same answer with or without a lookup)."""
    where = f" on instance {instance}" if instance is not None else ""
    return json_error(404, "not_found", f"There is no room {room_id[:80]!r}{where}: check the "
                      "link, or create a new room at /.")


def redirect(request: web.Request, path: str) -> web.Response:
    """308 to ``path`` with the request's query string (an invite link stays one). Not to
    be cached: the room may move again."""
    target = path + (f"?{request.query_string}" if request.query_string else "")
    return web.Response(status=308, headers={"Location": target, "Cache-Control": "no-store"})
