"""``[[instances]] follower`` and the ``[node]`` keys of on-line replication (SPEC section
9): the default ring, what is refused with the key at fault."""

from __future__ import annotations

import pytest

from shardchat import config
from shardchat.config import ConfigError


def parsed(instances: list[dict], node: dict | None = None) -> config.Config:
    return config.parse({"instances": instances, "node": node or {}}, env={})


def three(**extra: dict) -> list[dict]:
    return [{"number": n, "port": 9000 + n, "internal_port": 9100 + n, **extra.get(str(n), {})}
            for n in (1, 5, 9)]


def test_the_default_follower_is_the_next_number_the_highest_wrapping_to_the_lowest():
    cfg = parsed(three())
    assert [cfg.follower_of(n) for n in (1, 5, 9)] == [5, 9, 1]
    assert cfg.followed_by(1) == [9]


def test_one_instance_has_no_follower():
    assert parsed([{"number": 3}]).follower_of(3) is None


def test_a_follower_may_be_named():
    cfg = parsed(three(**{"1": {"follower": 9}}))
    assert cfg.follower_of(1) == 9 and cfg.followed_by(9) == [1, 5]


@pytest.mark.parametrize(("follower", "words"), [(1, "cannot follow itself"),
                                                 (7, "not in the cluster (configured: 1, 5, 9)")])
def test_a_follower_must_be_another_instance_of_the_cluster(follower, words):
    with pytest.raises(ConfigError) as info:
        parsed(three(**{"1": {"follower": follower}}))
    assert info.value.key == "instances[0].follower" and words in info.value.message


@pytest.mark.parametrize(("node", "key"), [
    ({"replication": "on"}, "node.replication"),
    ({"replication_fallback": "maybe"}, "node.replication_fallback"),
    ({"replication_ack_timeout": 0}, "node.replication_ack_timeout"),
    ({"replication_backlog": 0}, "node.replication_backlog"),
    ({"auto_adopt": True}, "node.auto_adopt"),
])
def test_replication_keys_are_checked(node, key):
    with pytest.raises(ConfigError) as info:
        parsed(three(), node)
    assert info.value.key == key


def test_the_defaults_keep_replication_off():
    n = parsed(three()).node
    assert (n.replication, n.replication_fallback, n.auto_adopt) == ("off", "none", False)


AUTO = {"replication": "sync", "auto_adopt": True}


def test_the_lease_is_half_of_adopt_after_unless_set():
    assert parsed(three(), {**AUTO, "adopt_after": 10.0}).node.adopt_lease == 5.0
    assert parsed(three()).node.adopt_lease == 15.0
    assert parsed(three(), {**AUTO, "adopt_after": 10.0, "adopt_lease": 3.0}).node.adopt_lease \
        == 3.0


@pytest.mark.parametrize(("node", "words"), [
    ({"adopt_lease": 0}, "must be greater than 0"),
    ({"adopt_lease": -1.0}, "must be greater than 0"),
    # 15 + 1 + 1.5 of the defaults fit in 30; 28 does not
    ({**AUTO, "adopt_lease": 28.0}, "must be less than adopt_after (30 s)"),
    ({**AUTO, "adopt_after": 4.0}, "(2 + 1 + 1.5 s) must be less than adopt_after (4 s)"),
    ({**AUTO, "adopt_after": 4.0, "peer_timeout": 1.0}, "lengthen adopt_after beyond 4 s"),
])
def test_the_lease_must_end_before_any_adoption(node, words):
    with pytest.raises(ConfigError) as info:
        parsed(three(), node)
    assert info.value.key == "node.adopt_lease" and words in info.value.message, info.value


def test_a_lease_that_ends_in_time_is_accepted():
    n = parsed(three(), {**AUTO, "adopt_after": 4.0, "stats_interval": 0.5,
                         "peer_timeout": 0.5}).node
    assert (n.adopt_lease, n.auto_adopt) == (2.0, True)


def test_auto_adopt_needs_three_instances():
    two = three()[:2]
    with pytest.raises(ConfigError) as info:
        parsed(two, AUTO)
    assert info.value.key == "node.auto_adopt"
    assert "at least 3 instances, the config has 2" in info.value.message
    assert "cannot tell its follower's death from a partition" in info.value.message
    assert parsed(two, {"replication": "sync"}).node.auto_adopt is False  # adopt by hand
