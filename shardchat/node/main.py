"""Instance N, wired: the one module that builds a node and runs it.

``Node`` builds the parts (the store, the Socket.IO engine ``node.engine`` names, the room
service, the limits, the placer, the public and internal listeners, and Litestream beside
the store when ``node.replicate_to`` is set) and hands each the others it needs; ``serve``
runs it until SIGTERM/SIGINT (or its supervisor is gone), drains it and returns the exit
code. This is the only module of ``node/`` that imports the cluster:
the placer (``cluster/placement.py``) is built here, with this node as its ``LocalNode``
(its own stats and room creation), and handed to the public routes, which know it only as a
``RoomPlacer``; so is the directory (``cluster/directory.py``, asking the placer's peers
where a room lives), which they know as a ``RoomFinder``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from shardchat import lifecycle, listener, urls
from shardchat.cluster.directory import Directory
from shardchat.cluster.load import node_load, room_presence
from shardchat.cluster.placement import Placer
from shardchat.config import Config
from shardchat.node import (
    engine,
    faults,
    fdlimit,
    gctune,
    gilswitch,
    idempotency,
    internal,
    shutdown,
)
from shardchat.node.buckets import Buckets
from shardchat.node.clientaddr import ClientAddresses
from shardchat.node.handoff import Handoff
from shardchat.node.handoff.routes import add_routes as add_move_routes
from shardchat.node.http import PublicApp
from shardchat.node.loads import NodeLoads
from shardchat.node.replication import litestream
from shardchat.node.replication.online import OnlineReplication
from shardchat.node.replication.restore import holds_store
from shardchat.node.replication.supervisor import STOP_TIMEOUT as REPLICA_STOP_TIMEOUT
from shardchat.node.replication.supervisor import Supervisor
from shardchat.node.rooms import RoomService
from shardchat.node.sockets import register_events
from shardchat.node.store import Store, StoreError

log = logging.getLogger("shardchat.node")

# The exit code of a node that stopped at once because its follower adopted rooms it still
# served (it was adopted while it ran), or because its lease was gone (it could not reach a
# majority of the others for node.adopt_lease seconds, replication/lease.py): restart it,
# and its start fences what was adopted.
EXIT_ADOPTED_AWAY = 3


class Node:
    """Everything of instance N inside one process."""

    def __init__(self, cfg: Config, number: int):
        self.cfg = cfg
        self.number = number
        self.settings = cfg.node
        self.instance = cfg.instance(number)
        self.replicated = bool(cfg.node.replicate_to)  # Litestream copies the store off
        self.store = Store(cfg.instance_data_dir(number), retention=cfg.node.history_retention,
                           fsync=cfg.node.fsync, max_recovery=cfg.node.max_recovery,
                           prune_interval=cfg.node.prune_interval,
                           own_checkpoints=not self.replicated)
        self.replica: Supervisor | None = None  # started once the store is open
        self.engine = engine.build(cfg.node)  # EngineIncompatible: the self-check failed
        self.sio = self.engine.sio
        self.rooms = RoomService(cfg, number, self.store, self.engine.delivery)
        # the cluster's measure over this node's rooms (the node does not import the cluster)
        self.loads = NodeLoads(self.store, self.rooms, node_load, room_presence(0.0))
        self._drained = False
        self.handoff = Handoff(cfg, number, self.store, self.store.moves, self.rooms,
                               locate=self._peer_url,
                               # a drained node, like a stopping one, takes no moved room
                               draining=lambda: self.rooms.draining or self._drained)
        self.rooms.moves = self.handoff  # moved, arriving and frozen rooms
        self.addresses = ClientAddresses(cfg.node.trusted_proxies)
        self.keyed = idempotency.KeyedCreations(self.store, self.rooms)
        self.placer = Placer(cfg, self)  # the cluster's part: this node is its LocalNode
        self.directory = Directory(number, self.room_state, self.placer.peers,
                                   cfg.node.peer_timeout)
        self.started_at = time.monotonic()
        # the follower stream, adoption and fencing (node.replication, SPEC section 9)
        self.online = OnlineReplication(cfg, number, self.store, self._peer_url,
                                        self.unreached_for, self.out_of_touch_for)
        self.public_app = PublicApp(cfg.node, number, self.sio, self.store, self.rooms,
                                    self.addresses, self.placer, self.directory,
                                    self.room_state)
        self.runners: list[web.AppRunner] = []  # public, internal
        self.step = "serving"  # the shutdown step under way, for the watchdog's log
        self.store_closed = False
        register_events(self.sio, self.rooms, self.addresses)

    # -- LocalNode protocol (used by placement) ------------------------------------------

    def stats(self) -> dict[str, Any]:
        """SPEC section 5's fields, plus ``load`` (``cluster/load.py``'s measure) and
        ``drained``. ``draining`` is true while the node shuts down and while it is drained:
        either way it is out of placement, and peers need not tell the two apart."""
        return {"instance": self.number, "connections": self.rooms.connection_count(),
                "rooms": self.store.room_count(), "draining": self.draining or self._drained,
                "drained": self._drained, "load": round(self.loads.total(), 6)}

    async def create_room(self, name: str, private: bool,
                          key: str | None = None) -> dict[str, Any]:
        if key is None:
            return await self.rooms.create_room(name, private)
        return await self.keyed.create(key, name, private)

    async def find_keyed_room(self, key: str) -> dict[str, Any] | None:
        """This node's room created under Idempotency-Key ``key``, with its fingerprint."""
        return await self.keyed.find(key)

    def _peer_url(self, number: int) -> str | None:
        """Where instance ``number``'s internal listener is, as placement knows its peers
        (the config's instances, or discovery's)."""
        peer = self.placer.peers.get(number)
        return peer.base_url if peer is not None else None

    def unreached_for(self, number: int) -> float:
        """Seconds since this node last reached instance ``number`` (its stats poll), 0
        while it answers; since this node started when it never answered."""
        peer = self.placer.peers.get(number)
        if peer is None:
            return 0.0
        if peer.healthy:
            return 0.0
        return time.monotonic() - (peer.fetched_at or self.started_at)

    def out_of_touch_for(self, number: int) -> float:
        """For the lease: the longer of how long this node has not reached instance
        ``number`` and how long ``number``, in its last answer, said it had not reached this
        node (so a cut one way only, that lets this node poll it, counts too)."""
        peer = self.placer.peers.get(number)
        said = peer.unreached_this_node_for if peer is not None and peer.healthy else 0.0
        return max(self.unreached_for(number), said)

    def room_state(self, room_id: str) -> dict[str, Any] | None:
        """What this node is to ``room_id`` (``GET /internal/rooms/<room_id>``, and the
        directory's first question): owner, forwarded or incoming (``Handoff.state``), or
        None."""
        return self.handoff.state(room_id)

    def metrics(self) -> dict[str, Any]:
        """Internal counters (``GET /internal/metrics``): where the work goes."""
        out = {"instance": self.number, "store": self.store.stats(), **self.engine.stats(),
               "rate_limits": self.rooms.limiter.stats(),
               "presence": {"pending_batches": self.rooms.batches.pending()},
               "placement": self._placement_view(),
               "gc": gctune.WATCH.stats()}
        if self.replica is not None:
            out["replication"] = self.replica.stats()
        out["online_replication"] = self.online.stats()
        return out

    def commit_seconds(self) -> Buckets:
        return self.store.commit_seconds

    def peer_health(self) -> list[dict[str, Any]]:
        """Every peer as the stats poller last saw it (``GET /metrics``, ``GET /admin``)."""
        now = time.monotonic()
        return [{"instance": p.number, "host": p.host, "internal_port": p.internal_port,
                 "healthy": p.healthy, "draining": p.draining,
                 "connections": p.connections, "rooms": p.rooms, "load": p.load,
                 "age": round(now - p.fetched_at, 3) if p.fetched_at else None,
                 "error": None if p.healthy else p.error}
                for p in self.placer.peers.snapshot()]

    def _placement_view(self) -> dict[str, Any]:
        """Every instance's load as this node's placement last saw it (peers' stats are
        polled, so they may be up to a poll old): what it would rank a new room by."""
        loads, _ = self.placer.loads()
        return {"loads": {str(ld.instance): ld.load for ld in loads if ld.available}}

    @property
    def draining(self) -> bool:
        """Shutting down (SIGTERM): health answers 503 and every new connect is refused."""
        return self.rooms.draining

    @property
    def drained(self) -> bool:
        """Emptied by ``shardchat drain``: out of placement and takes no moved room, but
        serves as before (the rooms still here, the moved rooms' redirects). Memory only:
        a restart ends it (docs/operations.md, "Drained and draining")."""
        return self._drained

    def set_drained(self, drained: bool) -> None:
        if drained != self._drained:
            log.info("instance %d is %s", self.number,
                     "drained: out of placement until undrained or restarted" if drained
                     else "undrained: back in placement")
        self._drained = drained

    def refuses_rooms(self) -> str | None:
        """Why this node creates no room now, or None when it does."""
        if self.draining:
            return f"Instance {self.number} is draining."
        if self._drained:
            return (f"Instance {self.number} is drained: it takes no new rooms until it is "
                    "undrained or restarted.")
        return None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, finish interrupted moves, start placement and both listeners."""
        faults.check()
        plan = await asyncio.to_thread(self._replication_plan) if self.replicated else None
        await self.store.open()
        if plan is not None:
            self.replica = Supervisor(*plan, litestream.describe(self.cfg, self.number))
            await self.replica.start()
        await self.handoff.start()
        await self.placer.start()
        inst = self.instance
        peer_app = internal.build_app(self.cfg, self)
        add_move_routes(peer_app, self.handoff)
        self.online.add_routes(peer_app)
        self.runners = [
            web.AppRunner(self.public_app.build_app(), access_log=None, handle_signals=False,
                          shutdown_timeout=shutdown.HTTP_TIMEOUT),
            web.AppRunner(peer_app, access_log=None, handle_signals=False,
                          shutdown_timeout=shutdown.HTTP_TIMEOUT)]
        for runner in self.runners:
            await runner.setup()
        public, private = self.runners
        timeouts = listener.ListenerTimeouts.from_config(self.cfg)  # header and idle bounds
        await listener.start_site(private, inst.host, inst.internal_port, timeouts)
        # Peers answer which of this node's rooms they adopted before it serves any: the
        # internal listener is up, so peers starting at the same time can ask it too.
        await self.online.fence()
        await self.online.start()
        await listener.start_site(public, inst.host, inst.port, timeouts)

    def _replication_plan(self) -> tuple[Path, Path]:
        """(binary, litestream.yml) for this instance, checked before the store opens: a
        usable Litestream 0.5, and no empty start over a replica that holds a backup
        (Litestream would go on writing the new, empty store's pages over the old one's
        copy). Raises ReplicationUnavailable, which stops the start."""
        binary = litestream.find_binary()
        version = litestream.check_version(binary)
        config_path = litestream.write_config(self.cfg, self.number)
        if not holds_store(self.store.directory) and litestream.replica_holds_backup(
                binary, config_path, self.store.path.absolute()):
            where = litestream.describe(self.cfg, self.number)
            raise litestream.ReplicationUnavailable(
                f"{self.store.directory} holds no store, but {where} holds a backup of "
                f"instance {self.number}. Restore it first: shardchat restore --config "
                f"{self.cfg.source} --instance {self.number} (or, to start this instance "
                "empty, replicate it elsewhere: its old copy would be overwritten)")
        log.info("instance %d replicates its store to %s with Litestream %s", self.number,
                 litestream.describe(self.cfg, self.number), version)
        return binary, config_path

    async def drain(self, hurry: asyncio.Event | None = None) -> int:
        """Stop taking rooms and connections, let in-flight messages commit, close every
        session so that its client reconnects, stop the listeners, flush the store.

        Each step has its own bound (``shutdown.run_step``), and the whole stop after the
        grace period has ``SHUTDOWN_LIMIT`` (``lifecycle.Watchdog``). Returns the exit code:
        0 once the store is flushed and closed, whatever else overran."""
        self.rooms.draining = True
        grace = self.settings.drain_grace_seconds
        log.info("instance %d draining: health answers 503 for %g s, then clients are "
                 "closed", self.number, grace)
        await self._grace(grace, hurry)
        watchdog = lifecycle.Watchdog(lifecycle.SHUTDOWN_LIMIT, self.open_state,
                                      lambda: 0 if self.store_closed else 1)
        watchdog.arm()
        public, private = self.runners
        steps = [
            ("in-flight messages", lambda: self.rooms.wait_idle(timeout=shutdown.IDLE_TIMEOUT),
             shutdown.IDLE_TIMEOUT + 1),
            ("presence batches", self.rooms.batches.close, shutdown.PRESENCE_TIMEOUT),
            ("closing sessions", self._close_sessions, shutdown.CLOSE_TIMEOUT + 1),
            ("public listener", public.cleanup, shutdown.LISTENER_TIMEOUT),
            ("replication streams", self.online.close, shutdown.PEERS_TIMEOUT),
            ("internal listener", private.cleanup, shutdown.LISTENER_TIMEOUT),
            ("moves", self.handoff.close, shutdown.PEERS_TIMEOUT),
            ("placement", self.placer.close, shutdown.PEERS_TIMEOUT),
            ("engine", self.sio.shutdown, shutdown.ENGINE_TIMEOUT),
            ("flushing the store", self.store.close, shutdown.STORE_TIMEOUT),
        ]
        if self.replica is not None:  # after the store: its last commits are uploaded too
            steps.append(("uploading to the replica", self.replica.stop,
                          REPLICA_STOP_TIMEOUT + 3))
        for name, work, timeout in steps:
            self.step = name
            finished = await shutdown.run_step(name, work(), timeout)
            if name == "flushing the store":
                self.store_closed = finished
        self.step = "exiting"
        return 0 if self.store_closed else 1

    async def _close_sessions(self) -> None:
        """Refuse new Engine.IO sessions, then end every open one so its client reconnects
        (to this node once it is back, or wherever the load balancer sends it)."""
        self.public_app.closing = True
        counts = await self.engine.close_sessions(shutdown.CLOSE_TIMEOUT)
        log.info("instance %d closed its sessions: %s", self.number, counts)

    async def _grace(self, seconds: float, hurry: asyncio.Event | None) -> None:
        """Answer 503 on health for ``seconds`` so the load balancer stops sending new
        connections here, while the members go on chatting; a second signal ends it early."""
        if hurry is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), seconds)

    async def stop_replica(self) -> None:
        """Stop Litestream if it was started (a start that failed after it)."""
        if self.replica is not None:
            await self.replica.stop()

    def open_state(self) -> str:
        """What a stop is still waiting on, for the watchdog's log line (read-only: it runs
        on the watchdog's thread)."""
        sessions = [s for s in list(self.sio.eio.sockets.values()) if not s.closed]
        websockets = self.engine.websocket_count()
        connections = sum(len(r.server.connections) for r in self.runners
                          if r.server is not None)
        return (f"step {self.step!r}; {len(sessions)} Engine.IO sessions ({websockets} on "
                f"websocket), {connections} HTTP connections, store "
                f"{'closed' if self.store_closed else 'not closed'}")


