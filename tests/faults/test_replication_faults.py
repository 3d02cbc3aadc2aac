"""kill -9 at each durable step of adoption and fencing (SPEC section 9).

``replication.after_adopt``: the adopter dies once the adopted rooms are durable, before it
answers. Restarted, it owns them; ``shardchat adopt`` run again answers the same rooms and
stores nothing twice. ``replication.after_fence``: the lost owner, back, dies once its
adopted rooms are forwards, before it serves. Restarted, it still serves none of them.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from shardchat.cli_common import EXIT_OK
from shardchat.node import faults
from tests.conftest import acreate_room, open_client
from tests.replicas import (
    adopt,
    assert_fenced,
    burst,
    caught_up,
    check_adopted,
    cluster,
    lookup,
    stop_all,
)
from tests.support import async_wait_until, in_thread


@pytest.mark.timeout(240)
async def test_adopter_killed_after_the_adoption_commit(tmp_path):
    armed = {2: {faults.ENV: "replication.after_adopt"}}
    with cluster(tmp_path, "sync", env=armed) as (path, (one, two, three), _):
        room = await acreate_room(one, "Adopted")
        running, clients = await burst(one, room, senders=2, until_acked=30)
        token = clients[0].token
        one.kill()
        acked = await stop_all(running, clients)
        run = await asyncio.to_thread(adopt, path, 1)
        assert run.returncode != EXIT_OK, run.stdout  # no answer: the adopter died
        await asyncio.to_thread(two.proc.wait, 30)
        assert two.proc.returncode == -signal.SIGKILL, two.log()
        two.env = {}
        await asyncio.to_thread(two.start)
        status, found = await asyncio.to_thread(lookup, three, room["id"])
        assert status == 200 and found["instance"] == 2, found
        again = await asyncio.to_thread(adopt, path, 1)
        assert again.returncode == EXIT_OK and "adopted 1 rooms" in again.stdout, again
        await check_adopted(two, dict(room, **found), acked, token)


@pytest.mark.timeout(240)
async def test_fenced_owner_killed_after_fencing_stays_fenced(tmp_path):
    armed = {1: {faults.ENV: "replication.after_fence"}}  # fires only when rooms are fenced
    with cluster(tmp_path, "async", env=armed) as (path, (one, two, _three), _):
        room = await acreate_room(one, "Fenced")
        member = await open_client(one, room, name="m")
        await member.send_ok("hello", client_id="c0")
        await member.close()
        # async: the follower must hold the room before the loss (else it is in the window)
        await async_wait_until(in_thread(lambda: caught_up(one)), timeout=30)
        one.kill()
        run = await asyncio.to_thread(adopt, path, 1)
        assert run.returncode == EXIT_OK and "adopted 1 rooms" in run.stdout, run
        one.spawn()  # back with its disk: fences, then dies before serving
        await asyncio.to_thread(one.proc.wait, 60)
        assert one.proc.returncode == -signal.SIGKILL, one.log()
        one.env = {}
        await asyncio.to_thread(one.start)
        await assert_fenced(one, room, 2)
        adopted = await open_client(two, room["id"], name="m", last_seq=0)
        assert [m["client_id"] for m in adopted.welcome["history"]] == ["c0"]
        await adopted.close()
