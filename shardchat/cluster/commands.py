"""``shardchat up`` and ``shardchat router``: thin click commands over up.py and router.py.

``shardchat.cli`` registers both with ``main.add_command(...)``; ``python -m
shardchat.cluster.commands up|router ...`` runs them on their own as well.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import click

from shardchat import config as config_mod
from shardchat.cli_common import EXIT_CONFIG, EXIT_FAILED, load_config, setup_logging


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
                       endpoint_url: str | None):
    from shardchat.cluster.rules import build_rules

    if not alb_name:
        rules = build_rules([i.number for i in cfg.instances], cfg.aws.rule_priority_offset)
        return rules, {i.number: (i.host, i.port) for i in cfg.instances}
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
def router(config_path: str, port: int, host: str, alb_name: str | None,
           endpoint_url: str | None, region: str | None) -> None:
    """Run the local router alone: ALB rule semantics in front of the configured nodes."""
    from shardchat.cluster.router import Router, RouterLimits

    setup_logging("router")
    cfg = load_config(config_path)
    rules, targets = _rules_and_targets(cfg, alb_name, region, endpoint_url)
    rt = Router(rules, targets, idle_timeout=float(cfg.aws.idle_timeout),
                limits=RouterLimits.from_config(cfg))
    asyncio.run(_serve_until_signal(rt, host, port))


@click.group()
def _standalone() -> None:
    """Cluster commands, runnable before they are wired into `shardchat`."""


_standalone.add_command(up)
_standalone.add_command(router)

if __name__ == "__main__":
    _standalone()
