"""``shardchat up``, ``router``, ``move``, ``drain`` and ``rebalance``: thin click commands
over up.py, router.py and moves.py.

``shardchat.cli`` registers them with ``main.add_command(...)``; ``python -m
shardchat.cluster.commands <command> ...`` runs them on their own as well.

Exit codes of ``move``, ``drain`` and ``rebalance`` (``cli_common``): 0 done (or nothing to
do), 1 some room could not be moved (each is listed with the reason), 2 the config is
wrong, 3 refused before anything changed (an unknown instance or room, a target that is
down, drained or stopping: the message says what to do).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import click

from shardchat import config as config_mod
from shardchat.cli_common import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    config_errors_exit,
    load_config,
    setup_logging,
)


@click.command("up")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 64),
              help="How many node processes to run.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535),
              help="Port of the local router (the URL to open).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the router listens on (nodes stay on 127.0.0.1).")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Once serving, write JSON here (url, pid, each node's pid and ports); "
                   "removed on stop.")
def up(nodes: int, port: int, host: str, ready_file: Path | None) -> None:
    """Run a whole cluster here: N nodes plus the router; data under ./.shardchat/."""
    from shardchat.cluster.up import UpOptions, run_up

    setup_logging("router")
    sys.exit(run_up(UpOptions(nodes=nodes, port=port, host=host, base=Path(".shardchat"),
                              ready_file=ready_file)))


def _rules_and_targets(cfg: config_mod.Config, alb_name: str | None, region: str | None,
                       endpoint_url: str | None, shard: int | None = None):
    from shardchat.cluster.rules import build_rules, shard_rules

    if not alb_name:
        numbers = [i.number for i in cfg.instances]
        offset = cfg.aws.rule_priority_offset
        rules = (build_rules(numbers, offset) if shard is None
                 else shard_rules(numbers, shard, offset))
        return rules, {i.number: (i.host, i.port) for i in cfg.instances
                       if i.number in rules.default_instances}
    from shardchat.cluster.alb_rules import load_rules_from_alb

    try:
        return load_rules_from_alb(alb_name, region=region or cfg.aws.region,
                                   endpoint_url=endpoint_url, cfg=cfg)
    except Exception as exc:
        click.echo(f"cannot read the rules of load balancer {alb_name!r}: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


async def _serve_until_signal(router, host: str, port: int) -> None:
    from shardchat.cluster.router import serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        runner = await serve(router, host, port)
    except OSError as exc:
        click.echo(f"cannot listen on {host}:{port} ({exc.strerror}); pass --port with a free "
                   "port", err=True)
        sys.exit(EXIT_FAILED)
    try:
        click.echo(f"router listening on http://{host}:{port}/ "
                   f"({len(router.targets)} targets, {len(router.rules.rules)} rules); "
                   "Ctrl-C to stop")
        await stop.wait()
    finally:
        await runner.cleanup()


@click.command("router")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML config file: its instances are the targets.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--rules-from-alb", "alb_name", default=None,
              help="Evaluate the rules of this live load balancer instead of the config's.")
@click.option("--endpoint-url", default=None, help="AWS endpoint (moto server, LocalStack).")
@click.option("--region", default=None, help="AWS region (default: aws.region).")
@click.option("--shard", type=click.IntRange(1), default=None,
              help="Stand in for this shard's ALB only: the rules and lobby of instances "
                   "ceil(N / 99) = K (run one router per shard, each on its shard's "
                   "public_url).")
def router(config_path: str, port: int, host: str, alb_name: str | None,
           endpoint_url: str | None, region: str | None, shard: int | None) -> None:
    """Run the local router alone: ALB rule semantics in front of the configured nodes."""
    from shardchat.cluster.router import Router, RouterLimits

    setup_logging("router")
    cfg = load_config(config_path)
    if shard is not None and alb_name:
        click.echo("--shard and --rules-from-alb exclude each other: name the shard's ALB "
                   "with --rules-from-alb alone", err=True)
        sys.exit(EXIT_CONFIG)
    rules, targets = _rules_and_targets(cfg, alb_name, region, endpoint_url, shard)
    if shard is not None and not targets:
        click.echo(f"shard {shard} has no instance in {cfg.source}: nothing to route to",
                   err=True)
        sys.exit(EXIT_CONFIG)
    rt = Router(rules, targets, idle_timeout=float(cfg.aws.idle_timeout),
                limits=RouterLimits.from_config(cfg))
    asyncio.run(_serve_until_signal(rt, host, port))


# -- moving rooms ---------------------------------------------------------------------------

CONFIG_OPTION = click.option("--config", "config_path", required=True,
                             type=click.Path(dir_okay=False),
                             help="TOML config file of the cluster (its instances and secret).")
JSON_OPTION = click.option("--json", "as_json", is_flag=True,
                           help="Print the report as one JSON object instead of lines.")


def _cluster_config(path: str) -> config_mod.Config:
    """The config, with its instances found by EC2 tags when ``aws.discover`` says so."""
    cfg = load_config(path)
    with config_errors_exit():
        config_mod.require_secret(cfg)
    if cfg.aws.discover == "ec2-tags":
        from shardchat.aws.ec2 import resolve_instances

        try:
            cfg = resolve_instances(cfg)
        except Exception as exc:
            click.echo(f"cannot find the instances by their EC2 tags: {exc}", err=True)
            sys.exit(EXIT_FAILED)
    return cfg


def _run_moves(work, as_json: bool) -> None:
    """Run one of moves.py's operations; print its report; exit with its code."""
    from shardchat.cluster.moves import Refused

    say = None if as_json else (lambda line: click.echo(line))
    try:
        report = asyncio.run(work(say))
    except Refused as exc:
        if as_json:
            click.echo(json.dumps({"refused": str(exc)}))
        click.echo(f"refused: {exc}", err=True)
        sys.exit(EXIT_REFUSED)
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        for line in report.lines():
            click.echo(line)
    sys.exit(EXIT_OK if report.ok else EXIT_FAILED)


