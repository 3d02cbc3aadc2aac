"""Names and ownership tags of the AWS resources shardchat creates.

Ownership is decided by tags, never by names: a resource is ours only when it carries
``shardchat:cluster = <cluster name>``. Names only have to be unique and readable.
"""

from __future__ import annotations

from shardchat import urls
from shardchat.cluster import discovery

TAG_CLUSTER = discovery.TAG_CLUSTER  # the same tags mark EC2 instances for discovery
TAG_INSTANCE = discovery.TAG_INSTANCE
TAG_ROLE = "shardchat:role"
TAG_ADOPTED = "shardchat:adopted"

ROLE_LB = "lb"
ROLE_LISTENER = "listener"
ROLE_REDIRECT = "redirect"
ROLE_INSTANCE = "instance"
ROLE_LOBBY = "lobby"

MAX_TARGET_GROUP_NAME = 32  # AWS limit on target group names


def _fit(cluster: str, suffix: str) -> str:
    """``<cluster>-<suffix>`` cut to the AWS name limit (the cluster part gives way)."""
    room = MAX_TARGET_GROUP_NAME - len(suffix) - 1
    return f"{cluster[:room].rstrip('-')}-{suffix}"


def target_group_name(cluster: str, instance: int, port: int, target_type: str) -> str:
    """Instance N's target group. The port and target type are part of the name because
    AWS cannot change either in place: a change means a new group beside the old one."""
    suffix = f"{urls.prefix(instance).lstrip('/')}-{port}"
    if target_type == "ip":
        suffix += "-ip"
    return _fit(cluster, suffix)


def lobby_name(cluster: str, target_type: str) -> str:
    """The lobby target group (every instance; the listener's default action)."""
    return _fit(cluster, "lobby-ip" if target_type == "ip" else "lobby")


def tags(cluster: str, role: str, instance: int | None = None) -> dict[str, str]:
    out = {TAG_CLUSTER: cluster, TAG_ROLE: role}
    if instance is not None:
        out[TAG_INSTANCE] = str(instance)
    return out


def tag_list(tag_map: dict[str, str]) -> list[dict[str, str]]:
    """boto3's ``[{"Key": ..., "Value": ...}]`` form, in a stable order."""
    return [{"Key": k, "Value": v} for k, v in sorted(tag_map.items())]
