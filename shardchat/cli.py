"""``shardchat node | up | router``: thin click wrappers that parse and hand over."""

from __future__ import annotations

import sys

import click

from shardchat import config as config_mod


def _load(path: str):
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        click.echo(f"config error: {exc}", err=True)
        sys.exit(2)


@click.group()
@click.version_option(package_name="shardchat")
def main() -> None:
    """shardchat: a Socket.IO chat whose rooms are pinned to instances."""


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML config file (see config.example.toml).")
@click.option("--instance", "number", required=True, type=int, help="Instance number N to run.")
def node(config_path: str, number: int) -> None:
    """Run chat node N (public listener + internal peer listener)."""
    from shardchat.node.app import run_node

    cfg = _load(config_path)
    try:
        cfg.instance(number)
    except config_mod.ConfigError as exc:
        click.echo(f"config error: {exc}", err=True)
        sys.exit(2)
    sys.exit(run_node(cfg, number))
