"""EC2: the instance list from tags (for clusters whose nodes come and go), and the private
addresses of instance targets.

A running EC2 instance belongs to the cluster when it carries ``shardchat:cluster = <name>``
and ``shardchat:instance = <N>`` (written by hand or a launch template), or the number it
claimed at boot, ``shardchat:instance-number = <N>`` (``claim.py``). Its private IP is the
host; its ports come from the tags ``shardchat:port`` / ``shardchat:internal-port`` when
set. The provisioner and the nodes (their peer list) both call this, so a new instance gets
its target group, its rule and its peers from the same answer.
"""

from __future__ import annotations

from typing import Any

from shardchat import urls
from shardchat.aws.claim import order
from shardchat.aws.clients import client, paginate
from shardchat.aws.tags import (
    TAG_CLUSTER,
    TAG_INSTANCE,
    TAG_INSTANCE_NUMBER,
    TAG_INTERNAL_PORT,
    TAG_PORT,
    tag_map,
)
from shardchat.config import Config, ConfigError, Instance, validate


def _int_tag(tags: dict[str, str], key: str, default: int, where: str) -> int:
    raw = tags.get(key)
    if raw is None:
        return default
    if not raw.isdigit():
        raise ConfigError("aws.discover", f"EC2 instance {where} has tag {key}={raw!r}: "
                          "it must be a whole number")
    return int(raw)


def _instance(raw: dict[str, Any], ports: tuple[int, int]) -> Instance:
    tags = tag_map(raw.get("Tags", []))
    iid = raw["InstanceId"]
    key = TAG_INSTANCE if TAG_INSTANCE in tags else TAG_INSTANCE_NUMBER
    number = _int_tag(tags, key, 0, iid)
    if not urls.valid_instance(number):
        raise ConfigError("aws.discover", f"EC2 instance {iid} has {key}="
                          f"{tags.get(key)!r}: it must be {urls.MIN_INSTANCE}.."
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
    """Running EC2 instances tagged for ``cfg.cluster.name``, sorted by number. Ports an
    instance's tags leave out are ``default_ports(cfg)``. Two instances with one claimed
    number are one claim still being decided: the lowest instance id has it (``claim.py``);
    two with one hand-written number are a mistake, refused."""
    ports = default_ports(cfg)
    ec2 = client("ec2", cfg.aws.region, endpoint_url, session=session)
    filters = [{"Name": f"tag:{TAG_CLUSTER}", "Values": [cfg.cluster.name]},
               {"Name": "tag-key", "Values": [TAG_INSTANCE, TAG_INSTANCE_NUMBER]},
               {"Name": "instance-state-name", "Values": ["running"]}]
    found: dict[int, Instance] = {}
    claimed: set[int] = set()  # numbers found through a claim, not a hand-written tag
    for reservation in paginate(ec2, "describe_instances", "Reservations", Filters=filters):
        for raw in reservation.get("Instances", []):
            inst = _instance(raw, ports)
            by_claim = TAG_INSTANCE not in tag_map(raw.get("Tags", []))
            had = found.get(inst.number)
            if had is not None and not (by_claim and inst.number in claimed):
                raise ConfigError("aws.discover", f"EC2 instances {had.ec2_instance_id} "
                                  f"and {inst.ec2_instance_id} both claim instance number "
                                  f"{inst.number}: fix the {TAG_INSTANCE} tags")
            if had is None or order(str(inst.ec2_instance_id)) < order(
                    str(had.ec2_instance_id)):
                found[inst.number] = inst
            if by_claim:
                claimed.add(inst.number)
            else:
                claimed.discard(inst.number)
    return tuple(found[n] for n in sorted(found))


def default_ports(cfg: Config) -> tuple[int, int]:
    """(port, internal_port) of an instance whose tags name none: those of the first
    configured instance, else ``aws.instance_port`` and ``aws.instance_internal_port``."""
    if cfg.instances:
        return cfg.instances[0].port, cfg.instances[0].internal_port
    return cfg.aws.instance_port, cfg.aws.instance_internal_port


def resolve_instances(cfg: Config, endpoint_url: str | None = None, *,
                      session: Any = None) -> Config:
    """``cfg`` with its instances found by EC2 tags when ``aws.discover = "ec2-tags"``.

    The result is validated like a config file (ports from tags checked like ports in the
    file), so everything downstream can trust any Config it is handed."""
    if cfg.aws.discover != "ec2-tags":
        return cfg
    return validate(cfg.with_instances(discover_instances(cfg, endpoint_url=endpoint_url,
                                                          session=session)))


def private_ips(ec2: Any, instance_ids: list[str]) -> dict[str, str]:
    """EC2 instance id -> private IP address (empty when it has none)."""
    if not instance_ids:
        return {}
    out = {}
    for reservation in ec2.describe_instances(InstanceIds=instance_ids)["Reservations"]:
        for inst in reservation["Instances"]:
            out[inst["InstanceId"]] = inst.get("PrivateIpAddress", "")
    return out
