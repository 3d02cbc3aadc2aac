"""The one node-process wrapper (``shardchat/cluster/nodeproc.py``) that ``shardchat up``,
the tests and the benchmark start their nodes with: real nodes and real child processes on
loopback, no stand-ins."""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shardchat import lifecycle
from shardchat.cluster import nodeproc
from shardchat.cluster.nodeproc import ChildProcess, Exited, NodeProcess, NotReady
from tests import support
from tests.support import (
    ROOT,
    http_json,
    make_cluster_config,
    refusing_port,
    repick_ports,
    start_nodes,
)

pytestmark = pytest.mark.timeout(120)


def python_child(tmp: Path, code: str, **kwargs) -> ChildProcess:
    """A child that runs ``code`` (a stand-in for a server that is not a node)."""
    return ChildProcess("child", [sys.executable, "-c", textwrap.dedent(code)],
                        tmp / "child.log", cwd=ROOT, **kwargs)


def test_a_node_is_ready_serves_and_stops_gracefully(tmp_path):
    cfg_path, instances = make_cluster_config(tmp_path, 1)
    node = support.NodeProcess(cfg_path, instances[0], tmp_path)
    start_nodes([node])  # spawn + wait_ready (with the tests' retry of a taken port)
    try:
        assert node.running and node.returncode is None
        assert node.probe()
        status, body = http_json("GET", node.ready_url)
        assert (status, body) == (200, {"instance": 1, "status": "ok"})
        assert node.stop() == 0  # SIGTERM: it drains and exits 0 well within the grace
        assert not node.running and node.returncode == 0
        assert "stopped cleanly" in node.run_log()
        assert node.run_log().startswith("--- started ")
    finally:
        node.kill()


def test_kill_is_kill_minus_9_and_a_restart_logs_its_own_run(tmp_path):
    cfg_path, instances = make_cluster_config(tmp_path, 1)
    node = support.NodeProcess(cfg_path, instances[0], tmp_path)
    start_nodes([node])
    try:
        first_pid = node.pid
        assert node.kill() == -signal.SIGKILL == -9
        assert node.returncode == -9
        assert "stopped cleanly" not in node.run_log()  # no chance to drain
        node.spawn()  # the same ports: they are this node's, its peers know them
        node.wait_ready(60)
        assert node.pid != first_pid
        assert node.run_log().count("--- started ") == 1
        assert node.log_path.read_text().count("--- started ") == 2
    finally:
        node.stop()


def test_a_node_that_cannot_bind_fails_at_once_with_its_log(tmp_path):
    cfg_path, instances = make_cluster_config(tmp_path, 1)
    inst = instances[0]
    node = NodeProcess(cfg_path, 1, host="127.0.0.1", port=inst["port"],
                       log_path=tmp_path / "node-1.log", cwd=ROOT)
    with socket.socket() as squatter:  # another process holds the public port
        squatter.bind(("127.0.0.1", inst["port"]))
        squatter.listen()
        node.spawn()
        started = time.monotonic()
        try:
            with pytest.raises(Exited) as info:
                node.wait_ready(60)
        finally:
            node.stop()
    assert time.monotonic() - started < 30, "an exit ends the wait, not the timeout"
    exited = info.value
    assert exited.address_in_use and exited.code != 0
    assert "node 1 exited with code" in str(exited)
    assert str(tmp_path / "node-1.log") in str(exited)


def test_a_child_that_never_gets_ready_is_not_ready_and_stop_escalates(tmp_path):
    with refusing_port() as port:
        child = python_child(tmp_path, """
            import signal, sys, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a child deaf to SIGTERM
            print("up", flush=True)
            time.sleep(120)
        """, ready_url=f"http://127.0.0.1:{port}/healthz")
        child.spawn()
        try:
            with pytest.raises(NotReady, match=f"127.0.0.1:{port}/healthz within 0.5 s"):
                child.wait_ready(0.5)
            assert child.running
            assert child.stop(grace=0.5) == -signal.SIGKILL  # SIGTERM ignored: SIGKILL
        finally:
            child.kill()


def test_a_probe_other_than_http_can_say_ready(tmp_path):
    child = python_child(tmp_path, """
        import pathlib, sys, time
        pathlib.Path(sys.argv[1]).write_text("ready")
        time.sleep(120)
    """)
    child.argv.append(str(tmp_path / "flag"))
    child.spawn()
    try:
        child.wait_ready(30, probe=(tmp_path / "flag").exists)
        assert child.terminate(10) == -signal.SIGTERM
    finally:
        child.kill()


def test_cores_are_inherited_by_the_child_and_the_caller_keeps_its_own(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    child = python_child(tmp_path, "import os; print(sorted(os.sched_getaffinity(0)))",
                         cores={cores[-1]})
    child.spawn()
    assert child.wait(30) == 0
    assert f"[{cores[-1]}]" in child.run_log()
    assert os.sched_getaffinity(0) == before


def test_a_supervised_child_is_told_its_parent_and_env_is_added(tmp_path):
    node = NodeProcess(tmp_path / "cfg.toml", 3, host="::1", port=9, log_path=tmp_path / "l",
                       env={"EXTRA": "1"}, supervised=True)
    env = node.child_env()
    assert env[lifecycle.PARENT_PID_ENV] == str(os.getpid())
    assert env["EXTRA"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert node.argv[-4:] == ["--config", str(tmp_path / "cfg.toml"), "--instance", "3"]
    assert node.ready_url == "http://[::1]:9/i3/healthz"
    assert lifecycle.PARENT_PID_ENV not in NodeProcess(
        tmp_path / "cfg.toml", 3, host="127.0.0.1", port=9, log_path=tmp_path / "l"
    ).child_env()


async def test_asyncio_callers_wait_without_blocking_the_loop(tmp_path):
    """What ``shardchat up`` does: spawn, await ready, SIGTERM, await the exit."""
    cfg_path, instances = make_cluster_config(tmp_path, 1)
    node = support.NodeProcess(cfg_path, instances[0], tmp_path)
    try:
        for attempt in range(3):  # a port taken meanwhile: fresh ports, as start_nodes does
            node.spawn()
            try:
                await node.wait_ready_async(60)
                break
            except Exited as exc:
                if not exc.address_in_use or attempt == 2:
                    raise
                repick_ports([node])
        assert await node.wait_async(0.1) is None  # still running
        node.send_signal(signal.SIGTERM)
        assert await node.wait_async(30) == 0
    finally:
        node.kill()


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "no-pidfd"])
async def test_an_awaited_exit_comes_with_its_code_with_or_without_pidfd(
        tmp_path, monkeypatch, pidfd):
    """Linux wakes the loop through a pidfd; elsewhere the exit is looked for."""
    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    elif not hasattr(os, "pidfd_open"):
        pytest.skip("this platform has no pidfd")
    child = python_child(tmp_path, "import sys; sys.stdin.read(); sys.exit(3)")
    child.spawn()  # stdin is closed: the child reads EOF at once and exits 3
    assert await child.wait_async(30) == 3
    sleeper = python_child(tmp_path, "import time; time.sleep(120)")
    sleeper.spawn()
    try:
        assert await sleeper.wait_async(0.2) is None
        sleeper.send_signal(signal.SIGKILL)
        assert await sleeper.wait_async(10) == -9
    finally:
        sleeper.kill()


def test_spawning_a_running_child_twice_is_refused(tmp_path):
    child = python_child(tmp_path, "import time; time.sleep(120)")
    child.spawn()
    try:
        with pytest.raises(nodeproc.ChildError, match="running already"):
            child.spawn()
    finally:
        assert child.kill() == -9
