"""Liveness of websocket sessions: Engine.IO pings on shared coarse timers.

engineio starts one task per socket that sleeps ``ping_interval`` and then sends a PING, and
its websocket loop reads every frame under ``asyncio.wait_for`` so that a client that stops
answering is noticed by the read timeout. The fast engine's session loop reads without a
timeout, so liveness lives here: ``PingTimers`` turns engineio's request for a
``_send_ping`` task (``AsyncSocket._send_ping``, recognised in ``start_background_task``)
into a timer, and a PING that gets no PONG within ``ping_timeout`` aborts the connection.
Timers are ``CoarseTimers``: one event-loop timer per 50 ms slot instead of a handle per
socket. Long-polling clients keep engineio's own checks (the poll timeout).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from engineio import packet as eio_packet
from engineio.async_socket import AsyncSocket

from shardchat.node.engine.delivery import FastDelivery

log = logging.getLogger("shardchat.transport")

_PING_FRAME = b"2"


class CoarseTimers:
    """Many one-shot timers that share one event-loop timer per ``RESOLUTION`` slot.

    A ``loop.call_later`` handle per connection costs ~530 B (uvloop's handle and timer,
    the bound method, the argument tuple); here a pending call is one small tuple in the
    list of its slot. Calls fire at most ``RESOLUTION`` late, never early, in the order they
    were scheduled within a slot; nothing is ever cancelled (callers check at fire time)."""

    RESOLUTION = 0.05  # seconds

    def __init__(self) -> None:
        self._slots: dict[int, list[tuple[Any, Any, Any]]] = {}

    def call_later(self, delay: float, fn: Any, sock: Any, arg: Any = None) -> None:
        loop = asyncio.get_running_loop()
        slot = math.ceil((loop.time() + delay) / self.RESOLUTION)
        calls = self._slots.get(slot)
        if calls is None:
            calls = self._slots[slot] = []
            loop.call_at(slot * self.RESOLUTION, self._fire, slot)
        calls.append((fn, sock, arg))

    def _fire(self, slot: int) -> None:
        for fn, sock, arg in self._slots.pop(slot, ()):
            try:
                fn(sock, arg)
            except Exception:
                log.exception("ping timer of %s failed", getattr(sock, "sid", sock))


class PingTimers:
    """Engine.IO pings as coarse timers instead of one sleeping task per socket.

    ``AsyncSocket.schedule_ping`` asks the server to start ``_send_ping`` (sleep
    ``ping_interval``, stamp ``last_ping``, send PING) whenever the client answered the
    previous PING; the server's ``start_background_task`` is wrapped to schedule a timer
    that does the same. A websocket client whose PONG does not come within ``ping_timeout``
    is cut off (engineio's read timeout did that); long-polling clients keep engineio's own
    checks (the poll timeout and the service task)."""

    def __init__(self, eio: Any, fanout: FastDelivery) -> None:
        self.eio = eio
        self.fanout = fanout
        self.timers = CoarseTimers()
        self._start = eio.start_background_task
        eio.start_background_task = self.start_background_task

    def start_background_task(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(target, "__func__", None) is AsyncSocket._send_ping:
            self.timers.call_later(self.eio.ping_interval, self._ping, target.__self__)
            return None  # schedule_ping ignores what it gets back
        return self._start(target, *args, **kwargs)

    def _ping(self, sock: Any, _: Any = None) -> None:
        if sock.closing or sock.closed:
            return
        sent = sock.last_ping = time.time()
        if not self.fanout.write_now(sock.sid, sock, _PING_FRAME):
            sock.queue.put_nowait(eio_packet.Packet(eio_packet.PING))
        self.timers.call_later(self.eio.ping_timeout, self._overdue, sock, sent)

    def _overdue(self, sock: Any, sent: float) -> None:
        """No PONG for the PING sent at ``sent``: the client is gone."""
        if sock.last_ping != sent:
            return
        transport = self.fanout.transport_of(sock.sid)
        if transport is None:
            return  # long-polling: engineio's checks close it
        log.info("%s: no PONG within %ss, closing", sock.sid, self.eio.ping_timeout)
        if not sock.closing:
            task = asyncio.ensure_future(sock.close(
                wait=False, abort=True, reason=self.eio.reason.PING_TIMEOUT))
            task.add_done_callback(_ignore_result)
        transport.abort()


def _ignore_result(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
