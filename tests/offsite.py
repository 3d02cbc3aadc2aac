"""Helpers of the off-machine replication tests: a moto S3 server, the environment every
Litestream of a test runs in, and a look at what a replica holds.

Litestream's AWS SDK walks the whole credential chain when it finds no credentials, down
to the EC2 metadata address, which is not on this machine: every process that may run
Litestream gets fake credentials, no shared config files and the metadata lookup turned
off (``AWS_ENV``), so all it ever talks to is the loopback moto server.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from shardchat.node.replication import litestream
from tests.provisioner.conftest import MotoServer
from tests.support import ROOT

REGION = "us-east-1"
BUCKET = "shardchat-replica"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_REGION": REGION,
           "AWS_CONFIG_FILE": "/nonexistent/aws-config",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials"}
REPLICA_TIMEOUT = 30.0  # seconds a replica may take to show what was acked
POLL = 0.2


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory) -> Iterator[MotoServer]:
    """A moto server with the replica bucket (one per test module)."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto_server.log").start()
    try:
        boto3.client("s3", region_name=REGION, endpoint_url=server.url,
                     aws_access_key_id="testing", aws_secret_access_key="testing"
                     ).create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()


def node_settings(kind: str, tmp: Path, moto: MotoServer | None, *, prefix: str = "t",
                  sync_interval: float = 1.0) -> dict[str, Any]:
    """The ``[node]`` keys that replicate to a directory (``file``) or to moto (``s3``)."""
    if kind == "file":
        return {"replicate_to": str(tmp / "replica"), "replicate_sync_interval": sync_interval}
    assert moto is not None
    return {"replicate_to": f"s3://{BUCKET}/{prefix}", "replicate_endpoint": moto.url,
            "replicate_region": REGION, "replicate_sync_interval": sync_interval}


def shardchat(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the ``shardchat`` command of this checkout with ``AWS_ENV``."""
    env = {**os.environ, **AWS_ENV, "PYTHONPATH": str(ROOT)}
    env.pop("AWS_PROFILE", None)
    return subprocess.run([sys.executable, "-m", "shardchat", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT, check=False)


def replica_tops(config_path: Path, db_path: Path, scratch: Path) -> dict[str, int]:
    """Restore the replica of ``db_path`` (described by its node's ``litestream.yml``)
    into ``scratch`` and read each room's highest seq; {} while it holds nothing."""
    scratch.unlink(missing_ok=True)
    env = {**litestream.child_env(), **AWS_ENV}
    done = subprocess.run(litestream.restore_argv(litestream.find_binary(), config_path,
                                                  db_path, scratch),
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 0, done.stderr
    if not scratch.exists():
        return {}
    conn = sqlite3.connect(scratch)
    try:
        return dict(conn.execute("SELECT room_id, MAX(seq) FROM messages GROUP BY room_id"))
    finally:
        conn.close()


def wait_for_replica(config_path: Path, db_path: Path, scratch: Path,
                     wanted: dict[str, int], timeout: float = REPLICA_TIMEOUT) -> float:
    """Poll the replica until every room of ``wanted`` reaches its seq there; the seconds
    that took. Each poll is a real restore: what it finds is what a restore would bring."""
    started = time.monotonic()
    seen: dict[str, int] = {}
    for _ in range(int(timeout / POLL) + 1):
        seen = replica_tops(config_path, db_path, scratch)
        if all(seen.get(room, 0) >= seq for room, seq in wanted.items()):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            break
        time.sleep(POLL)
    raise TimeoutError(f"the replica did not reach {wanted} within {timeout:g} s; it holds {seen}")
