"""``shardchat adopt``'s refusals (SPEC section 9), each with its exit code and the
``error`` code of its ``--json`` answer, as ``docs/operations.md`` lists them: nothing is
adopted and the rooms stay where they are."""

from __future__ import annotations

import asyncio
import json

import pytest

from shardchat.cli_common import EXIT_CONFIG, EXIT_FAILED, EXIT_REFUSED
from tests.conftest import acreate_room
from tests.moves import room_state
from tests.replicas import cluster, lookup, shardchat
from tests.support import NodeProcess, make_cluster_config, start_nodes

pytestmark = pytest.mark.timeout(120)


def adopt_json(config, number: int) -> tuple[int, dict]:
    run = shardchat("adopt", "--config", str(config), "--instance", str(number), "--json")
    return run.returncode, (json.loads(run.stdout) if run.stdout.strip() else {})


def test_the_only_instance_has_no_follower_to_adopt_it(tmp_path):
    path, _ = make_cluster_config(tmp_path, 1, node={"replication": "async"})
    code, answer = adopt_json(path, 1)
    assert code == EXIT_REFUSED and answer["error"] == "no_follower", answer


def test_an_instance_outside_the_cluster_is_a_config_error(tmp_path):
    path, _ = make_cluster_config(tmp_path, 2, node={"replication": "async"})
    run = shardchat("adopt", "--config", str(path), "--instance", "7")
    assert run.returncode == EXIT_CONFIG and "7" in run.stderr, run


def test_a_follower_that_cannot_be_reached_fails(tmp_path):
    path, _ = make_cluster_config(tmp_path, 2, node={"replication": "async"})  # none runs
    code, answer = adopt_json(path, 1)
    assert code == EXIT_FAILED and answer["error"] == "unreachable", answer
    assert "Instance 2 (the follower of 1) could not be asked" in answer["message"]


async def test_with_replication_off_nothing_is_adopted(tmp_path):
    path, instances = make_cluster_config(tmp_path, 2)
    nodes = [NodeProcess(path, inst, tmp_path) for inst in instances]
    await asyncio.to_thread(start_nodes, nodes)
    try:
        room = await acreate_room(nodes[0], "Not replicated")
        nodes[0].kill()
        code, answer = await asyncio.to_thread(adopt_json, path, 1)
        assert code == EXIT_REFUSED and answer["error"] == "replication_off", answer
        assert (await asyncio.to_thread(room_state, nodes[1], room["id"]))[0] == 404
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.timeout(180)
async def test_an_instance_that_still_answers_is_not_adopted(tmp_path):
    with cluster(tmp_path, "async") as (path, (one, two, _three), _):
        room = await acreate_room(one, "Alive")
        code, answer = await asyncio.to_thread(adopt_json, path, 1)
        assert code == EXIT_REFUSED and answer["error"] == "owner_alive", answer
        assert (await asyncio.to_thread(lookup, two, room["id"]))[1]["instance"] == 1
