"""How a node stops: the steps of a stop, each within its own bound.

A stop is a sequence of steps (close the sessions, stop the listeners, flush the store ...)
and any of them can wait on something outside the node: a client that never reads, a
long-poll nobody collects, a library that swallows cancellation. So:

* every step runs under its own deadline (``run_step``); a step that overruns is abandoned
  (cancelled, never awaited again) and logged, and the stop goes on with the next one;
* the whole stop has a final bound (``shardchat.lifecycle.Watchdog``, ``SHUTDOWN_LIMIT``):
  a thread, so it fires even when the event loop is blocked, logs what was still open and
  ends the process with ``os._exit``;
* a node started by a supervisor (``shardchat up``) is told its parent's pid and stops when
  that parent is gone, even after a SIGKILL (``shardchat.lifecycle.watch_parent``).

Both of the latter are shared with the supervisor, so they live in ``shardchat/lifecycle.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

log = logging.getLogger("shardchat.shutdown")

# Bounds of the steps of a node's stop, in seconds, in the order they run after the grace
# period (docs/operations.md lists them).
IDLE_TIMEOUT = 5.0       # in-flight messages still committing
PRESENCE_TIMEOUT = 1.0   # pending presence batches dropped, their tasks ended
CLOSE_TIMEOUT = 3.0      # WebSocket close handshakes; connections still open are then aborted
HTTP_TIMEOUT = 1.0       # aiohttp's shutdown_timeout: a request still running gets this twice
LISTENER_TIMEOUT = 4.0   # each listener's cleanup as a whole (public, then internal)
PEERS_TIMEOUT = 2.0      # the peer-stats pollers
ENGINE_TIMEOUT = 2.0     # engineio's background service task
STORE_TIMEOUT = 10.0     # the last group commits and the store's threads
# The stop as a whole is bounded by shardchat.lifecycle.SHUTDOWN_LIMIT; past it the process
# exits, whichever step it is in.


async def run_step(name: str, work: Awaitable[Any], timeout: float) -> bool:
    """Run one shutdown step for at most ``timeout`` seconds; True when it finished.

    ``asyncio.wait_for`` is not enough: on timeout it cancels and then waits for the
    cancellation to be honoured, and code that turns a CancelledError into a normal return
    (engineio's long-poll does) can keep it waiting. Here an overrunning step is cancelled
    and left behind; the process is about to end anyway."""
    task = asyncio.ensure_future(work)
    started = time.monotonic()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        task.add_done_callback(_ignore_result)
        log.warning("shutdown: %s did not finish within %g s; going on without it", name,
                    timeout)
        return False
    exc = task.exception()
    if exc is not None:
        log.error("shutdown: %s failed: %r", name, exc)
        return False
    log.debug("shutdown: %s took %.3f s", name, time.monotonic() - started)
    return True


def _ignore_result(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
