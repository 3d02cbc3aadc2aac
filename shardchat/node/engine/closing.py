"""How the fast engine's sessions end: on shutdown, when a long-poll leaves, and when a
server-side close cannot flush.

* ``close_sessions`` ends every session on shutdown the way a lost connection ends, so
  that clients reconnect by themselves (a websocket it knows is closed with 1001 "going
  away", then aborted if its close handshake does not finish in time);
* ``answer_polls_on_close`` answers a closing long-polling session's waiting GET at once
  (engineio leaves it to its poll timeout, which holds the client's request and the
  server's shutdown that long); it wraps the Engine.IO ``disconnect`` handler
  python-socketio registered (``eio.handlers``);
* ``bound_disconnect`` lets a server-side Engine.IO disconnect wait only so long for its
  CLOSE packet to go out.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from typing import Any

from engineio import packet as eio_packet

from shardchat.node.engine.delivery import FastDelivery
from shardchat.node.engine.session import GOING_AWAY_REASON
from shardchat.node.engine.websocket import CLOSE_GOING_AWAY


def answer_polls_on_close(eio: Any) -> None:
    """When a long-polling session closes, answer its waiting GET now.

    A client that leaves sends CLOSE in a POST while its next GET is already waiting (the
    official client polls again before it handles the packet that made it leave); engineio
    closes the session without waking that GET, which then waits for engineio's poll timeout
    (ping_interval + ping_timeout, 40 s by default) before it is answered. Until then the
    client's request stays open (a Node.js script does not exit) and so does the server's
    handler, which a shutdown has to wait for. The GET gets a NOOP instead: a client that
    left ignores it, one that did not sees its next request fail and reconnects. Sessions
    that close with a CLOSE packet queued (ping timeout) are left as they are."""
    handler = eio.handlers.get("disconnect")
    if handler is None or not inspect.iscoroutinefunction(handler):
        raise RuntimeError("python-socketio registered no async Engine.IO disconnect handler; "
                           "this python-socketio version is not supported")

    async def on_disconnect(eio_sid: str, reason: Any = None) -> Any:
        sock = eio.sockets.get(eio_sid)
        try:
            return await handler(eio_sid, reason)
        finally:
            if sock is not None and not sock.upgraded:
                # after close() has queued its CLOSE packet, if it queues one
                asyncio.get_running_loop().call_soon(_answer_poll, sock)

    eio.handlers["disconnect"] = on_disconnect


def _answer_poll(sock: Any) -> None:
    if sock.queue.empty():
        sock.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))


async def close_sessions(eio: Any, fanout: FastDelivery, timeout: float) -> dict[str, int]:
    """End every Engine.IO session so that its client reconnects by itself (shutdown).

    Not with a Socket.IO DISCONNECT: the official client takes that as final ("io server
    disconnect", no reconnection), and python-socketio's client takes an Engine.IO CLOSE
    packet the same way. Both reconnect, with backoff, when the transport is lost:

    * websocket: the WebSocket is closed (close code 1001, going away); the client sees
      "transport close";
    * long-polling: the session ends and its waiting GET is answered (``answer_polls_on_
      close``); the client's next request fails (400 for the ended session, or connection
      refused once the listener is down) and it sees "transport error".

    Waits up to ``timeout`` seconds for the WebSocket close handshakes, then aborts the
    connections still open. Returns how many sessions ended each way."""
    counts = {"websocket": 0, "polling": 0, "aborted": 0}
    closes: list[asyncio.Future] = []
    for eio_sid, sock in list(eio.sockets.items()):
        if sock.closed or sock.closing:
            continue
        ws = fanout.websocket(eio_sid)
        if ws is not None:
            closes.append(asyncio.ensure_future(
                ws.close(CLOSE_GOING_AWAY, GOING_AWAY_REASON)))
            counts["websocket"] += 1
            continue
        counts["polling"] += 1
        with contextlib.suppress(Exception):
            # a websocket that is not ours (someone wrapped engineio's handler) only closes
            # through engineio's writer, which the CLOSE packet stops
            await sock.close(wait=False, abort=not sock.upgraded,
                             reason=eio.reason.SERVER_DISCONNECT)
    if closes:
        _, pending = await asyncio.wait(closes, timeout=timeout)
        for task in pending:
            task.cancel()
        for task in closes:
            task.add_done_callback(_ignore_result)
    for eio_sid in fanout.websocket_sids():
        transport = fanout.transport_of(eio_sid)
        if transport is not None and not transport.is_closing():
            transport.abort()
            counts["aborted"] += 1
    return counts


CLOSE_FLUSH_SECONDS = 2.0  # how long a server-side close waits for its CLOSE to go out


def bound_disconnect(eio: Any) -> None:
    """Let a server-side Engine.IO disconnect wait at most ``CLOSE_FLUSH_SECONDS``.

    engineio's ``disconnect`` queues a CLOSE packet, marks the socket closed and then waits
    until the queue is drained. A long-polling socket drains only into a GET that is already
    pending: every later GET is refused because the socket is closed, so without a pending
    GET the wait never ends. One POST carrying a packet the server refuses (an Engine.IO
    OPEN, say) made engineio disconnect that way and held the request, its socket and its
    queue forever. After the bound, the CLOSE is given up (the client learns from the 400s
    its next requests get) and the session is forgotten."""
    original = eio.disconnect

    async def disconnect(sid: str | None = None) -> None:
        try:
            await asyncio.wait_for(original(sid), CLOSE_FLUSH_SECONDS)
        except TimeoutError:
            for key in [sid] if sid is not None else list(eio.sockets):
                sock = eio.sockets.get(key)
                if sock is not None and sock.closed:
                    eio.sockets.pop(key, None)

    eio.disconnect = disconnect


def _ignore_result(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
