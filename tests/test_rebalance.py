"""Rebalance and drain plans: which rooms move where, and what "even" means."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shardchat.cluster.load import RoomLoad, instance_load, room_weight
from shardchat.cluster.rebalance import (
    EVEN_SLACK,
    RATIO,
    UNITS,
    Move,
    Plan,
    is_even,
    plan_drain,
    plan_rebalance,
    units,
)
from shardchat.node.activity import UNKNOWN_IDLE_SECONDS, ActivityTracker

Loads = dict[int, list[RoomLoad]]
DAY = 86400.0
MONTH = 30 * DAY


def rooms(prefix: str, weights: Sequence[int], idle: float = MONTH) -> list[RoomLoad]:
    """Rooms of about these weights: that many members each (plus the idle floor)."""
    return [RoomLoad(f"{prefix}{i:03d}", connections=w, idle_seconds=idle)
            for i, w in enumerate(weights)]


def exact(loads: Mapping[int, Sequence[RoomLoad]]) -> dict[int, int]:
    """Each instance's load in the planner's integer units."""
    return {n: sum(units(room_weight(r)) for r in rs) for n, rs in loads.items()}


def apply(loads: Mapping[int, Sequence[RoomLoad]], moves: Sequence[Move]) -> Loads:
    """The cluster after the moves, run in order; checks each room is where a move says."""
    where = {r.room_id: n for n, rs in loads.items() for r in rs}
    for m in moves:
        assert where[m.room_id] == m.source, f"{m.room_id} is not on {m.source} for {m}"
        where[m.room_id] = m.target
    after: Loads = {n: [] for n in loads}
    for rs in loads.values():
        for r in rs:
            after[where[r.room_id]].append(r)
    return after


def assert_downhill(loads: Mapping[int, Sequence[RoomLoad]], plan: Plan) -> None:
    """Every move, at the moment it runs, goes from a more to a less loaded instance."""
    load = exact(loads)
    weight = {r.room_id: units(room_weight(r)) for rs in loads.values() for r in rs}
    for m in plan.moves:
        assert load[m.source] > load[m.target], (m, load)
        load[m.source] -= weight[m.room_id]
        load[m.target] += weight[m.room_id]


def ratio_of(values: Mapping[int, float]) -> float:
    return max(values.values()) / min(values.values())


# -- what even means ----------------------------------------------------------------------


def test_even_is_the_ratio_above_a_few_units_and_an_absolute_slack_below():
    assert is_even([125.0, 100.0, 110.0])
    assert not is_even([126.0, 100.0])
    assert is_even([1.9, 0.0])          # an all-but-idle pair: nothing worth a move
    assert not is_even([2.1, 0.0])
    assert is_even([9.9, 8.0])          # the slack (2) is wider than 25 % of 8 ...
    assert not is_even([12.6, 10.0])    # ... but not of 10
    assert is_even([]) and is_even([7.0])
    assert is_even([150.0, 100.0], ratio=1.5)


def test_an_all_idle_cluster_with_an_empty_newcomer_is_even_already():
    idle = {n: [RoomLoad(f"i{n}-{k}") for k in range(5000)] for n in (1, 2, 3)}
    idle[4] = []
    plan = plan_rebalance(idle)
    assert plan.moves == () and plan.reached and plan.reason is None
    assert plan.before[1] == pytest.approx(0.5, rel=1e-3)  # 5,000 idle rooms: half a member


def test_an_empty_newcomer_gets_rooms_until_the_ratio_holds():
    loads = {1: rooms("a", [5] * 40), 2: rooms("b", [5] * 40), 3: rooms("c", [5] * 40), 4: []}
    plan = plan_rebalance(loads)
    assert plan.reached and plan.reason is None
    assert {m.target for m in plan.moves} == {4}
    assert ratio_of(plan.after) <= RATIO
    assert plan.after[4] > 0
    assert plan_rebalance(apply(loads, plan.moves)).moves == ()


# -- how plans are made -------------------------------------------------------------------


def test_heavy_rooms_move_first_so_few_rooms_move():
    loads = {1: rooms("r", [30] + [1] * 24), 2: []}  # 54 against 0
    plan = plan_rebalance(loads)
    assert [m.room_id for m in plan.moves] == ["r000"]  # 24 against 30: one move, even
    assert plan.reached


def test_ties_go_to_the_lower_room_id_and_the_lower_instance_number():
    loads = {7: rooms("z", [4, 4, 4, 4]), 5: [], 3: []}
    plan = plan_rebalance(loads)
    assert plan.moves[0] == Move("z000", 7, 3, pytest.approx(4.0001))
    assert [m.target for m in plan.moves] == [3, 5]


def test_the_same_cluster_gives_the_same_plan_whatever_the_order_it_is_given_in():
    rng = random.Random(5)
    loads = {n: [RoomLoad(f"r{n}-{i}", rng.randint(0, 9), rng.random() * 5,
                          rng.choice([0.0, 900.0, MONTH])) for i in range(60)]
             for n in (1, 2, 3)}
    loads[4] = []
    plan = plan_rebalance(loads)
    shuffled = {n: rng.sample(loads[n], len(loads[n])) for n in (4, 2, 3, 1)}
    assert plan_rebalance(shuffled) == plan
    assert plan.count > 0


def test_excluded_instances_neither_give_nor_take():
    loads = {1: rooms("a", [10] * 12), 2: rooms("b", [10] * 30), 3: [], 4: []}
    plan = plan_rebalance(loads, exclude={2, 4})
    assert {(m.source, m.target) for m in plan.moves} == {(1, 3)}
    assert plan.after[2] == plan.before[2] and plan.after[4] == 0
    assert plan.closed == {2, 4}
    assert plan.reached  # even among the instances that may hold rooms


def test_one_room_heavier_than_the_spread_allows_is_left_and_the_plan_says_why():
    giant = [RoomLoad("giant", connections=400, idle_seconds=0)]
    loads = {1: giant, 2: rooms("s", [4] * 20), 3: []}
    plan = plan_rebalance(loads)
    assert not plan.reached and not plan.even
    assert "instance 1" in plan.reason and "401.0" in plan.reason
    assert all(m.source != 1 and m.room_id != "giant" for m in plan.moves)
    assert is_even([plan.after[2], plan.after[3]])  # the rest is evened instead...
    assert min(plan.after.values()) > min(plan.before.values())  # ...which raises the least
    assert "not reached" in plan.summary()
    again = plan_rebalance(apply(loads, plan.moves))
    assert again.moves == () and again.reason == plan.reason


def test_rooms_too_big_to_move_alone_are_exchanged():
    loads = {1: rooms("a", [30, 33]), 2: rooms("b", [20, 30])}  # 63 against 50, gap 13
    plan = plan_rebalance(loads)
    assert [(m.room_id, m.source, m.target) for m in plan.moves] == [
        ("a000", 1, 2), ("b000", 2, 1)]  # 30 for 20: 53 against 60
    assert plan.reached
    assert_downhill(loads, plan)


def test_a_plan_reports_its_moves_and_what_they_do():
    loads = {1: rooms("a", [6, 6, 6, 6]), 2: []}
    plan = plan_rebalance(loads)
    assert plan.count == 2
    assert plan.before == {1: pytest.approx(24.0004), 2: 0.0}
    assert plan.after == {1: pytest.approx(12.0002), 2: pytest.approx(12.0002)}
    assert plan.pending() == {1: pytest.approx(-12.0002), 2: pytest.approx(12.0002)}
    text = plan.summary()
    assert text.splitlines()[0] == "2 rooms to move"
    assert "i1 24.0" in text and "i2 12.0" in text and "not reached" not in text


def test_nothing_to_plan_with_fewer_than_two_instances():
    assert plan_rebalance({}).moves == ()
    assert plan_rebalance({1: rooms("a", [9, 9])}).reached


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="ratio"):
        plan_rebalance({1: []}, ratio=0.9)
    with pytest.raises(ValueError, match="one owner"):
        plan_rebalance({1: rooms("a", [1]), 2: rooms("a", [2])})
    with pytest.raises(ValueError, match="instance 9"):
        plan_drain(9, {1: []})


# -- drains -------------------------------------------------------------------------------


def test_a_drain_empties_the_instance_heaviest_rooms_first_onto_the_least_loaded():
    loads = {1: rooms("d", [30, 20, 10, 5, 5]), 2: rooms("x", [3]), 3: []}
    plan = plan_drain(1, loads)
    assert plan.reached and plan.after[1] == 0
    assert [(m.room_id, m.target) for m in plan.moves] == [
        ("d000", 3), ("d001", 2), ("d002", 2), ("d003", 3), ("d004", 2)]
    assert plan.after[2] == pytest.approx(38, abs=0.01)
    assert plan.after[3] == pytest.approx(35, abs=0.01)
    assert plan.closed == {1}
    assert plan_drain(1, apply(loads, plan.moves)).moves == ()


def test_a_drain_with_nowhere_to_go_plans_nothing_and_says_so():
    loads = {1: rooms("d", [3, 3]), 2: rooms("x", [1])}
    plan = plan_drain(1, loads, exclude={2})
    assert plan.moves == () and not plan.reached
    assert "no other instance" in plan.reason
    assert plan_drain(1, {1: [], 2: []}, exclude={2}).reached  # nothing to move


# -- the product's scenario ---------------------------------------------------------------


def mixed_instance(rng: random.Random, n: int, count: int) -> list[RoomLoad]:
    """Rooms as a real instance holds them: most idle for days, some in light use, a few
    busy ones."""
    out = []
    for i in range(count):
        kind = rng.random()
        if kind < 0.85:
            room = RoomLoad(f"r{n}-{i:05d}", 0, 0.0, rng.uniform(DAY, 30 * DAY))
        elif kind < 0.95:
            room = RoomLoad(f"r{n}-{i:05d}", rng.randint(0, 3), rng.uniform(0, 2),
                            rng.uniform(0, 2 * 3600))
        else:
            room = RoomLoad(f"r{n}-{i:05d}", rng.randint(2, 40), rng.uniform(1, 30),
                            rng.uniform(0, 120))
        out.append(room)
    return out


def fewest_rooms_to_reach(weights: Sequence[float], need: float) -> int:
    """The fewest rooms (the heaviest ones) whose weights add up to ``need``."""
    total = 0.0
    for count, w in enumerate(sorted(weights, reverse=True), start=1):
        total += w
        if total >= need:
            return count
    raise AssertionError("not enough load in the whole cluster")


def test_a_fourth_empty_instance_joins_three_busy_ones():
    """3 instances of 3,000 rooms each (85 % idle for days, 10 % in light use, 5 % busy)
    and an empty 4th. The newcomer must end with at least average / 1.25 of the load
    (else the ratio fails: max >= average), and each move brings it one room, so no plan
    does it in fewer moves than the heaviest rooms of the whole cluster need to add up to
    that. This planner takes, at each step, the heaviest fitting room of whichever
    instance is fullest, so it hands over each instance's own heaviest rooms, which are
    lighter on the whole than the cluster's top ones; and its last move from each source
    is whatever fits the remaining gap. Hence the slack: 10 % plus one move per source."""
    rng = random.Random(2024)
    loads = {n: mixed_instance(rng, n, 3000) for n in (1, 2, 3)}
    loads[4] = []
    plan = plan_rebalance(loads)
    bound = fewest_rooms_to_reach([room_weight(r) for rs in loads.values() for r in rs],
                                  sum(plan.before.values()) / 4 / RATIO)
    print(f"\n{plan.summary()}\nlower bound: {bound} moves")
    assert plan.reached
    assert max(plan.after.values()) <= RATIO * min(plan.after.values())
    assert {m.target for m in plan.moves} == {4}  # nothing shuffled between the old three
    assert len({m.room_id for m in plan.moves}) == plan.count
    assert bound <= plan.count <= bound * 1.1 + 3
    assert_downhill(loads, plan)
    assert plan_rebalance(apply(loads, plan.moves)).moves == ()


def test_measured_rooms_moved_with_their_numbers_plan_no_second_time():
    """The whole pure path: three nodes measure their rooms (activity trackers), the plan
    moves rooms to an empty 4th, each moved room takes its numbers along (export on the
    old owner, restore on the new one) and its members reconnect there. Measured again,
    the cluster needs no further move."""
    rng = random.Random(11)
    now = 50_000.0
    trackers = {n: ActivityTracker(clock=lambda: now) for n in (1, 2, 3, 4)}
    owned: dict[int, list[str]] = {n: [] for n in trackers}
    members: dict[str, int] = {}
    for n in (1, 2, 3):
        for i in range(400):
            room = f"n{n}-{i:03d}"
            owned[n].append(room)
            if rng.random() < 0.3:
                pace = rng.choice([0.2, 1.0, 4.0, 12.0])
                t = now - 3600.0
                while t < now:
                    trackers[n].message(room, now=t)
                    t += rng.expovariate(pace / 60.0)
                members[room] = rng.randint(1, 25)
    snap = {n: trackers[n].snapshot(members, owned[n]) for n in trackers}
    plan = plan_rebalance(snap)
    assert plan.reached and plan.count > 0
    for m in plan.moves:
        carried = trackers[m.source].export(m.room_id)
        trackers[m.source].forget(m.room_id)
        if carried is not None:
            trackers[m.target].restore(m.room_id, *carried)
        owned[m.source].remove(m.room_id)
        owned[m.target].append(m.room_id)
    again = {n: trackers[n].snapshot(members, owned[n]) for n in trackers}
    assert {n: instance_load(rs) for n, rs in again.items()} == \
        {n: pytest.approx(v, rel=1e-6) for n, v in plan.after.items()}
    assert plan_rebalance(again).moves == ()


# -- plan quality against brute force on tiny clusters ------------------------------------


def fewest_moves_to_even(loads: Mapping[int, Sequence[RoomLoad]]) -> int | None:
    """Brute force: the fewest rooms to move to make the instances even, None if no
    assignment of the rooms is even."""
    placed = [(units(room_weight(r)), n) for n, rs in loads.items() for r in rs]
    numbers = sorted(loads)
    best = None
    for assignment in itertools.product(numbers, repeat=len(placed)):
        total = dict.fromkeys(numbers, 0)
        for (w, _), n in zip(placed, assignment, strict=True):
            total[n] += w
        if is_even(total.values(), RATIO, EVEN_SLACK * UNITS):
            moved = sum(n != home for (_, home), n in zip(placed, assignment, strict=True))
            best = moved if best is None else min(best, moved)
    return best


def test_on_tiny_clusters_the_plan_is_nearly_as_good_as_brute_force():
    """400 random clusters of 2 to 3 instances and up to 6 rooms (heavy ones included,
    where greedy is weakest). Greedy is not optimal, so this measures it: where some
    assignment is even, the plan reaches even in at least 97 % of the clusters, and with
    at most two moves more than the fewest possible."""
    rng = random.Random(77)
    feasible = reached = 0
    for case in range(400):
        count = rng.randint(2, 3)
        loads: Loads = {n: [] for n in range(1, count + 1)}
        for i in range(rng.randint(0, 6)):
            loads[rng.randint(1, count)].append(RoomLoad(
                f"c{case}-{i}", rng.choice([0, 1, 2, 5, 10, 30]),
                rng.choice([0.0, 0.5, 3.0, 20.0]), rng.choice([0.0, 600.0, MONTH])))
        best = fewest_moves_to_even(loads)
        plan = plan_rebalance(loads)
        if best is None:
            assert not plan.reached
            continue
        feasible += 1
        if plan.reached:
            reached += 1
            assert plan.count <= best + 2, (loads, plan.moves, best)
    print(f"\nreached even in {reached} of {feasible} feasible tiny clusters")
    assert reached >= 0.97 * feasible


# -- properties over random clusters ------------------------------------------------------

SCALE = float(os.environ.get("SHARDCHAT_FUZZ_SCALE", "1"))
PROPERTY = settings(max_examples=max(1, int(300 * SCALE)), deadline=None, database=None,
                    derandomize=os.environ.get("SHARDCHAT_FUZZ_RANDOM", "0") != "1",
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

IDLE = st.sampled_from([0.0, 30.0, 600.0, 3600.0, 4 * 3600.0, DAY, UNKNOWN_IDLE_SECONDS])


def room_fields(small: bool) -> st.SearchStrategy[tuple[int, float, float]]:
    if small:
        return st.tuples(st.integers(0, 3), st.floats(0, 3), IDLE)
    connections = st.one_of(st.just(0), st.integers(0, 5), st.integers(0, 300))
    activity = st.one_of(st.just(0.0), st.floats(0, 5), st.floats(0, 120))
    return st.tuples(connections, activity, IDLE)


@st.composite
def clusters(draw: st.DrawFn, small: bool = False, max_rooms: int = 25,
             ) -> tuple[Loads, set[int]]:
    """Instances with distinct numbers, each with rooms; some instances excluded."""
    numbers = draw(st.lists(st.integers(1, 40), min_size=1, max_size=6, unique=True))
    loads: Loads = {}
    made = 0
    for n in numbers:
        fields = draw(st.lists(room_fields(small), max_size=max_rooms))
        loads[n] = [RoomLoad(f"room-{made + i:04d}", *f) for i, f in enumerate(fields)]
        made += len(fields)
    exclude = draw(st.sets(st.sampled_from(numbers), max_size=max(0, len(numbers) - 2)))
    return loads, exclude



@pytest.mark.property
@PROPERTY
@given(clusters())
def test_every_move_goes_downhill_and_the_plan_says_what_it_did(cluster):
    loads, exclude = cluster
    plan = plan_rebalance(loads, exclude=exclude)
    assert_downhill(loads, plan)
    assert all(m.source not in exclude and m.target not in exclude for m in plan.moves)
    after = apply(loads, plan.moves)
    load = exact(after)
    assert plan.after == {n: pytest.approx(load[n] / UNITS, abs=1e-9) for n in loads}
    assert plan.before == {n: pytest.approx(instance_load(rs), rel=1e-6, abs=1e-3)
                           for n, rs in loads.items()}
    eligible = [load[n] for n in loads if n not in exclude]
    assert plan.reached == plan.even == is_even(eligible, RATIO, EVEN_SLACK * UNITS)
    assert (plan.reason is None) == plan.reached
    assert sum(plan.pending().values()) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.property
@PROPERTY
@given(clusters())
def test_a_second_plan_right_after_the_first_plans_nothing(cluster):
    loads, exclude = cluster
    plan = plan_rebalance(loads, exclude=exclude)
    again = plan_rebalance(apply(loads, plan.moves), exclude=exclude)
    assert again.moves == ()
    assert again.reached == plan.reached


@pytest.mark.property
@PROPERTY
@given(clusters(small=True, max_rooms=60))
def test_the_ratio_is_met_whenever_every_room_is_small_against_the_spread(cluster):
    """The bound of rebalance.py's docstring: rooms of at most
    max(EVEN_SLACK, (ratio - 1) / ratio * average) always end even."""
    loads, exclude = cluster
    eligible = [n for n in loads if n not in exclude]
    average = sum(exact({n: loads[n] for n in eligible}).values()) / len(eligible)
    heaviest = max((units(room_weight(r)) for n in eligible for r in loads[n]), default=0)
    assume(heaviest <= max(EVEN_SLACK * UNITS, (RATIO - 1) / RATIO * average))
    plan = plan_rebalance(loads, exclude=exclude)
    assert plan.reached, plan.reason


@pytest.mark.property
@PROPERTY
@given(clusters(), st.data())
def test_a_drain_leaves_its_source_empty_and_spreads_by_load(cluster, data):
    loads, exclude = cluster
    source = data.draw(st.sampled_from(sorted(loads)))
    others = exclude - {source}
    plan = plan_drain(source, loads, exclude=others)
    targets = [n for n in loads if n != source and n not in others]
    if not targets and loads[source]:
        assert plan.moves == () and not plan.reached and plan.reason
        return
    assert plan.reached and plan.reason is None
    assert sorted(m.room_id for m in plan.moves) == sorted(r.room_id for r in loads[source])
    load = exact(loads)
    weight = {r.room_id: units(room_weight(r)) for r in loads[source]}
    for m in plan.moves:  # each room goes to the least loaded target at that moment
        assert m.source == source and m.target in targets
        assert load[m.target] == min(load[n] for n in targets)
        load[m.target] += weight[m.room_id]
    after = apply(loads, plan.moves)
    assert after[source] == [] and plan.after[source] == 0
    assert source in plan.closed
    assert plan_drain(source, after, exclude=others).moves == ()