# Generated room ids may begin with "-": such an argument is the room id, not an option.
@click.command("move", context_settings={"ignore_unknown_options": True})
@CONFIG_OPTION
@click.argument("room_id")
@click.option("--to", "to", required=True, type=int, help="Instance number to move the room to.")
@JSON_OPTION
def move(config_path: str, room_id: str, to: int, as_json: bool) -> None:
    """Move one room, live, to instance N (its members follow; nothing acked is lost)."""
    from shardchat.cluster import moves

    cfg = _cluster_config(config_path)
    _run_moves(lambda say: moves.move(cfg, room_id, to), as_json)


@click.command("drain")
@CONFIG_OPTION
@click.option("--instance", "number", required=True, type=int, help="Instance number to empty.")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(1),
              help="Seconds after which no further move starts.")
@click.option("--parallel", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Moves running at once.")
@click.option("--undrain", is_flag=True,
              help="Put a drained instance back into placement instead (moves nothing).")
@JSON_OPTION
def drain(config_path: str, number: int, timeout: float, parallel: int, undrain: bool,
          as_json: bool) -> None:
    """Move every room of instance N to the least loaded others; N stays drained (out of
    placement) until `--undrain` or its restart."""
    from shardchat.cluster import moves

    cfg = _cluster_config(config_path)
    if undrain:
        _run_moves(lambda say: moves.undrain(cfg, number), as_json)
    _run_moves(lambda say: moves.drain(cfg, number, deadline=timeout, concurrency=parallel,
                                       say=say), as_json)


@click.command("rebalance")
@CONFIG_OPTION
@click.option("--dry-run", is_flag=True, help="Show the plan; move nothing.")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(1),
              help="Seconds after which no further move starts.")
@click.option("--parallel", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Moves running at once.")
@JSON_OPTION
def rebalance(config_path: str, dry_run: bool, timeout: float, parallel: int,
              as_json: bool) -> None:
    """Move as few rooms as even out the load (largest at most 1.25 x the smallest)."""
    from shardchat.cluster import moves

    cfg = _cluster_config(config_path)
    _run_moves(lambda say: moves.rebalance(cfg, dry_run=dry_run, deadline=timeout,
                                           concurrency=parallel, say=say), as_json)


@click.command("adopt")
@CONFIG_OPTION
@click.option("--instance", "number", required=True, type=int,
              help="The lost instance whose rooms its follower takes over.")
@click.option("--force", is_flag=True,
              help="Adopt even though the instance still answers (it then stops as soon "
                   "as its follower reaches it, and is fenced at its next start).")
@JSON_OPTION
def adopt(config_path: str, number: int, force: bool, as_json: bool) -> None:
    """The follower of lost instance N becomes the owner of every room of N (SPEC section
    9); lookups and redirects then send N's clients there, and N, back, serves none of them.

    Exit codes: 0 adopted; 1 the follower could not be reached or failed; 2 config error;
    3 refused (N still answers, replication is off, ...), nothing changed."""
    from shardchat.cluster.adoption import adopt as run_adopt

    cfg = _cluster_config(config_path)
    with config_errors_exit():
        cfg.instance(number)
    code, answer = asyncio.run(run_adopt(cfg, number, force))
    if as_json:
        click.echo(json.dumps(answer))
    elif code == EXIT_OK:
        click.echo(f"instance {answer['by']} adopted {answer['rooms']} rooms of instance "
                   f"{number}; they are replicated to instance {answer['follower']} from "
                   "a snapshot")
    else:
        click.echo(f"refused: {answer.get('message', answer)}", err=True)
    sys.exit(code)


@click.group()
def _standalone() -> None:
    """Cluster commands, runnable before they are wired into `shardchat`."""


for _command in (up, router, move, drain, rebalance, adopt):
    _standalone.add_command(_command)

if __name__ == "__main__":
    _standalone()
