"""``shardchat node --instance 3,4``: the instance processes of one host, from one command.

A node is one Python process, and a Python process computes on one core at a time, so a
host with 4 vCPUs runs 4 instances to use them: each its own ``shardchat node`` process with
its own ports, store and target group. This supervisor starts one child per instance
(``nodeproc.NodeProcess``: the very command ``--instance N`` runs alone) and

* forwards SIGTERM, SIGINT and SIGHUP to every child, and each drains as it does alone (a
  second SIGTERM cuts every grace period short, as it does for one node). The children run
  in their own process group, so Ctrl-C at a terminal reaches each of them once, from here;
* ends the group together: a child that exits without being asked (it crashed, could not
  open its store or bind its port, or someone else signalled it) is reported with its exit
  code, the others are stopped as on SIGTERM, and the command exits 1. Nothing is restarted
  here, silently or not: restarting belongs to whatever runs this command (systemd's
  ``Restart=``, a container's restart policy), and the exit code is what it sees. Exit 0
  means: asked to stop, and every child drained and closed its store;
* bounds every wait: a child still running ``lifecycle.node_stop_limit`` seconds after its
  SIGTERM is killed, and this process ends by ``stop_limit`` whatever it is waiting on;
* goes down with its own supervisor: each child watches this process (``supervised``) and
  drains when it is gone, even after a SIGKILL, and this process watches the one that
  started it the same way when it was given its pid.

The children write to this process's stdout and stderr (each line of a node names its
instance, ``i3``), so one terminal or journal shows them all. The alternative is one
systemd unit per instance, ``docs/systemd/shardchat-node@.service``, each restarted on its
own; ``docs/aws.md`` (section 12) says which to choose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from shardchat import lifecycle
from shardchat.cluster.nodeproc import KILL_WAIT, NodeProcess
from shardchat.config import Config

log = logging.getLogger("shardchat.nodegroup")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_MARGIN = 5.0  # seconds beyond the children's bounds before this process gives up


def describe_exit(code: int | None) -> str:
    """How a child ended, as a person reads it: ``exited with code 1``, ``was killed by
    SIGKILL``."""
    if code is None:
        return "is still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class NodeGroup:
    """The instances ``numbers`` of ``cfg``, one child process each, started, watched and
    stopped together."""

    def __init__(self, cfg: Config, config_path: Path, numbers: Sequence[int]) -> None:
        self.cfg = cfg
        self.nodes = [NodeProcess(config_path, n, host=cfg.instance(n).host,
                                  port=cfg.instance(n).port, log_path=None, own_group=True,
                                  supervised=True)
                      for n in numbers]
        self.stopping = False  # the children were told to stop: their exits are expected
        self.unasked: dict[int, str] = {}  # instance -> how it ended on its own
        self._stop = asyncio.Event()

    @property
    def child_stop_limit(self) -> float:
        return lifecycle.node_stop_limit(self.cfg.node.drain_grace_seconds)

    @property
    def stop_limit(self) -> float:
        """Seconds the whole stop may take; past it this process exits regardless."""
        return self.child_stop_limit + KILL_WAIT + STOP_MARGIN

    def _signal_children(self, sig: int) -> None:
        self.stopping = True
        self._stop.set()
        for node in self.nodes:
            node.send_signal(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self.stopping:
            log.info("%s: stopping instances %s (each drains)", sig.name, self._numbers())
        self._signal_children(sig)

    def _numbers(self, nodes: Sequence[NodeProcess] | None = None) -> str:
        return ", ".join(str(n.number) for n in (self.nodes if nodes is None else nodes))

    async def run(self) -> int:
        """Run until asked to stop or until a child ends; the command's exit code."""
        loop = asyncio.get_running_loop()
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._on_signal, sig)
        parent = lifecycle.expected_parent()
        watcher = None
        if parent is not None:  # a drain, never a hurry: SIGHUP is what a child reads so
            watcher = asyncio.create_task(lifecycle.watch_parent(
                parent, lambda why: self._on_signal(signal.SIGHUP)), name="parent")
        try:
            if self._spawn():
                await self._until_stop_or_exit()
            return await self._stop_all()
        finally:
            if watcher is not None:
                watcher.cancel()
            for sig in FORWARDED:
                loop.remove_signal_handler(sig)

    def _spawn(self) -> bool:
        cores = len(os.sched_getaffinity(0))
        for node in self.nodes:
            try:
                node.spawn()
            except OSError as exc:
                self.unasked[node.number] = f"could not be started ({exc})"
                log.error("instance %d could not be started: %s", node.number, exc)
                return False
        log.info("instances %s running as processes %s, one each; SIGTERM drains them all",
                 self._numbers(), ", ".join(str(n.pid) for n in self.nodes))
        if len(self.nodes) > cores:
            log.warning("%d instances on %d cores: they share cores; one per core is the "
                        "most that helps (docs/aws.md, section 12)", len(self.nodes), cores)
        return True

    async def _until_stop_or_exit(self) -> None:
        """Wait for a stop request or the first child to exit, whichever comes first."""
        exits = {asyncio.create_task(self._exit(n)) for n in self.nodes}
        asked = asyncio.create_task(self._stop.wait())
        await asyncio.wait({*exits, asked}, return_when=asyncio.FIRST_COMPLETED)
        for task in (*exits, asked):
            task.cancel()
        await asyncio.gather(*exits, asked, return_exceptions=True)
        if not self.stopping:
            self._signal_children(signal.SIGTERM)

    async def _exit(self, node: NodeProcess) -> None:
        code = await node.wait_async()
        if not self.stopping:
            self.unasked[node.number] = f"{describe_exit(code)} before it was asked to stop"
            log.error("instance %d (pid %s) %s; stopping the others (nothing is "
                      "restarted here)", node.number, node.pid, self.unasked[node.number])

    async def _stop_all(self) -> int:
        started = [n for n in self.nodes if n.proc is not None]
        watchdog = lifecycle.Watchdog(self.stop_limit, self._still_running, lambda: 1)
        watchdog.arm()
        if not self.stopping:  # a spawn failed: the children started so far were not told
            self._signal_children(signal.SIGTERM)
        codes = await asyncio.gather(*(self._wait_stopped(n) for n in started))
        ended = {**{n.number: describe_exit(c) for n, c in zip(started, codes, strict=True)
                    if c != 0}, **self.unasked}
        if ended:
            log.error("stopped, not cleanly: %s", "; ".join(
                f"instance {n} {how}" for n, how in sorted(ended.items())))
            return 1
        log.info("stopped: instances %s drained and closed their stores", self._numbers())
        return 0

    async def _wait_stopped(self, node: NodeProcess) -> int | None:
        """A SIGTERMed child's exit code; killed past ``child_stop_limit``."""
        code = await node.wait_async(self.child_stop_limit)
        if code is None:
            log.error("instance %d did not stop within %g s; killing it", node.number,
                      self.child_stop_limit)
            node.send_signal(signal.SIGKILL)
            code = await node.wait_async(KILL_WAIT)
        if code not in (0, None) and node.number not in self.unasked:
            log.error("instance %d %s", node.number, describe_exit(code))
        return code

    def _still_running(self) -> str:
        """For the watchdog's log line: the children that have not exited."""
        left = [f"instance {n.number} (pid {n.pid})" for n in self.nodes if n.running]
        return ", ".join(left) or "no child; this process's event loop"


def run_group(cfg: Config, config_path: str | Path, numbers: Sequence[int]) -> int:
    """``shardchat node --instance 3,4``: run the instances until SIGTERM; the exit code."""
    logging.basicConfig(level=cfg.node.log_level.upper(),
                        format="%(asctime)s supervisor %(levelname)s %(name)s: %(message)s")
    return asyncio.run(NodeGroup(cfg, Path(config_path), numbers).run())
