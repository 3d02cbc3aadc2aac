"""Config loading (SPEC section 6): every mistake is reported with the key at fault."""

from __future__ import annotations

import pytest

from shardchat import config
from shardchat.config import ConfigError
from tests.support import ROOT, write_config


def base(**sections) -> dict:
    data = {"cluster": {"name": "demo", "public_url": "http://127.0.0.1:8080",
                        "secret": "s3cret", "data_dir": "./data"},
            "instances": [{"number": 1, "port": 9001, "internal_port": 9101},
                          {"number": 2, "port": 9002, "internal_port": 9102}]}
    data.update(sections)
    return data


def error_key(data: dict, env: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(data, env=env or {})
    assert info.value.message, "a config error must say what is accepted"
    return info.value.key


def test_minimal_config_gets_defaults():
    cfg = config.parse(base(), env={})
    assert [i.number for i in cfg.instances] == [1, 2]
    assert cfg.instance(2).port == 9002 and cfg.instance(2).host == "127.0.0.1"
    assert cfg.node.max_message_chars == 4000 and cfg.node.max_name_chars == 40
    assert cfg.node.max_body_bytes == 16 * 1024
    assert cfg.aws.listener_port == 80 and cfg.aws.target_type == "instance"


def test_instances_are_sorted_by_number():
    data = base()
    data["instances"].reverse()
    assert [i.number for i in config.parse(data, env={}).instances] == [1, 2]


def test_instance_data_dir_uses_the_instance_prefix():
    cfg = config.parse(base(), env={})
    assert str(cfg.instance_data_dir(2)).endswith("data/i2")


def test_secret_env_overrides_the_file():
    cfg = config.parse(base(), env={config.SECRET_ENV: "from-env"})
    assert cfg.cluster.secret == "from-env"


def test_unknown_instance_number_names_the_configured_ones():
    cfg = config.parse(base(), env={})
    with pytest.raises(ConfigError, match="1, 2"):
        cfg.instance(7)


def test_node_overrides_are_typed():
    cfg = config.parse(base(node={"rate_limit_window": 60, "room_capacity": 2,
                                  "invite_ttl_days": 0.00001, "fsync": False}), env={})
    assert cfg.node.rate_limit_window == 60.0 and isinstance(cfg.node.rate_limit_window, float)
    assert cfg.node.room_capacity == 2 and cfg.node.fsync is False


def test_page_bound_must_hold_a_message_and_stay_below_the_write_buffer_cap():
    assert config.parse(base(), env={}).node.max_page_bytes == 256 * 1024
    fits = base(node={"write_buffer_cap": 64 * 1024, "max_page_bytes": 32 * 1024})
    assert config.parse(fits, env={}).node.max_page_bytes == 32 * 1024
    # the default page bound is not below a small cap: the key at fault is the page bound's
    assert error_key(base(node={"write_buffer_cap": 128 * 1024})) == "node.max_page_bytes"
    assert error_key(base(node={"max_page_bytes": 1024 * 1024})) == "node.max_page_bytes"
    # 4,000 characters of 6 JSON bytes each do not fit in 16 KiB
    assert error_key(base(node={"max_page_bytes": 16 * 1024})) == "node.max_page_bytes"
    assert error_key(base(node={"max_message_chars": 50_000})) == "node.max_page_bytes"


def test_large_room_keys_have_their_defaults_and_a_welcome_stays_below_the_cap():
    node = config.parse(base(), env={}).node
    assert (node.welcome_members, node.presence_batch_members) == (100, 100)
    assert (node.presence_tick, node.presence_tick_max) == (0.5, 5.0)
    example = config.load(ROOT / "config.example.toml", env={}).node
    assert (example.welcome_members, example.presence_batch_members, example.presence_tick,
            example.presence_tick_max, example.rate_limit_members) == (100, 100, 0.5, 5.0, 20)
    # a history page and 500 members of the largest size do not fit under a 380 KiB cap:
    # the welcome lists fewer, never so many that it could make its reader look slow
    tight = config.parse(base(node={"write_buffer_cap": 380 * 1024, "welcome_members": 500}),
                         env={}).node
    assert config.welcome_member_cap(tight) == (380 * 1024 - 256 * 1024 - 2048) // 256 == 488
    assert config.welcome_member_cap(node) == 100
    small = config.parse(base(node={"write_buffer_cap": 32 * 1024,
                                    "max_page_bytes": 28 * 1024}), env={}).node
    assert config.welcome_member_cap(small) == 8


def mutate(path: str, value):
    """base() with one value replaced; ``path`` like "instances.1.port" or "node.x"."""
    data = base()
    parts = path.split(".")
    target = data
    for p in parts[:-1]:
        target = target[int(p)] if isinstance(target, list) else target.setdefault(p, {})
    target[parts[-1]] = value
    return data


@pytest.mark.parametrize("path,value,key", [
    ("cluster.name", "has space", "cluster.name"),
    ("cluster.name", "x" * 21, "cluster.name"),
    ("cluster.public_url", "chat.example.com", "cluster.public_url"),
    ("cluster.colour", "blue", "cluster.colour"),
    ("instances.1.number", 1, "instances[1].number"),
    ("instances.1.number", 0, "instances[1].number"),
    ("instances.1.number", 10_000, "instances[1].number"),
    ("instances.1.port", 70_000, "instances[1].port"),
    ("instances.1.port", "9002", "instances[1].port"),
    ("instances.1.internal_port", 9002, "instances[1].internal_port"),
    ("instances.1.port", 9001, "instances[1].port"),
    ("instances.0.host", "", "instances[0].host"),
    ("node.room_capacity", 0, "node.room_capacity"),
    ("node.max_message_chars", -1, "node.max_message_chars"),
    ("node.rate_limit_messages", True, "node.rate_limit_messages"),
    ("node.fsync", "yes", "node.fsync"),
    ("node.engine", "turbo", "node.engine"),
    ("node.engine", True, "node.engine"),
    ("node.max_recovery", 10, "node.max_recovery"),
    ("node.prune_interval", -1, "node.prune_interval"),
    ("node.welcome_members", -1, "node.welcome_members"),
    ("node.welcome_members", 501, "node.welcome_members"),
    ("node.presence_batch_members", -1, "node.presence_batch_members"),
    ("node.presence_tick", 0, "node.presence_tick"),
    ("node.presence_tick_max", 0.1, "node.presence_tick_max"),
    ("node.rate_limit_members", 0, "node.rate_limit_members"),
    ("node.prune_interval", "5", "node.prune_interval"),
    ("node.write_buffer_grace", 0, "node.write_buffer_grace"),
    ("node.max_page_bytes", 0, "node.max_page_bytes"),
    ("node.nope", 1, "node.nope"),
    ("aws.scheme", "public", "aws.scheme"),
    ("aws.target_type", "lambda", "aws.target_type"),
    ("aws.discover", "dns", "aws.discover"),
    ("aws.subnets", "subnet-a", "aws.subnets"),
    ("aws.idle_timeout", 30, "aws.idle_timeout"),
    ("aws.load_balancer", "has space", "aws.load_balancer"),
    ("aws.subnets", ["subnet-a"], "aws.subnets"),
    ("aws.health_check_interval", 1, "aws.health_check_interval"),
    ("aws.health_check_timeout", 10, "aws.health_check_timeout"),
    ("aws.healthy_threshold", 11, "aws.healthy_threshold"),
    ("aws.unhealthy_threshold", 1, "aws.unhealthy_threshold"),
    ("aws.deregistration_delay", 3601, "aws.deregistration_delay"),
    ("aws.certificate_arn", "my-cert", "aws.certificate_arn"),
])
def test_bad_value_names_its_key(path, value, key):
    assert error_key(mutate(path, value)) == key


def test_listener_port_443_is_refused_with_a_certificate():
    data = base(aws={"certificate_arn": "arn:aws:acm:us-east-1:1:certificate/x",
                     "listener_port": 443})
    assert error_key(data) == "aws.listener_port"


def test_a_node_config_needs_no_provisioner_keys_but_the_provisioner_does():
    cfg = config.parse(base(), env={})  # no [aws] at all: fine for nodes and the router
    with pytest.raises(ConfigError) as info:
        config.validate_for_aws(cfg)
    assert info.value.key == "aws.load_balancer"


def test_instance_without_number_is_reported():
    data = base()
    del data["instances"][1]["number"]
    assert error_key(data) == "instances[1].number"


def test_unknown_section_is_reported():
    assert error_key(base(extras={})) == "extras"


def test_instances_must_be_an_array_of_tables():
    assert error_key(base(instances={"number": 1})) == "instances"


def test_load_reads_toml(tmp_path):
    path = write_config(tmp_path / "c.toml", cluster={"name": "t", "secret": "x"},
                        instances=[{"number": 4, "port": 9004, "internal_port": 9104}],
                        node={"room_capacity": 3})
    cfg = config.load(path, env={})
    assert cfg.instance(4).port == 9004 and cfg.node.room_capacity == 3
    assert cfg.source == str(path)


def test_load_missing_file_says_so(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nope.toml", env={})
    assert info.value.key == "--config" and "does not exist" in info.value.message


def test_load_invalid_toml_says_so(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[cluster\nname = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(path, env={})


def test_example_config_is_valid():
    example = ROOT / "config.example.toml"
    if not example.exists():
        pytest.skip("config.example.toml not written yet")
    cfg = config.load(example, env={})
    assert cfg.instances, "the example should show at least one instance"


def test_drain_grace_defaults_to_the_time_the_alb_needs_to_see_a_node_unhealthy():
    assert config.parse(base(), env={}).node.drain_grace_seconds == 10 * 2
    aws = {"health_check_interval": 30, "unhealthy_threshold": 3}
    assert config.parse(base(aws=aws), env={}).node.drain_grace_seconds == 90


def test_an_explicit_drain_grace_wins_over_the_health_check_default():
    data = base(aws={"health_check_interval": 30}, node={"drain_grace_seconds": 0.5})
    assert config.parse(data, env={}).node.drain_grace_seconds == 0.5
    assert config.parse(base(node={"drain_grace_seconds": 0}), env={}
                        ).node.drain_grace_seconds == 0


def test_a_negative_drain_grace_names_the_key():
    assert error_key(base(node={"drain_grace_seconds": -1})) == "node.drain_grace_seconds"


def test_prune_interval_defaults_to_five_seconds_and_may_be_zero():
    assert config.parse(base(), env={}).node.prune_interval == 5.0
    data = base(node={"prune_interval": 0})
    assert config.parse(data, env={}).node.prune_interval == 0.0
    example = config.load(ROOT / "config.example.toml", env={})
    assert example.node.prune_interval == 5.0  # the example documents the default


def test_engine_is_fast_unless_stock_is_asked_for():
    assert config.parse(base(), env={}).node.engine == "fast"
    assert config.parse(base(node={"engine": "stock"}), env={}).node.engine == "stock"
    with pytest.raises(ConfigError, match=r'"fast".*"stock"'):
        config.parse(base(node={"engine": "Fast"}), env={})
    assert config.load(ROOT / "config.example.toml", env={}).node.engine == "fast"


# -- several instances on one machine (one process per core) -------------------------------


def on_one_machine(*ports: tuple[int, int], ec2: str | None = "i-0aaa", host: str = "10.0.1.5"
                   ) -> dict:
    """A config whose instances 1, 2, ... share one host (and EC2 instance), one per
    (port, internal_port) pair."""
    instances = [{"number": n, "host": host, "port": p, "internal_port": ip}
                 for n, (p, ip) in enumerate(ports, 1)]
    for inst in instances:
        if ec2:
            inst["ec2_instance_id"] = ec2
    return base(instances=instances)


def test_instances_may_share_a_host_and_an_ec2_instance_on_their_own_ports():
    cfg = config.parse(on_one_machine((9001, 9101), (9002, 9102), (9003, 9103)), env={})
    assert {i.ec2_instance_id for i in cfg.instances} == {"i-0aaa"}
    assert [(i.number, i.port) for i in cfg.instances] == [(1, 9001), (2, 9002), (3, 9003)]
    aws = {"load_balancer": "demo", "vpc_id": "vpc-1", "subnets": ["subnet-a", "subnet-b"]}
    data = on_one_machine((9001, 9101), (9002, 9102))
    data["aws"] = aws
    provisioned = config.parse(data, env={})
    assert config.validate_for_aws(provisioned) is provisioned  # the provisioner takes it too


def refusal(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config.parse(data, env={})
    return info.value


def test_two_instances_on_one_host_and_port_are_refused_naming_both_keys():
    err = refusal(on_one_machine((9001, 9101), (9001, 9102), ec2=None))
    assert err.key == "instances[1].port"
    assert "10.0.1.5:9001" in err.message and "instances[0].port" in err.message


def test_two_instances_on_one_ec2_instance_and_port_are_refused_whatever_their_hosts():
    data = on_one_machine((9001, 9101), (9001, 9102))
    data["instances"][1]["host"] = "10.0.1.6"  # a second address of the same EC2 instance
    err = refusal(data)
    assert err.key == "instances[1].port"
    assert "EC2 instance i-0aaa" in err.message and "instances[0].port" in err.message


def test_an_internal_port_that_is_another_instances_port_on_the_machine_is_refused():
    err = refusal(on_one_machine((9001, 9101), (9002, 9001)))
    assert err.key == "instances[1].internal_port"
    assert "instances[0].port" in err.message
    err = refusal(on_one_machine((9001, 9101), (9101, 9102)))
    assert (err.key, "instances[0].internal_port" in err.message) == ("instances[1].port", True)


def test_the_same_ports_on_other_machines_are_fine():
    data = on_one_machine((9001, 9101), (9001, 9101), ec2=None)
    data["instances"][1]["host"] = "10.0.1.6"
    data["instances"][0]["ec2_instance_id"] = "i-0aaa"
    data["instances"][1]["ec2_instance_id"] = "i-0bbb"
    assert len(config.parse(data, env={}).instances) == 2
