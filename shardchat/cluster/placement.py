"""Where a new room goes: the least-loaded healthy, non-draining instance.

Load of instance N, in the one measure the rebalancer uses too (``load.py``):

    load(N) = measured(N) + k * RESERVED_ROOM_WEIGHT * reserved(N) + pending(N)

* ``measured`` is the ``load`` of the node's stats (its rooms' weights: connections, recent
  messages, a small weight for idle rooms), read live for this node and from the last
  ``GET /internal/stats`` poll for peers (``peers.py``). A node that does not report
  ``load`` (an older version) is measured as ``connections + rooms``, and as long as one
  candidate is, every candidate is (``rank``): the two scales cannot be compared, and
  mixing them would send every room to whichever side looks smaller;
* ``pending`` is what a rebalance or drain in progress will add or take away
  (``rebalance.Plan.pending``), and instances it is emptying (``Plan.closed``) are not
  candidates: so placement does not fill the rebalancer's targets behind its back, and the
  next rebalance does not have to move those rooms again;
* ``reserved`` counts the rooms this node placed on N that N's stats cannot show yet: a
  placement in flight, or one finished after the last stats poll of N began. A reservation
  expires after ``node.placement_reservation_seconds`` at the latest. Without it, every
  creation between two polls would see the same "least loaded" node and a burst would pile
  onto it;
* ``k`` is the number of instances available for placement. Every node places rooms, and
  the load balancer spreads ``POST /api/rooms`` over all of them, so while this node placed
  one room the others placed about k - 1 more that it cannot see yet. Counting each own
  reservation k times keeps k nodes from all filling the same gap at once (which would
  overshoot it k-fold); with one node it is the plain count.

Ties go to this node first, then to the following instance numbers in cyclic order. Placing
on oneself costs no network hop, and starting the cycle at oneself means that the nodes
taking a burst at once do not all send their first room to the same instance. Together with
the reservations, a burst on an idle cluster spreads like round-robin.

A dead, slow or draining peer is skipped: peers that failed their last poll or a create call
are not candidates, and a create call that fails moves on to the next candidate within
``PLACEMENT_BUDGET`` seconds, so creation never hangs on a bad peer. With no candidate left
the answer is ``NoCapacity`` (HTTP 503 ``no_capacity``). Only a peer's own failure (no
connection, a timeout, a 5xx) counts against it. A 4xx is the peer refusing this request
(the receiving node has validated it already, so a peer with other limits, or a misrouted
one): the next candidate is tried and the peer stays a candidate for the next room; if
nobody took the room and a peer said 400 or 413, the caller gets that answer (``Refused``).
Marking such a peer failed would let anyone steer placement with requests peers refuse.

A creation with an Idempotency-Key (``node/idempotency.py``) first asks this node and every
peer, all at once and each within ``node.peer_timeout``, whether a room was already created
under that key, and answers that room if so. Peers believed down are asked too (a refused
connection costs a millisecond, and one that just came back may hold the key). A peer that
cannot be asked is passed over: it cannot serve the room it might hold either, and a room
now is worth more to the person waiting than a promise that the unreachable one exists.

``rank``/``choose`` are pure (no I/O, no clock) so they are tested as plain functions;
``Placer`` wires them to the peers and the local node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from shardchat.cluster.load import RESERVED_ROOM_WEIGHT, stats_load
from shardchat.cluster.peers import PeerError, PeerPool
from shardchat.config import Config
from shardchat.internal_api import IdempotencyConflict, NoCapacity, Refused, replay

log = logging.getLogger(__name__)

PLACEMENT_BUDGET = 2.0  # seconds one creation may spend trying peers before giving up


REQUEST_ERRORS = (400, 413)  # the request's own fault, worth passing on to the caller


class LocalNode(Protocol):
    """What the placer needs from the node it runs in."""

    number: int

    def stats(self) -> dict[str, Any]: ...

    async def create_room(self, name: str, private: bool,
                          key: str | None = None) -> dict[str, Any]: ...

    async def find_keyed_room(self, key: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class Load:
    """One instance as placement sees it. ``load``: the measure of ``load.py`` from its
    stats, None when its stats do not report one."""

    instance: int
    connections: int = 0
    rooms: int = 0
    healthy: bool = True
    draining: bool = False
    load: float | None = None

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining

    @classmethod
    def from_stats(cls, instance: int, stats: Mapping[str, Any], healthy: bool = True) -> Load:
        """An instance's ``Load`` from its stats answer (or a peer's last known state)."""
        return cls(instance, int(stats.get("connections", 0)), int(stats.get("rooms", 0)),
                   healthy, bool(stats.get("draining")), stats_load(stats))


def load_score(load: Load, reserved: int = 0, weight: int = 1, measured: bool = False,
               pending: float = 0.0) -> float:
    """``load`` plus reservations and a plan's pending change, in the measure of ``load.py``
    when ``measured`` (every candidate reports it), else as ``connections + rooms``."""
    if measured and load.load is not None:
        return load.load + weight * reserved * RESERVED_ROOM_WEIGHT + pending
    return load.connections + load.rooms + weight * reserved


def _tie_order(numbers: Iterable[int], prefer: int | None) -> dict[int, int]:
    """Position of each instance in the cycle that starts at ``prefer``."""
    ordered = sorted(set(numbers))
    if prefer is not None:
        later = [n for n in ordered if n >= prefer]
        ordered = later + [n for n in ordered if n < prefer]
    return {n: i for i, n in enumerate(ordered)}


def rank(loads: Iterable[Load], reservations: Mapping[int, int] | None = None,
         prefer: int | None = None, weight: int | None = None,
         pending: Mapping[int, float] | None = None,
         closed: Collection[int] = ()) -> list[int]:
    """Available instances, best first: lowest load, ties in cyclic order from ``prefer``.

    ``weight``: what one reservation counts for; default k, the number of candidates.
    ``pending``/``closed``: a rebalance or drain in progress (``rebalance.Plan.pending``,
    ``Plan.closed``); pending changes are in the measure of ``load.py`` and count only when
    every candidate reports it.
    """
    reservations = reservations or {}
    pending = pending or {}
    candidates = [ld for ld in loads if ld.available and ld.instance not in closed]
    k = len(candidates) if weight is None else weight
    measured = all(ld.load is not None for ld in candidates)
    ties = _tie_order((ld.instance for ld in candidates), prefer)
    candidates.sort(key=lambda ld: (load_score(ld, reservations.get(ld.instance, 0), k,
                                               measured, pending.get(ld.instance, 0.0)),
                                    ties[ld.instance]))
    return [ld.instance for ld in candidates]


def choose(loads: Iterable[Load], reservations: Mapping[int, int] | None = None,
           prefer: int | None = None, weight: int | None = None,
           pending: Mapping[int, float] | None = None,
           closed: Collection[int] = ()) -> int | None:
    """The instance a new room should go to, or None when none is available."""
    best = rank(loads, reservations, prefer, weight, pending, closed)
    return best[0] if best else None


@dataclass
class _Reservation:
    instance: int
    placed_at: float
    confirmed_at: float | None = None


class Reservations:
    """Rooms placed recently, until the target's stats can be trusted to count them."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic):
        self._ttl = ttl
        self._clock = clock
        self._items: list[_Reservation] = []

    def add(self, instance: int) -> _Reservation:
        item = _Reservation(instance, self._clock())
        self._items.append(item)
        return item

    def release(self, item: _Reservation) -> None:
        """The creation failed: it never loaded anyone."""
        if item in self._items:
            self._items.remove(item)

    def confirm(self, item: _Reservation) -> None:
        item.confirmed_at = self._clock()

    def counts(self, seen_since: Mapping[int, float] | None = None) -> dict[int, int]:
        """Reservations per instance; ``seen_since[n]``: start of n's latest stats poll.

        A confirmed reservation older than that poll is already in n's room count.
        """
        now = self._clock()
        self._items = [r for r in self._items if now - r.placed_at < self._ttl]
        seen_since = seen_since or {}
        out: dict[int, int] = {}
        for r in self._items:
            seen = seen_since.get(r.instance)
            if r.confirmed_at is not None and seen is not None and r.confirmed_at < seen:
                continue
            out[r.instance] = out.get(r.instance, 0) + 1
        return out


