"""``shardchat node | check | restore | up | router | move | drain | rebalance | adopt``: thin click
wrappers that parse and hand over."""

from __future__ import annotations

import sys

import click

from shardchat import config as config_mod
from shardchat.cli_common import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_REFUSED,
    config_errors_exit,
    load_config,
)

EXIT_NOTHING = 4  # restore: the replica holds no backup of the instance
ROOMS_LISTED = 20  # restore prints this many rooms, then only the totals


def load_node_config(path: str) -> config_mod.Config:
    """The config a node may run with: valid, and carrying a strong enough cluster secret
    (or exit 2 with one line saying what to set)."""
    cfg = load_config(path)
    with config_errors_exit():
        config_mod.require_secret(cfg)
    return cfg


@click.group()
@click.version_option(package_name="shardchat")
def main() -> None:
    """shardchat: a Socket.IO chat whose rooms are pinned to instances."""


class InstanceNumbers(click.ParamType):
    """``3`` or ``3,4,5``: the instance numbers one ``shardchat node`` runs, each once."""

    name = "N[,N...]"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        numbers: list[int] = []
        for part in str(value).split(","):
            if not part.strip().isdigit():
                self.fail(f"{value!r} is not an instance number or a comma-separated list "
                          "of them (3 or 3,4)", param, ctx)
            if int(part) in numbers:
                self.fail(f"instance {int(part)} is named twice in {value!r}", param, ctx)
            numbers.append(int(part))
        return tuple(numbers)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML config file (see config.example.toml).")
@click.option("--instance", "numbers", default=None, type=InstanceNumbers(),
              help="Instance number N to run; several (3,4) run one process each, one per "
                   "core, under one supervisor that forwards SIGTERM to all of them.")
@click.option("--auto", is_flag=True,
              help="On EC2: claim the lowest free instance number through EC2 tags, with "
                   "the host from instance metadata (IMDSv2) and ports from the config.")
@click.option("--endpoint-url", default=None,
              help="EC2 endpoint for --auto (moto server, LocalStack).")
def node(config_path: str, numbers: tuple[int, ...] | None, auto: bool,
         endpoint_url: str | None) -> None:
    """Run chat node N (public listener + internal peer listener), or several."""
    cfg = load_node_config(config_path)
    if auto == bool(numbers):
        click.echo("give either --instance N or --auto (claim a number on EC2)", err=True)
        sys.exit(EXIT_CONFIG)
    if auto:
        cfg, number = _claimed(cfg, endpoint_url)
        numbers = (number,)
    assert numbers is not None
    with config_errors_exit():
        for number in numbers:
            cfg.instance(number)
    if len(numbers) == 1:  # the node itself, in this process
        from shardchat.node.main import run_node

        sys.exit(run_node(cfg, numbers[0]))
    from shardchat.cluster.nodegroup import run_group

    sys.exit(run_group(cfg, config_path, numbers))


def _claimed(cfg: config_mod.Config, endpoint_url: str | None
             ) -> tuple[config_mod.Config, int]:
    """``node --auto``: this EC2 instance's claimed number and the config holding it."""
    from botocore.exceptions import BotoCoreError, ClientError

    from shardchat.aws.boot import auto_instance
    from shardchat.aws.claim import ClaimError
    from shardchat.aws.imds import ImdsError

    say = lambda line: click.echo(f"node --auto: {line}", err=True)  # noqa: E731
    with config_errors_exit():
        try:
            cfg, number = auto_instance(cfg, endpoint_url=endpoint_url, say=say)
        except (ImdsError, ClaimError, ClientError, BotoCoreError) as exc:
            click.echo(f"node --auto: no instance number claimed: {exc}", err=True)
            sys.exit(EXIT_FAILED)
    say(f"this is instance {number} ({cfg.instance(number).host})")
    return cfg, number


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML config file to check.")
def check(config_path: str) -> None:
    """Validate a config file (a node's secret included) and print what it describes."""
    from shardchat.cluster.rules import build_rules
    from shardchat.shards import shard_of

    cfg = load_node_config(config_path)
    with config_errors_exit():
        config_mod.check_shard_tables(cfg)
    click.echo(f"{config_path}: ok — cluster {cfg.cluster.name!r}, "
               f"{len(cfg.instances)} instance(s), public URL {cfg.cluster.public_url}")
    if cfg.aws.shards:
        for shard in cfg.shards:
            click.echo(f"  shard {shard.index}: load balancer {shard.load_balancer}, "
                       f"public URL {shard.public_url}")
    ruleset = build_rules([i.number for i in cfg.instances], cfg.aws.rule_priority_offset)
    for inst, rule in zip(cfg.instances, ruleset.rules, strict=True):
        where = f" (shard {shard_of(inst.number)})" if cfg.aws.shards else ""
        click.echo(f"  instance {inst.number}: {inst.host}:{inst.port} (internal "
                   f"{inst.internal_port})  rule {rule.priority}: {rule.path_pattern}{where}")
    if cfg.node.replicate_to:
        from shardchat import replica_target

        where = replica_target.parse(cfg.node.replicate_to).pattern()
        click.echo(f"  stores replicated (Litestream) to {where} every "
                   f"{cfg.node.replicate_sync_interval:g} s")
    if cfg.node.replication != "off":
        ring = ", ".join(f"{i.number} -> {cfg.follower_of(i.number)}" for i in cfg.instances)
        auto = (f", auto-adopt after {cfg.node.adopt_after:g} s" if cfg.node.auto_adopt
                else "")
        click.echo(f"  on-line replication {cfg.node.replication} to each follower ({ring})"
                   f"{auto}")


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML config file; its node.replicate_to names the replica.")
@click.option("--instance", "number", required=True, type=click.IntRange(1, 9999),
              help="Instance number N whose store to rebuild.")
