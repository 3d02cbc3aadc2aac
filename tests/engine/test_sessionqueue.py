"""The fast engine's per-session packet queue (shardchat/node/engine/sessionqueue.py):
engineio's queue semantics, its byte count (the backlog the slow-reader cut-off judges),
and the long-poll batch that keeps python-engineio clients under their payload limit."""

from __future__ import annotations

import asyncio

import pytest
from engineio import packet as eio_packet

from shardchat.node.engine.sessionqueue import POLL_BATCH, SessionQueue, packet_bytes

TIMEOUT = 2.0


def message(text: str) -> eio_packet.Packet:
    return eio_packet.Packet(eio_packet.MESSAGE, text)


class Session:
    """A websocket session as the queue sees it: woken on put, idle or writing."""

    def __init__(self) -> None:
        self.wakes = 0
        self.writing = False

    def wake(self) -> None:
        self.wakes += 1

    def idle(self) -> bool:
        return not self.writing


async def test_packets_come_out_in_order_and_their_bytes_are_counted():
    q = SessionQueue()
    packets = [message("2[\"a\"]"), message("2[\"bb\"]"), eio_packet.Packet(eio_packet.PING)]
    for p in packets:
        q.put_nowait(p)
    assert q.qsize() == 3 and not q.empty()
    assert q.nbytes == sum(packet_bytes(p) for p in packets) == (6 + 8) + (7 + 8) + 8
    assert [await q.get(), q.get_nowait(), q.get_nowait()] == packets
    assert q.empty() and q.nbytes == 0
    with pytest.raises(asyncio.QueueEmpty):
        q.get_nowait()


async def test_a_waiting_get_is_woken_by_a_put_and_counts_as_parked():
    q = SessionQueue()
    getter = asyncio.ensure_future(q.get())
    await asyncio.sleep(0)  # let the getter start waiting
    assert q.parked(), "a consumer waiting on an empty queue has handed everything on"
    q.put_nowait(message("x"))
    assert not q.parked()
    assert (await asyncio.wait_for(getter, TIMEOUT)).data == "x"


async def test_a_long_poll_takes_at_most_a_batch_and_the_rest_waits_for_the_next():
    q = SessionQueue()
    for i in range(POLL_BATCH + 4):
        q.put_nowait(message(str(i)))
    first = [await q.get()]
    while True:
        try:
            first.append(q.get_nowait())
        except asyncio.QueueEmpty:
            break
    assert [p.data for p in first] == [str(i) for i in range(POLL_BATCH)]
    assert q.qsize() == 4
    second = await asyncio.wait_for(q.get(), TIMEOUT)  # the next GET is answered at once
    assert second.data == str(POLL_BATCH)


async def test_a_session_consumer_is_woken_on_put_and_takes_everything():
    q = SessionQueue()
    session = Session()
    q.consumer = session
    assert q.parked()
    session.writing = True
    assert not q.parked(), "a writer still sending may hold an earlier packet"
    session.writing = False
    for i in range(POLL_BATCH + 4):
        q.put_nowait(message(str(i)))
    assert session.wakes == POLL_BATCH + 4
    assert [q.get_nowait().data for _ in range(POLL_BATCH + 4)] == [
        str(i) for i in range(POLL_BATCH + 4)]


async def test_discard_frees_the_backlog_and_releases_join():
    q = SessionQueue()
    for _ in range(5):
        q.put_nowait(message("y" * 100))
    joined = asyncio.ensure_future(q.join())
    await asyncio.sleep(0)
    assert not joined.done()
    assert q.discard() == 5 * (100 + 8)
    assert q.nbytes == 0 and q.empty()
    await asyncio.wait_for(joined, TIMEOUT)


async def test_join_waits_for_task_done_of_every_packet():
    q = SessionQueue()
    q.put_nowait(message("a"))
    q.put_nowait(message("b"))
    joined = asyncio.ensure_future(q.join())
    await q.get()
    q.task_done()
    await asyncio.sleep(0)
    assert not joined.done()
    q.get_nowait()
    q.task_done()
    await asyncio.wait_for(joined, TIMEOUT)
    with pytest.raises(ValueError):
        q.task_done()


async def test_a_getter_cancelled_after_it_was_woken_passes_the_packet_on():
    q = SessionQueue()
    first = asyncio.ensure_future(q.get())
    second = asyncio.ensure_future(q.get())
    await asyncio.sleep(0)  # both wait
    q.put_nowait(message("only one"))  # wakes the first ...
    first.cancel()  # ... which is cancelled before it runs (a poll timing out)
    assert (await asyncio.wait_for(second, TIMEOUT)).data == "only one"
    assert first.cancelled()

