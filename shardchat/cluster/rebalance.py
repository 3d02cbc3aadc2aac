"""Which rooms to move, and where, to even out the load (``shardchat rebalance``) or to
empty an instance (``shardchat drain``). Pure planning: no network, no clock; the moves
themselves are the handoff's job.

Load is ``cluster/load.py``'s measure, the one placement uses, so a room the rebalancer
moves is not one placement would have put elsewhere, and the instance the rebalancer fills
is the one placement picks next.

What "even" means
    Instances are even when the most loaded one carries at most ``ratio`` (default 1.25)
    times the least loaded one's load, or when the two differ by at most ``EVEN_SLACK``
    (2 load units)::

        max - min <= max((ratio - 1) * min, EVEN_SLACK)

    The absolute slack is what makes an empty newcomer and an idle cluster come out right.
    With ``min = 0`` the ratio alone would demand moves however little there is to move: an
    all-idle cluster of 3 x 5,000 idle rooms (0.5 each) and an empty 4th would shuffle
    thousands of rooms to spread half a member's worth of work. A gap of 2 is what one small
    room in use (one member, a live room term) weighs: a gap that small can only be closed
    by moving rooms nobody is in, which helps nobody. Above a least load of
    ``EVEN_SLACK / (ratio - 1)`` (8 units) the ratio is the rule, as the product asks.
    Only instances that may hold rooms count (not the excluded, draining ones).

How a plan is made (``plan_rebalance``)
    Step by step, each step a function of the loads alone: take the most loaded instance S
    and the least loaded T (ties: the lower instance number, as placement breaks them);
    when they are even, the plan is done; else move from S to T the room whose weight is
    closest to half their gap: the heaviest one that leaves S at least as loaded as T,
    unless the lightest heavier one lands nearer the middle. A few heavy rooms thus do the
    work of many light ones. Only rooms lighter than the gap qualify, so every move goes
    from a more to a less loaded instance and strictly lowers the sum of squared loads:
    planning ends. If S holds no such room (each of its rooms weighs at least the gap), it
    exchanges with T: a room of S for a lighter one of T whose difference is closest to
    half the gap (two moves, each still downhill). If nothing helps, S is left as it is and
    the next most loaded instance gives to T instead, until the instances still in play are
    even: the least load still rises, so the ratio improves as far as it can, and the plan's
    ``reason`` names the instances nothing could lower.

    Because each step depends only on the loads, the state a plan ends in is one where a
    new plan stops at once: a second rebalance right after the first plans no moves. Room
    weights are summed in integer micro-units, so "the loads" are exact and a second plan
    reads from the post-move state exactly the loads the first plan reached. Ties between
    rooms of equal weight go to the lower room id, so a plan is reproducible.

    A room the steps moved twice is merged into one move from where it was to where it
    ends (or none if it ends at home): each move disconnects the room's members, and a
    plan should move as few rooms as it can. The merged moves are ordered so that each
    still goes downhill; in the rare case (a few very heavy rooms) that no order does, the
    steps are kept as they are.

    Greedy is not optimal in general (that is bin packing), but the plan is sure to end
    even when rooms are small against the spread: when every movable room weighs at most
    ``max(EVEN_SLACK, (ratio - 1) / ratio * average load)``. (If the plan stopped uneven,
    the most loaded instance S would hold no room lighter than the gap g to the least load
    m; so g <= w, the heaviest room, and m >= max - w >= average - w >= average / ratio,
    hence g <= w <= (ratio - 1) * m: even after all.)

How a drain is planned (``plan_drain``)
    Every room of the source goes, heaviest first, to whichever other instance is least
    loaded at that moment (the longest-processing-time rule: the big rooms are spread
    first, the small ones fill the gaps). Excluded instances take nothing.

While a plan runs, placement should count its moves as already done (``Plan.pending``) and
avoid the instances it closes (``Plan.closed``), so new rooms do not pile onto the
rebalancer's targets or onto an instance being drained.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from shardchat.cluster.load import RoomStats, room_weight

RATIO = 1.25  # the product's "even": the largest load at most 1.25 times the smallest
EVEN_SLACK = 2.0  # load units; loads this close count as even (see the module docstring)
UNITS = 1_000_000  # integer micro-units per load unit: exact sums (see the docstring)

_MAX_ID = "\U0010ffff"  # sorts after every room id


@dataclass(frozen=True)
class Move:
    """Move room ``room_id`` (weighing ``weight``) from instance ``source`` to ``target``."""

    room_id: str
    source: int
    target: int
    weight: float


@dataclass(frozen=True)
class Plan:
    """A plan's moves, in the order to run them, and what they do to the load.

    ``before``/``after``: load per instance (every instance given, excluded ones too).
    ``reached``: the goal holds afterwards (rebalance: the instances are even; drain: the
    source is empty); ``reason`` says why not when it does not. ``even``: whether the
    instances that may hold rooms are even afterwards (for a drain: without the source)."""

    moves: tuple[Move, ...]
    before: dict[int, float]
    after: dict[int, float]
    ratio: float
    reached: bool
    even: bool
    reason: str | None = None
    closed: frozenset[int] = field(default_factory=frozenset)

    @property
    def count(self) -> int:
        return len(self.moves)

    def pending(self) -> dict[int, float]:
        """Load each instance gains (> 0) or sheds (< 0) once the moves are done: what
        placement adds to the loads it sees while the plan runs."""
        return {n: self.after[n] - self.before[n] for n in self.after
                if self.after[n] != self.before[n]}

    def summary(self) -> str:
        """What the command line prints: the count, the loads, and the outcome."""
        def loads(values: Mapping[int, float]) -> str:
            return ", ".join(f"i{n} {v:.1f}" for n, v in sorted(values.items()))

        lines = [f"{self.count} room{'s' if self.count != 1 else ''} to move",
                 f"load before: {loads(self.before)}",
                 f"load after:  {loads(self.after)}"]
        if self.reason:
            lines.append(f"not reached: {self.reason}")
        return "\n".join(lines)


def is_even(loads: Iterable[float], ratio: float = RATIO, slack: float = EVEN_SLACK) -> bool:
    """Whether instances with these loads are even (see the module docstring)."""
    values = list(loads)
    if len(values) < 2:
        return True
    low, high = min(values), max(values)
    return high - low <= max((ratio - 1.0) * low, slack)


class _Cluster:
    """Rooms per instance, sorted by (weight units, room id), with exact integer totals."""

    def __init__(self, loads: Mapping[int, Sequence[RoomStats]]) -> None:
        self.rooms: dict[int, list[tuple[int, str]]] = {}
        self.total: dict[int, int] = {}
        self.weight: dict[str, int] = {}
        seen: dict[str, int] = {}
        for n, rooms in loads.items():
            items = []
            for room in rooms:
                if room.room_id in seen:
                    raise ValueError(f"room {room.room_id!r} is listed on instances "
                                     f"{seen[room.room_id]} and {n}; a room has one owner")
                seen[room.room_id] = n
                self.weight[room.room_id] = units(room_weight(room))
                items.append((self.weight[room.room_id], room.room_id))
            items.sort()
            self.rooms[n] = items
            self.total[n] = sum(u for u, _ in items)

    def loads(self) -> dict[int, float]:
        return {n: t / UNITS for n, t in sorted(self.total.items())}

    def move(self, item: tuple[int, str], source: int, target: int) -> Move:
        src = self.rooms[source]
        del src[bisect.bisect_left(src, item)]
        bisect.insort(self.rooms[target], item)
        self.total[source] -= item[0]
        self.total[target] += item[0]
        return Move(item[1], source, target, item[0] / UNITS)

    def pick(self, source: int, gap: int) -> tuple[int, str] | None:
        """The room of ``source`` whose move best evens it with an instance ``gap`` below:
        the one whose weight is closest to gap / 2 (the heaviest with 2 * weight <= gap,
        unless the lightest heavier one lands nearer the middle; a tie goes to the lighter
        one, which leaves ``source`` the more loaded), among rooms lighter than the gap
        (a heavier one would not lower the pair's maximum). Among equal weights, the lower
        room id. None when no room helps."""
        rooms = self.rooms[source]
        split = bisect.bisect_right(rooms, (gap // 2, _MAX_ID))
        below = None
        if split > 0:  # the first room of the heaviest weight that fits
            below = rooms[bisect.bisect_left(rooms, (rooms[split - 1][0], ""))]
        above = rooms[split] if split < len(rooms) and rooms[split][0] < gap else None
        if below is None or (above is not None and 2 * above[0] - gap < gap - 2 * below[0]):
            return above
        return below

    def exchange(self, source: int, target: int, gap: int
                 ) -> tuple[tuple[int, str], tuple[int, str]] | None:
        """When no single room of ``source`` helps (each weighs at least the gap): a room
        of ``source`` and a lighter one of ``target`` whose difference is closest to
        gap / 2 and below the gap, or None. Used only then, so ``source`` holds few rooms
        (every one of them at least the gap) and trying each is cheap."""
        theirs = self.rooms[target]
        best: tuple[int, tuple[int, str], tuple[int, str]] | None = None
        for mine in self.rooms[source]:
            # the rooms of target on either side of the ideal weight, mine - gap / 2
            k = bisect.bisect_left(theirs, (mine[0] - gap // 2, ""))
            for other in theirs[max(0, k - 1):k + 1]:
                diff = mine[0] - other[0]
                if 0 < diff < gap:
                    option = (abs(gap - 2 * diff), mine, other)
                    if best is None or option < best:
                        best = option
        return None if best is None else (best[1], best[2])


def units(weight: float) -> int:
    """A weight in integer micro-units (at least 1: every room weighs something)."""
    return max(1, round(weight * UNITS))


def _check(ratio: float, slack: float) -> None:
    if not ratio >= 1.0 or ratio == float("inf"):
        raise ValueError("the target ratio must be a finite number >= 1")
    if not slack >= 0.0:
        raise ValueError("the even slack must be >= 0")


def _even(cluster: _Cluster, members: Iterable[int], ratio: float, slack: float) -> bool:
    return is_even((cluster.total[n] for n in members), ratio, slack * UNITS)


Step = list[tuple[tuple[int, str], int, int]]  # (room, source, target) moves, in order


def _next_step(cluster: _Cluster, eligible: Sequence[int], ratio: float, slack: float,
               stuck: dict[int, int] | None = None) -> Step | None:
    """The next move (or exchange) from this state, or None when the plan is done.

    A function of the state alone, so the state a plan ends in is one where a new plan
    starts and stops at once. The most loaded instance gives to the least loaded; an
    instance with nothing that helps is passed over (noted in ``stuck`` with the least
    load it faced) and the next most loaded gives instead, as long as the instances still
    in play are not even among themselves, or one more move would make them all even."""
    if _even(cluster, eligible, ratio, slack):
        return None
    active = list(eligible)
    while len(active) >= 2:
        source = min(active, key=lambda n: (-cluster.total[n], n))
        target = min(active, key=lambda n: (cluster.total[n], n))
        gap = cluster.total[source] - cluster.total[target]
        item = cluster.pick(source, gap)
        if len(active) < len(eligible) and _even(cluster, active, ratio, slack):
            # the rest is even: go on only if this one move makes everything even
            if item is not None and _even_after(cluster, eligible, item, source, target,
                                                ratio, slack):
                return [(item, source, target)]
            return None
        if item is not None:
            return [(item, source, target)]
        pair = cluster.exchange(source, target, gap)
        if pair is not None:
            return [(pair[0], source, target), (pair[1], target, source)]
        if stuck is not None:
            stuck[source] = cluster.total[target]
        active.remove(source)
    return None


def _even_after(cluster: _Cluster, members: Iterable[int], item: tuple[int, str],
                source: int, target: int, ratio: float, slack: float) -> bool:
    """Whether ``members`` would be even once ``item`` went from ``source`` to ``target``."""
    shift = {source: -item[0], target: item[0]}
    return is_even((cluster.total[n] + shift.get(n, 0) for n in members), ratio,
                   slack * UNITS)


def plan_rebalance(loads: Mapping[int, Sequence[RoomStats]], ratio: float = RATIO,
                   exclude: Collection[int] = (), slack: float = EVEN_SLACK) -> Plan:
    """The fewest moves this planner finds that make the instances even.

    ``loads``: every instance's rooms (``RoomLoad`` or any row with the same fields).
    ``exclude``: instances that neither give nor take rooms (draining ones; drain them with
    ``plan_drain``). See the module docstring for the rule and for what "even" means."""
    _check(ratio, slack)
    cluster = _Cluster(loads)
    before = cluster.loads()
    eligible = sorted(n for n in loads if n not in exclude)
    start = dict(cluster.total)
    moves: list[Move] = []
    while (step := _next_step(cluster, eligible, ratio, slack)) is not None:
        for item, source, target in step:
            moves.append(cluster.move(item, source, target))
    moves = _compact(moves, start, cluster.weight)
    reached = _even(cluster, eligible, ratio, slack)
    reason = None if reached else _stuck_reason(cluster, eligible, ratio, slack)
    return Plan(tuple(moves), before, cluster.loads(), ratio, reached, reached, reason,
                frozenset(n for n in loads if n in exclude))


def _compact(moves: list[Move], start: Mapping[int, int], weight: Mapping[str, int]
             ) -> list[Move]:
    """One move per room: a room the steps moved twice goes straight to where it ends (or
    stays, if it ends where it began). The merged moves are put in an order where each
    still goes from a more to a less loaded instance (the first one, in step order, that
    does, each time); in the rare case that no such order exists the steps stay as they
    are. Same end state either way, so a second plan still finds nothing to do."""
    if len({m.room_id for m in moves}) == len(moves):
        return moves
    origin: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, m in enumerate(moves):
        origin.setdefault(m.room_id, m.source)
        last[m.room_id] = i
    rest = [Move(m.room_id, origin[m.room_id], m.target, m.weight)
            for i, m in enumerate(moves)
            if last[m.room_id] == i and origin[m.room_id] != m.target]
    load = dict(start)
    ordered: list[Move] = []
    while rest:
        i = next((i for i, m in enumerate(rest) if load[m.source] > load[m.target]), None)
        if i is None:
            return moves
        m = rest.pop(i)
        load[m.source] -= weight[m.room_id]
        load[m.target] += weight[m.room_id]
        ordered.append(m)
    return ordered


def _stuck_reason(cluster: _Cluster, eligible: Sequence[int], ratio: float,
                  slack: float) -> str:
    """Why the instances are not even at the end of a plan: the instances that nothing
    lowers, each with its gap and its lightest room."""
    stuck: dict[int, int] = {}
    _next_step(cluster, eligible, ratio, slack, stuck)
    parts = []
    for n in sorted(stuck, key=lambda n: (-cluster.total[n], n)):
        load, gap = cluster.total[n] / UNITS, (cluster.total[n] - stuck[n]) / UNITS
        lightest = cluster.rooms[n][0][0] / UNITS
        parts.append(f"instance {n} (load {load:.1f}) holds no room lighter than its gap of "
                     f"{gap:.1f} to the least loaded instance (its lightest weighs "
                     f"{lightest:.1f}) and no exchange narrows it")
    if not parts:
        return "no move brings the instances closer."
    rest = "the other instances were evened out among themselves" \
        if len(stuck) < len(eligible) - 1 else "no move brings the instances closer"
    return "; ".join(parts) + "; " + rest + "."


def plan_drain(source: int, loads: Mapping[int, Sequence[RoomStats]],
               exclude: Collection[int] = (), ratio: float = RATIO,
               slack: float = EVEN_SLACK) -> Plan:
    """Move every room of ``source`` to the least loaded other instances, heaviest first.

    ``exclude``: instances that take nothing (other draining ones). The plan is
    ``reached`` when ``source`` ends empty; with no instance to take the rooms it plans no
    move and says so."""
    _check(ratio, slack)
    if source not in loads:
        raise ValueError(f"instance {source} is not one of the instances given")
    cluster = _Cluster(loads)
    before = cluster.loads()
    closed = frozenset(n for n in loads if n in exclude or n == source)
    targets = sorted(n for n in loads if n not in closed)
    rooms = sorted(cluster.rooms[source], key=lambda item: (-item[0], item[1]))
    if rooms and not targets:
        return Plan((), before, before, ratio, False, False,
                    f"no other instance can take the rooms of instance {source} "
                    "(all others are excluded or draining)", closed)
    heap = [(cluster.total[n], n) for n in targets]
    heapq.heapify(heap)
    moves = []
    for weight, room_id in rooms:  # totals only: no need to keep the targets' rooms sorted
        load, target = heapq.heappop(heap)
        moves.append(Move(room_id, source, target, weight / UNITS))
        cluster.total[target] = load + weight
        heapq.heappush(heap, (load + weight, target))
    cluster.total[source] = 0
    return Plan(tuple(moves), before, cluster.loads(), ratio, True,
                _even(cluster, targets, ratio, slack), None, closed)
