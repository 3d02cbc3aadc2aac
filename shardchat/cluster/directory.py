"""Where a room lives now: the lookup behind ``GET /api/rooms/<room_id>`` and the redirects.

A room lives on exactly one node, but it can move (SPEC section 8), so its address is a
fact only its current owner can vouch for. Every node answers, about itself,
``GET /internal/rooms/<room_id>`` with a ``whereabouts.RoomState``: owner, forwarded (it
moved from here to N), incoming (a copy is arriving, not served yet), or 404. A lookup
puts those answers together:

1. This node first: if it owns the room, that is the answer, with no network call.
2. A lead from here (this node forwarded the room, or holds an incoming copy of it) is
   followed first, hop by hop: after a move the old owner's forward names the new one, so
   one call usually settles it.
3. Otherwise every peer is asked at once, each call bounded by ``node.peer_timeout`` and
   the whole lookup by ``LOOKUP_BUDGET``, so a dead or hanging peer costs one timeout, not
   one per peer. Peers believed down are asked too: a refused connection costs a
   millisecond, and one that just came back may own the room.
4. Leads found in those answers (a forward to a node whose own answer came before the move
   reached it) are followed as in 2. A chain is at most ``MAX_HOPS`` calls long and never
   visits a node twice, so a forward loop (a bug, or a store restored from an old copy)
   ends the lookup instead of running it forever.

The outcome (``whereabouts.Lookup``): the owner's description (200); ``not_found`` (404)
only when every instance answered and none knows the room; ``unavailable`` (503) when no
one answered owner and some instance could not be asked, answered nonsense, or holds the
room as incoming or forwarded without an owner at the end of the chain: the room may well
exist, so a 404 would be a lie.

Nothing is cached. A lookup happens when a client cannot reach its room (or follows a link
of an instance that is gone), which is rare, and a remembered answer is exactly what goes
stale when a room moves: it would send clients to the node the room just left. The cost of
not caching is bounded by the per-address ``rate_limit_lookups``, checked before a lookup
runs (``node/lookup.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from shardchat.cluster.peers import PeerError
from shardchat.whereabouts import INCOMING, OWNER, BadState, Lookup, RoomState, parse_state

log = logging.getLogger(__name__)

LOOKUP_BUDGET = 3.0  # seconds one lookup may take at most, every hop included
MAX_HOPS = 4  # calls one chain of forwards may take


class RoomStates(Protocol):
    """The peers, as the directory asks them (``peers.PeerPool``)."""

    def numbers(self) -> list[int]: ...

    async def room_state(self, number: int, room_id: str, timeout: float) -> Any:
        """The peer's JSON answer about the room, None for a 404; raises PeerError."""


class LocalStates(Protocol):
    def __call__(self, room_id: str) -> dict[str, Any] | None:
        """This node's own ``GET /internal/rooms/<room_id>`` answer, None for nothing."""


class _Search:
    """What one lookup has learnt so far: each instance's state, and who could not say."""

    def __init__(self, room_id: str):
        self.room_id = room_id
        self.states: dict[int, RoomState | None] = {}  # None: knows nothing of the room
        self.failures: dict[int, str] = {}  # instance -> why it could not say

    def asked(self, number: int) -> bool:
        return number in self.states or number in self.failures

    def note(self, number: int, state: RoomState | None) -> None:
        self.failures.pop(number, None)
        self.states[number] = state

    def fail(self, number: int, why: str) -> None:
        if number not in self.states:
            self.failures[number] = why

    def owner(self) -> RoomState | None:
        """An owner's answer; should two claim the room (their answers straddle a move's
        commit), the one another instance forwards to is the newer."""
        owners = [s for s in self.states.values() if s is not None and s.state == OWNER]
        if not owners:
            return None
        targets = {s.to for s in self.states.values() if s is not None and s.to is not None}
        owners.sort(key=lambda s: (s.instance not in targets, s.instance))
        return owners[0]

    def leads(self) -> list[int]:
        """Instances some answer points at (forward targets, incoming sources)."""
        return sorted({s.lead for s in self.states.values()
                       if s is not None and s.lead is not None})

    def outcome(self) -> Lookup:
        """The answer when no owner was found (see the module docstring)."""
        room_id = self.room_id
        reasons = [f"instance {n} could not be asked ({why})"
                   for n, why in sorted(self.failures.items())]
        for state in self.states.values():
            if state is None or state.state == OWNER:
                continue
            if state.state == INCOMING:
                reasons.append(f"it is moving to instance {state.instance} right now")
            elif state.to not in self.failures:  # else that failure says it already
                reasons.append(f"instance {state.instance} says it moved to instance "
                               f"{state.to}, which does not serve it")
        if not reasons:
            return Lookup.not_found(room_id)
        return Lookup.unavailable(room_id, "; ".join(reasons))


