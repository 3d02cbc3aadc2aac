"""Storage and AWS resource names come from the instance number, never from the URL scheme:
a new URL scheme must not orphan a single data directory or target group."""

from __future__ import annotations

import pytest

from provisioner import naming
from provisioner.desired import desired_state
from shardchat import config, urls
from shardchat.names import storage_name


def provisionable() -> config.Config:
    return config.parse({
        "cluster": {"name": "demo", "secret": "s3cret", "data_dir": "./data"},
        "instances": [{"number": n, "port": 9000 + n, "internal_port": 9100 + n,
                       "ec2_instance_id": f"i-000{n}"} for n in (1, 2)],
        "aws": {"load_balancer": "demo-alb", "vpc_id": "vpc-1",
                "subnets": ["subnet-a", "subnet-b"]}}, env={})


@pytest.mark.parametrize("n", [1, 2, 42, 9999])
def test_storage_names_are_the_names_of_every_earlier_release(n):
    assert storage_name(n) == f"i{n}"


@pytest.mark.parametrize("n", [0, 10_000, True])
def test_storage_name_refuses_what_is_not_an_instance_number(n):
    with pytest.raises(ValueError, match=r"1\.\.9999"):
        storage_name(n)


def test_a_new_url_scheme_keeps_data_dirs_and_target_group_names(monkeypatch):
    cfg = provisionable()
    before_dirs = [cfg.instance_data_dir(n) for n in (1, 2)]
    before_groups = [tg.name for tg in desired_state(cfg).target_groups]
    assert [d.name for d in before_dirs] == ["i1", "i2"]
    assert before_groups == ["demo-i1-9001", "demo-i2-9002", "demo-lobby"]

    monkeypatch.setattr(urls, "prefix", lambda n: f"/shard-{n}")
    desired = desired_state(cfg)
    assert [r.path_pattern for r in desired.rules] == ["/shard-1/*", "/shard-2/*"]  # URLs moved
    assert [cfg.instance_data_dir(n) for n in (1, 2)] == before_dirs
    assert [tg.name for tg in desired.target_groups] == before_groups
    assert naming.target_group_name("demo", 2, 9002, "ip") == "demo-i2-9002-ip"
