"""``shardchat node --instance 1,2``: several instances of one host from one command, one
process each (``shardchat/cluster/nodegroup.py``). Real node processes on loopback.

The command runs as a child (``nodeproc.ChildProcess``) with its output in a log file: the
supervisor's lines and every node's, each naming its instance.
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from shardchat import config as config_mod
from shardchat import lifecycle
from shardchat.cli import main as cli
from shardchat.cluster.nodeproc import ChildProcess, Exited
from tests.support import (
    HEALTHY_TIMEOUT,
    PORT_ATTEMPTS,
    ROOT,
    GiveUp,
    http_json,
    make_cluster_config,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

STOP_TIMEOUT = 30.0  # seconds for the whole group to drain (grace 1 s each) and exit


class Group:
    """One ``shardchat node --instance 1,2`` command and the instances it serves."""

    def __init__(self, tmp: Path, instances: str = "1,2", n: int = 2, **config) -> None:
        self.tmp = tmp
        self.numbers = [int(x) for x in instances.split(",")]
        self.config_path, self.instances = make_cluster_config(tmp, n, **config)
        self.proc = ChildProcess("node group", [
            sys.executable, "-m", "shardchat", "node", "--config", str(self.config_path),
            "--instance", instances], tmp / "group.log", cwd=ROOT)

    def healthz(self, number: int) -> tuple[int, object]:
        port = self.instances[number - 1]["port"]
        return http_json("GET", f"http://127.0.0.1:{port}/i{number}/healthz", timeout=2)

    def wait_healthy(self) -> None:
        def healthy() -> bool:
            if self.proc.returncode is not None:
                raise GiveUp(f"the command exited with {self.proc.returncode}:\n"
                             f"{self.proc.run_log()}")
            return all(self.healthz(n)[0] == 200 for n in self.numbers)
        wait_until(healthy, HEALTHY_TIMEOUT, what="every instance of the group healthy")

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()

    def log(self) -> str:
        return self.proc.run_log()


def started_group(tmp: Path, **kwargs) -> Group:
    """A group whose instances all answer their health checks. A port another process took
    between choosing it and the node's bind is retried with fresh ports (tests/support.py)."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        group = Group(tmp, **kwargs)
        group.proc.spawn()
        try:
            group.wait_healthy()
            return group
        except GiveUp:
            if "address already in use" not in group.log().lower() or attempt == PORT_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def instance_of(proc: psutil.Process) -> int:
    argv = proc.cmdline()
    return int(argv[argv.index("--instance") + 1])


def test_two_instances_run_as_two_processes_and_sigterm_drains_both_to_exit_0(tmp_path):
    group = started_group(tmp_path, node={"drain_grace_seconds": 2.0})
    try:
        children = group.children()
        assert sorted(instance_of(c) for c in children) == [1, 2]  # one process each
        assert len({c.pid for c in children}) == 2
        assert group.healthz(1) == (200, {"instance": 1, "status": "ok"})
        assert group.healthz(2) == (200, {"instance": 2, "status": "ok"})

        group.proc.send_signal(signal.SIGTERM)
        # each drains as it does alone: its health check answers 503 during the grace
        wait_until(lambda: all(group.healthz(n)[0] == 503 for n in (1, 2)), 10,
                   what="both instances draining")
        assert group.proc.wait(STOP_TIMEOUT) == 0, group.log()
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                       for c in children)
        log = group.log()
        for n in (1, 2):
            assert f"instance {n} stopped cleanly" in log
            assert log.count(f"i{n} INFO shardchat.node: stopping: SIGTERM") == 1
        assert "again" not in log  # one SIGTERM each: nobody's grace was cut short
        assert "stopped: instances 1, 2 drained" in log
    finally:
        group.proc.stop()


