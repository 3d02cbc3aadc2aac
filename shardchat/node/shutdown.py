"""How a node stops: when (signals, a parent that died), and within which bounds.

A stop is a sequence of steps (close the sessions, stop the listeners, flush the store ...)
and any of them can wait on something outside the node: a client that never reads, a
long-poll nobody collects, a library that swallows cancellation. So:

* every step runs under its own deadline (``run_step``); a step that overruns is abandoned
  (cancelled, never awaited again) and logged, and the stop goes on with the next one;
* the whole stop has a final bound (``Watchdog``): a thread, so it fires even when the event
  loop is blocked, logs what was still open and ends the process with ``os._exit``;
* a node started by a supervisor (``shardchat up``) is told its parent's pid
  (``PARENT_PID_ENV``) and stops when that parent is gone, even after a SIGKILL
  (``watch_parent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("shardchat.shutdown")

# Bounds of the steps of a node's stop, in seconds, in the order they run after the grace
# period (docs/operations.md lists them).
IDLE_TIMEOUT = 5.0       # in-flight messages still committing
CLOSE_TIMEOUT = 3.0      # WebSocket close handshakes; connections still open are then aborted
HTTP_TIMEOUT = 1.0       # aiohttp's shutdown_timeout: a request still running gets this twice
LISTENER_TIMEOUT = 4.0   # each listener's cleanup as a whole (public, then internal)
PEERS_TIMEOUT = 2.0      # the peer-stats pollers
ENGINE_TIMEOUT = 2.0     # engineio's background service task
STORE_TIMEOUT = 10.0     # the last group commits and the store's threads
SHUTDOWN_LIMIT = 30.0    # all of the above together (at most 29 s); then the process exits

PARENT_PID_ENV = "SHARDCHAT_PARENT_PID"
PARENT_POLL_SECONDS = 1.0
PARENT_DEATH_SIGNAL = signal.SIGHUP  # "the other end is gone": a drain, never a hurry
_PR_SET_PDEATHSIG = 1


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


class Watchdog:
    """The final bound of a stop: ``limit`` seconds after ``arm`` the process ends, whatever
    it is waiting on. It stays armed until the process is gone, so the interpreter's own
    exit (the event loop's executor, threads it joins) is bounded too; as a daemon thread it
    never delays an exit. ``describe`` says what is still open (it runs on the watchdog's
    thread, so it must only read); ``exit_code`` is asked at that moment too (0 when the
    data is safe, i.e. the store was flushed and closed)."""

    def __init__(self, limit: float, describe: Callable[[], str],
                 exit_code: Callable[[], int]) -> None:
        self.limit = limit
        self.describe = describe
        self.exit_code = exit_code
        self._thread: threading.Thread | None = None

    def arm(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shutdown-watchdog",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        time.sleep(self.limit)
        try:
            still_open = self.describe()
        except Exception as exc:  # it reads the loop's state from another thread
            still_open = f"(could not be read: {exc!r})"
        code = self.exit_code()
        log.error("shutdown did not finish within %g s; exiting with %d now. Still open: %s",
                  self.limit, code, still_open)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(code)


def expected_parent() -> int | None:
    """The supervisor's pid when one started this node (``PARENT_PID_ENV``), else None."""
    raw = os.environ.get(PARENT_PID_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) > 1 else None


def _set_parent_death_signal() -> bool:
    """Linux: have the kernel send PARENT_DEATH_SIGNAL to this process when its parent
    dies. Not SIGTERM: the kernel may deliver it more than once (once per exiting thread of
    a parent that had several), and a second SIGTERM means "hurry"."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


async def watch_parent(parent: int, stop: Callable[[str], None]) -> None:
    """Call ``stop`` once the process ``parent`` is no longer this node's parent.

    Two mechanisms, because each alone has a gap: PR_SET_PDEATHSIG (set here, at start)
    signals the moment the parent dies, SIGKILL included, but it is Linux-only and
    cannot cover a parent that died before it was set; polling ``getppid`` (the orphan is
    re-parented, so the value changes) covers both, within ``PARENT_POLL_SECONDS``."""
    _set_parent_death_signal()
    while True:
        if os.getppid() != parent:  # checked first: it may have died before prctl
            stop(f"parent process {parent} is gone")
            return
        await asyncio.sleep(PARENT_POLL_SECONDS)
