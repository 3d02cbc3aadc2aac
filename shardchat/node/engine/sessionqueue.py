"""A lean outgoing-packet queue for each Engine.IO socket.

Every Engine.IO socket owns an ``asyncio.Queue`` of packets waiting for its writer (or its
next long-poll). An idle one costs about 3 KB: three deques of 64 slots each (items, getters,
putters), an ``asyncio.Event`` for ``join`` with a deque of its own, and two instance dicts.
On this node most packets never enter the queue (the fan-out writes them straight to the
socket), so an idle connection pays that for nothing; with 5,000 connections it is 15 MB.

``SessionQueue`` does what engineio asks of its queue (``put``, ``put_nowait``, ``get``,
``get_nowait``, ``task_done``, ``join``, ``empty``, ``qsize``) with the same semantics for an
unbounded queue, and allocates its containers only while they hold something. Two additions:

* ``nbytes`` counts what the queued packets hold (the length of their encoded data), so the
  fan-out can see a client's backlog and cut off one that does not take it (a long-polling
  client that never GETs, a websocket client that stops reading); ``discard`` frees it all.
* A long-poll takes at most ``POLL_BATCH`` packets. engineio's ``poll`` takes one packet with
  ``get`` and then everything else with ``get_nowait``; python-engineio clients refuse a
  payload of more than 16 packets and drop the connection, so a burst (a group commit of
  20 messages) would disconnect every Python client on long-polling. The rest stays queued
  and the client's next GET returns at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

POLL_BATCH = 16  # packets per long-poll response (python-engineio's Payload.max_decode_packets)


def packet_bytes(item: Any) -> int:
    """What a queued packet holds: its encoded data's length (characters of a str, which is
    how the fan-out and engineio queue text), or a small constant for control packets."""
    data = getattr(item, "data", None)
    if isinstance(data, (str, bytes)):
        return len(data) + 8
    return 8


class SessionQueue:
    """An unbounded FIFO with asyncio.Queue's semantics and no idle allocations."""

    __slots__ = ("_batch", "_getters", "_items", "_joined", "_unfinished", "consumer",
                 "nbytes")

    def __init__(self) -> None:
        self.consumer: Any = None  # a websocket session: woken on put, no waiting get()
        self.nbytes = 0  # packet_bytes of everything queued
        self._items: deque | None = None  # queued packets; None while empty
        self._getters: list[asyncio.Future] | None = None  # consumers waiting in get()
        self._unfinished = 0  # put minus task_done, for join()
        self._joined: asyncio.Future | None = None
        self._batch = 0  # get_nowait calls left in the current long-poll (see POLL_BATCH)

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def parked(self) -> bool:
        """Nothing queued and the consumer idle (a websocket session with no writer running,
        or a consumer waiting in ``get``): whatever it took earlier has been handed on, so a
        write that bypasses the queue cannot overtake anything."""
        if self.consumer is not None:
            return not self._items and self.consumer.idle()
        getters = self._getters
        return not self._items and bool(getters) and not getters[0].done()

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        self.nbytes += packet_bytes(item)
        self._unfinished += 1
        if self.consumer is not None:
            self.consumer.wake()
        else:
            self._wake_one()

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        if self.consumer is None:  # a long-poll collecting its response after get()
            if self._batch <= 0:
                raise asyncio.QueueEmpty  # the rest goes in the next response
            self._batch -= 1
        return self._pop()

    def _pop(self) -> Any:
        items = self._items
        item = items.popleft()
        if not items:
            self._items = None
            self.nbytes = 0
        else:
            self.nbytes -= packet_bytes(item)
        return item

    async def get(self) -> Any:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(waiter)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                getters = self._getters
                if getters and waiter in getters:
                    getters.remove(waiter)
                if self._items and not waiter.cancelled():
                    self._wake_one()  # it was woken, then cancelled: pass the turn on
                raise
        self._batch = POLL_BATCH - 1
        return self._pop()

    def discard(self) -> int:
        """Drop every queued packet (a client being cut off will never take them) and
        return how many bytes that freed; ``join`` waiters are released."""
        items, freed = self._items, self.nbytes
        self._items, self.nbytes = None, 0
        if items:
            self._unfinished = max(0, self._unfinished - len(items))
            if self._unfinished == 0 and self._joined is not None:
                if not self._joined.done():
                    self._joined.set_result(None)
                self._joined = None
        return freed

    def task_done(self) -> None:
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1
        if self._unfinished == 0 and self._joined is not None:
            if not self._joined.done():
                self._joined.set_result(None)
            self._joined = None

    async def join(self) -> None:
        if self._unfinished > 0:
            if self._joined is None:
                self._joined = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._joined)

    def _wake_one(self) -> None:
        getters = self._getters
        while getters:
            waiter = getters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break
        if not getters:
            self._getters = None


def install(eio: Any) -> None:
    """Give every new Engine.IO socket a ``SessionQueue`` (engineio asks its server's
    ``create_queue`` for one in ``BaseSocket.__init__``)."""
    eio.create_queue = lambda *args, **kwargs: SessionQueue()
