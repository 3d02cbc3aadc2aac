"""On-line replication (SPEC section 9) with real nodes on loopback: a follower per instance,
sync and async acks, adoption of a lost instance, fencing of one that comes back.

Cluster of three: instance 1's follower is 2, 2's is 3, 3's is 1 (the default ring).
"""

from __future__ import annotations

import asyncio
import socket

import pytest

import tests.replicas as replicas
from shardchat.cli_common import EXIT_OK, EXIT_REFUSED
from shardchat.node.main import EXIT_ADOPTED_AWAY
from tests.conftest import acreate_room, open_client
from tests.moves import move_room, room_state
from tests.replicas import (
    adopt,
    assert_fenced,
    burst,
    caught_up,
    check_adopted,
    cluster,
    lookup,
    metrics,
    stop_all,
    wipe,
)
from tests.support import async_wait_until, in_thread, page_redirect


@pytest.mark.timeout(240)
async def test_sync_kill_owner_mid_burst_wipe_and_adopt_loses_nothing_acked(tmp_path):
    with cluster(tmp_path, "sync") as (path, (one, two, three), _):
        room = await acreate_room(one, "Sync room")
        running, clients = await burst(one, room)
        token = clients[0].token
        assert (await asyncio.to_thread(metrics, one))["shipping"]["waited"] > 0  # gated
        one.kill()  # kill -9 in the middle of the burst
        acked = await stop_all(running, clients)
        wipe(one, tmp_path / "data")
        run = await asyncio.to_thread(adopt, path, 1)
        assert run.returncode == EXIT_OK, (run.stdout, run.stderr)
        assert "instance 2 adopted 1 rooms of instance 1" in run.stdout, run.stdout
        status, found = await asyncio.to_thread(lookup, three, room["id"])
        assert status == 200 and found["instance"] == 2, found
        assert found["socketio_path"] == "/i2/socket.io"
        adopted = dict(room, **found)
        history = await check_adopted(two, adopted, acked, token)
        # a client that saw up to the middle of the burst misses nothing
        middle = len(history) // 2
        late = await open_client(two, adopted, name="late", last_seq=middle)
        assert late.welcome["recovered"] is True
        assert late.welcome["history"][0]["seq"] == middle + 1
        await late.close()
        # the adopted rooms are replicated onward: instance 2's follower (3) catches up
        await async_wait_until(in_thread(lambda: caught_up(two)), timeout=30,
                               what="instance 3 to copy the adopted room")
        assert metrics(two)["shipping"]["snapshots"] >= 1


@pytest.mark.timeout(240)
async def test_async_loss_window_when_the_owner_dies_mid_burst(tmp_path):
    """Async: acked after the owner's commit. What a kill -9 mid burst loses is measured
    and reported (the window is a few milliseconds of commits), not asserted."""
    with cluster(tmp_path, "async") as (path, (one, two, _three), _):
        room = await acreate_room(one, "Async room")
        running, clients = await burst(one, room, until_acked=200)
        token = clients[0].token
        one.kill()
        acked = await stop_all(running, clients)
        run = await asyncio.to_thread(adopt, path, 1)
        assert run.returncode == EXIT_OK, (run.stdout, run.stderr)
        member = await open_client(two, room["id"], name="s0", last_seq=0, token=token)
        held = {m["client_id"]: m["seq"] for m in member.welcome["history"]}
        seqs = sorted(held.values())
        assert seqs == list(range(1, len(seqs) + 1)), seqs
        lost = [cid for cid, seq in acked.items() if held.get(cid) != seq]
        print(f"\nasync loss window: {len(lost)} of {len(acked)} acked messages lost "
              f"by kill -9 of the owner mid burst")
        # every message the follower holds is one that was acked (or in flight) once
        fresh = await member.send_ok("after", client_id="after")
        assert fresh["seq"] == len(seqs) + 1
        await member.close()


@pytest.mark.timeout(240)
async def test_sync_cut_to_the_follower_refuses_within_the_timeout_then_recovers(tmp_path):
    with cluster(tmp_path, "sync", cut=(2, 1), replication_ack_timeout=2.0) as (
            _path, (one, _two, _three), proxy):
        room = await acreate_room(one, "Cut room")
        member = await open_client(one, room, name="m")
        watcher = await open_client(one, room, name="w")
        await member.send_ok("before the cut", client_id="c0")
        proxy.stop()
        await async_wait_until(in_thread(lambda: not metrics(one)["shipping"]["connected"]),
                               timeout=15, what="the owner to see its follower gone")
        loop = asyncio.get_running_loop()
        started = loop.time()
        ack = await member.send("during the cut", client_id="c1")
        took = loop.time() - started
        assert ack["ok"] is False and ack["error"] == "unavailable", ack
        assert "instance 2" in ack["message"] and "client_id" in ack["message"], ack
        assert took < 2.0 + 1.5, f"the refusal took {took:.2f} s"
        # refused, but stored here and broadcast: the room saw it after the one before
        assert (await watcher.next("message"))["client_id"] == "c0"
        assert (await watcher.next("message"))["client_id"] == "c1"
        assert metrics(one)["shipping"]["refused"] >= 1
        proxy.start()
        await async_wait_until(in_thread(lambda: caught_up(one)), timeout=30,
                               what="the follower to catch up after the cut")
        again = await member.send("during the cut", client_id="c1")
        assert again["ok"] is True and again["seq"] == 2, again  # the stored one, once
        await member.close()
        await watcher.close()


