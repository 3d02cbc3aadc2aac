"""TOML -> typed, validated configuration.

Every error names the key at fault (``instances[2].port``) and says what would be accepted,
because a config mistake found at start-up is cheap and one found in production is not.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from shardchat import replica_target, shards, urls
from shardchat.names import storage_name

SECRET_ENV = "SHARDCHAT_SECRET"
IDLE_MARGIN = 15.0  # default keep-alive beyond the ALB's idle timeout (node.idle_timeout = 0)
PLACEHOLDER_SECRET = "change-me"  # the example config's value: never accepted by a node
MIN_SECRET_CHARS = 16
HTTPS_PORT = 443  # the HTTPS listener's port when aws.certificate_arn is set
ENGINES = ("fast", "stock")  # node.engine: shardchat/node/engine/


class ConfigError(ValueError):
    """A config value is missing or wrong; ``key`` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class ClusterConfig:
    name: str = "demo"
    public_url: str = "http://127.0.0.1:8080"
    secret: str = ""  # unset: tools that sign nothing (the provisioner) do not need one
    data_dir: str = "./data"


@dataclass(frozen=True)
class Instance:
    number: int
    host: str = "127.0.0.1"
    port: int = 9001
    internal_port: int = 9101
    ec2_instance_id: str | None = None
    # The instance that keeps an on-line copy of this one's rooms (SPEC section 9); None:
    # the next instance number of the cluster, the highest wrapping round to the lowest
    # (``Config.follower_of``).
    follower: int | None = None


@dataclass(frozen=True)
class NodeSettings:
    """Limits and transport settings of every node (the ``[node]`` table)."""

    # "fast": python-socketio with the node's fast paths (engine/); "stock": plain
    # python-socketio, the fallback when a library upgrade fails the fast one's self-check
    engine: str = "fast"
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    websocket_compression: bool = False
    max_message_chars: int = 4000
    max_packet_bytes: int = 64 * 1024
    max_body_bytes: int = 16 * 1024
    max_name_chars: int = 40
    rate_limit_messages: int = 20
    rate_limit_window: float = 10.0
    rate_limit_typing: int = 20
    rate_limit_history: int = 20
    rate_limit_members: int = 20  # ``members`` pages per member (node/rooms.py)
    rate_limit_joins: int = 10
    rate_limit_rooms: int = 10
    rate_limit_lookups: int = 60  # per address: each may ask every peer (cluster/directory.py)
    rate_limit_address_multiple: int = 10
    rate_limit_max_keys: int = 100_000
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    room_capacity: int = 500
    # Large rooms (docs/protocol.md, "Large rooms"): how many members a welcome lists (the
    # rest are paged with ``members``), above how many members joins and leaves go out as
    # one ``presence`` batch per tick, and that tick: ``presence_tick`` seconds at the
    # threshold, growing with the room, never longer than ``presence_tick_max``.
    welcome_members: int = 100
    presence_batch_members: int = 100
    presence_tick: float = 0.5
    presence_tick_max: float = 5.0
    history_retention: int = 10_000
    prune_interval: float = 5.0  # seconds between two prunes of one room's old messages
    max_recovery: int = 1000
    invite_ttl_days: float = 30.0
    write_buffer_cap: int = 1024 * 1024
    write_buffer_grace: float = 5.0
    max_page_bytes: int = 256 * 1024
    fsync: bool = True
    peer_timeout: float = 1.5
    placement_reservation_seconds: float = 5.0
    stats_interval: float = 1.0
    # When the key is not set: aws.health_check_interval * aws.unhealthy_threshold (see
    # ``drain_grace_default``); 20.0 is that product for the [aws] defaults.
    drain_grace_seconds: float = 20.0
    log_level: str = "INFO"
    header_timeout: float = 10.0  # seconds to receive a request's headers (listener.py)
    idle_timeout: float = 0.0  # idle keep-alive seconds; 0: aws.idle_timeout + IDLE_MARGIN
    # Off-machine copy of every store, streamed by Litestream (shardchat/node/replication/):
    # "" (off), "s3://bucket/prefix" or a directory; each instance under <target>/i<N>/
    replicate_to: str = ""
    replicate_endpoint: str = ""  # S3-compatible server (MinIO, moto); "" for AWS S3
    replicate_region: str = ""  # the bucket's region; "": aws.region
    replicate_sync_interval: float = 1.0  # seconds between uploads: the loss window's size
    # On-line copy on the follower (shardchat/node/replication/, SPEC section 9): "off",
    # "async" (acked after the owner's commit, shipped at once) or "sync" (acked once on
    # the owner's and the follower's disk).
    replication: str = "off"
    replication_ack_timeout: float = 2.0  # sync: seconds an ack waits for the follower
    replication_fallback: str = "none"  # sync: "none" (refuse, unavailable) or "async"
    replication_backlog: int = 10_000  # batches kept for a follower that fell behind
    auto_adopt: bool = False  # the follower adopts a lost instance on its own
    adopt_after: float = 30.0  # seconds a majority must not reach the lost instance
    # With auto_adopt, an owner that has not reached enough of the others for this long
    # stops itself (``replication/lease.py``) before a follower can adopt its rooms. When
    # the key is not set: adopt_after / 2 (15.0 is that for the default adopt_after).
    adopt_lease: float = 15.0


