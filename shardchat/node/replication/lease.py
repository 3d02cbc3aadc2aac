"""The owner's lease (``node.adopt_lease``): an owner cut off from the majority stops itself.

With ``auto_adopt`` a follower adopts its owner N once a strict majority of the instances
other than N have not reached N for ``adopt_after`` seconds (``auto.py``). A partition that
cuts N off from them but not from its clients would leave N serving the rooms its follower
now owns. So every node holds a lease on its own rooms: it reads the same stats-poll
reachability the votes are made of (``Node.out_of_touch_for``: how long it has not reached
a peer, or, from the peer's last answer to its poll, how long the peer has not reached it,
which catches a cut one way only), and once the instances it has been out of touch with
for ``adopt_lease`` seconds are enough to form such a majority, no adoption of it can be
ruled out any more and it stops at once, through the path of an owner that
learnt it was adopted away (``OnlineReplication.stop_now``: no grace period, exit code
``EXIT_ADOPTED_AWAY``), and its restart fences whatever was adopted meanwhile.

The count is that of the votes: with ``n`` instances, an adoption needs ``(n - 1) // 2 + 1``
of N's ``n - 1`` others to have lost N, so N keeps its lease while fewer than that many are
out of its reach, that is while N and the instances it reaches are a strict majority of the
cluster. Config validation (``adopt_lease + stats_interval + peer_timeout < adopt_after``)
makes the lease end before the first vote can pass: both sides measure from their last
successful poll, which on N's side started before the cut, and on the others' side at
most about one interval and one timeout before it; after a cut one way only, N learns a
peer's count at its next poll of it, at most one interval and one answer late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

log = logging.getLogger("shardchat.node.replication")

CHECK_INTERVAL = 0.1  # seconds between two looks: reading the poll's state costs nothing


def needed_to_adopt(others: int) -> int:
    """How many of an owner's ``others`` must have lost it for ``auto.py`` to adopt it (the
    follower itself counted): a strict majority of them."""
    return others // 2 + 1


class Lease:
    """Watches how long this node has been out of touch with each other instance; stops the
    node once those are enough to adopt it."""

    def __init__(self, number: int, others: Callable[[], list[int]],
                 out_of_touch_for: Callable[[int], float], lease: float,
                 stop: Callable[[str], None]) -> None:
        self.number = number
        self._stop = stop  # called once, with the sentence to log, when the lease is gone
        self._others = others  # the other instances of the cluster, this node left out
        self._out_of_touch_for = out_of_touch_for
        self.lease = lease
        self.lost = asyncio.Event()
        self.reason = ""
        self.unreached: list[int] = []  # past the lease at the last look (metrics)
        self._task: asyncio.Task[None] | None = None
        self._started = time.monotonic()

    def start(self) -> None:
        """Begin with a fresh lease: the node has just been fenced by its follower or a
        majority of the others (``fence_at_start``), and a peer its stats poll has not
        reached yet since the start (it may have waited there for minutes) is counted from
        now, not from the process's start, so a restart after a partition does not stop
        again before its first poll."""
        self._started = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="adopt-lease")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while not self.lost.is_set():
            self.check()
            await asyncio.sleep(CHECK_INTERVAL)

    def check(self) -> bool:
        """One look; True (and ``lost`` set, the reason logged once) when the lease is gone."""
        others = self._others()
        held = time.monotonic() - self._started
        self.unreached = [o for o in others
                          if min(self._out_of_touch_for(o), held) >= self.lease]
        if not others or len(self.unreached) < needed_to_adopt(len(others)):
            return False
        if not self.lost.is_set():
            reached = len(others) - len(self.unreached)
            self.reason = (
                f"instance {self.number} could not reach a majority of the other instances "
                f"(or they it) for {self.lease:g} s (node.adopt_lease; in touch with "
                f"{reached} of {len(others)}, not with instances "
                f"{', '.join(map(str, self.unreached))}) and "
                "stopped before a follower could adopt its rooms. Restart it (systemd's "
                "Restart=always does): its start waits until its follower or a majority "
                "answers, and fences the rooms adopted meanwhile")
            log.error("%s", self.reason)
            self.lost.set()
            self._stop(self.reason)
        return True

    def stats(self) -> dict[str, object]:
        return {"lease": self.lease, "unreached": list(self.unreached),
                "lost": self.lost.is_set()}
