"""Which load balancer ("shard") each instance sits behind, and that shard's public URL.

One ALB holds at most 100 target groups: 99 instance groups and the lobby. Past 99
instances the fleet is split into shards, one ALB each, by instance number alone: instance
N belongs to shard ceil(N / 99). A number never changes shard when other instances come or
go, so a room's URL stays valid for as long as its instance lives. The provisioner builds
one ALB per shard that has instances; the node answers each room's ``url`` under the public
URL of its instance's shard; the local router can stand in for one shard at a time.

Pure: no I/O, no AWS. The config parser builds ``ShardTable`` values from ``[[aws.shards]]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

SHARD_SIZE = 99  # instance target groups per ALB: its hard limit of 100 less the lobby


def shard_of(instance: int) -> int:
    """The shard of instance N: ceil(N / 99), so 1-99 -> 1, 100-198 -> 2, ..."""
    return (instance + SHARD_SIZE - 1) // SHARD_SIZE


def first_instance(shard: int) -> int:
    return (shard - 1) * SHARD_SIZE + 1


def last_instance(shard: int) -> int:
    return shard * SHARD_SIZE


def span(shard: int) -> str:
    """``100-198``: the instance numbers of a shard, for messages."""
    return f"{first_instance(shard)}-{last_instance(shard)}"


def in_shard(numbers: Iterable[int], shard: int) -> list[int]:
    """The instance numbers among ``numbers`` that belong to ``shard``, sorted."""
    return sorted(n for n in set(numbers) if shard_of(n) == shard)


@dataclass(frozen=True)
class ShardTable:
    """One ``[[aws.shards]]`` table as written: empty strings mean "not set"."""

    load_balancer: str = ""
    public_url: str = ""


@dataclass(frozen=True)
class Shard:
    index: int  # 1, 2, 3 ...
    load_balancer: str
    public_url: str

    @property
    def key(self) -> str:
        """The config key this shard comes from, for messages."""
        return f"aws.shards[{self.index - 1}]"


def resolve(tables: tuple[ShardTable, ...], load_balancer: str, public_url: str
            ) -> tuple[Shard, ...]:
    """The configured shards. Without tables: one, named by ``aws.load_balancer`` and
    ``cluster.public_url``. With tables: one per table, in order; those two keys fill in
    what shard 1's table leaves out (later tables must name both themselves)."""
    if not tables:
        return (Shard(1, load_balancer, public_url),)
    out = []
    for idx, table in enumerate(tables, 1):
        lb = table.load_balancer or (load_balancer if idx == 1 else "")
        url = table.public_url or (public_url if idx == 1 else "")
        out.append(Shard(idx, lb, url))
    return tuple(out)