@pytest.mark.timeout(240)
async def test_async_cut_catches_up_after_and_a_long_one_resends_a_snapshot(tmp_path):
    with cluster(tmp_path, "async", cut=(2, 1), replication_backlog=5) as (
            path, (one, two, _three), proxy):
        room = await acreate_room(one, "Cut room")
        member = await open_client(one, room, name="m")
        token = member.token
        await member.send_ok("before", client_id="c0")
        await async_wait_until(in_thread(lambda: caught_up(one)), timeout=30)
        first = metrics(one)["shipping"]["snapshots"]
        proxy.stop()
        acked = {"c0": 1}
        for i in range(1, 21):  # acked at once: async does not wait for the follower
            ack = await member.send_ok(f"cut {i}", client_id=f"c{i}")
            acked[f"c{i}"] = ack["seq"]
        lag = metrics(one)["shipping"]
        assert lag["records_behind"] >= 20 and lag["bytes_behind"] > 0, lag
        assert lag["seconds_behind"] > 0, lag
        proxy.start()
        await async_wait_until(in_thread(lambda: caught_up(one)), timeout=30,
                               what="the follower to catch up after the cut")
        assert metrics(one)["shipping"]["snapshots"] == first + 1  # 20 > backlog of 5
        await member.close()
        one.kill()
        run = await asyncio.to_thread(adopt, path, 1)
        assert run.returncode == EXIT_OK, (run.stdout, run.stderr)
        await check_adopted(two, room, acked, token)


@pytest.mark.timeout(240)
async def test_follower_restart_mid_stream_resumes_from_its_position(tmp_path):
    with cluster(tmp_path, "async") as (path, (one, two, _three), _):
        room = await acreate_room(one, "Restart room")
        running, clients = await burst(one, room, senders=2, until_acked=40)
        await async_wait_until(in_thread(lambda: metrics(one)["shipping"]["acked"] > 0),
                               timeout=30)
        snapshots = metrics(one)["shipping"]["snapshots"]
        two.kill()  # the follower dies mid-stream
        await async_wait_until(lambda: sum(len(s.acked) for s in running) >= 80, timeout=60)
        await asyncio.to_thread(two.start)
        await async_wait_until(lambda: sum(len(s.acked) for s in running) >= 120, timeout=60)
        token = clients[0].token
        acked = await stop_all(running, clients)
        await async_wait_until(in_thread(lambda: caught_up(one)), timeout=30,
                               what="the restarted follower to catch up")
        assert metrics(one)["shipping"]["snapshots"] == snapshots  # resumed, no snapshot
        one.kill()
        run = await asyncio.to_thread(adopt, path, 1)
        assert run.returncode == EXIT_OK, (run.stdout, run.stderr)
        await check_adopted(two, room, acked, token)


@pytest.mark.timeout(240)
async def test_a_fenced_owner_that_comes_back_serves_none_of_its_adopted_rooms(tmp_path):
    with cluster(tmp_path, "sync") as (path, (one, two, _three), _):
        room = await acreate_room(one, "Fenced room", private=True)
        member = await open_client(one, room, name="m")
        token = member.token
        for i in range(5):
            await member.send_ok(f"m{i}", client_id=f"c{i}")
        await member.close()
        one.kill()  # lost, disk kept
        run = await asyncio.to_thread(adopt, path, 1)
        assert run.returncode == EXIT_OK, (run.stdout, run.stderr)
        moved = await open_client(two, room["id"], name="m", token=token, last_seq=5,
                                  invite=room["invite"])
        await moved.send_ok("on the adopter", client_id="c5")
        await moved.close()
        await asyncio.to_thread(one.start)  # back with its old disk
        refused = await assert_fenced(one, room, 2)
        assert refused.data["data"]["instance"] == 2
        status, where = await asyncio.to_thread(page_redirect, one.base_url,
                                                f"/i1/room/{room['id']}")
        assert status == 308 and where == f"/i2/room/{room['id']}", (status, where)
        assert (await asyncio.to_thread(lookup, one, room["id"]))[1]["instance"] == 2
        # instance 1 answers again: adopting it now is refused, nothing changes
        again = await asyncio.to_thread(adopt, path, 1)
        assert again.returncode == EXIT_REFUSED and "still answers" in again.stderr, again


