"""``node.replicate_to`` and its keys (SPEC section 9, off the machine): what is accepted,
what is refused with the key at fault, and the ``litestream.yml`` a node writes from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardchat import config, replica_target
from shardchat.config import ConfigError
from shardchat.node.replication import litestream
from shardchat.replica_target import FileTarget, S3Target


def parsed(node: dict, data_dir: str = "/srv/shardchat/data") -> config.Config:
    return config.parse({"cluster": {"data_dir": data_dir},
                         "instances": [{"number": 1}, {"number": 12, "port": 9012,
                                                       "internal_port": 9112}],
                         "node": node}, env={})


def error(node: dict, data_dir: str = "/srv/shardchat/data") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parsed(node, data_dir)
    return info.value


@pytest.mark.parametrize(("value", "target"), [
    ("s3://my-bucket/chat/prod", S3Target("my-bucket", "chat/prod")),
    ("s3://my-bucket", S3Target("my-bucket", "")),
    ("s3://my.bucket.example/p/", S3Target("my.bucket.example", "p")),
    ("/mnt/backup/shardchat", FileTarget(Path("/mnt/backup/shardchat"))),
    ("file:///mnt/backup", FileTarget(Path("/mnt/backup"))),
    ("replica", FileTarget(Path("replica"))),
])
def test_targets_that_are_accepted(value, target):
    assert replica_target.parse(value) == target


@pytest.mark.parametrize("value", [
    "s3://ab/p", "s3://Upper/p", "s3://-bucket/p", "s3://a..b/p", "s3://bucket/p?region=x",
    "gs://bucket/p", "abs://container/p", "file://relative/path", "s3://bucket/a//b", "  ",
])
def test_targets_that_are_refused_say_what_would_do(value):
    with pytest.raises(replica_target.TargetError) as info:
        replica_target.parse(value)
    assert any(hint in str(info.value) for hint in ("s3://", "bucket", "file:///"))


def test_each_instance_has_a_place_of_its_own_under_the_target():
    s3 = S3Target("b", "chat")
    assert [s3.key_prefix(1), s3.key_prefix(12)] == ["chat/i1", "chat/i12"]
    assert S3Target("b", "").key_prefix(3) == "i3"
    assert FileTarget(Path("/r")).directory(12) == Path("/r/i12")
    assert s3.pattern() == "s3://b/chat/i<N>/" and FileTarget(Path("/r")).pattern() == "/r/i<N>/"


def test_replication_is_off_by_default():
    cfg = parsed({})
    assert cfg.node.replicate_to == "" and cfg.node.replicate_sync_interval == 1.0


@pytest.mark.parametrize(("node", "key"), [
    ({"replicate_to": "gs://b/p"}, "node.replicate_to"),
    ({"replicate_to": "/srv/shardchat/data/replica"}, "node.replicate_to"),
    ({"replicate_to": "/srv/shardchat/data"}, "node.replicate_to"),
    ({"replicate_to": "/mnt/r", "replicate_endpoint": "http://127.0.0.1:9000"},
     "node.replicate_endpoint"),
    ({"replicate_to": "s3://bucket/p", "replicate_endpoint": "127.0.0.1:9000"},
     "node.replicate_endpoint"),
    ({"replicate_endpoint": "http://127.0.0.1:9000"}, "node.replicate_endpoint"),
    ({"replicate_region": "eu-west-1"}, "node.replicate_region"),
    ({"replicate_to": "s3://bucket/p", "replicate_sync_interval": 0},
     "node.replicate_sync_interval"),
    ({"replicate_to": "s3://bucket/p", "replicate_sync_interval": 7200},
     "node.replicate_sync_interval"),
])
def test_bad_replication_keys_are_named(node, key):
    exc = error(node)
    assert exc.key == key and exc.message


def test_a_directory_beside_the_data_dir_is_accepted():
    assert parsed({"replicate_to": "/srv/shardchat/replica"}).node.replicate_to


def render(cfg: config.Config, number: int) -> dict:
    text = litestream.render(cfg, number)
    assert text.startswith("#")  # comment lines, then JSON (which YAML reads as it is)
    return json.loads("".join(line for line in text.splitlines(keepends=True)
                              if not line.startswith("#")))


def test_litestream_config_for_s3_has_one_db_one_replica_and_no_credentials():
    cfg = parsed({"replicate_to": "s3://chat-backups/prod",
                  "replicate_endpoint": "http://127.0.0.1:9000",
                  "replicate_sync_interval": 0.5})
    body = render(cfg, 12)
    (db,) = body["dbs"]
    assert db["path"] == "/srv/shardchat/data/i12/store.sqlite3"
    assert db["monitor-interval"] == "500ms"
    assert db["replica"] == {"type": "s3", "bucket": "chat-backups", "path": "prod/i12",
                             "region": "us-east-1", "sync-interval": "500ms",
                             "endpoint": "http://127.0.0.1:9000", "force-path-style": True}
    text = json.dumps(body).lower()
    assert "secret" not in text and "access-key" not in text
    assert body["logging"]["type"] == "json"


def test_litestream_config_for_a_directory_and_the_region_default():
    cfg = parsed({"replicate_to": "/mnt/r"})
    assert render(cfg, 1)["dbs"][0]["replica"] == {"type": "file", "path": "/mnt/r/i1",
                                                   "sync-interval": "1000ms"}
    cfg = config.parse({"node": {"replicate_to": "s3://bucket/p"},
                        "aws": {"region": "eu-west-1"}}, env={})
    assert litestream.replica_section(cfg, 1)["region"] == "eu-west-1"
    cfg = config.parse({"node": {"replicate_to": "s3://bucket/p",
                                 "replicate_region": "ap-south-1"}}, env={})
    assert litestream.replica_section(cfg, 1)["region"] == "ap-south-1"


def test_a_ca_bundle_reaches_litestream_as_ssl_cert_file():
    env = litestream.child_env({"AWS_CA_BUNDLE": "/etc/ca.pem", "HOME": "/root"})
    assert env == {"SSL_CERT_FILE": "/etc/ca.pem", "HOME": "/root"}
    env = litestream.child_env({"AWS_CA_BUNDLE": "/etc/ca.pem", "SSL_CERT_FILE": "/other"})
    assert env == {"SSL_CERT_FILE": "/other"}


def test_the_installed_binary_is_a_05_litestream():
    assert litestream.check_version(litestream.find_binary()).startswith("0.5.")
