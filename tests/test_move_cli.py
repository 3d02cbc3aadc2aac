"""`shardchat move | drain | rebalance` refusals and exit codes, against real nodes.

Refusals come before anything changed, exit with 3 and say what to do; a config error is
2 like every command's. The cluster: instances 1 and 2 run, instance 3 is in the config but
down. The moves themselves are tests/e2e/test_operate.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shardchat.cli_common import EXIT_CONFIG, EXIT_OK, EXIT_REFUSED
from tests.conftest import create_room
from tests.support import (
    AUTH,
    ROOT,
    NodeProcess,
    http_json,
    make_cluster_config,
    start_nodes,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(config path, [node 1, node 2]); instance 3 is configured and never started."""
    tmp = tmp_path_factory.mktemp("cli")
    path, instances = make_cluster_config(tmp, 3)
    nodes = [NodeProcess(path, inst, tmp) for inst in instances[:2]]
    try:
        start_nodes(nodes)
        yield path, nodes
    finally:
        for node in nodes:
            node.stop()


def shardchat(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "shardchat", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_refused(run: subprocess.CompletedProcess, *words: str) -> None:
    assert run.returncode == EXIT_REFUSED, (run.returncode, run.stdout, run.stderr)
    assert run.stderr.startswith("refused: "), run.stderr
    for word in words:
        assert word in run.stderr, (word, run.stderr)


def test_a_move_to_an_instance_the_config_lacks_is_refused(cluster):
    path, (one, _) = cluster
    room = create_room(one, "Stays")
    run = shardchat("move", "--config", str(path), room["id"], "--to", "7")
    assert_refused(run, "no instance 7", "1, 2, 3")


def test_a_move_of_a_room_nobody_owns_is_refused(cluster):
    path, _ = cluster
    run = shardchat("move", "--config", str(path), "NoSuchRoomAnywhere", "--to", "2")
    # instance 3 is down, so the room may be there: the sentence says so
    assert_refused(run, "NoSuchRoomAnywhere", "3 did not answer", "Start it")
    run = shardchat("move", "--config", str(path), "not a room id!", "--to", "2")
    assert_refused(run, "is not a room id")


def test_a_move_to_a_target_that_is_down_or_drained_is_refused(cluster):
    path, (one, two) = cluster
    room = create_room(one, "Stays put")
    run = shardchat("move", "--config", str(path), room["id"], "--to", "3")
    assert_refused(run, "Instance 3 does not answer", "connection refused", "start it")
    status, _ = http_json("POST", f"{two.internal_url}/internal/drained", {"drained": True},
                          headers=AUTH)
    assert status == 200
    try:
        run = shardchat("move", "--config", str(path), room["id"], "--to", "2")
        assert_refused(run, "Instance 2 is drained", "--undrain")
    finally:
        run = shardchat("drain", "--config", str(path), "--instance", "2", "--undrain")
    assert run.returncode == EXIT_OK, run.stderr
    assert "instance 2 is undrained" in run.stdout
    status, body = http_json("GET", f"{one.internal_url}/internal/rooms/{room['id']}",
                             headers=AUTH)
    assert status == 200 and body["state"] == "owner", body  # nothing moved


def test_a_move_to_where_the_room_is_moves_nothing(cluster):
    path, (one, _) = cluster
    room = create_room(one, "Home")
    run = shardchat("move", "--config", str(path), room["id"], "--to", "1", "--json")
    assert run.returncode == EXIT_OK, run.stderr
    report = json.loads(run.stdout)
    assert report["moved"] is False and report["ok"] is True and report["from"] == 1


def test_a_drain_of_a_down_instance_or_with_nowhere_to_go_is_refused(cluster):
    path, (one, two) = cluster
    run = shardchat("drain", "--config", str(path), "--instance", "3")
    assert_refused(run, "Instance 3 does not answer", "Start it")
    run = shardchat("drain", "--config", str(path), "--instance", "9")
    assert_refused(run, "no instance 9")
    create_room(two, "Nowhere to go")
    status, _ = http_json("POST", f"{one.internal_url}/internal/drained", {"drained": True},
                          headers=AUTH)
    assert status == 200
    try:
        run = shardchat("drain", "--config", str(path), "--instance", "2")
        assert_refused(run, "No other instance can take the rooms of instance 2",
                       "instance 1 is drained", "instance 3 does not answer")
        status, body = http_json("GET", f"{two.internal_url}/internal/stats", headers=AUTH)
        assert body["drained"] is False, body  # refused: nothing changed
    finally:
        shardchat("drain", "--config", str(path), "--instance", "1", "--undrain")


def test_a_bad_config_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\nname = 3\n")
    for args in (["move", "--config", str(bad), "abc", "--to", "1"],
                 ["drain", "--config", str(bad), "--instance", "1"],
                 ["rebalance", "--config", str(bad), "--dry-run"]):
        run = shardchat(*args)
        assert run.returncode == EXIT_CONFIG, (args, run.stdout, run.stderr)
        assert run.stderr.startswith("Config error at "), run.stderr


def test_a_move_and_a_dry_run_say_what_moved_and_the_loads(cluster):
    path, (one, two) = cluster
    room = create_room(one, "Travels")
    run = shardchat("move", "--config", str(path), room["id"], "--to", "2")
    assert run.returncode == EXIT_OK, (run.stdout, run.stderr)
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"moved {room['id']}: instance 1 -> 2 (0 messages, "), lines
    assert lines[1].startswith("1 room moved in "), lines
    status, body = http_json("GET", f"{two.internal_url}/internal/rooms/{room['id']}",
                             headers=AUTH)
    assert status == 200 and body["state"] == "owner", body

    run = shardchat("rebalance", "--config", str(path), "--dry-run")
    assert run.returncode == EXIT_OK, (run.stdout, run.stderr)
    out = run.stdout
    assert "instance 3 does not answer" in out and "left out" in out, out  # named, not hidden
    assert out.count("load before: i1 ") == 1 and "(planned)" in out, out
    assert "nothing moved" in out, out


def test_a_room_id_that_begins_with_a_dash_is_a_room_id(cluster):
    """Generated ids may begin with "-" (urlsafe base64): the command takes it as the id,
    before or after the options, and with `--` as well."""
    path, _ = cluster
    for args in (["-bNoSuchRoom", "--to", "2"], ["--to", "2", "-bNoSuchRoom"],
                 ["--to", "2", "--", "-bNoSuchRoom"]):
        run = shardchat("move", "--config", str(path), *args)
        assert_refused(run, "-bNoSuchRoom")
