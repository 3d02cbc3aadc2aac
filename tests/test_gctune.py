"""The tuned collector still walks the oldest generation now and then (``sweep_old``).

Without it a node with raised thresholds kept the cycles of closed connections for good:
memory grew by a fifth in a 5-minute churn soak."""

from __future__ import annotations

import asyncio
import gc

from shardchat.node import gctune


class Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_sweep_frees_cycles_the_raised_thresholds_keep() -> None:
    watch = gctune.install(tune=False)
    before = watch.count[2]
    old = gc.get_threshold()
    gc.set_threshold(*gctune.THRESHOLDS)
    try:
        for _ in range(100):
            Cycle()
        assert any(isinstance(o, Cycle) for o in gc.get_objects())
        full = asyncio.Event()

        def on_gc(phase: str, info: dict) -> None:
            if phase == "stop" and info.get("generation") == 2:
                full.set()

        gc.callbacks.append(on_gc)
        task = asyncio.create_task(gctune.sweep_old(0.05))
        try:
            await asyncio.wait_for(full.wait(), 5)
        finally:
            task.cancel()
            gc.callbacks.remove(on_gc)
        assert watch.count[2] > before
        assert not any(isinstance(o, Cycle) for o in gc.get_objects())
    finally:
        gc.set_threshold(*old)


async def test_no_sweep_when_disabled() -> None:
    await asyncio.wait_for(gctune.sweep_old(0), 1)  # returns at once instead of looping
