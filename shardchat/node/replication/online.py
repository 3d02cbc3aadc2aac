"""On-line replication of one node, wired: what it ships, what it follows, adopt and fence.

``node.replication`` (SPEC section 9) is the same on every node. When it is ``async`` or
``sync`` every instance N streams its commits to its follower (``Config.follower_of``):

* as an owner: ``ShipLog`` (``stream.py``) numbers every commit and serves the stream; in
  sync mode ``AckGate`` (``gate.py``) is the store's ack gate;
* as a follower: one ``Follow`` (``follow.py``) per instance this node follows, keeping its
  copy apart from the node's own rooms (``copy.py``);
* ``adopt``: the copy of a lost instance becomes rooms of this node (``adopt.py``), by an
  operator's ``shardchat adopt`` or by ``AutoAdopt`` (``auto.py``);
* ``fence``: at start, before serving, the rooms adopted away from this node become
  forwards; and while it runs, each time its follower connects, it asks the follower
  whether it adopted rooms this node still serves (``_check_adopted_away``, below);
* with ``auto_adopt``, the lease (``lease.py``): a node that cannot reach enough of the
  others stops before a follower may adopt it.

Both of the last two stop the node at once through ``stop_now``.

With ``replication = "off"`` nothing of this runs (the routes answer 409, saying so).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from shardchat.config import Config
from shardchat.http_errors import json_error
from shardchat.internal_api import (
    ADOPT_PATH,
    ADOPTED_PATH,
    REACHABILITY_PATH,
    REPLICATION_STREAM_PATH,
    ROOMS_PATH,
    STATS_PATH,
    auth_header,
)
from shardchat.node.replication import adopt as adoption
from shardchat.node.replication.auto import AutoAdopt
from shardchat.node.replication.copy import FollowedCopy, copy_path
from shardchat.node.replication.follow import Follow
from shardchat.node.replication.gate import AckGate
from shardchat.node.replication.lease import Lease
from shardchat.node.replication.stream import ShipLog
from shardchat.node.store import Store

log = logging.getLogger("shardchat.node.replication")


class OnlineReplication:
    """Everything of on-line replication on one node; see the module docstring."""

    def __init__(self, cfg: Config, number: int, store: Store,
                 locate: Callable[[int], str | None],
                 unreached_for: Callable[[int], float],
                 out_of_touch_for: Callable[[int], float]) -> None:
        n = cfg.node
        self.cfg = cfg
        self.number = number
        self.store = store
        self.mode = n.replication
        self._locate = locate
        self._unreached_for = unreached_for
        self._headers = auth_header(cfg.cluster.secret)
        self.ship: ShipLog | None = None
        self.gate: AckGate | None = None
        self.follows: dict[int, Follow] = {}
        self.auto: AutoAdopt | None = None
        self.adopted: dict[int, int] = {}  # owner -> rooms of its copy held here
        # Set when this node must stop serving at once (no grace period, exit code 3): it
        # learnt that its follower adopted rooms it still serves (``_check_adopted_away``),
        # or its lease is gone (``lease.py``); its next start fences what was adopted.
        # ``stop_reason`` is the sentence it logs.
        self.stop_now = asyncio.Event()
        self.stop_reason = ""
        self.lease: Lease | None = None
        self._checks: set[asyncio.Task[None]] = set()
        # The follower may connect while the start-up fence still waits for answers (the
        # internal listener is up): the rooms that fence takes are not "still served".
        self._fenced = asyncio.Event()
        self._adopting = asyncio.Lock()
        if self.mode == "off":
            return
        if n.auto_adopt:
            self.lease = Lease(number, self._other_numbers, out_of_touch_for,
                               n.adopt_lease, self._stop)
        follower = cfg.follower_of(number)
        if follower is not None:
            self.ship = ShipLog(store, follower, n.replication_backlog)
            store.writer.post_commit.append(self.ship.committed)
            store.moves.changed.append(self.ship.room_changed)
            if self.mode == "sync":
                self.gate = AckGate(self.ship, n.replication_ack_timeout,
                                    n.replication_fallback == "async")
                store.ack_gate = self.gate
        for owner in cfg.followed_by(number):
            copy = FollowedCopy(copy_path(cfg.data_dir, number, owner), n.history_retention)
            self.follows[owner] = Follow(number, owner, copy, locate, self._headers)
        if n.auto_adopt and self.follows:
            self.auto = AutoAdopt(number, list(self.follows), self._others, unreached_for,
                                  n.adopt_after, lambda owner: self.adopt(owner, force=True),
                                  self._headers, n.peer_timeout)

    def _other_numbers(self) -> list[int]:
        return [i.number for i in self.cfg.instances if i.number != self.number]

    def _stop(self, reason: str) -> None:
        """Stop serving now (see ``stop_now``); the first reason is the one logged."""
        if not self.stop_now.is_set():
            self.stop_reason = reason
            self.stop_now.set()

    def _others(self) -> dict[int, str]:
        out = {}
        for inst in self.cfg.instances:
            url = self._locate(inst.number) if inst.number != self.number else None
            if url is not None:
                out[inst.number] = url
        return out

    # -- lifecycle -------------------------------------------------------------------------

    async def fence(self) -> int:
        """Before serving: rooms adopted away from this node become forwards."""
        if self.mode == "off":
            return 0
        fenced = await adoption.fence_at_start(
            self.store, self.number, self.cfg.follower_of(self.number), self._others(),
            self._headers, self.cfg.node.peer_timeout)
        self._fenced.set()
        return fenced

    async def start(self) -> None:
        for follow in self.follows.values():
            await follow.start()
        if self.lease is not None:
            self.lease.start()
        if self.auto is not None:
            self.auto.start()

    async def close(self) -> None:
        for check in list(self._checks):
            check.cancel()
        if self.lease is not None:
            await self.lease.close()
        if self.auto is not None:
            await self.auto.close()
        for follow in self.follows.values():
            await follow.stop()
        if self.ship is not None:
            self.ship.close()

    # -- adoption --------------------------------------------------------------------------

    async def adopt(self, owner: int, force: bool = False) -> dict[str, Any]:
        """Take over every room of ``owner`` (see ``adopt.py``); AdoptRefused otherwise."""
        if self.mode == "off":
            raise adoption.AdoptRefused("replication_off", "node.replication is \"off\": no "
                                        "instance holds a copy of another to adopt.")
        follow = self.follows.get(owner)
        if follow is None:
            raise adoption.AdoptRefused(
                "not_follower", f"Instance {self.number} does not follow instance {owner} "
                f"(its follower is instance {self.cfg.follower_of(owner)}); ask that one.")
        async with self._adopting:
            if not force and await self._answers(owner):
                raise adoption.AdoptRefused(
                    "owner_alive", f"Instance {owner} still answers on its internal "
                    "listener, so it is not lost: stop it first, or empty it with "
                    f"shardchat drain --instance {owner}.")
            before = self.store.room_count()
            elsewhere = await self._owned_elsewhere(owner)
            await follow.stop()
            try:
                rooms = await adoption.adopt(self.store, follow.copy.path, owner, elsewhere)
            finally:
                # Followed again from a snapshot once it is back (fenced): its new rooms
                # need a copy too, and a later loss adopts only what is new.
                await follow.start()
            self.adopted[owner] = rooms
            rooms_now = self.store.room_count()
            if self.auto is not None:
                self.auto.forget(owner)
            if self.ship is not None and rooms_now > before:
                self.ship.reset(f"adopted instance {owner}")
        return self._adoption(owner, rooms)

    def _adoption(self, owner: int, rooms: int) -> dict[str, Any]:
        return {"instance": owner, "by": self.number, "rooms": rooms,
                "follower": self.cfg.follower_of(self.number)}

    async def _owned_elsewhere(self, owner: int) -> set[str]:
        """The rooms the other reachable instances own now. A room ``owner`` moved away just
        before it was lost may still be its own in the copy (the forward had not reached
        the follower yet); its new owner serves it, so it is not adopted."""
        out: set[str] = set()
        peers = {n: url for n, url in self._others().items() if n != owner}
        async with aiohttp.ClientSession(headers=self._headers) as session:
            for number, base in peers.items():
                try:
                    async with session.get(f"{base}{ROOMS_PATH}", timeout=aiohttp.ClientTimeout(
                            total=max(5.0, self.cfg.node.peer_timeout))) as resp:
                        body = await resp.json() if resp.status == 200 else {}
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                    log.warning("adopting instance %d: instance %d could not list its rooms",
                                owner, number)
                    continue
                out.update(r["room_id"] for r in body.get("active", []))
                out.update(body.get("idle", []))
        return out

    async def _answers(self, owner: int) -> bool:
        base = self._locate(owner)
        if base is None:
            return False
        try:
            async with aiohttp.ClientSession(headers=self._headers) as session, \
                    session.get(f"{base}{STATS_PATH}", timeout=aiohttp.ClientTimeout(
                        total=self.cfg.node.peer_timeout)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    # -- the routes on the internal listener -----------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(REPLICATION_STREAM_PATH, self._stream)
        app.router.add_post(ADOPT_PATH, self._adopt_route)
        app.router.add_get(ADOPTED_PATH, self._adopted_route)
        app.router.add_get(REACHABILITY_PATH, self._reachability)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if self.ship is None:
            return json_error(409, "replication_off", f"Instance {self.number} ships no "
                              "stream: node.replication is \"off\" (or it has no follower).")
        if request.query.get("follower") == str(self.ship.follower):
            check = asyncio.get_running_loop().create_task(
                self._check_adopted_away(self.ship.follower), name="adopted-away")
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)
        return await self.ship.serve(request)

    async def _check_adopted_away(self, follower: int) -> None:
        """The follower (re)connects: did it adopt rooms that this node still serves?

        Fencing at start covers an instance that was down while it was adopted. One that
        ran on meanwhile (``shardchat adopt --force``, or ``auto_adopt`` while a partition
        cut it off from the others but not from its clients) learns it here, when the link
        to its follower is back: the adopter follows it again after an adoption. Its rooms
        then have two owners, so it stops serving at once (``stop_now``) and its next
        start fences them, as for any instance that comes back."""
        await self._fenced.wait()
        base = self._locate(follower)
        if base is None:
            return
        async with aiohttp.ClientSession(headers=self._headers) as session:
            answers = await adoption.ask_adopted(session, {follower: base}, self.number,
                                                 self.cfg.node.peer_timeout)
        served = sorted(r for r in answers.get(follower, {}) if self.store.get_room(r))
        if not served or self.stop_now.is_set():
            return
        reason = (
            f"instance {follower} adopted {len(served)} rooms that instance {self.number} "
            f"still serves (e.g. {served[0]}): it was adopted while it ran (shardchat adopt "
            "--force, or auto_adopt while it was cut off). Stopping now; the next start "
            "makes them forwards to their new owner")
        log.error("%s", reason)
        self._stop(reason)

    async def _adopt_route(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        owner = body.get("instance") if isinstance(body, dict) else None
        if not isinstance(owner, int) or isinstance(owner, bool):
            return json_error(400, "bad_request", 'The body must be {"instance": N}.')
        try:
            return web.json_response(await self.adopt(owner, bool(body.get("force"))))
        except adoption.AdoptRefused as exc:
            return json_error(409, exc.code, exc.message)

    async def _adopted_route(self, request: web.Request) -> web.Response:
        try:
            owner = int(request.query["instance"])
        except (KeyError, ValueError):
            return json_error(400, "bad_request", "Give ?instance=N.")
        rooms = await asyncio.to_thread(adoption.where_adopted, self.store, self.number, owner)
        return web.json_response({"instance": self.number, "rooms": rooms})

    async def _reachability(self, request: web.Request) -> web.Response:
        seconds = {str(i.number): round(self._unreached_for(i.number), 3)
                   for i in self.cfg.instances if i.number != self.number}
        return web.json_response({"instance": self.number, "unreached_for": seconds})

    # -- metrics -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        if self.ship is not None:
            out["shipping"] = {**self.ship.stats(),
                               **(self.gate.stats() if self.gate is not None else {})}
        if self.follows:
            out["following"] = {str(o): f.stats() for o, f in self.follows.items()}
        if self.lease is not None:
            out["lease"] = self.lease.stats()
        if self.auto is not None:
            out["auto_adopt"] = {str(o): {"agreeing": a, "needed": n, "rounds": r}
                                 for o, (a, n, r) in self.auto.votes.items()}
        if self.adopted:
            out["adopted"] = {str(o): n for o, n in self.adopted.items()}
        return out

