"""The compiled load generator (bench/cloadgen): built from its source, it connects rooms of
members to a real server and runs the closed loop, every message to every member, acked.

Real servers on loopback (a shardchat node; the raw ws peer where Node is installed), the
program built with the machine's cc, and an observer (the Python load generator's client)
in every room that reads what the program's members actually sent. Only the plumbing and
the counts are checked here, never a speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import cloadgen
from bench.servers import Endpoint, RawWsServer, Server, ShardchatServer
from bench.wsclient import SioClient, connect
from tests.support import async_wait_until, refusing_port

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc)")]

ROOMS, MEMBERS, MESSAGES = 3, 3, 10
# the multicore row reads /proc/stat's per-core times, which a tickless kernel brings up to
# date in 10 ms steps: a run of a few ms could read no time at all on the machine
ROW_MESSAGES = 200


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cloadgen.build(tmp_path_factory.mktemp("cloadgen-cache"))


def test_the_program_is_built_once_per_source_and_again_when_it_changes(
        tmp_path: Path, binary: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cloadgen.build(binary.parent) == binary, "the same source is not built again"
    edited = tmp_path / "loadgen.c"
    edited.write_text(cloadgen.SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(cloadgen, "SOURCE", edited)
    rebuilt = cloadgen.build(binary.parent)
    assert rebuilt != binary and rebuilt.exists()
    assert sorted(p.name for p in binary.parent.iterdir()) == sorted([binary.name,
                                                                       rebuilt.name])


def test_the_cache_keeps_only_the_newest_builds(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cache, built = tmp_path / "cache", []
    for n in range(cloadgen.KEEP_BUILDS + 2):  # one build per edit of the source
        edited = tmp_path / f"loadgen-{n}.c"
        edited.write_text(cloadgen.SOURCE.read_text() + f"\n/* edit {n} */\n")
        monkeypatch.setattr(cloadgen, "SOURCE", edited)
        built.append(cloadgen.build(cache))
        os.utime(built[-1], (n, n))  # ordered by age whatever the clock's resolution
    assert sorted(cache.iterdir()) == sorted(built[-cloadgen.KEEP_BUILDS:])


async def _observe(endpoints: list[list[Endpoint]]) -> tuple[list[SioClient], list[list]]:
    """One observer per room, joined before the run: every ``message`` it is sent."""
    seen: list[list] = [[] for _ in endpoints]
    clients = []
    for r, eps in enumerate(endpoints):
        ep = eps[0]

        def keep(_client: SioClient, payload: bytes, r: int = r) -> None:
            seen[r].append(json.loads(payload[payload.index(b"["):])[1])

        clients.append(await connect(ep.host, ep.port, ep.path, ep.namespace,
                                     {"name": f"observer{r}"}, on_message=keep))
    return clients, seen


async def _closed_loop(binary: Path, server: Server) -> None:
    server.start()
    try:
        rooms = server.create_rooms(ROOMS)
        endpoints = [[server.endpoint(room, j) for j in range(MEMBERS)] for room in rooms]
        observers, seen = await _observe(endpoints)
        loop = cloadgen.ClosedLoop(binary, endpoints, MESSAGES, 2, timeout=60,
                                   extra=("--per-member",))
        try:
            await loop.connect()
            out = await loop.run()
        finally:
            loop.close()
        assert out.complete and out.error is None, out
        assert out.sent == ROOMS * MESSAGES and out.acks_failed == 0, out
        assert out.delivered == out.expected == ROOMS * MEMBERS * MESSAGES
        assert out.delivered_per_member == [[MESSAGES] * MEMBERS] * ROOMS, \
            "every member got every message of its room, once"
        await async_wait_until(lambda: all(len(s) >= MESSAGES for s in seen), timeout=10)
        for r, messages in enumerate(seen):
            # two in flight from two connections: the server may take them in either order
            assert sorted((m["text"], m["from"]["name"]) for m in messages) == sorted(
                (f"m{i} of room {r}", f"b{r}-{i % MEMBERS}") for i in range(MESSAGES)), \
                "the members send in turn, each under its own name"
        for client in observers:
            client.close()
    finally:
        server.stop()


async def test_a_closed_loop_on_a_shardchat_node_delivers_every_message_to_every_member(
        binary: Path) -> None:
    await _closed_loop(binary, ShardchatServer(None))


@pytest.mark.skipif(not RawWsServer.available(), reason="Node or node_modules missing")
async def test_a_closed_loop_on_the_raw_ws_peer_delivers_every_message_too(
        binary: Path) -> None:
    await _closed_loop(binary, RawWsServer(None))


def test_a_refused_connection_ends_the_program_with_a_message_that_names_it(
        binary: Path) -> None:
    with refusing_port() as port:
        eps = [[Endpoint("127.0.0.1", port, "/socket.io", "/room/r1")]]
        done = subprocess.run([str(binary), "--messages", str(MESSAGES)],
                              input=cloadgen.member_lines(eps) + b"go\n", capture_output=True,
                              timeout=30, check=False)
    assert done.returncode == 1 and not done.stdout
    assert done.stderr.decode().startswith(
        f"cloadgen: room 0 member 0 (127.0.0.1:{port} /socket.io/ /room/r1): connect: "
        "Connection refused")


def test_input_it_cannot_read_is_refused_before_it_connects(binary: Path) -> None:
    done = subprocess.run([str(binary)], input=b"M zero 127.0.0.1 1 /socket.io /room/a\n",
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 2
    assert b"not a member line: M zero" in done.stderr


async def test_a_refused_namespace_ends_the_program_with_the_servers_answer(
        binary: Path) -> None:
    server = ShardchatServer(None)
    server.start()
    try:
        port, path, _ = server.create_rooms(1)[0]
        eps = [[Endpoint("127.0.0.1", port, path, "/room/no-such-room")]]
        loop = cloadgen.ClosedLoop(binary, eps, MESSAGES, 2, timeout=10)
        with pytest.raises(cloadgen.LoadgenError, match="connect refused: 44/room/no-such-room,"):
            await loop.connect()
    finally:
        server.stop()


@pytest.mark.parametrize("loadgen", ["c", "python"])
async def test_a_multicore_row_counts_the_same_with_either_load_generator(
        loadgen: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scenario's plumbing, on two nodes with tiny rooms: each node's deliveries, the
    load generator's cost and where the machine's CPU went are in the row."""
    from bench import multicore

    monkeypatch.setattr(multicore, "ROOMS", ROOMS)
    make = multicore.drivers_for(loadgen, ROW_MESSAGES, log=lambda line: None)[loadgen]
    row = await multicore.run_once(2, ROW_MESSAGES, make, log=lambda line: None)
    assert "error" not in row, row
    assert row["loadgen"] == loadgen and row["complete"] and row["acks_failed"] == 0
    per_node = ROOMS * multicore.ROOM_SIZE * ROW_MESSAGES
    assert row["deliveries_per_node"] == [per_node, per_node] and row["deliveries"] == 2 * per_node
    assert row["loadgen_cpu_s"] >= 0 and row["loadgen_us_per_delivery"] is not None
    split = row["machine_cpu_s"]
    assert split["nodes"] == row["server_cpu_s"] and split["total"] > 0
    assert 0 <= split["nodes_kernel"] <= split["nodes"]
