"""``shardchat up``: a whole cluster on this machine, nodes plus the local router.

Everything lives under ``./.shardchat/`` of the working directory:

* ``shardchat.toml``: the cluster config. Written on first run with a random 256-bit secret
  (kept, never printed; a missing or weak one found there is replaced) and free loopback
  ports for the nodes. Later runs reuse it as it is, so ports, secret and data stay put;
  only ``public_url`` follows ``--port``/``--host`` and the instance list follows
  ``--nodes`` (existing instances keep their ports). Any other key a person adds (a
  ``[node]`` table, say) is kept.
* ``data/``: node N's store (``data/i<N>/``); ``logs/node-<N>.log``: node N's output.

Growing and shrinking. ``--nodes`` above the instances of an existing ``.shardchat/`` adds
instances (new ports, empty stores); their rooms come from placement from then on, and
``shardchat rebalance`` spreads the existing ones. ``--nodes`` below them removes the
instances numbered above it, without stranding a room: their nodes are started too, marked
drained (out of placement), and each one's rooms are moved, live, to the kept instances
(``moves.drain``, bounded by ``SHRINK_DEADLINE``), printing what moved; an instance that
ends up empty is stopped and taken out of the config. One that cannot be emptied in time
(or at all) is kept, undrained, and ``up`` says so and serves with it: the config only
loses an instance that holds no room. The removed instance's data directory stays (it
holds only the forwards of the rooms that left; its old URLs are redirected by the others,
SPEC section 8). The router starts once the shrink is over, with the kept instances' rules.

Nodes are real ``shardchat node`` processes (``nodeproc.NodeProcess``) in their own process
group, so Ctrl-C reaches only this supervisor, which then stops them in order: SIGTERM to
every node (each drains, flushes its store and exits), wait for all of them, stop the
router, exit 0. Every wait is bounded: a node that has not exited ``lifecycle.STOP_EXTRA``
seconds past its own shutdown limit is killed, and the supervisor itself exits by
``stop_limit`` whatever it is waiting on. Nothing is restarted behind the user's back: a
node that dies is reported, the others keep going.

Nodes die with the supervisor, also when it is SIGKILLed and cannot stop them. Each node is
started with ``SHARDCHAT_PARENT_PID`` set to this process's pid (``supervised=True``), and
the node itself (see ``shardchat.lifecycle.watch_parent``) asks the kernel for SIGHUP when
its parent dies (Linux ``PR_SET_PDEATHSIG``) and also checks ``getppid()`` every second: an
orphan is re-parented, so the value changes. The check covers what the signal cannot: a
supervisor that died before the node set it, and platforms without prctl. Both live in the
node rather than in a ``preexec_fn`` here, because code between fork and exec is unsafe once
the supervisor runs threads. On parent loss the node drains as on SIGTERM and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardchat import config as config_mod
from shardchat.cluster import moves
from shardchat.cluster.control import NodeDown, Nodes
from shardchat.cluster.nodeproc import Exited, NodeProcess, NotReady
from shardchat.cluster.router import HealthSettings, Router, RouterLimits, serve
from shardchat.cluster.rules import build_rules
from shardchat.lifecycle import Watchdog, node_stop_limit

log = logging.getLogger(__name__)

CLUSTER_NAME = "local"
START_TIMEOUT = 30.0   # seconds a node may take to answer its health check
KILL_WAIT = 5.0        # seconds a killed node may take to be reaped
ROUTER_STOP = 5.0      # seconds the router's listener may take to close
# The nodes' drain grace unless the config sets one: as long as the local router takes to
# see a draining node as unhealthy (its checks, every 1 s, two failures in a row).
UP_DRAIN_GRACE = HealthSettings.interval * HealthSettings.unhealthy_threshold
SHRINK_DEADLINE = 120.0  # seconds the rooms of one removed instance may take to move


class UpError(Exception):
    """`shardchat up` cannot go on; the message says what to do."""


@dataclass(frozen=True)
class UpOptions:
    nodes: int = 3
    port: int = 8080
    host: str = "127.0.0.1"
    base: Path = field(default_factory=lambda: Path(".shardchat"))
    ready_file: Path | None = None  # where to write ``ready_info`` once serving

    @property
    def config_path(self) -> Path:
        return self.base / "shardchat.toml"

    @property
    def public_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"


# ---------------------------------------------------------------------------------------
# the config file


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just had free on ``host`` (bind to 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    """True when a listener could bind host:port now (TIME_WAIT leftovers do not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def dump_toml(data: dict[str, Any]) -> str:
    """Write the config's shape back as TOML: tables of scalars and [[instances]]."""
    return config_mod.dump_toml(data, header="Written by `shardchat up`; edits are kept, "
                                "comments are not.")


def _read_existing(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UpError(f"{path} is not readable TOML ({exc}); fix it or delete it to start "
                      "over") from None


def _instances(old: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Instances 1..count, and after them every existing one numbered above ``count``
    (it is removed only once its rooms have moved: ``Up``); ones that already exist keep
    their ports (and their data)."""
    by_number = {i.get("number"): i for i in old if isinstance(i, dict)}
    leaving = sorted(n for n in by_number if isinstance(n, int) and n > count)
    out = []
    for n in [*range(1, count + 1), *leaving]:
        inst = dict(by_number.get(n) or {})
        inst["number"] = n
        inst.setdefault("host", "127.0.0.1")
        inst.setdefault("port", free_port())
        inst.setdefault("internal_port", free_port())
        out.append(inst)
    return out


def local_config(opts: UpOptions) -> config_mod.Config:
    """Create or update ``.shardchat/shardchat.toml`` and return the loaded config."""
    path = opts.config_path
    data = _read_existing(path)
    before = dump_toml(data) if data else None
    cluster = dict(data.get("cluster") or {})
    cluster.setdefault("name", CLUSTER_NAME)
    cluster["public_url"] = opts.public_url
    if config_mod.secret_problem(str(cluster.get("secret") or "")):
        cluster["secret"] = secrets.token_urlsafe(32)  # 256 random bits
    cluster.setdefault("data_dir", str(opts.base / "data"))
    data["cluster"] = cluster
    node = dict(data.get("node") or {})
    node.setdefault("drain_grace_seconds", UP_DRAIN_GRACE)
    data["node"] = node
    data["instances"] = _instances(list(data.get("instances") or []), opts.nodes)
    data = {"cluster": data.pop("cluster"), "instances": data.pop("instances"), **data}
    try:
        cfg = config_mod.parse(data, source=str(path))
        config_mod.require_secret(cfg)  # a weak SHARDCHAT_SECRET would stop every node
    except config_mod.ConfigError as exc:
        raise UpError(f"{path}: {exc}. Fix that key, or delete the file to start over.") from None
    text = dump_toml(data)
    if text != before:
        _write(path, text)
    return cfg


def _write(path: Path, text: str) -> None:
    """Write the config aside (owner-only: it holds the secret), then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def remove_instances(opts: UpOptions, numbers: set[int]) -> config_mod.Config:
    """Take ``numbers`` out of the config file (their rooms have moved); the new config."""
    path = opts.config_path
    data = _read_existing(path)
    data["instances"] = [i for i in data.get("instances") or []
                         if not (isinstance(i, dict) and i.get("number") in numbers)]
    _write(path, dump_toml(data))
    return config_mod.parse(data, source=str(path))


def check_ports(cfg: config_mod.Config, opts: UpOptions) -> None:
    """Fail early, naming the port, instead of letting a node die on bind."""
    if not port_free(opts.host, opts.port):
        raise UpError(f"port {opts.port} on {opts.host} is in use; stop what uses it or pass "
                      "--port with another number")
    for inst in cfg.instances:
        for what, port in (("port", inst.port), ("internal_port", inst.internal_port)):
            if not port_free(inst.host, port):
                raise UpError(f"port {port} ({what} of instance {inst.number}) is in use; is "
                              f"another `shardchat up` running here? Stop it, or delete "
                              f"{opts.config_path} to pick new ports")


# ---------------------------------------------------------------------------------------
# the supervisor


class Up:
    """Starts the nodes and the router, watches them, and stops them in order."""

    def __init__(self, opts: UpOptions, cfg: config_mod.Config, out=None,
                 added: tuple[int, ...] = ()):
        self.opts = opts
        self.cfg = cfg
        self.added = added  # instances this run added to an existing cluster
        self.out = out or sys.stdout
        self.nodes = [NodeProcess(opts.config_path, i.number, host=i.host, port=i.port,
                                  log_path=opts.base / "logs" / f"node-{i.number}.log",
                                  own_group=True, supervised=True)
                      for i in cfg.instances]
        self.stopping = False  # the nodes are being stopped: their exits are expected
        self.stop_requested = asyncio.Event()
        self.force = False
        self._runner = None
        self._watchers: list[asyncio.Task[None]] = []

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    @property
    def node_stop_limit(self) -> float:
        """Seconds a node may take from SIGTERM to exit before it is killed."""
        return node_stop_limit(self.cfg.node.drain_grace_seconds)

    @property
    def stop_limit(self) -> float:
        """Seconds the whole stop may take; past it this process exits regardless."""
        return self.node_stop_limit + KILL_WAIT + ROUTER_STOP + 5.0

    def request_stop(self) -> None:
        if self.stop_requested.is_set():
            if not self.force:
                self.force = True
                self.say("second interrupt: killing the nodes now")
                for node in self.nodes:
                    node.send_signal(signal.SIGKILL)
            return
        self.stop_requested.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            try:
                started = await self._start()
            except UpError:
                await self._stop()
                raise
            if started:
                self._announce()
                self._write_ready()
                await self.stop_requested.wait()
                self._remove_ready()
            return await self._stop()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _start(self) -> bool:
        for node in self.nodes:
            node.spawn()
        waits = {asyncio.create_task(self._wait_ready(n)) for n in self.nodes}
        stop = asyncio.create_task(self.stop_requested.wait())
        pending: set[asyncio.Task[Any]] = {*waits, stop}
        failure: BaseException | None = None
        while waits & pending and failure is None and not stop.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failure = next((t.exception() for t in done & waits if t.exception()), None)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if failure is not None:
            raise failure
        if self.stop_requested.is_set():
            return False
        leaving = [n.number for n in self.nodes if n.number > self.opts.nodes]
        if leaving and not await self._shrink(leaving):
            return False
        numbers = [n.number for n in self.nodes]
        router = Router(build_rules(numbers, self.cfg.aws.rule_priority_offset),
                        {i.number: (i.host, i.port) for i in self.cfg.instances},
                        idle_timeout=float(self.cfg.aws.idle_timeout),
                        limits=RouterLimits.from_config(self.cfg))
        try:
            self._runner = await serve(router, self.opts.host, self.opts.port)
        except OSError as exc:
            raise UpError(f"the router cannot listen on {self.opts.host}:{self.opts.port} "
                          f"({exc.strerror}); pass --port with a free port") from None
        self._watchers = [asyncio.create_task(self._watch(n)) for n in self.nodes]
        return True

    async def _shrink(self, leaving: list[int]) -> bool:
        """Empty the instances above ``--nodes`` and remove them; False when a stop was
        asked for meanwhile. Interrupted, the config keeps them all (it loses an instance
        only once it is empty)."""
        work = asyncio.create_task(self._move_out(leaving))
        stop = asyncio.create_task(self.stop_requested.wait())
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            self.say("interrupted while moving rooms: every instance stays in the config.")
            return False
        work.result()
        return True

    async def _move_out(self, leaving: list[int]) -> None:
        kept = [n.number for n in self.nodes if n.number not in leaving]
        self.say(f"shrinking to {len(kept)} instance{'s' if len(kept) != 1 else ''}: moving "
                 f"the rooms of instance{'s' if len(leaving) > 1 else ''} "
                 f"{', '.join(map(str, leaving))} to {', '.join(map(str, kept))} ...")
        try:
            async with Nodes(self.cfg) as nodes:  # none of them may take the others' rooms
                for number in leaving:
                    await nodes.set_drained(number, True)
        except NodeDown as exc:
            self.say(f"cannot drain {exc}; every instance stays in the cluster.")
            return
        removed: set[int] = set()
        for number in leaving:
            if await self._move_out_one(number):
                removed.add(number)
        if not removed:
            return
        for node in [n for n in self.nodes if n.number in removed]:
            self.say(f"stopping node {node.number} ...")
            node.send_signal(signal.SIGTERM)
            await self._wait_stopped(node)
        self.nodes = [n for n in self.nodes if n.number not in removed]
        self.cfg = remove_instances(self.opts, removed)
        self.say(f"removed instance{'s' if len(removed) > 1 else ''} "
                 f"{', '.join(map(str, sorted(removed)))} from {self.opts.config_path} (its "
                 f"data stays under {self.cfg.cluster.data_dir}/; it holds no room).")

    async def _move_out_one(self, number: int) -> bool:
        """Drain one leaving instance; True when it owns no room any more."""
        try:
            report = await moves.drain(self.cfg, number, deadline=SHRINK_DEADLINE,
                                       say=self.say, keep_drained=False)
        except moves.Refused as exc:
            self.say(f"instance {number} stays: {exc}")
            return False
        for line in report.lines()[:1] + [ln for ln in report.lines()[1:]
                                          if ln.startswith("load")]:
            self.say(line)
        if report.finished:
            return True
        left = "an unknown number of" if report.remaining is None else str(report.remaining)
        self.say(f"instance {number} still owns {left} room(s) after {report.seconds:.0f} s "
                 f"({report.note or 'see the moves above'}); it stays in the cluster, back "
                 f"in placement. Run `shardchat up --nodes {self.opts.nodes}` again to "
                 "retry.")
        return False

    @staticmethod
    async def _wait_ready(node: NodeProcess) -> None:
        """Wait for a node's health check; a node that exits or hangs is an ``UpError``."""
        try:
            await node.wait_ready_async(START_TIMEOUT)
        except Exited as exc:
            raise UpError(f"node {node.number} exited during start-up (code {exc.code}); "
                          f"last lines of {node.log_path}:\n{exc.tail(15)}") from None
        except NotReady:
            raise UpError(f"node {node.number} did not answer {node.ready_url} within "
                          f"{START_TIMEOUT:g} s; see {node.log_path}") from None

    def _announce(self) -> None:
        n = len(self.nodes)
        self.say(f"shardchat is running: {n} node{'s' if n != 1 else ''} behind the router.")
        if self.added:
            self.say(f"  added  instance{'s' if len(self.added) > 1 else ''} "
                     f"{', '.join(map(str, self.added))} (empty: new rooms go there first; "
                     f"`shardchat rebalance --config {self.opts.config_path}` spreads the "
                     "existing ones)")
        self.say(f"  open   {self.opts.public_url}/")
        self.say(f"  data   {self.opts.base}/ (config {self.opts.config_path}, logs "
                 f"{self.opts.base / 'logs'}/)")
        self.say("Ctrl-C to stop.")

    def ready_info(self) -> dict[str, Any]:
        """What ``--ready-file`` holds, for scripts and tests: the URL, this process's pid,
        each node's instance number, pid and ports. Lines printed for people may change
        wording; this is the stable way to know the cluster serves."""
        return {"url": self.opts.public_url, "pid": os.getpid(),
                "config": str(self.opts.config_path),
                "nodes": [{"instance": n.number, "pid": n.pid, "host": n.host, "port": n.port,
                           "internal_port": self.cfg.instance(n.number).internal_port,
                           "log": str(n.log_path)}
                          for n in self.nodes]}

    def _write_ready(self) -> None:
        """Write ``ready_info`` aside, then rename: a reader never sees half a file."""
        path = self.opts.ready_file
        if path is None:
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.ready_info()) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def _remove_ready(self) -> None:
        """Stopping: the file no longer describes a cluster that serves."""
        if self.opts.ready_file is not None:
            with contextlib.suppress(OSError):
                self.opts.ready_file.unlink()

    async def _watch(self, node: NodeProcess) -> None:
        code = await node.wait_async()
        if not self.stopping:
            self.say(f"node {node.number} exited unexpectedly (code {code}); its rooms are "
                     f"unavailable, the other nodes keep running. Not restarted: see "
                     f"{node.log_path}, then run `shardchat up` again.")

    async def _stop(self) -> int:
        self.say("stopping: draining the nodes ...")
        watchdog = Watchdog(self.stop_limit, self._still_running, lambda: 1)
        watchdog.arm()
        # nodes failing their health checks while they drain is expected, not news
        logging.getLogger("shardchat.cluster.router").setLevel(logging.WARNING)
        live = [n for n in self.nodes if n.running]
        self.stopping = True
        for node in live:
            node.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(self._wait_stopped(n) for n in live))
        ok = all(code == 0 for code in codes)
        for t in self._watchers:
            t.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        if self._runner is not None:
            try:
                await asyncio.wait_for(self._runner.cleanup(), ROUTER_STOP)
            except TimeoutError:
                self.say(f"the router did not stop within {ROUTER_STOP:g} s; leaving it")
        self.say("stopped." if ok and not self.force else "stopped, not cleanly.")
        return 0 if ok and not self.force else 1

    async def _wait_stopped(self, node: NodeProcess) -> int | None:
        """Wait for a SIGTERMed node to exit; kill it past ``node_stop_limit``."""
        limit = self.node_stop_limit
        code = await node.wait_async(limit)
        if code is None:
            self.say(f"node {node.number} did not stop within {limit:g} s; killing it")
            node.send_signal(signal.SIGKILL)
            code = await node.wait_async(KILL_WAIT)
            if code is None:
                self.say(f"node {node.number} (pid {node.pid}) survived SIGKILL")
                return None
        if code != 0:
            self.say(f"node {node.number} stopped with code {code}; see {node.log_path}")
        return code

    def _still_running(self) -> str:
        """For the watchdog's log line: the nodes that have not exited."""
        left = [f"node {n.number} (pid {n.pid})" for n in self.nodes if n.running]
        return ", ".join(left) or "no node; the router or the event loop"


async def _main(opts: UpOptions) -> int:
    existing = {i.get("number") for i in _read_existing(opts.config_path).get("instances")
                or [] if isinstance(i, dict)}
    cfg = local_config(opts)
    check_ports(cfg, opts)
    added = tuple(i.number for i in cfg.instances if existing and i.number not in existing)
    return await Up(opts, cfg, added=added).run()


def run_up(opts: UpOptions) -> int:
    """Run the local cluster until Ctrl-C/SIGTERM; returns the process exit code."""
    try:
        return asyncio.run(_main(opts))
    except UpError as exc:
        print(f"shardchat up: {exc}", file=sys.stderr, flush=True)
        return 1
