"""The instance list from EC2 tags, for clusters whose nodes come and go (Auto Scaling).

A running EC2 instance belongs to the cluster when it carries ``shardchat:cluster = <name>``
and ``shardchat:instance = <N>``. Its private IP is the host; its ports come from the tags
``shardchat:port`` / ``shardchat:internal-port`` when set. The provisioner and the nodes
(their peer list) both call this, so a new instance gets its target group, its rule and its
peers from the same answer.
"""

from __future__ import annotations

from typing import Any

from shardchat import urls
from shardchat.config import Config, ConfigError, Instance

TAG_CLUSTER = "shardchat:cluster"
TAG_INSTANCE = "shardchat:instance"
TAG_PORT = "shardchat:port"
TAG_INTERNAL_PORT = "shardchat:internal-port"
DEFAULT_PORT = 9001
DEFAULT_INTERNAL_PORT = 9101


def _ec2(cfg: Config, endpoint_url: str | None, session: Any) -> Any:
    import boto3  # only needed when discovery is on

    session = session or boto3.session.Session()
    kw: dict[str, Any] = {"region_name": cfg.aws.region}
    if endpoint_url:
        kw["endpoint_url"] = endpoint_url
    return session.client("ec2", **kw)


def _int_tag(tags: dict[str, str], key: str, default: int, where: str) -> int:
    raw = tags.get(key)
    if raw is None:
        return default
    if not raw.isdigit():
        raise ConfigError("aws.discover", f"EC2 instance {where} has tag {key}={raw!r}: "
                          "it must be a whole number")
    return int(raw)


def _instance(raw: dict[str, Any], ports: tuple[int, int]) -> Instance:
    tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
    iid = raw["InstanceId"]
    number = _int_tag(tags, TAG_INSTANCE, 0, iid)
    if not urls.valid_instance(number):
        raise ConfigError("aws.discover", f"EC2 instance {iid} has {TAG_INSTANCE}="
                          f"{tags.get(TAG_INSTANCE)!r}: it must be {urls.MIN_INSTANCE}.."
                          f"{urls.MAX_INSTANCE}")
    host = raw.get("PrivateIpAddress")
    if not host:
        raise ConfigError("aws.discover", f"EC2 instance {iid} has no private IP address")
    return Instance(number=number, host=host,
                    port=_int_tag(tags, TAG_PORT, ports[0], iid),
                    internal_port=_int_tag(tags, TAG_INTERNAL_PORT, ports[1], iid),
                    ec2_instance_id=iid)


def discover_instances(cfg: Config, *, endpoint_url: str | None = None,
                       session: Any = None) -> tuple[Instance, ...]:
    """Running EC2 instances tagged for ``cfg.cluster.name``, sorted by number."""
    first = cfg.instances[0] if cfg.instances else None
    ports = (first.port, first.internal_port) if first else (DEFAULT_PORT, DEFAULT_INTERNAL_PORT)
    ec2 = _ec2(cfg, endpoint_url, session)
    filters = [{"Name": f"tag:{TAG_CLUSTER}", "Values": [cfg.cluster.name]},
               {"Name": "tag-key", "Values": [TAG_INSTANCE]},
               {"Name": "instance-state-name", "Values": ["running"]}]
    found: dict[int, Instance] = {}
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page.get("Reservations", []):
            for raw in reservation.get("Instances", []):
                inst = _instance(raw, ports)
                if inst.number in found:
                    raise ConfigError("aws.discover", f"EC2 instances "
                                      f"{found[inst.number].ec2_instance_id} and "
                                      f"{inst.ec2_instance_id} both claim instance number "
                                      f"{inst.number}: fix the {TAG_INSTANCE} tags")
                found[inst.number] = inst
    return tuple(found[n] for n in sorted(found))


def resolve_instances(cfg: Config, endpoint_url: str | None = None, *,
                      session: Any = None) -> Config:
    """``cfg`` with its instances found by EC2 tags when ``aws.discover = "ec2-tags"``."""
    if cfg.aws.discover != "ec2-tags":
        return cfg
    return cfg.with_instances(discover_instances(cfg, endpoint_url=endpoint_url,
                                                 session=session))
