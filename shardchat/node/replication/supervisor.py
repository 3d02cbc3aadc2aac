"""Litestream beside a running node: started after the store opens, restarted when it dies,
stopped after the store closes.

Replication is best effort with respect to serving: a node whose Litestream died keeps
serving (its store is as durable on its own disk as ever) while the supervisor restarts it
with a backoff (``BACKOFF_FIRST`` doubling up to ``BACKOFF_MAX``, back to the first once a
run lasted ``STABLE_AFTER``). Every death is logged with Litestream's last error and counted
in ``/internal/metrics`` (``replication.restarts``), so a replica that falls behind is seen.
What cannot be fixed by a restart (no binary, a wrong version) stops the node at start
instead, since the config asked for a copy elsewhere.

Litestream dies with the node: it is started with the parent-death signal set to SIGTERM,
so a node killed with SIGKILL does not leave a Litestream behind that would race the next
one on the same store and replica. It runs in a process group of its own, so a signal to
the node's group reaches the node alone, which stops it last. On SIGTERM Litestream uploads
what it has not shipped yet (``litestream.SHUTDOWN_SYNC_SECONDS``) and exits.

Litestream logs JSON lines on stderr (``litestream.render``), read here: warnings and
errors go to the node's log, and the debug lines give the positions shown in the metrics,
the local transaction id written to LTX and the highest one uploaded to the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from shardchat.node.replication import litestream

log = logging.getLogger("shardchat.node.replication")

BACKOFF_FIRST = 1.0   # seconds before the first restart after a death
BACKOFF_MAX = 30.0    # the longest wait between two restarts
STABLE_AFTER = 60.0   # a run this long resets the backoff
STOP_TIMEOUT = litestream.SHUTDOWN_SYNC_SECONDS + 2.0  # SIGTERM to exit; then SIGKILL
KILL_WAIT = 2.0       # seconds a SIGKILLed Litestream may take to be reaped
ERROR_LINES = 5       # Litestream's last warnings and errors, quoted when it dies
LINE_LIMIT = 1 << 20  # bytes of one log line read at most (longer ones are cut)
_PR_SET_PDEATHSIG = 1

_LIBC: Any = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: two system calls, nothing that could need
    a lock another thread of the node holds. A process group of its own keeps a Ctrl-C at
    the node's terminal (or a signal to the node's group) from stopping Litestream before
    the node has flushed its last commits; the parent-death signal ends it with the node."""
    os.setpgid(0, 0)
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class Supervisor:
    """One instance's Litestream process, from ``start`` to ``stop``."""

    def __init__(self, binary: Path, config_path: Path, target: str) -> None:
        self.binary = binary
        self.config_path = config_path
        self.target = target
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.restarts = 0  # deaths while the node ran (each one restarted)
        self.last_exit: int | None = None
        self.errors = 0  # ERROR lines Litestream logged
        self.local_txid = 0  # the last transaction Litestream turned into a local LTX file
        self.replica_txid = 0  # the highest transaction uploaded to the replica
        self.uploads = 0
        self.checkpoints = 0  # WAL checkpoints Litestream ran (it owns them, checkpoint.py)
        self.last_upload: float | None = None  # time.time() of the last upload
        self._recent: deque[str] = deque(maxlen=ERROR_LINES)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start Litestream (raises OSError when the binary cannot be executed at all)."""
        await self._spawn()
        self._task = asyncio.create_task(self._run(), name="litestream")

    async def stop(self) -> None:
        """SIGTERM (Litestream uploads what is left, within its shutdown bound), then
        SIGKILL after ``STOP_TIMEOUT``. Safe to call more than once."""
        self._stopping.set()
        for _ in range(2):  # twice: a restart may have been spawning when the stop began
            proc = self.proc
            if proc is not None:
                await self._end(proc)
            if self._task is not None:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(self._task), KILL_WAIT)
            if self.proc is proc:
                break
        if self.proc is not None and self.proc.returncode is not None:
            log.info("litestream stopped (exit code %s); replica at transaction %d",
                     self.proc.returncode, self.replica_txid)

    async def _end(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM, up to ``STOP_TIMEOUT`` for the exit, then SIGKILL."""
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("litestream did not stop within %g s of SIGTERM; killing it (what "
                        "it had not uploaded is on this disk only)", STOP_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), KILL_WAIT)

    def stats(self) -> dict[str, Any]:
        """For ``/internal/metrics``: is it running, how often it died, how far it got."""
        running = self.proc is not None and self.proc.returncode is None
        age = None if self.last_upload is None else round(time.time() - self.last_upload, 3)
        return {"target": self.target, "running": running,
                "pid": self.proc.pid if running and self.proc else None,
                "starts": self.starts, "restarts": self.restarts,
                "last_exit": self.last_exit, "errors": self.errors,
                "local_txid": self.local_txid, "replica_txid": self.replica_txid,
                "uploads": self.uploads, "last_upload_age": age,
                "checkpoints": self.checkpoints}

    # -- the process ------------------------------------------------------------------------

    async def _spawn(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *litestream.replicate_argv(self.binary, self.config_path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=litestream.child_env(),
            preexec_fn=_die_with_parent, limit=LINE_LIMIT)
        self.starts += 1
        log.info("litestream %s replicating to %s (pid %d)", "started" if self.starts == 1
                 else "restarted", self.target, self.proc.pid)

    async def _run(self) -> None:
        """Read the running process's log until it exits; restart it unless stopping."""
        backoff = BACKOFF_FIRST
        while True:
            proc = self.proc
            started = time.monotonic()
            if proc is not None:
                await self._read_log(proc)
                self.last_exit = await proc.wait()
            if self._stopping.is_set():
                return
            ran = time.monotonic() - started
            if ran >= STABLE_AFTER:
                backoff = BACKOFF_FIRST
            self.restarts += 1
            last = "; ".join(self._recent) or "no error logged"
            log.error("litestream exited with code %s after %.1f s (death %d); restarting in "
                      "%g s. Until it runs, new messages are on this disk only. Its last "
                      "errors: %s", self.last_exit, ran, self.restarts, backoff, last)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            if self._stopping.is_set():
                return
            backoff = min(backoff * 2, BACKOFF_MAX)
            try:
                await self._spawn()
            except OSError as exc:
                self.proc = None
                log.error("litestream could not be started again: %s", exc)

    async def _read_log(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            try:
                raw = await proc.stderr.readline()
            except ValueError:  # a line past LINE_LIMIT: skip what is left of it
                continue
            if not raw:
                return
            self._line(raw.decode(errors="replace").strip())

    def _line(self, text: str) -> None:
        """One line of Litestream's log: positions from its debug lines, warnings and
        errors into the node's log. Anything that is not JSON is passed on as it is."""
        if not text:
            return
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            self._recent.append(text[:500])
            log.warning("litestream: %s", text[:2000])
            return
        level = str(record.get("level", "")).upper()
        msg = str(record.get("msg", ""))
        if msg == "ltx file uploaded":
            self.uploads += 1
            self.last_upload = time.time()
            self.replica_txid = max(self.replica_txid, _txid(record.get("maxTXID")))
        elif msg == "checkpoint" and "mode" in record:
            self.checkpoints += 1
        elif msg == "replica sync" and isinstance(record.get("txid"), dict):
            # {"txid": {"replica": ..., "db": ...}}: the database's last LTX transaction
            # (the debug line "sync" names the next one, which may never be written)
            self.local_txid = max(self.local_txid, _txid(record["txid"].get("db")))
        if level not in ("WARN", "ERROR"):
            return
        detail = " ".join(f"{k}={v}" for k, v in record.items()
                          if k not in ("time", "level", "msg"))
        line = f"{msg} {detail}".strip()
        self._recent.append(line[:500])
        if level == "ERROR":
            self.errors += 1
            log.error("litestream: %s", line)
        else:
            log.warning("litestream: %s", line)


def _txid(value: Any) -> int:
    """Litestream writes transaction ids as 16 hex digits."""
    try:
        return int(str(value), 16)
    except ValueError:
        return 0
