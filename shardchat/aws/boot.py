"""``shardchat node --auto``: an EC2 instance becomes a cluster instance with no
hand-written ``[[instances]]`` entry.

It asks the metadata service (``imds.py``) who it is and at which private address, claims
the lowest free instance number through EC2 tags (``claim.py``), and takes its ports from
its ``shardchat:port`` / ``shardchat:internal-port`` tags, else the config's defaults
(``ec2.default_ports``). The result is the config with this instance added, validated like
a config file.

A number whose shard has no ``[[aws.shards]]`` table (the 100th instance of a config
without them) is refused, naming ``aws.shards``: the provisioner would give it no rule, and
a node serving anyway would take new rooms whose URLs no load balancer routes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shardchat.aws import imds
from shardchat.aws.claim import claim_number
from shardchat.aws.clients import client
from shardchat.aws.ec2 import default_ports
from shardchat.aws.tags import TAG_INTERNAL_PORT, TAG_PORT, tag_map
from shardchat.config import Config, ConfigError, Instance, check_shard_tables, validate


def _ports(ec2: Any, me: str, defaults: tuple[int, int]) -> tuple[int, int]:
    found = ec2.describe_instances(InstanceIds=[me])["Reservations"][0]["Instances"][0]
    tags = tag_map(found.get("Tags", []))
    out = []
    for key, default in ((TAG_PORT, defaults[0]), (TAG_INTERNAL_PORT, defaults[1])):
        raw = tags.get(key, str(default))
        if not raw.isdigit():
            raise ConfigError("aws.discover", f"EC2 instance {me} has tag {key}={raw!r}: it "
                              "must be a whole number")
        out.append(int(raw))
    return out[0], out[1]


def auto_instance(cfg: Config, *, endpoint_url: str | None = None,
                  say: Callable[[str], None] = lambda _line: None) -> tuple[Config, int]:
    """(config with this EC2 instance in it, its number), the number claimed by tags."""
    me = imds.identity()
    ec2 = client("ec2", cfg.aws.region, endpoint_url)
    port, internal = _ports(ec2, me.instance_id, default_ports(cfg))
    number = claim_number(ec2, cfg.cluster.name, me.instance_id,
                          settle=cfg.aws.claim_settle, say=say)
    inst = Instance(number=number, host=me.private_ip, port=port, internal_port=internal,
                    ec2_instance_id=me.instance_id)
    others = tuple(i for i in cfg.instances if i.number != number)
    mine = validate(cfg.with_instances((*others, inst)))
    check_shard_tables(mine.with_instances((inst,)))
    return mine, number