class Directory:
    """Finds where a room lives now, for the node ``number`` it runs in."""

    def __init__(self, number: int, local: LocalStates, peers: RoomStates,
                 peer_timeout: float, budget: float = LOOKUP_BUDGET,
                 max_hops: int = MAX_HOPS):
        self.number = number
        self._local = local
        self._peers = peers
        self._peer_timeout = peer_timeout
        self._budget = max(budget, peer_timeout)
        self._max_hops = max_hops

    def knows(self, instance: int) -> bool:
        """Whether ``instance`` is part of the cluster now (this node or a peer). A request
        under the prefix of one that is not came through the load balancer's default rule:
        the instance is gone, and its rooms are found by lookup."""
        return instance == self.number or instance in self._peers.numbers()

    async def find(self, room_id: str) -> Lookup:
        """Where ``room_id`` lives now; never takes longer than the budget."""
        try:
            return await asyncio.wait_for(self._find(room_id), self._budget + 0.5)
        except TimeoutError:  # each call has its own bound; this is the last resort
            return Lookup.unavailable(room_id, "the instances took too long to answer")

    async def _find(self, room_id: str) -> Lookup:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._budget
        search = _Search(room_id)
        self._ask_here(search, room_id)
        here = search.states[self.number]
        if here is None or here.state != OWNER:
            if here is not None and here.lead is not None:
                await self._follow(search, here.lead, deadline)
            if search.owner() is None:
                await asyncio.gather(*(self._ask(search, n, deadline)
                                       for n in self._peers.numbers() if not search.asked(n)))
            for lead in search.leads():
                if search.owner() is not None:
                    break
                await self._follow(search, lead, deadline, again=True)
        owner = search.owner()
        if owner is not None and owner.room is not None:
            return Lookup.found(owner.room)
        return search.outcome()

    def _ask_here(self, search: _Search, room_id: str) -> None:
        try:
            answer = self._local(room_id)
            search.note(self.number, None if answer is None
                        else parse_state(self.number, room_id, answer))
        except BadState as exc:  # a bug of this node: say so, the peers may still know
            log.error("this node's own room state is not readable: %s", exc)
            search.fail(self.number, "its own answer is not readable")

    async def _follow(self, search: _Search, lead: int, deadline: float,
                      again: bool = False) -> None:
        """Ask ``lead``, then whom it points at, until an owner, a dead end, a node already
        on this chain, or ``max_hops`` calls. ``again``: ask ``lead`` even if it answered
        before (its answer may predate the move that made the lead)."""
        chain: set[int] = set()
        for _ in range(self._max_hops):
            if lead in chain or (search.asked(lead) and not again):
                return
            chain.add(lead)
            again = False
            if lead == self.number:
                self._ask_here(search, search.room_id)
            else:
                await self._ask(search, lead, deadline)
            state = search.states.get(lead)
            if state is None or state.state == OWNER or state.lead is None:
                return
            lead = state.lead

    async def _ask(self, search: _Search, number: int, deadline: float) -> None:
        """Ask peer ``number`` about the room; its answer or its failure goes to ``search``."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0.01:
            search.fail(number, "the lookup ran out of time")
            return
        try:
            answer = await self._peers.room_state(number, search.room_id,
                                                  min(self._peer_timeout, remaining))
            search.note(number, None if answer is None
                        else parse_state(number, search.room_id, answer))
        except PeerError as exc:
            log.info("lookup of room %s: instance %s could not say: %s", search.room_id,
                     number, exc.reason)
            search.fail(number, exc.reason)
        except BadState as exc:
            log.warning("lookup of room %s: %s", search.room_id, exc)
            search.fail(number, "its answer was not readable")
