"""Shared coarse timers (shardchat/node/engine/liveness.py): the pings of thousands of
websocket sessions share one event-loop timer per 50 ms slot. A ping may fire a little
late, never early, and one failing call does not stop the others of its slot."""

from __future__ import annotations

import asyncio
import math

from shardchat.node.engine.liveness import CoarseTimers

TIMEOUT = 2.0
EARLY_SLACK = 0.002  # the event loop's own clock granularity


async def test_calls_fire_in_order_never_early_and_at_most_one_slot_late():
    loop = asyncio.get_running_loop()
    timers = CoarseTimers()
    fired: list[tuple[str, float]] = []
    done = asyncio.Event()
    due: dict[str, float] = {}

    def record(name: str, _: object) -> None:
        fired.append((name, loop.time()))
        if len(fired) == len(due):
            done.set()

    # b is due before a but in a's slot: a slot's calls fire in the order they were made
    for name, delay in (("a", 0.011), ("b", 0.01), ("c", 0.12)):
        due[name] = loop.time() + delay
        timers.call_later(delay, record, name)
    await asyncio.wait_for(done.wait(), TIMEOUT)
    slot = {name: math.ceil(at / CoarseTimers.RESOLUTION) for name, at in due.items()}
    if slot["a"] == slot["b"]:
        assert [name for name, _ in fired] == ["a", "b", "c"]
    assert fired[-1][0] == "c"
    for name, at in fired:
        assert at >= due[name] - EARLY_SLACK, f"{name} fired early"
        # one slot late at most, plus whatever the loop itself was busy with
        assert at - due[name] < CoarseTimers.RESOLUTION + 0.5, f"{name} fired far too late"


async def test_calls_of_one_slot_share_one_loop_timer():
    timers = CoarseTimers()
    done = asyncio.Event()
    count = 0

    def tick(_: object, __: object) -> None:
        nonlocal count
        count += 1
        if count == 1000:
            done.set()

    for i in range(1000):
        timers.call_later(0.01, tick, i)
    assert len(timers._slots) <= 2  # one slot (two if the clock crossed a boundary)
    await asyncio.wait_for(done.wait(), TIMEOUT)


async def test_a_failing_call_does_not_stop_the_rest_of_its_slot(caplog):
    timers = CoarseTimers()
    done = asyncio.Event()

    def boom(_: object, __: object) -> None:
        raise RuntimeError("boom")

    timers.call_later(0.0, boom, "first")
    timers.call_later(0.0, lambda _sock, _arg: done.set(), "second")
    await asyncio.wait_for(done.wait(), TIMEOUT)
    assert "ping timer of first failed" in caplog.text