@dataclass(frozen=True)
class AwsConfig:
    region: str = "us-east-1"
    load_balancer: str = ""
    vpc_id: str = ""
    subnets: tuple[str, ...] = ()
    security_groups: tuple[str, ...] = ()
    scheme: str = "internet-facing"
    listener_port: int = 80
    certificate_arn: str = ""
    target_type: str = "instance"
    idle_timeout: int = 60
    health_check_interval: int = 10
    health_check_timeout: int = 5
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2
    deregistration_delay: int = 30
    discover: str = "config"
    rule_priority_offset: int = 0
    max_target_groups: int = 100
    max_rules: int = 100
    # ``[[aws.shards]]``: one ALB per 99 instances (shardchat/shards.py); empty: one shard
    # named by ``load_balancer`` and ``cluster.public_url``
    shards: tuple[shards.ShardTable, ...] = ()
    # The DynamoDB table whose conditional writes keep two plans, applies or watchers from
    # interleaving (provisioner/lock.py); created when absent. Its lease: seconds a holder
    # that stopped renewing keeps it before another may take it.
    lock_table: str = "shardchat-locks"
    lock_lease: int = 120
    watch_interval: float = 30.0  # seconds between two rounds of ``shardchat-provision watch``
    # Instances found by EC2 tags or claimed at boot (``shardchat node --auto``) without
    # [[instances]] entries: their ports (unless their tags say otherwise), and how long a
    # claim of a number waits before it reads the others' claims again (aws/claim.py).
    instance_port: int = 9001
    instance_internal_port: int = 9101
    claim_settle: float = 5.0
    # Auto Scaling groups whose termination lifecycle hooks drain a leaving instance before
    # AWS terminates it (provisioner/scalein.py); empty: scale-in is not watched
    autoscaling_groups: tuple[str, ...] = ()
    lifecycle_heartbeat: float = 60.0  # seconds between heartbeats while a drain runs


@dataclass(frozen=True)
class Config:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    instances: tuple[Instance, ...] = ()
    node: NodeSettings = field(default_factory=NodeSettings)
    aws: AwsConfig = field(default_factory=AwsConfig)
    source: str = "<defaults>"

    def instance(self, number: int) -> Instance:
        for inst in self.instances:
            if inst.number == number:
                return inst
        known = ", ".join(str(i.number) for i in self.instances) or "none"
        raise ConfigError("instances", f"no instance number {number} (configured: {known})")

    @property
    def data_dir(self) -> Path:
        return Path(self.cluster.data_dir)

    def follower_of(self, number: int) -> int | None:
        """The instance that follows ``number``: its ``follower`` key, else the next
        instance number, the highest wrapping round to the lowest; None in a cluster of
        one."""
        inst = self.instance(number)
        if inst.follower is not None:
            return inst.follower
        numbers = sorted(i.number for i in self.instances)
        if len(numbers) < 2:
            return None
        later = [n for n in numbers if n > number]
        return later[0] if later else numbers[0]

    def followed_by(self, number: int) -> list[int]:
        """The instances whose follower ``number`` is."""
        return [i.number for i in self.instances if i.number != number
                and self.follower_of(i.number) == number]

    def instance_data_dir(self, number: int) -> Path:
        return self.data_dir / storage_name(number)

    @property
    def replicate_region(self) -> str:
        """The replica bucket's region: ``node.replicate_region``, else ``aws.region``."""
        return self.node.replicate_region or self.aws.region

    @property
    def keepalive_timeout(self) -> float:
        """How long listeners keep an idle connection: ``node.idle_timeout``, by default
        longer than the ALB's, so the ALB never reuses a connection the node just closed."""
        return self.node.idle_timeout or self.aws.idle_timeout + IDLE_MARGIN

    @property
    def shards(self) -> tuple[shards.Shard, ...]:
        """The configured shards (``shardchat/shards.py``), 1 first."""
        return shards.resolve(self.aws.shards, self.aws.load_balancer, self.cluster.public_url)

    def shard(self, index: int) -> shards.Shard | None:
        """Shard ``index`` when the config has it, else None."""
        found = self.shards
        return found[index - 1] if 1 <= index <= len(found) else None

    def public_url_for(self, number: int) -> str:
        """The base of instance N's room URLs: its shard's ``public_url``, else (a shard
        without a table, refused by the provisioner) ``cluster.public_url``."""
        shard = self.shard(shards.shard_of(number))
        return shard.public_url if shard and shard.public_url else self.cluster.public_url

    def with_instances(self, instances: tuple[Instance, ...]) -> Config:
        return replace(self, instances=tuple(sorted(instances, key=lambda i: i.number)))


