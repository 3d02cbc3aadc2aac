"""The benchmark's CPU window: a server's CPU over a throughput run, read to the nanosecond
from the scheduler, and read from the process's ticks when a thread ended inside the window
(the scheduler's counters lose an ended thread's time; the process's ticks keep it).

A real child process does the work; only the bench's accounting is checked, never a speed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench import procstat

pytestmark = pytest.mark.timeout(60)

# The child spins for as long as it is told: on its main thread ("main S"), on a thread
# that starts and ends ("thread S"), or on a thread started earlier ("hold", then
# "release S": it spins, then ends); it says "done" after each.
CHILD = r"""
import sys, threading, time

def spin(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass

held = None
go = threading.Event()
print("ready", flush=True)
for line in sys.stdin:
    where, *arg = line.split()
    if where == "main":
        spin(float(arg[0]))
    elif where == "thread":
        t = threading.Thread(target=spin, args=(float(arg[0]),))
        t.start()
        t.join()
    elif where == "hold":
        seconds = []
        held = threading.Thread(target=lambda: go.wait() and spin(seconds[0]))
        held.start()
    else:
        seconds.append(float(arg[0]))
        go.set()
        held.join()
    print("done", flush=True)
"""


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def _say(proc: subprocess.Popen, line: str) -> None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done"


def test_a_window_of_the_same_threads_reads_nanoseconds(child) -> None:
    window = procstat.CpuWindow([child.pid])
    _say(child, "main 0.015")  # less than two of /proc's 10 ms ticks
    cpu = window.seconds()
    assert window.counter == "ns"
    assert 0.015 <= cpu < 0.5  # the spin, and little else
    assert cpu != round(cpu, 2)  # not a whole number of ticks


def test_a_thread_that_started_and_ended_inside_the_window_is_not_lost(child) -> None:
    window = procstat.CpuWindow([child.pid])
    _say(child, "thread 0.2")  # in neither reading of the threads' counters, once reaped
    assert window.seconds() >= 0.19


def test_a_thread_that_ended_inside_the_window_is_not_lost(child) -> None:
    _say(child, "hold")
    window = procstat.CpuWindow([child.pid])
    _say(child, "release 0.2")  # in the first reading only (once reaped), without its spin
    assert window.seconds() >= 0.19