class StopRequest:
    """Why and how urgently the node stops: the first SIGTERM/SIGINT begins the drain, a
    second one cuts the grace period short. SIGHUP (the parent-death signal, or a closed
    terminal) and a parent found gone begin it too, but never hurry it: the kernel may send
    the parent-death signal more than once."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.hurry = asyncio.Event()

    def __call__(self, why: str, can_hurry: bool = True) -> None:
        if not self.requested.is_set():
            log.info("stopping: %s", why)
            self.requested.set()
        elif can_hurry and not self.hurry.is_set():
            log.info("%s again: skipping the rest of the grace period", why)
            self.hurry.set()


async def serve(cfg: Config, number: int) -> int:
    """Run node N until SIGTERM/SIGINT (or its supervisor is gone); drain and return the
    exit code (0 after a clean drain; ``EXIT_ADOPTED_AWAY`` when it stopped, without a
    grace period, because its follower adopted rooms it served or its lease was gone). A
    store that cannot be opened (damaged, or in use by another process), or installed
    libraries the fast engine cannot run on, is one logged line and exit code 1."""
    try:
        node = Node(cfg, number)
    except engine.EngineIncompatible as exc:  # the fast engine's self-check, before serving
        log.error("instance %d cannot start: %s", number, exc)
        return 1
    try:
        await node.start()  # opens the store before anything listens
    except (StoreError, litestream.ReplicationUnavailable) as exc:
        # damaged, locked by another process, unwritable; or replication asked for and
        # impossible
        log.error("instance %d cannot start: %s", number, exc)
        await node.stop_replica()
        return 1
    tuned = os.environ.get("SHARDCHAT_GC_TUNE", "1") != "0"
    gctune.install(tune=tuned)
    sweeper = asyncio.create_task(gctune.sweep_old(), name="gc-sweep") if tuned else None
    inst = node.instance
    log.info("instance %d serving http://%s:%d%s/ (internal port %d)", number, inst.host,
             inst.port, urls.prefix(number), inst.internal_port)
    stop = StopRequest()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, signal.Signals(sig).name)
    loop.add_signal_handler(signal.SIGHUP, stop, "SIGHUP", False)
    parent = lifecycle.expected_parent()
    watcher = None
    if parent is not None:
        watcher = asyncio.create_task(
            lifecycle.watch_parent(parent, lambda why: stop(why, False)), name="parent")
    requested = asyncio.create_task(stop.requested.wait(), name="stop-requested")
    stop_now = asyncio.create_task(node.online.stop_now.wait(), name="stop-now")
    await asyncio.wait({requested, stop_now}, return_when=asyncio.FIRST_COMPLETED)
    for task in (watcher, sweeper, requested, stop_now):
        if task is not None:
            task.cancel()
    fenced = node.online.stop_now.is_set()
    if fenced:  # two owners now, or soon: no grace period, clients go at once
        stop(node.online.stop_reason)
        stop.hurry.set()
    code = await node.drain(stop.hurry)
    if code == 0:
        log.info("instance %d stopped cleanly", number)
    else:
        log.error("instance %d stopped, but its store could not be closed in time", number)
    return EXIT_ADOPTED_AWAY if fenced else code


def run_node(cfg: Config, number: int) -> int:
    """``shardchat node``: log set-up, the open-files limit, the event loop (uvloop where
    it is installed), then ``serve``; returns the process exit code."""
    logging.basicConfig(level=cfg.node.log_level.upper(),
                        format=f"%(asctime)s i{number} %(levelname)s %(name)s: %(message)s")
    fdlimit.log_limit(*fdlimit.raise_soft_limit())  # one descriptor per client
    gilswitch.install()  # the writer thread's commits wait less for the GIL
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    return runner(serve(cfg, number))