# ---------------------------------------------------------------------------------------
# the cluster secret


def secret_problem(secret: str) -> str | None:
    """Why a node must not run with ``secret``, or None when it may.

    The secret signs invite links and opens the internal API, so a guessable one lets anyone
    forge invites and call peers. A missing secret and the example's placeholder are refused
    rather than replaced by a default: a default would be the same on every install."""
    if not secret:
        return "is not set"
    if secret.strip().lower() == PLACEHOLDER_SECRET:
        return f"is the example's placeholder {PLACEHOLDER_SECRET!r}"
    if not secret.isascii() or not secret.isprintable() or " " in secret:
        return "must be printable ASCII without spaces (peers send it in an HTTP header)"
    if len(secret) < MIN_SECRET_CHARS:
        return f"is only {len(secret)} characters long"
    return None


def require_secret(cfg: Config, env: dict[str, str] | None = None) -> None:
    """Raise ConfigError unless ``cfg`` carries a secret a node may run with.

    Checked by the commands that run or vouch for a node (``node``, ``check``, ``up``), not
    by ``parse``: the provisioner reads the same file and never uses the secret."""
    problem = secret_problem(cfg.cluster.secret)
    if problem is None:
        return
    env = os.environ if env is None else env
    key = SECRET_ENV if env.get(SECRET_ENV) else "cluster.secret"
    raise ConfigError(key, f"{problem}; a node needs a cluster secret of at least "
                      f"{MIN_SECRET_CHARS} characters, the same on every node: set "
                      f"{SECRET_ENV} (or cluster.secret in {cfg.source}) to a random value "
                      "such as the output of: python3 -c \"import secrets; "
                      "print(secrets.token_urlsafe(32))\"")


# ---------------------------------------------------------------------------------------
# parsing


def _check_type(key: str, value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(key, f"must be a whole number, got {value!r}")
    if not isinstance(value, expected):
        names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
                 tuple: "a list of strings"}
        raise ConfigError(key, f"must be {names.get(expected, expected.__name__)}, got {value!r}")
    return value


def _build(cls: type, table: Any, prefix: str) -> Any:
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise ConfigError(prefix, "must be a table")
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}.{key}"
        if key not in known:
            raise ConfigError(full, f"unknown key (known keys: {', '.join(sorted(known))})")
        ftype = known[key].type
        if ftype in ("int | None", int | None):
            kwargs[key] = None if value is None else _check_type(full, value, int)
        elif ftype in ("str | None", str | None):
            kwargs[key] = None if value in ("", None) else _check_type(full, value, str)
        elif ftype in ("tuple[str, ...]",):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(full, f"must be a list of strings, got {value!r}")
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = _check_type(full, value, {"str": str, "int": int, "float": float,
                                                     "bool": bool}[str(ftype)])
    return cls(**kwargs)


def _port(key: str, value: int) -> None:
    if not 1 <= value <= 65535:
        raise ConfigError(key, f"must be a TCP port 1..65535, got {value}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be greater than 0, got {value}")


# The widest a character of message text gets in JSON: a control character escapes to
# ``\u00XX``. Plus room for the other fields of a message (sid, name, client_id, ts ...).
JSON_BYTES_PER_CHAR = 6
MESSAGE_OVERHEAD_BYTES = 1024
# The most one member takes in JSON (``{"sid", "name", "member"}``): a 40-character name of
# 4-byte characters, the two ids and the punctuation fit in it.
MEMBER_JSON_BYTES = 256
MAX_MEMBERS_PAGE = 500  # the largest ``members`` limit (SPEC section 10), and welcome_members
WELCOME_OVERHEAD_BYTES = 2048  # a welcome's room, you, invite and keys, around its lists


