"""kill -9 of the source or the target at every step of a move (SPEC section 8).

Each test arms one fault point (``SHARDCHAT_FAULT``, ``shardchat/node/faults.py``) on one of
two real nodes, moves a private room with history from node 1 to node 2 while a member keeps
sending messages with client ids, and checks the node really died there (SIGKILL). The dead
node is restarted without the switch; once the two have settled, exactly one of them owns
the room and holds every acked message once, seqs without a gap; a resend of an acked
client id is a duplicate; the other node forwards the room or knows nothing of it.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from shardchat.node import faults
from tests.conftest import Refused, assert_refusal_shape, create_room, open_client
from tests.moves import Sender, assert_one_owner_holds, move_room, room_state, settled, stats
from tests.support import NodeProcess, async_wait_until, in_thread, make_cluster_config, start_nodes

HISTORY = 20  # messages in the room before the move
SETTLE_TIMEOUT = 30.0


def _stored_by_target(point: str) -> bool:
    """After this point the target serves the room, whatever else happens."""
    return point in ("handoff.after_forward", "handoff.after_activate",
                     "handoff.target_after_activate")


@pytest.mark.parametrize("point", sorted(faults.SOURCE_POINTS + faults.TARGET_POINTS))
async def test_kill_at_every_step_leaves_one_owner_with_every_acked_message(tmp_path, point):
    cfg_path, instances = make_cluster_config(tmp_path, 2)
    armed = {faults.ENV: point}
    on_source = point in faults.SOURCE_POINTS
    source = NodeProcess(cfg_path, instances[0], tmp_path, env=armed if on_source else None)
    target = NodeProcess(cfg_path, instances[1], tmp_path, env=None if on_source else armed)
    victim, survivor = (source, target) if on_source else (target, source)
    start_nodes([source, target])
    try:
        room = await asyncio.to_thread(create_room, source, "Moving", True)
        member = await open_client(source, room, name="sender")
        token = member.token
        acked: dict[str, int] = {}
        for i in range(HISTORY):
            acked[f"old-{i}"] = (await member.send_ok(f"old {i}", client_id=f"old-{i}"))["seq"]
        sender = Sender(member).start()
        await async_wait_until(lambda: len(sender.acked) >= 5, what="live messages acked")

        status, report = await asyncio.to_thread(move_room, source, room["id"], 2)
        await asyncio.to_thread(victim.proc.wait, 30)
        assert victim.proc.returncode == -signal.SIGKILL, \
            f"node {victim.number} did not die at {point}: {status} {report}\n{victim.log()}"
        await sender.stop()
        await member.close()
        acked.update(sender.acked)

        if on_source and point != "handoff.after_activate":
            # The source is down, so the target cannot learn what became of its copy: it
            # holds it as incoming, and an incoming room is never served nor counted.
            state = await asyncio.to_thread(room_state, target, room["id"])
            assert state[1].get("state") == "incoming", state
            with pytest.raises(Refused) as refused:
                await open_client(target, room["id"], name="early", invite=room["invite"])
            assert_refusal_shape(refused.value, "unavailable")
            assert (await asyncio.to_thread(stats, target))["rooms"] == 0

        victim.env = {}  # restarted without the switch
        await asyncio.to_thread(victim.start)
        owner = await async_wait_until(in_thread(lambda: settled([source, target], room["id"])),
                                       SETTLE_TIMEOUT, what="one owner and no copy arriving")
        expected = target if _stored_by_target(point) else source
        assert owner is expected, f"{point}: owner is node {owner.number}"
        other = source if owner is target else target
        await assert_one_owner_holds(owner, other, room, acked, token)
        assert (await asyncio.to_thread(stats, owner))["rooms"] == 1
        assert (await asyncio.to_thread(stats, other))["rooms"] == 0
        assert survivor.proc.poll() is None
    finally:
        for node in (source, target):
            node.stop()
