"""CPU time and memory of server processes, read from /proc.

Only the server processes are read, so the load generator's own CPU does not count in any
figure; /proc/<pid>/stat sums every thread of the process (Node's worker threads, an
executor's threads).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # the command name may contain spaces; the fields after it are fixed
    fields = raw[raw.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` in seconds: its own code, and the kernel's on its behalf
    (system calls: the sockets' reads and writes, the store's writes)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rindex(b")") + 2:].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


def kernel_threads_cpu() -> float:
    """CPU seconds of every kernel thread so far (kthreadd, pid 2, and its children): the
    kernel's own workers, which serve the processes' I/O (a disk's writes after an fsync,
    freeing memory after RCU) on whatever core has room, and are charged to no process."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                raw = f.read()
        except OSError:  # ended meanwhile
            continue
        fields = raw[raw.rindex(b")") + 2:].split()
        if pid == "2" or fields[1] == b"2":  # the parent's pid
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def thread_cpu(pid: int) -> dict[str, float]:
    """utime + stime per thread name of ``pid`` (threads of one name summed), so a run
    shows how the work splits between the event loop and helper threads."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                raw = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        name = raw[raw.index(b"(") + 1:raw.rindex(b")")].decode(errors="replace")
        if tid == str(pid):
            name = "main"
        fields = raw[raw.rindex(b")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _TICKS
    return out


def total_threads(pids: Iterable[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for pid in pids:
        for name, secs in thread_cpu(pid).items():
            out[name] = out.get(name, 0.0) + secs
    return out


def diff_threads(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per thread name spent between two ``total_threads`` readings."""
    return {k: round(v - before.get(k, 0.0), 2) for k, v in after.items()
            if v - before.get(k, 0.0) > 0}


def _thread_schedstat(pids: Iterable[int], field: int = 0) -> dict[tuple[int, str], int]:
    """Field ``field`` of each thread's schedstat, by (pid, tid), in nanoseconds as the
    scheduler counts them (0: time on a CPU, 1: time runnable but waiting for one)."""
    out: dict[tuple[int, str], int] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    out[(pid, tid)] = int(f.read().split()[field])
            except (OSError, IndexError, ValueError):
                continue
    return out


def _schedstat(pid: int, field: int) -> float:
    """Field ``field`` of every thread of ``pid`` summed, in seconds."""
    return sum(_thread_schedstat((pid,), field).values()) / 1e9


def runqueue_wait(pid: int) -> float:
    """Seconds the threads of ``pid`` were runnable but waiting for a CPU (schedstat): on a
    shared machine, time other processes took from the server; it shows up as latency."""
    return _schedstat(pid, 1)


def total_runqueue_wait(pids: Iterable[int]) -> float:
    return sum(runqueue_wait(p) for p in pids)


def total_exec(pids: Iterable[int]) -> float:
    """CPU seconds of every thread of ``pids`` to the nanosecond (schedstat), where
    ``total_cpu``'s /proc/<pid>/stat counts 10 ms ticks: a phase of a few tens of ms (500
    leaves) reads as 0, 1 or 2 ticks there. Threads that ended meanwhile are not counted,
    so only for phases in which the server's threads stay."""
    return sum(_schedstat(p, 0) for p in pids)


def total_cpu(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


class CpuWindow:
    """The servers' CPU seconds from its creation to each ``seconds()``, to the nanosecond.

    A throughput window is about a second of server CPU, where /proc/<pid>/stat counts
    10 ms ticks: one tick is about 1 % of a figure, more than the differences being
    measured. The scheduler's per-thread counters are exact, and a thread that started
    inside the window counts whole; but a thread that ended inside it takes its time out of
    them. The process's ticks keep every thread's time (the kernel scales them to the same
    exact sum, then truncates to a tick), so when the threads' sum falls short of the ticks
    by more than the truncation can explain, time was lost with an ended thread: the window
    then gives the ticks, and says so in ``counter``."""

    def __init__(self, pids: Iterable[int]) -> None:
        self.pids = list(pids)
        self._ticks0 = total_cpu(self.pids)
        self._ns0 = _thread_schedstat(self.pids)
        self.counter = "ns"

    def seconds(self) -> float:
        ns = _thread_schedstat(self.pids)
        ticks = total_cpu(self.pids) - self._ticks0
        exact = sum(v - self._ns0.get(t, 0) for t, v in ns.items()) / 1e9
        # each of the two tick readings per process may be up to a tick below the truth
        slack = 2 * len(self.pids) / _TICKS
        if any(t not in ns for t in self._ns0) or ticks - exact > slack:
            self.counter = "ticks"
            return ticks
        self.counter = "ns"
        return exact


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def total_rss(pids: Iterable[int]) -> int:
    return sum(rss_bytes(p) for p in pids)


async def wait_idle(pids: list[int], *, quiet: float = 0.3, timeout: float = 20.0) -> bool:
    """Wait until the servers spend (almost) no CPU over ``quiet`` seconds, so set-up work
    (joins, presence fan-out) is over before a measurement starts. Bounded by ``timeout``;
    returns False when the servers never went quiet."""
    import asyncio

    deadline = time.monotonic() + timeout
    last = total_cpu(pids)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        now = total_cpu(pids)
        if now - last <= 0.02 * len(pids):
            return True
        last = now
    return False


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full
    (TcpExt ListenOverflows, /proc/net/netstat; for the whole network namespace, so other
    processes' drops count too). A dropped SYN is retried by the client after about a
    second: a burst of reconnects larger than a listener's backlog shows up here."""
    return tcp_ext("ListenOverflows")


def syn_retransmits() -> int | None:
    """SYNs the clients of this network namespace sent again (TcpExt TCPSynRetrans): each is
    a connect that waited a retransmission timeout (1 s, then 3 s ...), for whatever
    reason the first SYN went unanswered."""
    return tcp_ext("TCPSynRetrans")


def tcp_ext(name: str) -> int | None:
    """One TcpExt counter of /proc/net/netstat, or None where it cannot be read."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            fields = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            value = fields.get(name)
            return int(value) if value is not None else None
    return None
