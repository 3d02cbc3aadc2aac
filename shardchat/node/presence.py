"""Presence in large rooms: the joins and leaves of one tick, told as one ``batch``.

Below ``node.presence_batch_members`` members, every join and leave is its own ``presence``
event to the others (SPEC section 4). Above it, telling every member of every join costs
O(members) per join, O(members^2) for a room filling up; so the joins and leaves of one tick
are collected here and sent as one ``presence`` event ``{"event": "batch", "joined",
"left", "count"}`` (SPEC section 10), encoded once for everyone: O(members) per tick.

What a batch says is a summary of the tick's log of joins and leaves, in order:

* a member that joined and left within the tick is listed in ``left`` only: nobody was
  told it came, but a client may have met it in a ``members`` page, and drops it again;
* a member welcomed during the tick must hear what happened after its welcome was cut and
  must not hear of its own join (logged just before the cut): it gets, instead of the
  shared batch, the summary of the log from its cut on (``fresh``). The batch and every
  such catch-up are slices of one encoding of the tick's members (``catchup.py``), and a
  catch-up goes out as its own short part up to the next ``CATCHUP_SPAN`` entries of the
  log plus the rest of the tick from there, encoded once for every joiner cut in the
  same stretch: a recipient costs a copy of its bytes, not an encoding of its own.

The tick grows with the room: ``presence_tick`` at the threshold, in proportion to the
member count above it, at most ``presence_tick_max``. One batch is one frame per member, so
a room sends at most ``presence_batch_members / presence_tick`` presence frames a second
(200 with the defaults) until its tick reaches the maximum, then members /
``presence_tick_max``: whatever the join rate, n joins cost O(n x ticks) frames.

A batch is bounded in bytes like a page (``node.max_page_bytes``): one too large for it
goes out as several batch events in a row, each with the same final ``count``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from shardchat.config import NodeSettings
from shardchat.node.catchup import Catchup

log = logging.getLogger("shardchat.presence")

JOIN, LEAVE = True, False


@dataclass
class PresenceBatch:
    """One room's joins and leaves since its last batch went out."""

    log: list[tuple[bool, dict[str, str]]] = field(default_factory=list)  # (JOIN?, member)
    # members welcomed during this tick -> the length of the log when their welcome was cut
    fresh: dict[str, int] = field(default_factory=dict)

    def joined(self, member: dict[str, str]) -> None:
        self.log.append((JOIN, member))

    def left(self, member: dict[str, str]) -> None:
        self.log.append((LEAVE, member))
        self.fresh.pop(member["sid"], None)

    def cut(self, sid: str) -> None:
        """Member ``sid``'s welcome was just built: it knows the log up to here."""
        self.fresh[sid] = len(self.log)


def batched(settings: NodeSettings, members: int, pending: bool) -> bool:
    """Whether a join or leave in a room of ``members`` (counting the one that comes or
    goes) goes into a batch: above the threshold, or while a batch is pending anyway (so
    that no event overtakes an earlier one of the same member)."""
    return pending or members > settings.presence_batch_members


def tick(settings: NodeSettings, members: int) -> float:
    """Seconds a batch of a room of ``members`` collects before it goes out."""
    threshold = max(settings.presence_batch_members, 1)
    grown = settings.presence_tick * max(1.0, members / threshold)
    return min(settings.presence_tick_max, grown)


# How the room service delivers: (room, presence data, sids to skip) to every member, and
# (room, sids, presence data) to those members; each buffers for members still being
# welcomed.
Broadcast = Callable[[Any, dict[str, Any], Collection[str]], Awaitable[None]]
Tell = Callable[[Any, list[str], dict[str, Any]], Awaitable[None]]

# A joiner's catch-up is told in two parts: the log from its cut to the next multiple of
# this many entries (its own), then the rest of the tick from there, one encoding shared by
# every joiner cut in the same stretch. So a tick's catch-ups cost O(joiners x SPAN) bytes
# of their own plus one encoding per stretch, instead of an encoding of its own of up to the
# whole tick for each joiner.
CATCHUP_SPAN = 64


@dataclass
class _Pending:
    room: Any  # the room service's Room: ``record.id`` and ``members`` are read
    batch: PresenceBatch
    task: asyncio.Task | None = None


class Batches:
    """Every room's pending batch and the task that sends it when its tick ends."""

    def __init__(self, settings: NodeSettings, broadcast: Broadcast, tell: Tell,
                 served: Callable[[Any], bool]) -> None:
        self.settings = settings
        self._broadcast = broadcast
        self._tell = tell
        self._served = served  # whether the node still serves that room (it did not move)
        self._pending: dict[str, _Pending] = {}  # room id -> its batch
        self._closed = False

    def announce(self, room: Any, member: dict[str, str], *, joined: bool) -> bool:
        """Put a join or leave in the room's batch, or return True: announce it alone now
        (SPEC section 4), as below ``node.presence_batch_members`` members. A join is
        logged when the joiner's welcome is cut, and the joiner is fresh from there."""
        room_id = room.record.id
        count = len(room.members) + (0 if joined else 1)  # the one coming or going counts
        if not batched(self.settings, count, room_id in self._pending):
            return True
        if self._closed:
            return False  # stopping: everyone is being disconnected anyway
        pending = self._pending.get(room_id)
        if pending is None:
            pending = self._pending[room_id] = _Pending(room, PresenceBatch())
            delay = tick(self.settings, len(room.members))
            pending.task = asyncio.get_running_loop().create_task(
                self._flush_after(pending, delay), name=f"presence-{room_id}")
        if joined:
            pending.batch.joined(member)
            pending.batch.cut(member["sid"])
        else:
            pending.batch.left(member)
        return False

    async def _flush_after(self, pending: _Pending, delay: float) -> None:
        """At the end of the tick: the batch to every member but the fresh ones, and to
        each fresh one what happened after its welcome was cut."""
        await asyncio.sleep(delay)
        room, batch = pending.room, pending.batch
        if self._pending.get(room.record.id) is not pending:
            return
        del self._pending[room.record.id]  # what comes now starts the next batch
        if not self._served(room):
            return
        try:
            count, cap = len(room.members), self.settings.max_page_bytes
            encoded = Catchup(batch.log)  # every member of the tick encoded once
            for event in encoded.events(count, cap):
                await self._broadcast(room, event, batch.fresh)
            rest: dict[int, list[str]] = {}  # where a shared rest starts -> its joiners
            for sid, start in batch.fresh.items():
                stretch = min(-(-start // CATCHUP_SPAN) * CATCHUP_SPAN, len(batch.log))
                for event in encoded.events(count, cap, start, stretch):
                    await self._tell(room, [sid], event)
                rest.setdefault(stretch, []).append(sid)
            for stretch, sids in rest.items():
                for event in encoded.events(count, cap, stretch):
                    await self._tell(room, sids, event)
        except Exception:
            log.exception("the presence batch of room %s failed", room.record.id)

    def drop(self, room_id: str) -> None:
        """Forget a room's pending batch: the room moved (its members are told at their
        next welcome, wherever the room is then) or its last member left (nobody is left to
        tell, and the next joiner's welcome says who is in)."""
        pending = self._pending.pop(room_id, None)
        if pending is not None and pending.task is not None:
            pending.task.cancel()

    async def close(self) -> None:
        """The node stops: pending batches are dropped (their members are all being
        disconnected), later ones are not started, and no flush task outlives the node."""
        self._closed = True
        tasks = [p.task for p in self._pending.values() if p.task is not None]
        self._pending.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def pending(self) -> int:
        """Rooms with a batch waiting for its tick."""
        return len(self._pending)