@click.option("--force", is_flag=True,
              help="Restore even though the data directory holds a store: its files are "
                   "moved aside into replaced-<time>/ in that directory, never deleted.")
@click.option("--timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="Seconds the download may take.")
def restore(config_path: str, number: int, force: bool, timeout: float) -> None:
    """Rebuild instance N's store from its node.replicate_to copy (Litestream), on a new
    machine or an emptied disk; then start it with `shardchat node`.

    Exit codes: 0 restored; 1 the restore or the check of what it fetched failed (nothing
    put in place); 2 config error; 3 refused, nothing changed (the data directory holds a
    store, or a node runs on it); 4 the replica holds no backup of instance N."""
    from shardchat.node.replication import restore as restoring
    from shardchat.node.replication.litestream import ReplicationUnavailable

    cfg = load_config(config_path)
    with config_errors_exit():
        cfg.instance(number)
        if not cfg.node.replicate_to:
            raise config_mod.ConfigError("node.replicate_to", f"is not set in {config_path}: "
                                         "there is no replica to restore from. Set it to "
                                         "where the nodes replicated (s3://bucket/prefix or "
                                         "a directory)")
    try:
        done = restoring.restore(cfg, number, force=force, timeout=timeout)
    except restoring.RestoreRefused as exc:
        click.echo(f"Refused: {exc}", err=True)
        sys.exit(EXIT_REFUSED)
    except restoring.NothingToRestore as exc:
        click.echo(f"Nothing to restore: {exc}", err=True)
        sys.exit(EXIT_NOTHING)
    except (restoring.RestoreFailed, ReplicationUnavailable) as exc:
        click.echo(f"Restore failed: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    if done.replaced is not None:
        click.echo(f"the store that was there is in {done.replaced}")
    click.echo(f"restored instance {number} from {done.source} (transaction "
               f"{done.txid or '?'}) into {done.path} in {done.seconds:.2f} s: "
               f"{len(done.rooms)} rooms, {done.messages} messages, {done.size} bytes; "
               "integrity check ok")
    for room in done.rooms[:ROOMS_LISTED]:
        click.echo(f"  room {room.room_id} {room.name!r}: {room.messages} messages, last "
                   f"seq {room.last_seq}")
    if len(done.rooms) > ROOMS_LISTED:
        click.echo(f"  ... and {len(done.rooms) - ROOMS_LISTED} more rooms")
    if done.arriving or done.forwards:
        click.echo(f"  {done.arriving} rooms arriving by a move (finished when the node "
                   f"starts), {done.forwards} forwards of rooms that moved away")
    click.echo(f"start it with: shardchat node --config {config_path} --instance {number}")


def _register_cluster_commands() -> None:
    """`up`, `router`, `move`, `drain` and `rebalance` live with the cluster code they
    drive."""
    from shardchat.cluster import commands

    for name in ("up", "router", "move", "drain", "rebalance", "adopt"):
        cmd = getattr(commands, name, None)
        if cmd is not None:
            main.add_command(cmd, name)


_register_cluster_commands()
