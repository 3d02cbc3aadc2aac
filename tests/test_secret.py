"""The cluster secret: no node runs on a missing, short or placeholder secret.

The secret signs invites and opens the internal API, so a node that started on a default
would let anyone forge invites. Each refusal is a real ``shardchat node`` process that exits
with code 2 and one line saying what to set; SHARDCHAT_SECRET is enough to start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shardchat import config
from shardchat.cluster import up
from tests.support import ROOT, SECRET, NodeProcess, free_port, write_config

pytestmark = pytest.mark.timeout(60)


def one_node_config(tmp: Path, secret: str | None) -> tuple[Path, dict]:
    inst = {"number": 1, "host": "127.0.0.1", "port": free_port(),
            "internal_port": free_port()}
    cluster = {"name": "t", "data_dir": str(tmp / "data")}
    if secret is not None:
        cluster["secret"] = secret
    return write_config(tmp / "shardchat.toml", instances=[inst], cluster=cluster), inst


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``shardchat ARGS`` with SHARDCHAT_SECRET taken out of the environment unless given."""
    full = {k: v for k, v in os.environ.items() if k != config.SECRET_ENV}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "shardchat", *args], cwd=str(ROOT), env=full,
                          capture_output=True, text=True, timeout=30)


WEAK = {"missing": None, "empty": "", "short": "abc123", "fifteen": "x" * 15,
        "placeholder": "change-me", "placeholder_upper": "CHANGE-ME",
        "with_space": "a long secret with spaces"}


@pytest.mark.parametrize("secret", list(WEAK.values()), ids=list(WEAK))
def test_node_refuses_to_start_on_a_weak_secret(tmp_path, secret):
    path, _ = one_node_config(tmp_path, secret)
    done = run_cli("node", "--config", str(path), "--instance", "1")
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert line.startswith("Config error at cluster.secret: "), line
    assert config.SECRET_ENV in line and "16 characters" in line, line
    assert not (tmp_path / "data").exists(), "nothing may be created before the refusal"


def test_a_short_secret_from_the_environment_is_named_as_such(tmp_path):
    path, _ = one_node_config(tmp_path, SECRET)
    done = run_cli("node", "--config", str(path), "--instance", "1",
                   env={config.SECRET_ENV: "short"})
    assert done.returncode == 2, done
    assert done.stderr.startswith(f"Config error at {config.SECRET_ENV}: is only 5 characters")


def test_the_environment_secret_lets_a_node_start(tmp_path):
    path, inst = one_node_config(tmp_path, None)
    node = NodeProcess(path, inst, tmp_path, env={config.SECRET_ENV: "e" * 16})
    try:
        node.start()  # waits until /healthz answers 200
        assert node.healthz() == (200, {"instance": 1, "status": "ok"})
    finally:
        node.stop()


def test_the_secret_from_the_config_lets_a_node_start(tmp_path):
    path, inst = one_node_config(tmp_path, SECRET)
    node = NodeProcess(path, inst, tmp_path)
    try:
        node.start()
        assert node.healthz()[0] == 200
    finally:
        node.stop()


def test_check_reports_the_same_problem(tmp_path):
    path, _ = one_node_config(tmp_path, "change-me")
    done = run_cli("check", "--config", str(path))
    assert done.returncode == 2 and "cluster.secret" in done.stderr, done
    good = run_cli("check", "--config", str(path), env={config.SECRET_ENV: SECRET})
    assert good.returncode == 0 and "ok" in good.stdout, good


def test_the_example_config_carries_the_refused_placeholder():
    cfg = config.load(ROOT / "config.example.toml", env={})
    with pytest.raises(config.ConfigError) as info:
        config.require_secret(cfg, env={})
    assert info.value.key == "cluster.secret" and "placeholder" in info.value.message


def test_reading_a_config_without_a_secret_still_works():
    """The provisioner reads the same file and never needs the secret."""
    cfg = config.parse({"cluster": {"name": "t"}, "instances": [{"number": 1}]}, env={})
    assert cfg.cluster.secret == ""
    assert config.secret_problem(SECRET) is None


def test_up_replaces_a_weak_secret_with_a_strong_one(tmp_path, monkeypatch):
    monkeypatch.delenv(config.SECRET_ENV, raising=False)
    opts = up.UpOptions(nodes=1, port=free_port(), base=tmp_path / ".shardchat")
    opts.base.mkdir()
    opts.config_path.write_text('[cluster]\nsecret = "change-me"\n')
    cfg = up.local_config(opts)
    written = tomllib.loads(opts.config_path.read_text())["cluster"]["secret"]
    assert written == cfg.cluster.secret and config.secret_problem(written) is None
    assert len(written) >= 40  # 32 random bytes, URL-safe base64
    assert up.local_config(opts).cluster.secret == written, "a good secret is kept"
