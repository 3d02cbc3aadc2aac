"""A ``shardchat node`` child process, and the server child it is one kind of.

Four places start and supervise nodes: ``shardchat up`` (the nodes of a local cluster),
``shardchat node --instance 3,4`` (the processes of one host, ``cluster/nodegroup.py``), the
tests (real nodes on loopback) and the benchmark (servers pinned to their own cores).
What they share is written once, here:

* spawning: the command line, the environment (``PYTHONUNBUFFERED`` plus what the caller
  adds), stdin closed, stdout and stderr appended to a log file behind a line that marks
  where this run begins, so ``run_log`` is this run's output and the file keeps every run
  (or, without a log file, the caller's own stdout and stderr, so a service manager's
  journal gets every child's lines);
* being ready: the ready URL (a node's ``/i<N>/healthz``) answers 200, polled until a
  deadline; a child that exits first fails at once (``Exited``, with the end of its log, and
  ``address_in_use`` when it could not bind its port);
* stopping: ``stop`` is SIGTERM, a bounded wait for the exit, then SIGKILL; ``kill`` is the
  SIGKILL alone (``kill -9``: the return code is then ``-9``);
* supervision: the child in its own process group (``own_group``: Ctrl-C at the
  supervisor's terminal reaches only the supervisor, which stops the children in order),
  and a node that stops with its supervisor (``supervised``: the supervisor's pid goes in
  ``PARENT_PID_ENV`` and the node watches its parent itself, ``shardchat.lifecycle``);
* CPU pinning (``cores``, for the benchmark). It is inherited, not set in the child: the
  spawning thread takes the cores for the moment of the fork, so no code runs between fork
  and exec (which is unsafe once the parent runs threads, as ``shardchat up`` does).

Blocking callers use ``wait``/``wait_ready``; asyncio callers ``wait_async``/
``wait_ready_async``, which keep the event loop running (an exit wakes the loop through a
pidfd on Linux; each readiness probe runs on a thread for at most ``PROBE_TIMEOUT`` seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from shardchat import urls
from shardchat.lifecycle import PARENT_PID_ENV

READY_POLL = 0.05     # seconds between two readiness probes
EXIT_POLL = 0.1       # seconds between two looks for an exit, where there is no pidfd
PROBE_TIMEOUT = 1.0   # seconds one readiness probe may take
STOP_GRACE = 15.0     # seconds ``stop`` waits after SIGTERM before it sends SIGKILL
KILL_WAIT = 5.0       # seconds a SIGKILLed child may take to be reaped
LOG_TAIL_LINES = 30   # lines of its log an error about a child quotes
ADDRESS_IN_USE = "address already in use"  # EADDRINUSE as a bind error logs it, lower-cased


class ChildError(RuntimeError):
    """A child process did not do what its caller waited for."""


class Exited(ChildError):
    """The child exited while it was expected to run (before it was ready, or since)."""

    def __init__(self, name: str, code: int, log_path: Path | None, run_log: str) -> None:
        self.name = name
        self.code = code
        self.log_path = log_path
        self.run_log = run_log
        where = (f"the last lines of {log_path}:\n{self.tail()}" if log_path is not None
                 else "its output went to this process's stderr")
        super().__init__(f"{name} exited with code {code}; {where}")

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.run_log.splitlines()[-lines:])

    @property
    def address_in_use(self) -> bool:
        """It could not listen: another process holds one of its ports."""
        return ADDRESS_IN_USE in self.run_log.lower()


class NotReady(ChildError, TimeoutError):
    """The child runs, but did not become ready within the time it was given."""


class ChildProcess:
    """One server child process: spawn, ready, stop, kill, and its log."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path | None, *,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 ready_url: str | None = None, cores: set[int] | None = None,
                 own_group: bool = False) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env or {})
        self.cwd = cwd
        self.cores = cores
        self.own_group = own_group
        self._ready_url = ready_url
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_from = 0  # where this run's output starts in the (appended) log

    @property
    def ready_url(self) -> str | None:
        """The URL that answers 200 once the child serves (None: no URL to ask)."""
        return self._ready_url

    # -- spawning ---------------------------------------------------------------------------

    def child_env(self) -> dict[str, str]:
        """The environment the child starts with."""
        return {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}

    def spawn(self) -> None:
        """Start the child, without waiting for it to be ready."""
        if self.running:
            raise ChildError(f"{self.name} is running already (pid {self.pid})")
        if self.log_path is None:  # the child writes where this process writes
            self._popen(None)
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._log_from = log.tell()
            log.write(f"--- started {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
            log.flush()
            self._popen(log)

    def _popen(self, log: BinaryIO | None) -> None:
        with _pinned(self.cores):
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log,
                stderr=None if log is None else subprocess.STDOUT, env=self.child_env(),
                cwd=self.cwd, process_group=0 if self.own_group else None)

    # -- state ------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit code once the child has exited (``-N``: ended by signal N), else None."""
        return self.proc.poll() if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Raise ``Exited`` if the child has exited."""
        if self.proc is not None and (code := self.proc.poll()) is not None:
            raise Exited(self.name, code, self.log_path, self.run_log())

    # -- the log ----------------------------------------------------------------------------

    def run_log(self) -> str:
        """This run's output (the log file holds every run of the child); empty without a
        log file."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_from)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.run_log().splitlines()[-lines:])

    # -- being ready ------------------------------------------------------------------------

    def probe(self) -> bool:
        """One readiness check: the ready URL answers 200 within ``PROBE_TIMEOUT``."""
        if self.ready_url is None:
            raise ChildError(f"{self.name} has no ready URL: pass a probe")
        try:
            with urllib.request.urlopen(self.ready_url, timeout=PROBE_TIMEOUT) as resp:
                return resp.status == 200
        except (OSError, http.client.HTTPException, ValueError):  # HTTPError is an OSError
            return False

    def _not_ready(self, timeout: float) -> NotReady:
        what = self.ready_url or "its readiness check"
        see = self.log_path if self.log_path is not None else "its output above"
        return NotReady(f"{self.name} did not answer {what} within {timeout:g} s; see {see}")

    def wait_ready(self, timeout: float, probe: Callable[[], bool] | None = None) -> None:
        """Block until ``probe`` (default: the ready URL) succeeds; ``Exited`` at once when
        the child exits first, ``NotReady`` after ``timeout`` seconds."""
        probe = probe or self.probe
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            if probe():
                return
            if time.monotonic() >= deadline:
                raise self._not_ready(timeout)
            time.sleep(READY_POLL)

    async def wait_ready_async(self, timeout: float,
                               probe: Callable[[], bool] | None = None) -> None:
        """``wait_ready`` for asyncio callers: each probe runs on a thread."""
        probe = probe or self.probe
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.check()
            if await asyncio.to_thread(probe):
                return
            if loop.time() >= deadline:
                raise self._not_ready(timeout)
            await asyncio.sleep(READY_POLL)

    # -- waiting and stopping ---------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Signal the child if it still runs (a child that just exited is no error)."""
        if self.running and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the child exits: its exit code, or None past ``timeout`` seconds."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    async def wait_async(self, timeout: float | None = None) -> int | None:
        """``wait`` for asyncio callers. On Linux the exit wakes the loop (a pidfd turns
        readable when the child exits); elsewhere it is looked for every ``EXIT_POLL``."""
        if self.proc is None or self.proc.poll() is not None:
            return self.returncode
        try:
            pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):  # not Linux (5.3 or later)
            return await self._poll_exit(timeout)
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(exited, timeout)
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return self.proc.poll()  # reaps the child once it has exited

    async def _poll_exit(self, timeout: float | None) -> int | None:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while (code := self.proc.poll()) is None:
            if deadline is not None and loop.time() >= deadline:
                return None
            await asyncio.sleep(EXIT_POLL)
        return code

    def terminate(self, timeout: float = STOP_GRACE) -> int | None:
        """SIGTERM, then wait up to ``timeout`` for the graceful exit: its code, or None
        when the child still runs (it is left running)."""
        self.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self, timeout: float = KILL_WAIT) -> int | None:
        """SIGKILL (no chance to flush anything) and reap: the code (``-9``), or None when
        even that did not end it within ``timeout``."""
        self.send_signal(signal.SIGKILL)
        return self.wait(timeout)

    def stop(self, grace: float = STOP_GRACE, kill_wait: float = KILL_WAIT) -> int | None:
        """Stop the child: SIGTERM, up to ``grace`` seconds for it to exit, then SIGKILL.
        Its exit code (None when it never started, or survived SIGKILL)."""
        if self.proc is None:
            return None
        code = self.terminate(grace)
        return code if code is not None else self.kill(kill_wait)