def welcome_member_cap(n: NodeSettings) -> int:
    """How many members a welcome lists: ``node.welcome_members``, or fewer when the room a
    history page leaves below ``node.write_buffer_cap`` holds fewer of the largest members,
    so that no welcome can make its reader look slow. Counted, never measured per join."""
    room = n.write_buffer_cap - n.max_page_bytes - WELCOME_OVERHEAD_BYTES
    return max(0, min(n.welcome_members, room // MEMBER_JSON_BYTES))


def _check_page_bytes(n: NodeSettings) -> None:
    """A page must hold the largest single message (so every page carries at least one)
    and stay below the write buffer cap (so one page never makes a reader look slow)."""
    largest = n.max_message_chars * JSON_BYTES_PER_CHAR + MESSAGE_OVERHEAD_BYTES
    if n.max_page_bytes < largest:
        raise ConfigError("node.max_page_bytes", f"must hold one message of "
                          f"node.max_message_chars ({n.max_message_chars}) characters, "
                          f"at least {largest} bytes; got {n.max_page_bytes}")
    if n.max_page_bytes >= n.write_buffer_cap:
        raise ConfigError("node.max_page_bytes", f"must be smaller than "
                          f"node.write_buffer_cap ({n.write_buffer_cap}); got "
                          f"{n.max_page_bytes}")


def _check_large_rooms(n: NodeSettings) -> None:
    """The large-room keys: a welcome lists 0..500 members, batching starts above a
    member count of 0 or more, and the tick is positive and no longer than its maximum."""
    if not 0 <= n.welcome_members <= MAX_MEMBERS_PAGE:
        raise ConfigError("node.welcome_members", f"must be 0..{MAX_MEMBERS_PAGE} (the rest "
                          f"are paged with \"members\"), got {n.welcome_members}")
    if n.presence_batch_members < 0:
        raise ConfigError("node.presence_batch_members", "must be 0 (every room batches) or "
                          f"more members, got {n.presence_batch_members}")
    if n.presence_tick_max < n.presence_tick:
        raise ConfigError("node.presence_tick_max", f"must be at least node.presence_tick "
                          f"({n.presence_tick:g} s), got {n.presence_tick_max:g} s")


def _networks(key: str, values: tuple[str, ...]) -> None:
    """Every entry an IP address or CIDR (``10.0.0.0/16``, ``::1``), host bits clear."""
    for idx, value in enumerate(values):
        try:
            ipaddress.ip_network(value.strip())
        except ValueError as exc:
            raise ConfigError(f"{key}[{idx}]", f"must be an IP address or a CIDR such as "
                              f"\"10.0.0.0/16\", got {value!r} ({exc})") from None


def _check_listeners(instances: tuple[Instance, ...]) -> None:
    """No two listeners of the cluster on one machine and port.

    Several instances may share a machine (one process per core): the same ``host``, the
    same ``ec2_instance_id``, or both, each instance on ports of its own. A machine is named
    by its host address and, where set, by its EC2 instance id too, because the load
    balancer reaches an instance target by id and port whatever ``host`` says: two
    instances on one EC2 id and one port would be one target, however their hosts differ.
    Public and internal ports share one space (a machine has one set of TCP ports)."""
    taken: dict[tuple[str, int], str] = {}
    for idx, inst in enumerate(instances):
        machines = [(inst.host, f"{inst.host}:{{port}}")]
        if inst.ec2_instance_id:
            machines.append((f"ec2:{inst.ec2_instance_id}",
                             f"port {{port}} of EC2 instance {inst.ec2_instance_id}"))
        for which, port in (("port", inst.port), ("internal_port", inst.internal_port)):
            here = f"instances[{idx}].{which}"
            for machine, label in machines:
                other = taken.get((machine, port))
                if other is not None:
                    raise ConfigError(here, f"{label.format(port=port)} is already used by "
                                      f"{other}: instances on one machine need ports of "
                                      "their own")
            for machine, _ in machines:
                taken[(machine, port)] = here


def drain_grace_default(aws: AwsConfig) -> float:
    """How long the load balancer takes to see a draining node as unhealthy and stop sending
    it new connections: ``unhealthy_threshold`` failed checks, ``health_check_interval``
    apart. The default of ``node.drain_grace_seconds``: a shorter grace closes clients while
    the load balancer still sends their reconnects (and new visitors) to this node."""
    return float(max(0, aws.health_check_interval * aws.unhealthy_threshold))


def validate(cfg: Config) -> Config:
    """Cross-field checks; returns ``cfg`` unchanged or raises ConfigError."""
    c = cfg.cluster
    if not c.name or not all(ch.isalnum() or ch == "-" for ch in c.name) or len(c.name) > 20:
        raise ConfigError("cluster.name", "must be 1..20 letters, digits or '-' "
                          f"(it names AWS resources), got {c.name!r}")
    if not c.public_url.startswith(("http://", "https://")):
        raise ConfigError("cluster.public_url", f"must start with http:// or https://, "
                          f"got {c.public_url!r}")
    seen: dict[int, str] = {}
    for idx, inst in enumerate(cfg.instances):
        key = f"instances[{idx}]"
        if not urls.valid_instance(inst.number):
            raise ConfigError(f"{key}.number", f"must be {urls.MIN_INSTANCE}..{urls.MAX_INSTANCE}"
                              f", got {inst.number!r}")
        if inst.number in seen:
            raise ConfigError(f"{key}.number", f"duplicate instance number {inst.number} "
                              f"(also {seen[inst.number]})")
        seen[inst.number] = key
        if not inst.host:
            raise ConfigError(f"{key}.host", "must not be empty")
        _port(f"{key}.port", inst.port)
        _port(f"{key}.internal_port", inst.internal_port)
        if inst.port == inst.internal_port:
            raise ConfigError(f"{key}.internal_port", "must differ from port: the internal "
                              "listener is never a load balancer target")
    _check_listeners(cfg.instances)
    n = cfg.node
    if n.engine not in ENGINES:
        raise ConfigError("node.engine", f"must be \"fast\" (the default) or \"stock\" "
                          f"(plain python-socketio, no fast path), got {n.engine!r}")
    for name in ("ping_interval", "ping_timeout", "max_message_chars", "max_packet_bytes",
                 "max_body_bytes", "max_name_chars", "rate_limit_messages", "rate_limit_window",
                 "rate_limit_typing", "rate_limit_history", "rate_limit_members",
                 "rate_limit_joins", "rate_limit_rooms", "rate_limit_lookups",
                 "rate_limit_address_multiple", "rate_limit_max_keys", "room_capacity",
                 "presence_tick", "presence_tick_max", "history_retention", "invite_ttl_days",
                 "write_buffer_cap", "write_buffer_grace", "max_page_bytes", "peer_timeout",
                 "stats_interval", "header_timeout"):
        _positive(f"node.{name}", getattr(n, name))
    _check_large_rooms(n)
    _check_page_bytes(n)
    if n.rate_limit_max_keys < 2:
        raise ConfigError("node.rate_limit_max_keys", "must be at least 2 (an event spends "
                          f"from a member's bucket and an address's), got {n.rate_limit_max_keys}")
    _networks("node.trusted_proxies", n.trusted_proxies)
    if n.drain_grace_seconds < 0:
        raise ConfigError("node.drain_grace_seconds", f"must be 0 or more seconds, got "
                          f"{n.drain_grace_seconds}")
    if n.max_recovery < 50:
        raise ConfigError("node.max_recovery", f"must be at least 50, got {n.max_recovery}")
    if n.prune_interval < 0:
        raise ConfigError("node.prune_interval", "must be 0 (prune after every write) or more "
                          f"seconds, got {n.prune_interval:g}")
    _check_aws(cfg.aws, n)
    _check_shards(cfg)
    _check_replication(cfg)
    _check_followers(cfg)
    return cfg


REPLICATION_MODES = ("off", "async", "sync")
FALLBACKS = ("none", "async")


def _check_followers(cfg: Config) -> None:
    """Each ``follower`` names another instance of the cluster; the on-line replication
    keys fit together."""
    numbers = {i.number for i in cfg.instances}
    for idx, inst in enumerate(cfg.instances):
        if inst.follower is None:
            continue
        key = f"instances[{idx}].follower"
        if inst.follower == inst.number:
            raise ConfigError(key, f"instance {inst.number} cannot follow itself: name "
                              "another instance, or remove the key for the next one")
        if inst.follower not in numbers:
            known = ", ".join(str(n) for n in sorted(numbers))
            raise ConfigError(key, f"names instance {inst.follower}, which is not in the "
                              f"cluster (configured: {known})")
    n = cfg.node
    if n.replication not in REPLICATION_MODES:
        raise ConfigError("node.replication", "must be \"off\", \"async\" or \"sync\", "
                          f"got {n.replication!r}")
    if n.replication_fallback not in FALLBACKS:
        raise ConfigError("node.replication_fallback", "must be \"none\" (sync acks fail "
                          "with unavailable while the follower is away) or \"async\", got "
                          f"{n.replication_fallback!r}")
    for name in ("replication_ack_timeout", "replication_backlog", "adopt_after",
                 "adopt_lease"):
        _positive(f"node.{name}", getattr(n, name))
    if n.auto_adopt and n.replication == "off":
        raise ConfigError("node.auto_adopt", "needs node.replication = \"async\" or "
                          "\"sync\": with replication off no follower holds a copy to adopt")
    if n.auto_adopt:
        _check_lease(cfg)


def _check_lease(cfg: Config) -> None:
    """``auto_adopt`` is safe only if an owner cut off from the majority stops itself
    (``adopt_lease``) before any follower can adopt it: the lease, plus the time a
    partition may go unseen by the stats poll (one interval and one timeout), must end
    before ``adopt_after``; and only a third instance lets an owner tell its follower's
    death from a partition."""
    n = cfg.node
    if cfg.aws.discover == "config" and len(cfg.instances) < 3:
        raise ConfigError("node.auto_adopt", f"needs at least 3 instances, the config has "
                          f"{len(cfg.instances)}: with 2, an owner cannot tell its "
                          "follower's death from a partition, and its lease would stop it "
                          "whenever its follower is down. Add an instance, or set "
                          "auto_adopt = false and adopt with shardchat adopt")
    margin = n.stats_interval + n.peer_timeout
    if n.adopt_lease + margin >= n.adopt_after:
        raise ConfigError("node.adopt_lease", f"adopt_lease + stats_interval + peer_timeout "
                          f"({n.adopt_lease:g} + {n.stats_interval:g} + {n.peer_timeout:g} "
                          f"s) must be less than adopt_after ({n.adopt_after:g} s), so that "
                          "an owner cut off from the others has stopped before its follower "
                          "may adopt its rooms: shorten adopt_lease (by default adopt_after "
                          f"/ 2) or lengthen adopt_after beyond {n.adopt_lease + margin:g} s")


SYNC_INTERVAL_RANGE = (0.1, 3600.0)  # node.replicate_sync_interval, seconds


def _check_replication(cfg: Config) -> None:
    """``replicate_to`` names a place Litestream can write (``replica_target.parse``), away
    from the data it protects; the other ``replicate_*`` keys fit it."""
    n = cfg.node
    low, high = SYNC_INTERVAL_RANGE
    if not low <= n.replicate_sync_interval <= high:
        raise ConfigError("node.replicate_sync_interval", f"must be {low:g}..{high:g} "
                          f"seconds, got {n.replicate_sync_interval:g}")
    if not n.replicate_to:
        for key in ("replicate_endpoint", "replicate_region"):
            if getattr(n, key):
                raise ConfigError(f"node.{key}", "is set but node.replicate_to is not: set "
                                  "node.replicate_to = \"s3://bucket/prefix\" too, or "
                                  "remove this key")
        return
    try:
        target = replica_target.parse(n.replicate_to)
    except replica_target.TargetError as exc:
        raise ConfigError("node.replicate_to", str(exc)) from None
    if isinstance(target, replica_target.FileTarget):
        if n.replicate_endpoint:
            raise ConfigError("node.replicate_endpoint", "only applies to an s3:// "
                              f"node.replicate_to, which is a directory here "
                              f"({n.replicate_to!r})")
        root, data = target.root.absolute(), cfg.data_dir.absolute()
        if root == data or data in root.parents:
            raise ConfigError("node.replicate_to", f"is inside cluster.data_dir ({data}): a "
                              "copy on the same disk is lost with it. Name a directory "
                              "outside it (another volume, a network mount) or an s3:// URL")
    if n.replicate_endpoint and not n.replicate_endpoint.startswith(("http://", "https://")):
        raise ConfigError("node.replicate_endpoint", "must be the URL of an S3-compatible "
                          "server, starting with http:// or https://, got "
                          f"{n.replicate_endpoint!r}")


def _within(key: str, value: int, low: int, high: int, unit: str = "") -> None:
    if not low <= value <= high:
        raise ConfigError(key, f"must be {low}..{high}{unit}, got {value}")


def _check_aws(a: AwsConfig, n: NodeSettings) -> None:
    """The [aws] values AWS itself would refuse (or that would cut sockets), refused here
    with the key at fault. Keys a node never needs may stay empty: ``validate_for_aws``
    requires them when the provisioner runs."""
    if a.scheme not in ("internet-facing", "internal"):
        raise ConfigError("aws.scheme", f"must be \"internet-facing\" or \"internal\", "
                          f"got {a.scheme!r}")
    if a.target_type not in ("instance", "ip"):
        raise ConfigError("aws.target_type",
                          f"must be \"instance\" or \"ip\", got {a.target_type!r}")
    if a.discover not in ("config", "ec2-tags"):
        raise ConfigError("aws.discover", f"must be \"config\" or \"ec2-tags\", got {a.discover!r}")
    _port("aws.listener_port", a.listener_port)
    _within("aws.idle_timeout", a.idle_timeout, 1, 4000, " seconds")
    if n.ping_interval + n.ping_timeout >= a.idle_timeout:
        raise ConfigError("aws.idle_timeout", f"must exceed node.ping_interval + "
                          f"node.ping_timeout ({n.ping_interval + n.ping_timeout:g} s), got "
                          f"{a.idle_timeout} s: the load balancer would cut idle sockets")
    if n.idle_timeout < 0:
        raise ConfigError("node.idle_timeout", f"must be 0 (automatic) or more than "
                          f"aws.idle_timeout, got {n.idle_timeout:g}")
    if n.idle_timeout and n.idle_timeout <= a.idle_timeout:
        raise ConfigError("node.idle_timeout", f"must exceed aws.idle_timeout "
                          f"({a.idle_timeout} s), got {n.idle_timeout:g} s: the load balancer "
                          "would reuse connections the node already closed (502s); or 0 for "
                          f"aws.idle_timeout + {IDLE_MARGIN:g} s")
    _check_lb_name("aws.load_balancer", a.load_balancer)
    _port("aws.instance_port", a.instance_port)
    _port("aws.instance_internal_port", a.instance_internal_port)
    if a.instance_port == a.instance_internal_port:
        raise ConfigError("aws.instance_internal_port", "must differ from aws.instance_port")
    if not 0.05 <= a.claim_settle <= 300:
        raise ConfigError("aws.claim_settle", "must be 0.05..300 seconds (longer than EC2 "
                          f"takes to show a new tag), got {a.claim_settle:g}")
    if not 1 <= a.watch_interval <= 86400:
        raise ConfigError("aws.watch_interval", "must be 1..86400 seconds, got "
                          f"{a.watch_interval:g}")
    if not 10 <= a.lock_lease <= 3600:
        raise ConfigError("aws.lock_lease", f"must be 10..3600 seconds, got {a.lock_lease}")
    if not 3 <= len(a.lock_table) <= 255 or not all(
            c.isalnum() or c in "_.-" for c in a.lock_table):
        raise ConfigError("aws.lock_table", "must be a DynamoDB table name: 3..255 letters, "
                          f"digits, '_', '-' or '.', got {a.lock_table!r}")
    if a.subnets and len(set(a.subnets)) < 2:
        raise ConfigError("aws.subnets", REQUIRED_AWS["subnets"] + f", got {list(a.subnets)}")
    _within("aws.health_check_interval", a.health_check_interval, 5, 300)
    _within("aws.health_check_timeout", a.health_check_timeout, 2, 120)
    if a.health_check_timeout >= a.health_check_interval:
        raise ConfigError("aws.health_check_timeout", f"must be less than "
                          f"aws.health_check_interval ({a.health_check_interval} s), "
                          f"got {a.health_check_timeout} s")
    _within("aws.healthy_threshold", a.healthy_threshold, 2, 10)
    _within("aws.unhealthy_threshold", a.unhealthy_threshold, 2, 10)
    _within("aws.deregistration_delay", a.deregistration_delay, 0, 3600)
    if a.certificate_arn and not a.certificate_arn.startswith("arn:"):
        raise ConfigError("aws.certificate_arn", "must be an ACM or IAM certificate ARN "
                          f"(arn:...), got {a.certificate_arn!r}")
    if a.certificate_arn and a.listener_port == HTTPS_PORT:
        raise ConfigError("aws.listener_port", f"must not be {HTTPS_PORT} when "
                          "aws.certificate_arn is set: it is the port that redirects to HTTPS")


# What the provisioner needs that a node config may leave out, and what to say when missing.
REQUIRED_AWS = {
    "load_balancer": "must name the load balancer to create or adopt",
    "vpc_id": "must name the VPC the nodes run in",
    "subnets": "must list at least two subnets in two availability zones (an ALB requires it)",
}


def validate_for_aws(cfg: Config) -> Config:
    """A validated config that also holds everything ``shardchat-provision`` needs: the
    [aws] keys a node never reads, at least one instance, and each instance's EC2 id when
    the load balancer targets instances. Returns ``cfg`` or raises ConfigError."""
    a = cfg.aws
    for key, missing in REQUIRED_AWS.items():
        if key == "load_balancer" and cfg.shards[0].load_balancer:
            continue  # named by the first [[aws.shards]] table
        if not getattr(a, key):
            got = f", got {list(a.subnets)}" if key == "subnets" else ""
            raise ConfigError(f"aws.{key}", missing + got)
    if not cfg.instances:
        raise ConfigError("instances", "the config lists no instances (and discovery found "
                          "none): there is nothing to route to")
    if a.target_type == "instance":
        for idx, inst in enumerate(cfg.instances):
            if not inst.ec2_instance_id:
                raise ConfigError(f"instances[{idx}].ec2_instance_id", "is required when "
                                  "aws.target_type = \"instance\" (or set aws.target_type = "
                                  "\"ip\" to target the host address)")
    check_shard_tables(cfg)
    return cfg


def _shard_tables(raw: Any) -> tuple[shards.ShardTable, ...]:
    if not isinstance(raw, list):
        raise ConfigError("aws.shards", "must be an array of tables ([[aws.shards]])")
    return tuple(_build(shards.ShardTable, table, f"aws.shards[{idx}]")
                 for idx, table in enumerate(raw))


def _check_shards(cfg: Config) -> None:
    """Every shard table after the first names its load balancer and public URL; names
    are valid and no two shards share a load balancer."""
    if not cfg.aws.shards:
        return
    seen: dict[str, str] = {}
    for shard in cfg.shards:
        for key in ("load_balancer", "public_url"):
            if not getattr(shard, key):
                raise ConfigError(f"{shard.key}.{key}", f"is required for shard "
                                  f"{shard.index} (instances {shards.span(shard.index)}); "
                                  f"only shard 1 falls back to {DEFAULTS_OF_SHARD_1[key]}")
        if not shard.public_url.startswith(("http://", "https://")):
            raise ConfigError(f"{shard.key}.public_url", "must start with http:// or "
                              f"https://, got {shard.public_url!r}")
        _check_lb_name(f"{shard.key}.load_balancer", shard.load_balancer)
        if shard.load_balancer in seen:
            raise ConfigError(f"{shard.key}.load_balancer", f"{shard.load_balancer!r} is "
                              f"also {seen[shard.load_balancer]}: each shard has its own ALB")
        seen[shard.load_balancer] = f"{shard.key}.load_balancer"


DEFAULTS_OF_SHARD_1 = {"load_balancer": "aws.load_balancer", "public_url": "cluster.public_url"}


def _check_lb_name(key: str, name: str) -> None:
    if name and (len(name) > 32 or not all(c.isalnum() or c == "-" for c in name)):
        raise ConfigError(key, f"must be 1..32 letters, digits or '-', got {name!r}")


def check_shard_tables(cfg: Config) -> None:
    """Refuse an instance whose shard has no ``[[aws.shards]]`` table (or, without tables,
    any instance past the first shard), naming the key to add."""
    have = len(cfg.shards)
    for idx, inst in enumerate(cfg.instances):
        k = shards.shard_of(inst.number)
        if k <= have:
            continue
        why = ("the config has no [[aws.shards]] tables, so only shard 1 (instances "
               f"{shards.span(1)}, aws.load_balancer) exists" if not cfg.aws.shards else
               f"the config has {have} [[aws.shards]] table(s)")
        raise ConfigError("aws.shards", f"instance {inst.number} (instances[{idx}]) belongs "
                          f"to shard {k} (instances {shards.span(k)}), but {why}: add "
                          f"[[aws.shards]] tables up to shard {k}, each with load_balancer "
                          "and public_url (one ALB holds 99 instances)")


def parse(data: dict[str, Any], source: str = "<dict>", env: dict[str, str] | None = None
          ) -> Config:
    """Build a validated Config from parsed TOML; ``env`` defaults to os.environ."""
    env = os.environ if env is None else env
    allowed = {"cluster", "instances", "node", "aws"}
    for key in data:
        if key not in allowed:
            raise ConfigError(key, f"unknown section (known: {', '.join(sorted(allowed))})")
    cluster = _build(ClusterConfig, data.get("cluster"), "cluster")
    if env.get(SECRET_ENV):
        cluster = replace(cluster, secret=env[SECRET_ENV])
    raw_instances = data.get("instances", [])
    if not isinstance(raw_instances, list):
        raise ConfigError("instances", "must be an array of tables ([[instances]])")
    instances = []
    for idx, table in enumerate(raw_instances):
        if not isinstance(table, dict) or "number" not in table:
            raise ConfigError(f"instances[{idx}].number", "is required")
        instances.append(_build(Instance, table, f"instances[{idx}]"))
    aws_table = data.get("aws")
    shard_tables: tuple[shards.ShardTable, ...] = ()
    if isinstance(aws_table, dict) and "shards" in aws_table:
        aws_table = dict(aws_table)
        shard_tables = _shard_tables(aws_table.pop("shards"))
    aws = replace(_build(AwsConfig, aws_table, "aws"), shards=shard_tables)
    node = _build(NodeSettings, data.get("node"), "node")
    if "drain_grace_seconds" not in (data.get("node") or {}):
        node = replace(node, drain_grace_seconds=drain_grace_default(aws))
    if "adopt_lease" not in (data.get("node") or {}):
        node = replace(node, adopt_lease=node.adopt_after / 2)
    cfg = Config(
        cluster=cluster,
        instances=tuple(instances),
        node=node,
        aws=aws,
        source=source,
    )
    validate(cfg)
    return cfg.with_instances(cfg.instances)


def load(path: str | Path, env: dict[str, str] | None = None) -> Config:
    """Read and validate a TOML config file. Relative ``data_dir`` is kept as written
    (relative to the working directory), like every other CLI path."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("--config", f"file {str(p)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {str(p)!r}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), f"is not valid TOML: {exc}") from None
    return parse(data, source=str(p), env=env)


# ---------------------------------------------------------------------------------------
# writing (``shardchat up`` keeps its config as a file; tests and the benchmark write theirs)


def toml_value(value: Any) -> str:
    """One TOML value: booleans, numbers, strings (JSON escapes are valid TOML ones), lists."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def dump_toml(data: dict[str, Any], header: str = "") -> str:
    """The config's shape as TOML: tables of values (``[node]``) and arrays of tables
    (``[[instances]]``); ``header`` becomes a leading comment."""
    out: list[str] = [f"# {header}", ""] if header else []
    for name, value in data.items():
        if isinstance(value, dict):
            nested = {k: v for k, v in value.items() if _tables(v)}
            out.append(f"[{name}]")
            out += [f"{k} = {toml_value(v)}" for k, v in value.items() if k not in nested]
            out.append("")
            out += [dump_toml({f"{name}.{k}": v}) for k, v in nested.items()]
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            for item in value:
                out.append(f"[[{name}]]")
                out += [f"{k} = {toml_value(v)}" for k, v in item.items()]
                out.append("")
    return "\n".join(out)