@pytest.mark.timeout(240)
async def test_an_owner_back_while_its_adopter_is_down_waits_before_serving(tmp_path):
    """Instance 1 comes back while instance 2, which adopted its rooms, is down: 3 alone
    is no majority of 1's peers, so 1 keeps its public listener closed and says why, and
    serves only once 2 is back and told it which rooms are no longer its own."""
    with cluster(tmp_path, "sync") as (path, (one, two, _three), _):
        room = await acreate_room(one, "Adopted while away")
        member = await open_client(one, room, name="m")
        await member.send_ok("hello", client_id="c0")
        await member.close()
        one.kill()
        run = await asyncio.to_thread(adopt, path, 1)
        assert run.returncode == EXIT_OK and "adopted 1 rooms" in run.stdout, run
        two.kill()
        one.spawn()  # back with its old disk, the adopter away
        await async_wait_until(lambda: "instance 1 waits before serving" in one.log(),
                               timeout=60, what="instance 1 to say it waits")
        assert one.proc.poll() is None
        with pytest.raises(OSError):  # the public listener is not open
            socket.create_connection(("127.0.0.1", one.port), timeout=2).close()
        await asyncio.to_thread(two.start)
        await one.wait_ready_async(60)
        await assert_fenced(one, room, 2)


@pytest.mark.timeout(240)
async def test_an_owner_adopted_while_it_runs_stops_at_once_and_is_fenced_at_its_restart(
        tmp_path):
    """``shardchat adopt --force`` while instance 1 serves (as ``auto_adopt`` does when a
    partition cut 1 off from the others but not from its clients): the adopter follows 1
    again, 1 learns from it that its rooms have a second owner and stops without a grace
    period (exit 3); restarted, it fences them like any instance that comes back."""
    with cluster(tmp_path, "sync") as (path, (one, two, _three), _):
        room = await acreate_room(one, "Two owners")
        member = await open_client(one, room, name="m")
        token = member.token
        for i in range(3):
            await member.send_ok(f"m{i}", client_id=f"c{i}")
        run = await asyncio.to_thread(adopt, path, 1, "--force")
        assert run.returncode == EXIT_OK and "adopted 1 rooms" in run.stdout, run
        code = await asyncio.to_thread(one.proc.wait, 30)
        assert code == EXIT_ADOPTED_AWAY, one.log()
        assert "instance 2 adopted 1 rooms that instance 1 still serves" in one.log()
        await member.close()
        await asyncio.to_thread(one.start)
        await assert_fenced(one, room, 2)
        moved = await open_client(two, room["id"], name="m", token=token, last_seq=0)
        assert [m["client_id"] for m in moved.welcome["history"]] == ["c0", "c1", "c2"]
        await moved.send_ok("on the adopter", client_id="c3")
        await moved.close()
        # once fenced, the follower's next connection finds nothing to stop for
        await async_wait_until(in_thread(lambda: caught_up(one)), timeout=30,
                               what="instance 2 to follow instance 1 again")
        assert one.proc.poll() is None


@pytest.mark.timeout(300)
async def test_auto_adopt_needs_a_majority(tmp_path):
    # adopt_lease (adopt_after / 2) + stats_interval + peer_timeout < adopt_after; a lease
    # of a few seconds, so that a loaded machine's slow polls do not stop a node
    with cluster(tmp_path, "async", cut=(2, 1), auto_adopt=True, adopt_after=6.0,
                 stats_interval=0.5, peer_timeout=1.0) as (_path, (one, two, three), proxy):
        room = await acreate_room(one, "Auto room")
        member = await open_client(one, room, name="m")
        await member.send_ok("hello", client_id="c0")
        await member.close()
        await async_wait_until(in_thread(lambda: caught_up(one)), timeout=30,
                               what="instance 2 to copy instance 1")
        proxy.stop()  # instance 2 (the follower) loses 1; instance 3 still reaches it

        def rounds() -> int:
            votes = metrics(two).get("auto_adopt", {}).get("1")
            return votes["rounds"] if votes else 0

        await async_wait_until(in_thread(lambda: rounds() >= 3), timeout=30,
                               what="the follower to ask the others three times")
        votes = metrics(two)["auto_adopt"]["1"]
        assert votes["agreeing"] == 1 and votes["needed"] == 2, votes
        _, state = await asyncio.to_thread(room_state, one, room["id"])
        assert state["state"] == "owner", state  # no majority: not adopted
        assert "adopted" not in metrics(two)
        one.kill()  # now 3 cannot reach 1 either: a majority
        # counted in the metrics once instance 2 follows 1 again, just after the adoption
        await async_wait_until(in_thread(lambda: "adopted" in metrics(two)), timeout=60,
                               what="instance 2 to adopt instance 1 by itself")
        assert metrics(two)["adopted"] == {"1": 1}
        await async_wait_until(in_thread(lambda: lookup(three, room["id"])[1].get("instance")
                                         == 2), timeout=60,
                               what="instance 3 to find the room on instance 2")