class NodeProcess(ChildProcess):
    """``shardchat node --config <path> --instance <N>``, ready once its health check says
    so. ``python_args`` go to the interpreter before ``-m shardchat`` (a profiler, say)."""

    def __init__(self, config_path: Path, number: int, *, host: str, port: int,
                 log_path: Path | None, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, cores: set[int] | None = None,
                 own_group: bool = False, supervised: bool = False,
                 python_args: Sequence[str] = ()) -> None:
        argv = [sys.executable, *python_args, "-m", "shardchat", "node",
                "--config", str(config_path), "--instance", str(number)]
        super().__init__(f"node {number}", argv, log_path, env=env, cwd=cwd, cores=cores,
                         own_group=own_group)
        self.config_path = config_path
        self.number = number
        self.supervised = supervised
        self._host = host
        self._port = port

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def ready_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{urls.healthz_path(self.number)}"

    def child_env(self) -> dict[str, str]:
        env = super().child_env()
        if self.supervised:  # the node stops once this process is no longer its parent
            env[PARENT_PID_ENV] = str(os.getpid())
        return env


@contextlib.contextmanager
def _pinned(cores: set[int] | None) -> Iterator[None]:
    """The calling thread on ``cores`` for the block: a child forked meanwhile inherits
    them (Linux keeps the CPU affinity per thread, and a fork copies the caller's)."""
    if not cores:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
