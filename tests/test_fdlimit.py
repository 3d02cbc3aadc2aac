"""File descriptors: a node raises its own soft limit to the hard one at start, and a node
that runs out of descriptors refuses new connections without spinning or stopping, then
serves again once descriptors are free (shardchat/node/fdlimit.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from bench import procstat
from shardchat.node import fdlimit
from tests.conftest import acreate_room, open_client
from tests.support import async_wait_until, running_nodes


@contextlib.contextmanager
def soft_limit(value: int) -> Iterator[None]:
    """This process's soft limit lowered for the block (children started in it inherit
    it); the hard limit stays, so the old soft limit can be restored."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(value, old[1]), old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def limits_of(pid: int) -> tuple[int, int]:
    """(soft, hard) open files of a process, from /proc/<pid>/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), (resource.RLIM_INFINITY if hard == "unlimited" else int(hard))
    raise AssertionError("no open-files line")


def test_the_soft_limit_is_raised_to_the_hard_limit():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with soft_limit(256):
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(256, hard)
        soft, after = fdlimit.raise_soft_limit()
        assert after == hard
        assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert soft == (hard if hard != resource.RLIM_INFINITY
                        else int(Path(fdlimit.NR_OPEN).read_text()))


def test_a_node_started_with_a_low_soft_limit_raises_it(tmp_path):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with soft_limit(256), running_nodes(tmp_path, 1) as (node,):
        soft, node_hard = limits_of(node.proc.pid)
        assert node_hard == hard and soft == hard != 256
        assert f"open files: soft limit {soft}" in node.log()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


async def test_a_node_out_of_descriptors_refuses_then_recovers(tmp_path):
    """With its limit lowered to 20 descriptors above what it uses, a node given 60 new
    connections keeps about 20 and closes the others at once (libuv's reserve descriptor;
    "about": a descriptor the node was just closing when it was counted frees one more);
    it does not spin on the listening socket meanwhile, and once the 60 are gone a client
    joins a room as usual."""
    with running_nodes(tmp_path, 1) as (node,):
        room = await acreate_room(node)
        pid = node.proc.pid
        used = _fds(pid)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (used + 20, used + 20))
        socks = []
        try:
            for _ in range(60):
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.1", node.port))
                socks.append(s)
            await async_wait_until(
                lambda: sum(_closed_by_peer(s) for s in socks) >= 35, timeout=10,
                what="the node to close the connections it has no descriptor for")
            assert _fds(pid) <= used + 20
            cpu0, t0 = procstat.cpu_seconds(pid), time.monotonic()
            await asyncio.sleep(1.0)  # a measuring window, not a synchronisation
            busy = (procstat.cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            assert busy < 0.3, f"the node spun at {busy:.0%} of a core while out of fds"
        finally:
            for s in socks:
                s.close()
        assert node.proc.poll() is None
        await async_wait_until(lambda: _fds(pid) < used + 10, timeout=10,
                               what="the node to release the closed connections")
        client = await open_client(node, room, name="after")
        try:
            assert await client.send_ok("descriptors are back")
        finally:
            await client.close()
