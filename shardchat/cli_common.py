"""What every command line of the product shares: exit codes, how a config error reads,
loading the config, and log set-up.

``shardchat`` (node, check, up, router) and ``shardchat-provision`` both use these, so a bad
config reads the same and exits with the same code whichever command found it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from shardchat import config as config_mod

EXIT_OK = 0
EXIT_FAILED = 1  # the work itself failed (AWS refused, a port was taken, ...)
EXIT_CONFIG = 2  # the config is wrong; the message names the key at fault
EXIT_REFUSED = 3  # the request cannot be done as asked (nothing changed); the message says why


@contextmanager
def config_errors_exit() -> Iterator[None]:
    """Turn a ConfigError raised inside into one line naming the key, and exit 2."""
    try:
        yield
    except config_mod.ConfigError as exc:
        click.echo(f"Config error at {exc.key}: {exc.message}", err=True)
        sys.exit(EXIT_CONFIG)


def load_config(path: str | Path) -> config_mod.Config:
    """The validated config at ``path``, or exit 2 with the key at fault."""
    with config_errors_exit():
        return config_mod.load(path)


def setup_logging(prefix: str, level: int | str = logging.INFO) -> None:
    """Log lines as ``<prefix>: <message>`` on stderr; aiohttp's access log kept quiet."""
    logging.basicConfig(level=level, format=f"{prefix}: %(message)s")
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