class Placer:
    """Creates a room on the least-loaded instance: this node or a peer."""

    def __init__(self, cfg: Config, local: LocalNode) -> None:
        self._local = local
        self._peer_timeout = cfg.node.peer_timeout
        self._budget = max(PLACEMENT_BUDGET, cfg.node.peer_timeout)
        self._peers = PeerPool(cfg, local.number)
        self._reservations = Reservations(cfg.node.placement_reservation_seconds)
        self._keyed: dict[str, asyncio.Future[None]] = {}  # keyed creations answered here

    @property
    def peers(self) -> PeerPool:
        """The peer pool placement polls; the directory asks the same peers."""
        return self._peers

    async def start(self) -> None:
        await self._peers.start()

    async def close(self) -> None:
        await self._peers.close()

    def loads(self) -> tuple[list[Load], dict[int, float]]:
        """Every instance's load now, and when each one's stats were taken."""
        stats = self._local.stats()
        now = time.monotonic()
        loads = [Load.from_stats(self._local.number, stats)]
        seen = {self._local.number: now}
        for p in self._peers.snapshot():
            loads.append(Load.from_stats(p.number, vars(p), p.healthy))
            seen[p.number] = p.fetched_at
        return loads, seen

    def _next(self, tried: set[int]) -> int | None:
        loads, seen = self.loads()
        order = rank(loads, self._reservations.counts(seen), prefer=self._local.number)
        order = [n for n in order if n not in tried]
        return order[0] if order else None

    async def find_key(self, key: str) -> dict[str, Any] | None:
        """``{"room", "fingerprint"}`` of the room created under ``key`` on this node or a
        peer, or None when none of those that answered has one."""
        found = await self._local.find_keyed_room(key)
        if found is not None:
            return found
        peers = [p.number for p in self._peers.snapshot()]  # down ones fail fast
        answers = await asyncio.gather(
            *(self._peers.find_key(n, key, self._peer_timeout) for n in peers),
            return_exceptions=True)
        for n, answer in zip(peers, answers, strict=True):
            if isinstance(answer, PeerError):
                log.warning("could not ask instance %s for a creation key: %s", n, answer.reason)
            elif isinstance(answer, BaseException):
                log.error("asking instance %s for a creation key failed: %r", n, answer)
            elif answer is not None:
                return answer
        return None

    async def create_room(self, name: str, private: bool,
                          key: str | None = None) -> dict[str, Any]:
        """Place and create the room (once per Idempotency-Key ``key``); raises NoCapacity
        when nobody can take it, IdempotencyConflict when ``key`` made another room.

        Keyed creations answered by this node take turns per key: a retry arriving while
        the first attempt is still placing waits for it, then finds its room."""
        if key is None:
            return await self._place(name, private, None)
        while (pending := self._keyed.get(key)) is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        turn = self._keyed[key] = asyncio.get_running_loop().create_future()
        try:
            found = await self.find_key(key)
            if found is not None:
                return replay(found, name, private)
            return await self._place(name, private, key)
        finally:
            del self._keyed[key]
            turn.set_result(None)

    async def _place(self, name: str, private: bool, key: str | None) -> dict[str, Any]:
        """Create the room on the best instance that takes it, within the budget."""
        deadline = time.monotonic() + self._budget
        tried: set[int] = set()
        refused: Refused | None = None
        while (target := self._next(tried)) is not None:
            tried.add(target)
            remaining = deadline - time.monotonic()
            is_local = target == self._local.number
            if remaining <= 0.05 and not is_local:
                continue  # out of time for network calls; only this node is still worth a try
            item = self._reservations.add(target)
            try:
                if is_local:
                    room = await self._local.create_room(name, private, key)
                else:
                    room = await self._peers.create_room(
                        target, name, private, min(self._peer_timeout, remaining), key)
            except IdempotencyConflict:
                self._reservations.release(item)
                raise
            except PeerError as exc:
                self._reservations.release(item)
                if exc.refused:  # the peer is up: it is still a candidate for the next room
                    log.warning("instance %s refused a room creation: %s", target, exc.reason)
                    if exc.status in REQUEST_ERRORS:
                        refused = Refused(exc.status, str(exc.body.get("error") or "bad_request"),
                                          str(exc.body.get("message") or "The room request "
                                              "was refused; check its name and size."))
                    continue
                self._peers.mark_failed(target, exc.reason, exc.draining)
                log.warning("placement skipped instance %s: %s", target, exc.reason)
                continue
            except Exception:
                self._reservations.release(item)
                log.exception("creating a room on this node (%s) failed", target)
                continue
            self._reservations.confirm(item)
            return room
        if refused is not None:
            raise refused
        raise NoCapacity()
