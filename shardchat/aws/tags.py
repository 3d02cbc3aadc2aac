"""The tags that say which AWS resources belong to which shardchat cluster.

Ownership is decided by tags, never by names: a resource is ours only when it carries
``shardchat:cluster = <cluster name>``. The same keys mark EC2 instances for discovery, so a
new instance gets its target group, its rule and its peers from one set of tags. Every key
and role value is spelled here and nowhere else.
"""

from __future__ import annotations

TAG_CLUSTER = "shardchat:cluster"
TAG_INSTANCE = "shardchat:instance"
TAG_ROLE = "shardchat:role"
TAG_ADOPTED = "shardchat:adopted"  # existed before shardchat: destroy untags, never deletes
TAG_PORT = "shardchat:port"  # EC2 instances only: the public port, when not the default
TAG_INTERNAL_PORT = "shardchat:internal-port"  # EC2 instances only
TAG_SHARD = "shardchat:shard"  # which ALB of the fleet (shardchat/shards.py); absent: 1
TAG_INSTANCE_NUMBER = "shardchat:instance-number"  # EC2: the number a node claimed at boot

# what untagging removes
OWNERSHIP_KEYS = (TAG_CLUSTER, TAG_ROLE, TAG_INSTANCE, TAG_ADOPTED, TAG_SHARD)

ROLE_LB = "lb"
ROLE_LISTENER = "listener"
ROLE_REDIRECT = "redirect"
ROLE_INSTANCE = "instance"
ROLE_LOBBY = "lobby"


def ownership(cluster: str, role: str, instance: int | None = None, shard: int = 1
              ) -> dict[str, str]:
    """The tags a resource of ``cluster`` in ``role`` (of ``instance``, behind the ALB of
    ``shard``) carries."""
    out = {TAG_CLUSTER: cluster, TAG_ROLE: role, TAG_SHARD: str(shard)}
    if instance is not None:
        out[TAG_INSTANCE] = str(instance)
    return out


def shard_tag(tags: dict[str, str]) -> int:
    """The shard a resource is tagged with; resources made before shards existed carry no
    such tag and belong to shard 1."""
    raw = tags.get(TAG_SHARD, "1")
    return int(raw) if raw.isdigit() else 0


def is_ours(tags: dict[str, str], cluster: str) -> bool:
    return tags.get(TAG_CLUSTER) == cluster


def instance_of(tags: dict[str, str]) -> int | None:
    """The instance number a resource is tagged with, or None (absent or not a number)."""
    raw = tags.get(TAG_INSTANCE, "")
    return int(raw) if raw.isdigit() else None


def tag_list(tag_map: dict[str, str]) -> list[dict[str, str]]:
    """boto3's ``[{"Key": ..., "Value": ...}]`` form, in a stable order."""
    return [{"Key": k, "Value": v} for k, v in sorted(tag_map.items())]


def tag_map(tag_list: list[dict[str, str]]) -> dict[str, str]:
    """boto3's ``[{"Key": ..., "Value": ...}]`` form as a dict."""
    return {t["Key"]: t["Value"] for t in tag_list}
