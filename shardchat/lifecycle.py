"""How a shardchat process ends: within a final bound, and together with its supervisor.

Two things a node and the supervisor that starts it (``shardchat up``) must agree on, so
they live below both (``cluster/`` never imports ``node/``):

* the final bound of a stop (``Watchdog``, ``SHUTDOWN_LIMIT``): a thread that ends the
  process ``limit`` seconds after it is armed, whatever the event loop is waiting on. The
  node arms it once its grace period is over; the supervisor arms it for its own stop, and
  kills a node that is still running past the node's ``SHUTDOWN_LIMIT`` (plus its grace);
* dying with the supervisor: the supervisor passes its pid in ``PARENT_PID_ENV``, and the
  child stops when that process is no longer its parent (``watch_parent``), also after the
  supervisor was SIGKILLed and could not stop it.

The bounds of each step of a node's stop are ``node/shutdown.py``'s; ``SHUTDOWN_LIMIT`` is
the bound of all of them together.
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
from collections.abc import Callable

log = logging.getLogger("shardchat.shutdown")

SHUTDOWN_LIMIT = 30.0    # seconds a node's stop may take after its grace; then it exits
STOP_EXTRA = 5.0         # seconds a supervisor waits beyond that before it kills the node

PARENT_PID_ENV = "SHARDCHAT_PARENT_PID"
PARENT_POLL_SECONDS = 1.0
PARENT_DEATH_SIGNAL = signal.SIGHUP  # "the other end is gone": a drain, never a hurry
_PR_SET_PDEATHSIG = 1


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


def node_stop_limit(drain_grace_seconds: float) -> float:
    """Seconds a supervisor gives a SIGTERMed node to exit before it sends SIGKILL: the
    node's grace period, the bound of the rest of its stop, and ``STOP_EXTRA``, so the
    node's own watchdog always fires first and a kill means it was stuck for good."""
    return drain_grace_seconds + SHUTDOWN_LIMIT + STOP_EXTRA


def expected_parent() -> int | None:
    """The supervisor's pid when one started this process (``PARENT_PID_ENV``), else None."""
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
    """Call ``stop`` once the process ``parent`` is no longer this process's parent.

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