def test_a_child_that_dies_stops_the_others_and_the_command_exits_non_zero(tmp_path):
    group = started_group(tmp_path)
    try:
        victim = next(c for c in group.children() if instance_of(c) == 2)
        victim.kill()  # kill -9: instance 2 is gone without a drain
        code = group.proc.wait(STOP_TIMEOUT)
        log = group.log()
        assert code == 1, log
        assert "instance 2 (pid" in log and "was killed by SIGKILL before it was asked to " \
            "stop" in log
        assert "nothing is restarted" in log
        assert "instance 1 stopped cleanly" in log  # the other one drained
        assert log.count("instances 1, 2 running") == 1  # and nobody came back
    finally:
        group.proc.stop()


def test_a_child_that_cannot_start_makes_the_command_exit_non_zero(tmp_path):
    group = Group(tmp_path)
    with socket.socket() as squatter:  # another process holds instance 2's port
        squatter.bind(("127.0.0.1", group.instances[1]["port"]))
        group.proc.spawn()
        try:
            code = group.proc.wait(HEALTHY_TIMEOUT + STOP_TIMEOUT)
        finally:
            group.proc.stop()
    log = group.log()
    assert code == 1, log
    assert "instance 2 (pid" in log and "exited with code" in log
    # instance 1 may still be starting when it is told to stop (then SIGTERM ends it before
    # its handler is in place and it is listed too): what matters is that 2 is named
    assert "stopped, not cleanly: " in log
    assert "instance 2 exited with code 1" in log.split("stopped, not cleanly: ", 1)[1]


def test_one_instance_runs_in_the_command_itself_as_before(tmp_path):
    group = started_group(tmp_path, instances="1", n=1)
    try:
        assert group.children() == []  # no supervisor: the command is the node
        assert "supervisor" not in group.log()
        assert group.proc.terminate(STOP_TIMEOUT) == 0
    finally:
        group.proc.stop()


@pytest.mark.parametrize("instances,says", [
    ("1,1", "instance 1 is named twice"),
    ("1,x", "is not an instance number"),
])
def test_a_bad_instance_list_is_refused_before_anything_starts(tmp_path, instances, says):
    cfg_path, _ = make_cluster_config(tmp_path, 2)
    result = CliRunner().invoke(cli, ["node", "--config", str(cfg_path), "--instance",
                                      instances])
    assert result.exit_code == 2 and says in result.output


def test_an_instance_the_config_lacks_is_a_config_error_naming_the_key(tmp_path):
    cfg_path, _ = make_cluster_config(tmp_path, 2)
    result = CliRunner().invoke(cli, ["node", "--config", str(cfg_path), "--instance", "1,7"])
    assert result.exit_code == 2
    assert "Config error at instances: no instance number 7 (configured: 1, 2)" in \
        result.output


def test_exited_names_where_an_inherited_output_went(tmp_path):
    child = ChildProcess("child", [sys.executable, "-c", "raise SystemExit(3)"], None)
    child.spawn()
    assert child.wait(30) == 3
    with pytest.raises(Exited, match="exited with code 3; its output went to this "
                                     "process's stderr"):
        child.check()
    assert child.run_log() == ""


def test_the_systemd_template_runs_one_instance_and_outlasts_its_drain():
    """The unit the docs ship stays in step with the node: one instance (%i) per unit,
    SIGTERM to the node alone, and a stop timeout longer than a stop with the defaults."""
    unit = (ROOT / "docs" / "systemd" / "shardchat-node@.service").read_text()
    keys = dict(line.split("=", 1) for line in unit.splitlines()
                if "=" in line and not line.startswith("#"))
    assert keys["ExecStart"].endswith("shardchat node --config /etc/shardchat/shardchat.toml "
                                      "--instance %i")
    assert (keys["KillSignal"], keys["KillMode"]) == ("SIGTERM", "mixed")
    defaults = config_mod.parse({"instances": [{"number": 1}]}, env={})
    assert float(keys["TimeoutStopSec"]) >= lifecycle.node_stop_limit(
        defaults.node.drain_grace_seconds)
    assert keys["Restart"] == "always"