@pytest.mark.timeout(240)
async def test_a_room_that_moved_away_just_before_the_loss_is_not_adopted(tmp_path):
    """The forward never reached the follower (its link is cut): the copy still holds the
    room as the lost owner's, but its new owner serves it, so the adopter leaves it."""
    with cluster(tmp_path, "async", cut=(2, 1)) as (path, (one, two, three), proxy):
        room = await acreate_room(one, "Moved away")
        stays = await acreate_room(one, "Stays")
        member = await open_client(one, room, name="m")
        await member.send_ok("hello", client_id="c0")
        await member.close()
        await async_wait_until(in_thread(lambda: caught_up(one)), timeout=30)
        proxy.stop()
        status, report = await asyncio.to_thread(move_room, one, room["id"], 3)
        assert status == 200, report
        one.kill()
        run = await asyncio.to_thread(adopt, path, 1)
        assert run.returncode == EXIT_OK and "adopted 1 rooms" in run.stdout, run.stdout
        assert (await asyncio.to_thread(lookup, two, room["id"]))[1]["instance"] == 3
        assert (await asyncio.to_thread(room_state, two, room["id"]))[0] == 404
        assert (await asyncio.to_thread(lookup, three, stays["id"]))[1]["instance"] == 2


@pytest.mark.timeout(240)
async def test_sync_with_the_async_fallback_acks_while_the_follower_is_away(tmp_path):
    with cluster(tmp_path, "sync", cut=(2, 1), replication_ack_timeout=1.0,
                 replication_fallback="async") as (_path, (one, _two, _three), proxy):
        room = await acreate_room(one, "Fallback room")
        member = await open_client(one, room, name="m")
        await member.send_ok("before", client_id="c0")
        proxy.stop()
        await async_wait_until(in_thread(lambda: not metrics(one)["shipping"]["connected"]),
                               timeout=15, what="the owner to see its follower gone")
        for i in range(1, 6):  # the first waits out the timeout, the rest go at once
            await member.send_ok(f"away {i}", client_id=f"c{i}")
        ship = metrics(one)["shipping"]
        assert ship["fallback_acks"] >= 5 and ship["degraded"] is True, ship
        assert ship["refused"] == 0, ship
        assert "acking after the local commit only" in one.log()
        proxy.start()
        await async_wait_until(in_thread(lambda: caught_up(one)), timeout=30)
        await member.send_ok("back", client_id="c6")
        assert metrics(one)["shipping"]["degraded"] is False
        assert "caught up: acks are sync again" in one.log()
        await member.close()


@pytest.mark.timeout(240)
async def test_a_cut_cluster_that_needed_fresh_ports_still_goes_through_its_proxy(
        tmp_path, monkeypatch):
    """Another process takes the cut instances' ports after they were picked: the nodes
    start again on fresh ports, and the link the test cuts still runs through the proxy
    (the proxy follows instance 1's new port; node 2's own config names the proxy)."""
    squatters: list[socket.socket] = []
    picked = replicas.make_cluster_config

    def then_taken(*args, **kwargs):
        path, instances = picked(*args, **kwargs)
        for inst in instances[:2]:
            squatter = socket.socket()
            squatter.bind(("127.0.0.1", inst["internal_port"]))
            squatter.listen()
            squatters.append(squatter)
        return path, instances

    monkeypatch.setattr(replicas, "make_cluster_config", then_taken)
    try:
        with cluster(tmp_path, "sync", cut=(2, 1)) as (_path, (one, _two, _three), proxy):
            assert all(one.internal_port != s.getsockname()[1] for s in squatters)
            room = await acreate_room(one, "Fresh ports")
            member = await open_client(one, room, name="m")
            await member.send_ok("through the proxy", client_id="c0")
            await async_wait_until(in_thread(lambda: caught_up(one)), timeout=30,
                                   what="the follower to copy through the proxy")
            proxy.stop()
            await async_wait_until(in_thread(lambda: not metrics(one)["shipping"]["connected"]),
                                   timeout=15, what="the cut to reach the owner")
            await member.close()
    finally:
        for squatter in squatters:
            squatter.close()
