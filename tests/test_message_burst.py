"""Bursts of messages from many clients at once, on both transports and both engines.

The message hot path hands each message to the store without a task or a future (the fast
engine's direct handler on a websocket, ``RoomService.message_now``), hands the store's
writer one loop tick's messages at a time, and broadcasts and acks from the commit's
callback. Next to it the task path (long-polling, the stock engine, a frozen room) does the
same with a task per event. Whatever path a message took: every ack is ``ok``, each room's
seqs are gap-free, a client's messages get seqs in the order it sent them, every member
gets every message once and in seq order, a repeated ``client_id`` is stored once, and an
ack is only sent once its message is committed: ``kill -9`` at a commit (before it, and
after it but before the acks, ``shardchat/node/faults.py``) loses nothing that was acked.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from shardchat.node import faults
from tests.conftest import (
    ENGINES,
    EVENT_TIMEOUT,
    RoomClient,
    acreate_room,
    all_history,
    open_client,
)
from tests.support import NodeProcess, in_thread, make_cluster_config, start_nodes

pytestmark = pytest.mark.timeout(180)
ENGINES = ENGINES  # the burst runs on the fast and the stock engine

ROOMS = 2
CLIENTS = 5  # per room
PER_CLIENT = 12  # messages each client sends at once
REPEATS = 3  # of its last messages each client sends again with the same client_id
SETTINGS = {"rate_limit_messages": 100_000}


def burst_shape(engine: str, transport: list[str]) -> tuple[int, int, int]:
    """(clients per room, messages each, repeats). The stock engine answers a long-poll with
    everything queued, and python-engineio clients drop a response of more than 16
    packets, so on that pair a member's messages and acks must stay below 16 in all."""
    if engine == "stock" and transport == ["polling"]:
        return 2, 4, 1  # 8 messages + 5 acks per member
    return CLIENTS, PER_CLIENT, REPEATS


async def burst(client: RoomClient, tag: str, count: int, repeats: int = 0,
                timeout: float = EVENT_TIMEOUT) -> list[tuple[str, Any]]:
    """Send ``count`` messages without waiting in between (ids ``tag-0`` ...), then the
    last ``repeats`` of them again; [(client_id, ack or exception)] in sending order."""
    ids = [f"{tag}-{k}" for k in range(count)]
    ids += ids[count - repeats:]
    calls = [client.sio.call("message", {"text": f"text of {cid}", "client_id": cid},
                             namespace=client.namespace, timeout=timeout) for cid in ids]
    # gather starts the calls in list order, so the frames leave in that order
    results = await asyncio.gather(*calls, return_exceptions=True)
    return list(zip(ids, results, strict=True))



def assert_gap_free_and_once(messages: list[dict]) -> None:
    """Seqs 1..n in order, and no client_id stored twice."""
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    ids = [m["client_id"] for m in messages]
    assert len(ids) == len(set(ids)), "a client_id was stored twice"


async def test_a_burst_from_many_clients_is_acked_stored_once_and_in_order(
        tmp_path, transport, engine):
    cfg_path, instances = make_cluster_config(tmp_path, 1, engine=engine, node=SETTINGS)
    node = NodeProcess(cfg_path, instances[0], tmp_path)
    start_nodes([node])
    clients: list[RoomClient] = []
    size, each, repeats = burst_shape(engine, transport)
    try:
        rooms = [await acreate_room(node, f"Burst {r}") for r in range(ROOMS)]
        members = [[await open_client(node, room, name=f"c{r}-{i}", transport=transport)
                    for i in range(size)] for r, room in enumerate(rooms)]
        clients = [c for room in members for c in room]
        sent = await asyncio.gather(*(burst(c, f"r{r}c{i}", each, repeats)
                                      for r, room in enumerate(members)
                                      for i, c in enumerate(room)))
        per_room = size * each
        for r, room in enumerate(members):
            seq_of: dict[str, int] = {}
            for i in range(size):
                acks = sent[r * size + i]
                assert all(isinstance(a, dict) and a.get("ok") is True for _, a in acks), acks
                first = acks[:each]
                seqs = [a["seq"] for _, a in first]
                assert seqs == sorted(seqs), f"client {i} of room {r}: seqs not in send order"
                seq_of.update((cid, a["seq"]) for cid, a in first)
                for cid, again in acks[each:]:  # a repeat is the first one's seq
                    assert again["seq"] == seq_of[cid], (cid, again)
            assert sorted(seq_of.values()) == list(range(1, per_room + 1))
            for member in room:  # every message once, in seq order
                got = [(await member.next("message"))["seq"] for _ in range(per_room)]
                assert got == list(range(1, per_room + 1))
                assert member.pending("message") == []
            reader = await open_client(node, rooms[r], name=f"reader{r}", transport=transport)
            clients.append(reader)
            stored = await all_history(reader)
            assert len(stored) == per_room
            assert_gap_free_and_once(stored)
            assert {m["client_id"]: m["seq"] for m in stored} == seq_of
    finally:
        for c in clients:
            await c.close()
        node.stop()


