"""Names of the AWS resources shardchat creates.

Ownership is decided by tags (``shardchat.aws.tags``), never by names: names only have to be
unique, readable and stable. A target group's name is built from the frozen storage name of
its instance (``shardchat.names``), never from the URL scheme, so existing groups keep being
recognised whatever the URLs look like.
"""

from __future__ import annotations

from shardchat.names import storage_name

MAX_TARGET_GROUP_NAME = 32  # AWS limit on target group names


def _fit(cluster: str, suffix: str) -> str:
    """``<cluster>-<suffix>`` cut to the AWS name limit (the cluster part gives way)."""
    room = MAX_TARGET_GROUP_NAME - len(suffix) - 1
    return f"{cluster[:room].rstrip('-')}-{suffix}"


def target_group_name(cluster: str, instance: int, port: int, target_type: str) -> str:
    """Instance N's target group. The port and target type are part of the name because
    AWS cannot change either in place: a change means a new group beside the old one."""
    suffix = f"{storage_name(instance)}-{port}"
    if target_type == "ip":
        suffix += "-ip"
    return _fit(cluster, suffix)


def lobby_name(cluster: str, target_type: str, shard: int = 1) -> str:
    """The lobby target group of a shard (its instances; its listener's default action).
    Shard 1 keeps the name it had before there were shards."""
    suffix = "lobby-ip" if target_type == "ip" else "lobby"
    return _fit(cluster, suffix if shard == 1 else f"s{shard}-{suffix}")
