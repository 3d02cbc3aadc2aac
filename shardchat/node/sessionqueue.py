"""A lean outgoing-packet queue for each Engine.IO socket.

Every Engine.IO socket owns an ``asyncio.Queue`` of packets waiting for its writer (or its
next long-poll). An idle one costs about 3 KB: three deques of 64 slots each (items, getters,
putters), an ``asyncio.Event`` for ``join`` with a deque of its own, and two instance dicts.
On this node most packets never enter the queue (the fan-out writes them straight to the
socket), so an idle connection pays that for nothing; with 5,000 connections it is 15 MB.

``SessionQueue`` does what engineio asks of its queue (``put``, ``put_nowait``, ``get``,
``get_nowait``, ``task_done``, ``join``, ``empty``, ``qsize``) with the same semantics for an
unbounded queue, and allocates its containers only while they hold something.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class SessionQueue:
    """An unbounded FIFO with asyncio.Queue's semantics and no idle allocations."""

    __slots__ = ("_getters", "_items", "_joined", "_unfinished", "consumer")

    def __init__(self) -> None:
        self.consumer: Any = None  # a websocket session: woken on put, no waiting get()
        self._items: deque | None = None  # queued packets; None while empty
        self._getters: list[asyncio.Future] | None = None  # consumers waiting in get()
        self._unfinished = 0  # put minus task_done, for join()
        self._joined: asyncio.Future | None = None

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
        item = items.popleft()
        if not items:
            self._items = None
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
        return self.get_nowait()

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