@pytest.mark.parametrize("point", faults.STORE_POINTS)
async def test_kill_9_at_a_commit_loses_nothing_acked(tmp_path, point):
    """The node dies (SIGKILL) at its second commit of messages, before or after COMMIT,
    in the middle of bursts on both transports. After a restart, every acked message is
    stored with its acked seq, seqs are gap-free, and a resend of everything (same
    members, same client ids) stores each message once."""
    cfg_path, instances = make_cluster_config(tmp_path, 1, node=SETTINGS)
    armed = {faults.ENV: point, faults.AT_ENV: "2"}
    node = NodeProcess(cfg_path, instances[0], tmp_path, env=armed)
    start_nodes([node])
    clients: list[RoomClient] = []
    try:
        room = await acreate_room(node, "Crash")
        transports = [["websocket"], ["websocket"], ["polling"], ["websocket"]]
        clients = [await open_client(node, room, name=f"k{i}", transport=t)
                   for i, t in enumerate(transports)]
        tokens = [c.token for c in clients]
        acked: dict[str, int] = {}
        sent: list[list[str]] = [[] for _ in clients]
        for wave in range(20):  # bounded: the second commit comes in the first waves
            results = await asyncio.gather(*(
                burst(c, f"w{wave}k{i}", 6, timeout=5.0) for i, c in enumerate(clients)))
            for i, acks in enumerate(results):
                sent[i] += [cid for cid, _ in acks]
                acked.update((cid, a["seq"]) for cid, a in acks
                             if isinstance(a, dict) and a.get("ok") is True)
            if node.proc.poll() is not None:
                break
        await asyncio.to_thread(node.proc.wait, 30)
        assert node.proc.returncode == -signal.SIGKILL, f"did not die at {point}\n{node.log()}"
        for c in clients:
            await c.close()

        node.env = {}  # restarted without the switch
        await in_thread(node.start)()
        reader = await open_client(node, room, name="reader")
        clients = [reader]
        stored = await all_history(reader)
        assert_gap_free_and_once(stored)
        stored_seq = {m["client_id"]: m["seq"] for m in stored}
        lost = {cid: seq for cid, seq in acked.items() if stored_seq.get(cid) != seq}
        assert not lost, f"acked but not stored with that seq: {lost}"

        # Everyone sends everything again as the same member: what is stored is a
        # duplicate with its stored seq, the rest is stored now, each exactly once.
        again = [await open_client(node, room, name=f"k{i}", token=tokens[i])
                 for i in range(len(tokens))]
        clients += again
        for c, ids in zip(again, sent, strict=True):
            for cid in ids:
                ack = await c.send_ok(f"text of {cid}", client_id=cid)
                if cid in stored_seq:
                    assert ack["seq"] == stored_seq[cid], (cid, ack)
        last = await open_client(node, room, name="final")
        clients.append(last)
        final = await all_history(last)
        assert_gap_free_and_once(final)
        assert {m["client_id"] for m in final} == {cid for ids in sent for cid in ids}
    finally:
        for c in clients:
            await c.close()
        node.stop()
