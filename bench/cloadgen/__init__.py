"""The compiled load generator (``loadgen.c``): build it, run its closed loop.

Why a second load generator: on a machine whose cores are shared between the servers and
the clients, the Python one (``bench.loadgen`` on ``bench.wsclient``) spends about 60 % of
a node's CPU reading every delivery, and takes that CPU from the servers it measures. The C
program speaks the same frames as ``bench.wsclient`` (Engine.IO 4 over a raw WebSocket,
Socket.IO namespace CONNECT with ``{"name": ...}`` as auth, ``message`` EVENTs with ack
ids) and runs the same closed loop as ``loadgen.closed_loop``, in one thread on epoll, for
a small part of that CPU.

It is compiled at bench time from the source beside this file (``cc -O2``) into a cache
outside the repository (``$XDG_CACHE_HOME/shardchat-bench`` or ``~/.cache/shardchat-bench``),
named by a hash of the source and the flags, so that an edited source is rebuilt and no
binary is ever committed. ``CompilerMissing`` says plainly when there is no ``cc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import TrafficResult
from bench.servers import Endpoint

SOURCE = Path(__file__).with_name("loadgen.c")
CFLAGS = ("-O2", "-std=c11", "-Wall", "-Wextra")
BUILD_TIMEOUT = 120.0    # seconds cc may take
CONNECT_TIMEOUT = 120.0  # seconds every member together may take to connect
CLIENT_TIMEOUT = 10.0    # seconds one member may take (TCP, upgrade, namespace CONNECT)
EXIT_TIMEOUT = 10.0      # seconds the program may take to exit after its result


class CompilerMissing(RuntimeError):
    """There is no C compiler (``cc``) on this machine."""


class LoadgenError(RuntimeError):
    """The C load generator failed: its message (from stderr) says why."""


KEEP_BUILDS = 3  # builds of other sources left in the cache


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shardchat-bench"


def build(cache: Path | None = None) -> Path:
    """The path of the compiled program, compiling it first when this source (with these
    flags) has not been compiled yet. The binary is written under a temporary name and
    renamed, so concurrent builds (test workers) never see half a file."""
    cc = shutil.which("cc")
    if cc is None:
        raise CompilerMissing("no C compiler: `cc` is not on PATH (install gcc, e.g. "
                              "`make system-deps`)")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    out_dir = cache or cache_dir()
    binary = out_dir / f"cloadgen-{digest}"
    if binary.exists():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=binary.name + ".", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT, check=False)
        if done.returncode != 0:
            raise LoadgenError(f"compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, binary)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _prune(out_dir, keep=binary)
    return binary


def _prune(out_dir: Path, keep: Path) -> None:
    """Leave the ``KEEP_BUILDS`` newest builds (``keep`` among them): every edit of the
    source or its flags makes one, and nothing else removes them."""
    builds = sorted((p for p in out_dir.glob("cloadgen-*") if "." not in p.name),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in builds if p != keep][KEEP_BUILDS - 1:]:
        with contextlib.suppress(FileNotFoundError):  # another build pruned it first
            old.unlink()


@dataclass
class Outcome(TrafficResult):
    """The closed loop's figures, as the program printed them (see ``loadgen.c``): the
    Python load generator's, and what only the program counts."""

    cpu_s: float                 # the program's own user + system CPU over the run
    cpu_sys_s: float
    delivered_per_room: list[int]
    delivered_per_member: list[list[int]] | None  # with ``--per-member``, room by room
    reads: int                   # read() calls that returned data
    frames: int
    error: str | None

    @classmethod
    def parse(cls, line: str) -> Outcome:
        d: dict[str, Any] = json.loads(line)
        return cls(sent=d["sent"], delivered=d["delivered"], expected=d["expected"],
                   acks_failed=d["acks_failed"], wall=d["wall"], complete=d["complete"],
                   cpu_s=d["cpu_user_s"] + d["cpu_sys_s"], cpu_sys_s=d["cpu_sys_s"],
                   delivered_per_room=d["delivered_per_room"],
                   delivered_per_member=d.get("delivered_per_member"), reads=d["reads"],
                   frames=d["frames"], error=d["error"])


def member_lines(endpoints: list[list[Endpoint]]) -> bytes:
    """The program's input: one ``M room host port path namespace`` line per member."""
    lines = [f"M {r} {ep.host} {ep.port} {ep.path} {ep.namespace}"
             for r, eps in enumerate(endpoints) for ep in eps]
    return ("\n".join(lines) + "\nend\n").encode()


class ClosedLoop:
    """One run of the program: ``connect`` (every member connected to its room), then
    ``run`` (the closed loop, once), then ``close``. Between the two the program keeps the
    connections alive and waits; ``pid`` is there so its priority can be set."""

    def __init__(self, binary: Path, endpoints: list[list[Endpoint]], messages: int,
                 window: int, timeout: float, extra: tuple[str, ...] = ()) -> None:
        self.binary, self.endpoints = binary, endpoints
        self.args = [*extra, "--messages", str(messages), "--window", str(window),
                     "--timeout", str(timeout), "--connect-timeout", str(CONNECT_TIMEOUT),
                     "--client-timeout", str(CLIENT_TIMEOUT)]
        self.timeout = timeout
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def connect(self) -> float:
        """Start the program and wait (bounded) until every member is connected; returns
        the seconds that took."""
        self.proc = await asyncio.create_subprocess_exec(
            str(self.binary), *self.args, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert self.proc.stdin is not None
        self.proc.stdin.write(member_lines(self.endpoints))
        await self.proc.stdin.drain()
        line = await self._line(CONNECT_TIMEOUT + 10)
        return float(json.loads(line)["connect_s"])

    async def run(self) -> Outcome:
        """The closed loop: returns its figures once the program printed them."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()
        line = await self._line(self.timeout + 30)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT)
        return Outcome.parse(line)

    async def _line(self, timeout: float) -> str:
        """The program's next line of output; LoadgenError with its stderr when it ends
        (or says nothing within ``timeout``) instead."""
        assert self.proc is not None and self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            line = b""
        if line.strip():
            return line.decode()
        self.close()
        err = b""
        if self.proc.stderr is not None:
            with contextlib.suppress(TimeoutError):
                err = await asyncio.wait_for(self.proc.stderr.read(4000), 5)
        raise LoadgenError(err.decode(errors="replace").strip()
                           or f"the C load generator said nothing within {timeout:.0f} s")

    def close(self) -> None:
        """Stop the program, if it still runs (closing every connection)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
