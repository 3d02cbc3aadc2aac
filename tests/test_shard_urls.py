"""Shards on one machine (SPEC section 10): the room API answers each room's ``url`` under
its instance's shard ``public_url``, and one ``shardchat router --shard K`` per shard stands
in for each shard's ALB. Real nodes 1 (shard 1) and 100 (shard 2), two real routers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    ROOT,
    SECRET,
    TEST_RATE_LIMITS,
    GiveUp,
    NodeProcess,
    distinct_free_ports,
    http_json,
    start_nodes,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.timeout(120)


def router(config: Path, shard: int, port: int, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "shardchat", "router", "--config",
                                 str(config), "--shard", str(shard), "--port", str(port)],
                                cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory) -> Iterator[tuple[dict[int, str], list[NodeProcess]]]:
    tmp = tmp_path_factory.mktemp("shards")
    p1, p2, *ports = distinct_free_ports(6)
    bases = {1: f"http://127.0.0.1:{p1}", 2: f"http://127.0.0.1:{p2}"}
    instances = [{"number": n, "host": "127.0.0.1", "port": ports[2 * i],
                  "internal_port": ports[2 * i + 1]} for i, n in enumerate((1, 100))]
    path = write_config(tmp / "shardchat.toml", instances=instances,
                        cluster={"name": "test", "public_url": bases[1], "secret": SECRET,
                                 "data_dir": str(tmp / "data")},
                        node=TEST_RATE_LIMITS,
                        aws={"shards": [{"load_balancer": "test-s1"},
                                        {"load_balancer": "test-s2", "public_url": bases[2]}]})
    nodes = [NodeProcess(path, inst, tmp) for inst in instances]
    routers: list[subprocess.Popen] = []
    try:
        start_nodes(nodes)
        routers = [router(path, k, int(bases[k].rsplit(":", 1)[1]), tmp / f"router{k}.log")
                   for k in (1, 2)]
        for k, proc in zip((1, 2), routers, strict=True):
            def up(proc=proc, k=k) -> bool:
                if proc.poll() is not None:
                    raise GiveUp((tmp / f"router{k}.log").read_text())
                return http_json("GET", f"{bases[k]}/healthz", timeout=1)[0] == 200
            wait_until(up, timeout=60, what=f"router of shard {k}")
        yield bases, nodes
    finally:
        for proc in routers:
            proc.terminate()
            proc.wait(timeout=15)
        for node in nodes:
            node.stop()


def test_each_room_url_is_under_its_shard_and_that_router_serves_it(two_shards):
    bases, _ = two_shards
    placed: dict[int, dict] = {}
    for attempt in range(40):  # placement spreads a burst of creations over both nodes
        status, room = http_json("POST", f"{bases[1]}/api/rooms", {"name": f"r{attempt}"})
        assert status == 201, room
        placed.setdefault(room["instance"], room)
        if len(placed) == 2:
            break
    assert set(placed) == {1, 100}, placed
    for number, shard in ((1, 1), (100, 2)):
        room = placed[number]
        assert room["url"] == bases[shard] + room["path"]
        status, _page = http_json("GET", room["url"])  # the shard's router reaches it
        assert status == 200
        # a lookup answered by the other shard's router names the same url
        other = bases[3 - shard]
        status, found = http_json("GET", f"{other}/api/rooms/{room['id']}")
        assert status == 200 and found["url"] == room["url"], found


def test_a_shard_router_routes_only_its_own_instances(two_shards):
    bases, _ = two_shards
    assert http_json("GET", f"{bases[2]}/i100/healthz")[1]["instance"] == 100
    assert http_json("GET", f"{bases[1]}/i1/healthz")[1]["instance"] == 1
    # instance 1's prefix on shard 2's router falls to its lobby (node 100), which
    # answers 421: a routing mistake, exactly as on shard 2's ALB
    status, body = http_json("GET", f"{bases[2]}/i1/healthz")
    assert status == 421, body
    assert http_json("GET", f"{bases[2]}/healthz")[1]["instance"] == 100


def test_check_names_each_instance_s_shard_and_refuses_one_without_a_table(tmp_path):
    instances = [{"number": 1, "port": 9001, "internal_port": 9101},
                 {"number": 100, "port": 9002, "internal_port": 9102}]
    cluster = {"name": "test", "secret": SECRET}

    def check(aws: dict | None) -> subprocess.CompletedProcess:
        path = write_config(tmp_path / "c.toml", instances=instances, cluster=cluster, aws=aws)
        return subprocess.run([sys.executable, "-m", "shardchat", "check", "--config",
                               str(path)], cwd=str(ROOT), capture_output=True, text=True,
                              timeout=60, check=False)
    refused = check(None)
    assert refused.returncode == 2 and "aws.shards" in refused.stderr, refused.stderr
    done = check({"shards": [{"load_balancer": "test-s1"},
                             {"load_balancer": "test-s2", "public_url": "https://two.test"}]})
    assert done.returncode == 0, done.stderr
    assert "shard 2: load balancer test-s2, public URL https://two.test" in done.stdout
    assert "rule 100: /i100/* (shard 2)" in done.stdout
