"""Automatic adoption (``node.auto_adopt``): only when a majority agrees the owner is gone.

Every node tells, at ``GET /internal/reachability``, how long it has not reached each peer
(its stats poll, ``cluster/peers.py``, is the probe: every ``node.stats_interval``, and
every fraction of a second while a peer fails). The follower M of instance N adopts N when
it has not reached N for ``node.adopt_after`` seconds itself *and* a strict majority of the
instances other than N (M included) report the same. A peer M cannot ask counts as not
agreeing, so a follower cut off from the rest of the cluster never adopts: at worst the
cluster waits for an operator (``shardchat adopt``), it never has two owners because of a
one-sided view. The owner's side of the same count is its lease (``lease.py``): cut off
from that many, it stops before the first vote can pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from shardchat.internal_api import REACHABILITY_PATH
from shardchat.node.replication.lease import needed_to_adopt

log = logging.getLogger("shardchat.node.replication")

CHECK_INTERVAL = 1.0  # seconds between two looks


class AutoAdopt:
    """Watches the instances this node follows; adopts one once a majority lost it."""

    def __init__(self, number: int, owners: list[int], others: Callable[[], dict[int, str]],
                 unreached_for: Callable[[int], float], after: float,
                 adopt: Callable[[int], Awaitable[Any]], headers: dict[str, str],
                 timeout: float) -> None:
        self.number = number
        self.owners = list(owners)
        self._others = others  # instance -> internal base URL, this node left out
        self._unreached_for = unreached_for
        self.after = after
        self._adopt = adopt
        self._headers = headers
        self._timeout = timeout
        self.adopted: set[int] = set()  # watched again once they are reachable again
        self.votes: dict[int, tuple[int, int, int]] = {}  # owner -> agreeing, needed, rounds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="auto-adopt")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        async with aiohttp.ClientSession(headers=self._headers) as session:
            while True:
                await asyncio.sleep(CHECK_INTERVAL)
                for owner in [o for o in self.adopted if self._unreached_for(o) == 0]:
                    self.adopted.discard(owner)  # back (fenced): watched again
                    self.owners.append(owner)
                for owner in list(self.owners):
                    try:
                        if await self._majority_lost(session, owner):
                            log.warning("a majority of the instances has not reached "
                                        "instance %d for %g s: adopting its rooms", owner,
                                        self.after)
                            await self._adopt(owner)
                            self.forget(owner)
                    except Exception:
                        log.exception("automatic adoption of instance %d failed", owner)

    def forget(self, owner: int) -> None:
        """``owner`` was adopted: not again until it has been seen back."""
        if owner in self.owners:
            self.owners.remove(owner)
            self.adopted.add(owner)

    async def _majority_lost(self, session: aiohttp.ClientSession, owner: int) -> bool:
        if self._unreached_for(owner) < self.after:
            self.votes.pop(owner, None)
            return False
        voters = {n: url for n, url in self._others().items() if n != owner}
        agreeing = 1 + sum(await asyncio.gather(
            *(self._agrees(session, url, owner) for url in voters.values())))
        # a strict majority of the others of ``owner`` (the count its lease is held by)
        needed = needed_to_adopt(len(voters) + 1)
        rounds = self.votes.get(owner, (0, 0, 0))[2] + 1
        self.votes[owner] = (agreeing, needed, rounds)
        return agreeing >= needed

    async def _agrees(self, session: aiohttp.ClientSession, url: str, owner: int) -> bool:
        try:
            async with session.get(f"{url}{REACHABILITY_PATH}",
                                   timeout=aiohttp.ClientTimeout(total=self._timeout)) as r:
                body = await r.json() if r.status == 200 else {}
            seconds = body.get("unreached_for", {}).get(str(owner))
            return isinstance(seconds, int | float) and seconds >= self.after
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, AttributeError):
            return False
