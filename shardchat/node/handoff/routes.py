"""The internal listener's routes for moves (paths and shapes: ``api.py``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from shardchat import urls
from shardchat.http_errors import json_error
from shardchat.node.handoff import Handoff, api
from shardchat.node.handoff.records import MoveError

log = logging.getLogger("shardchat.handoff")


def add_routes(app: web.Application, handoff: Handoff) -> None:
    """Install the move routes on the internal app (whose middleware checks the secret)."""
    r = app.router
    r.add_post(api.MOVE_PATH, _wrap(lambda req: _move(req, handoff)))
    target = handoff.target
    for path, step in ((api.BEGIN_PATH, target.begin), (api.COPY_PATH, target.copy),
                       (api.ACTIVATE_PATH, target.activate), (api.ABORT_PATH, target.abort)):
        r.add_post(path, _wrap(_step(step)))


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _wrap(handler: Handler) -> Handler:
    """Bad requests are 400, refused moves their own status; both JSON with a sentence."""

    async def run(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except api.BadRequest as exc:
            return json_error(400, "bad_request", str(exc))
        except MoveError as exc:
            return json_error(exc.status, exc.code, exc.message, **exc.extra)

    return run


def _step(step: Callable[[Any], Awaitable[dict[str, Any]]]) -> Handler:
    async def run(request: web.Request) -> web.Response:
        return web.json_response(await step(await _body(request)))

    return run


async def _body(request: web.Request) -> Any:
    """The JSON body, read up to ``api.MAX_COPY_BYTES`` (copy pages are larger than the
    internal app's limit for everything else, so the stream is read here directly)."""
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > api.MAX_COPY_BYTES:
            raise MoveError(413, "too_large", f"The request is larger than "
                            f"{api.MAX_COPY_BYTES} bytes.")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (ValueError, RecursionError):
        raise api.BadRequest("The body must be JSON.") from None


def _room_id(request: web.Request) -> str:
    room_id = request.match_info["room_id"]
    if not urls.valid_room_id(room_id):
        raise api.BadRequest(f"{room_id!r} is not a room id.")
    return room_id


async def _move(request: web.Request, handoff: Handoff) -> web.Response:
    room_id = _room_id(request)
    to = api.field(await _body(request), "to", "instance")
    try:
        report = await handoff.move(room_id, to)
    except MoveError as exc:
        if exc.code == "not_owner":
            where = handoff.state(room_id)
            exc.extra.setdefault("state", where["state"] if where else None)
            if where and where.get("to") is not None:
                exc.extra.setdefault("to", where["to"])
        raise
    return web.json_response(report.to_json())
