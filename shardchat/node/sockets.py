"""Instance N's Socket.IO events, on the engine's server.

``register_events`` wires the events of every room namespace (``/i<N>/room/<id>``, one
catch-all namespace) to the room service, and the engine's ``on_connected`` hook (right
after a member's CONNECT went out) to its welcome; every handler answers, an unexpected
failure included (``answers_errors``). What python-socketio lacks for a chat room (that
hook, answers to packets it cannot read, refused event names) is the engine's:
``shardchat/node/engine/``, on either engine.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from socketio.exceptions import ConnectionRefusedError as SioRefused

from shardchat.node.clientaddr import ClientAddresses
from shardchat.node.engine import SocketServer
from shardchat.node.engine.refusals import JOIN_FAILED, UNAVAILABLE
from shardchat.node.rooms import RoomService

log = logging.getLogger("shardchat.node")


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


def register_events(sio: SocketServer, rooms: RoomService,
                    addresses: ClientAddresses) -> None:
    """The handlers of every room namespace: connect, disconnect, message, typing, history,
    members, and an answer to any other event name."""

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

    # The websocket path's direct handler of ``message`` (fast engine): the same checks,
    # store and broadcast as the handler above, with no task or future per message; it
    # hands back to that handler (False) for what must await (a frozen room).
    direct = getattr(sio, "direct_handlers", None)
    if direct is not None:
        direct["message"] = rooms.message_now

    @sio.on("typing", namespace="*")
    @answers_errors
    async def typing(namespace, sid, data=None, *_):
        await rooms.typing(namespace, sid, data)

    @sio.on("history", namespace="*")
    @answers_errors
    async def history(namespace, sid, data=None, *_):
        return await rooms.history(namespace, sid, data)

    @sio.on("members", namespace="*")
    @answers_errors
    async def members(namespace, sid, data=None, *_):
        return await rooms.members(namespace, sid, data)

    @sio.on("*", namespace="*")
    @answers_errors
    async def unknown(event, namespace, sid, *args):
        log.debug("ignored unknown event %r on %s", event, namespace)
        return {"ok": False, "error": "bad_request",
                "message": f"Unknown event {event!r}: use message, typing, history or "
                           "members."}

    sio.on_connected = rooms.connected
