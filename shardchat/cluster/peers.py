"""The other nodes of the cluster, as seen from one node: who they are and how loaded.

Placement needs a fresh-enough picture of every peer's load without ever waiting on a peer
while a user waits for a room. So a background task polls ``GET /internal/stats`` on every
peer each ``node.stats_interval`` seconds (``?from=N``: the peer adds how long it has not
reached this node, ``unreached_for_caller``), each call bounded by ``node.peer_timeout``, and
placement only ever reads the last snapshot, which keeps each peer's ``load`` (the
measure of ``load.py``, None from a node too old to report it) so that placement ranks
every instance by the measure the rebalancer uses. A peer that refused, timed out or answered
garbage is marked unhealthy until a later poll succeeds (unhealthy peers are asked again
every ``RETRY_INTERVAL``); a room creation that fails for the peer's sake (no connection, a
timeout, a 5xx) marks it the same way at once, so the next placement skips it without
waiting for the next poll. A creation the peer refuses with a 4xx does not: the peer is up,
and marking it would let anyone steer placement by sending requests it refuses.

The peer list is the config's ``[[instances]]``, or, when ``aws.discover = "ec2-tags"``,
the instances of ``shardchat.aws.ec2.resolve_instances(cfg)`` (re-resolved every
``DISCOVERY_INTERVAL`` seconds; that module needs boto3 and AWS credentials, so it is only
imported in that case).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from shardchat.cluster.load import stats_load
from shardchat.config import Config, Instance
from shardchat.internal_api import (
    KEY_HEADER,
    KEYS_PATH,
    ROOMS_PATH,
    STATS_PATH,
    IdempotencyConflict,
    auth_header,
    room_state_path,
)

log = logging.getLogger(__name__)

DISCOVERY_INTERVAL = 30.0
RETRY_INTERVAL = 0.2  # an unhealthy peer is asked again this soon: nodes start one by one


class PeerError(Exception):
    """A peer did not do what was asked (unreachable, too slow, draining, or refused).

    ``status`` is the peer's HTTP status when it answered at all; ``body`` its JSON error.
    A 4xx (``refused``) means the peer is up and read the request but would not do it: that
    says something about the request (or the peer's config), not about the peer's health."""

    def __init__(self, number: int, reason: str, draining: bool = False,
                 status: int | None = None, body: Any = None):
        super().__init__(f"instance {number}: {reason}")
        self.number = number
        self.reason = reason
        self.draining = draining
        self.status = status
        self.body = body if isinstance(body, dict) else {}

    @property
    def refused(self) -> bool:
        return self.status is not None and 400 <= self.status < 500


@dataclass
class PeerState:
    """The last thing we know about one peer. ``fetched_at`` is time.monotonic()."""

    number: int
    host: str
    internal_port: int
    healthy: bool = False
    draining: bool = False
    connections: int = 0
    rooms: int = 0
    load: float | None = None  # load.py's measure; None from a node that does not report it
    fetched_at: float = 0.0
    error: str = "not polled yet"
    # How long the peer said, in its last answer (at ``fetched_at``), that it had not
    # reached this node (``unreached_for_caller``): a cut one way only, where this node
    # still reaches the peer, shows here (the owner's lease, ``replication/lease.py``).
    unreached_this_node_for: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.internal_port}"


def _valid_stats(number: int, body: Any) -> dict[str, Any]:
    """Check a stats answer: a peer answering for another number is misconfigured."""
    if not isinstance(body, dict):
        raise PeerError(number, "stats answer is not a JSON object")
    if body.get("instance") != number:
        raise PeerError(number, f"answered as instance {body.get('instance')!r}: the config's "
                        "host/internal_port for this instance point at another node")
    for key in ("connections", "rooms"):
        if not isinstance(body.get(key), int) or isinstance(body.get(key), bool):
            raise PeerError(number, f"stats field {key!r} is not a whole number")
    return body


class PeerPool:
    """Polls the peers' stats in the background and creates rooms on them on request."""

    def __init__(self, cfg: Config, local_number: int):
        self._cfg = cfg
        self._local = local_number
        self._secret = cfg.cluster.secret
        self._timeout = cfg.node.peer_timeout
        self._interval = cfg.node.stats_interval
        self._peers: dict[int, PeerState] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._pollers: dict[int, asyncio.Task[None]] = {}
        self._last_discovery = 0.0
        self._set_instances(cfg.instances)

    # -- peer list ------------------------------------------------------------------------

    def _set_instances(self, instances: Iterable[Instance]) -> None:
        fresh: dict[int, PeerState] = {}
        for inst in instances:
            if inst.number == self._local:
                continue
            old = self._peers.get(inst.number)
            if old and (old.host, old.internal_port) == (inst.host, inst.internal_port):
                fresh[inst.number] = old
            else:
                fresh[inst.number] = PeerState(inst.number, inst.host, inst.internal_port)
        self._peers = fresh

    async def _discover(self) -> None:
        if self._cfg.aws.discover != "ec2-tags":
            return
        now = time.monotonic()
        if self._last_discovery and now - self._last_discovery < DISCOVERY_INTERVAL:
            return
        self._last_discovery = now
        from shardchat.aws import ec2 as discovery  # needs boto3 + credentials: only here

        try:
            found = await asyncio.to_thread(discovery.resolve_instances, self._cfg)
            if inspect.isawaitable(found):
                found = await found
        except Exception as exc:  # keep the last known list; discovery may be flaky
            log.warning("peer discovery failed, keeping %d known peers: %s",
                        len(self._peers), exc)
            return
        self._set_instances(getattr(found, "instances", found))

    def snapshot(self) -> list[PeerState]:
        """The current view of every peer (copies, safe to keep)."""
        return [PeerState(**vars(p)) for p in self._peers.values()]

    def get(self, number: int) -> PeerState | None:
        return self._peers.get(number)

    def numbers(self) -> list[int]:
        """The instance numbers of every peer (this node not included), in order."""
        return sorted(self._peers)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP session, poll once (bounded by peer_timeout), then keep polling."""
        await self._discover()
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=auth_header(self._secret),
                connector=aiohttp.TCPConnector(limit=0),
                cookie_jar=aiohttp.DummyCookieJar())
        await self.poll_once()
        self._task = asyncio.create_task(self._run(), name="peer-stats")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._pollers.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._task, self._pollers = None, {}
        if self._session:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        """Keep one polling task per peer, so a peer that hangs never delays the others."""
        while True:
            try:
                await self._discover()
            except Exception:  # a bug in discovery must not stop polling for good
                log.exception("peer discovery round failed")
            for n in self._peers:
                task = self._pollers.get(n)
                if task is None or task.done():
                    self._pollers[n] = asyncio.create_task(self._poll_loop(n),
                                                           name=f"peer-stats-{n}")
            for n in [n for n in self._pollers if n not in self._peers]:
                self._pollers.pop(n).cancel()
            await asyncio.sleep(self._interval)

    async def _poll_loop(self, number: int) -> None:
        """Poll one peer each interval; while it is unhealthy, every RETRY_INTERVAL, so a
        peer that comes up (or back) is a candidate again within a fraction of a second."""
        while (peer := self._peers.get(number)) is not None:
            try:
                await self._poll(peer)
            except Exception:
                log.exception("polling peer %s failed", number)
            await asyncio.sleep(self._interval if peer.healthy
                                else min(self._interval, RETRY_INTERVAL))

    # -- stats ----------------------------------------------------------------------------

    async def poll_once(self) -> None:
        """Ask every peer for its stats at once; each answer updates that peer's state."""
        peers = list(self._peers.values())
        await asyncio.gather(*(self._poll(p) for p in peers))

    async def _poll(self, peer: PeerState) -> None:
        started = time.monotonic()
        try:
            body = _valid_stats(peer.number, await self._request(
                peer, "GET", f"{STATS_PATH}?from={self._local}", None, self._timeout,
                expect=200))
        except PeerError as exc:
            if peer.healthy:
                log.warning("peer %s is now unhealthy: %s", peer.number, exc.reason)
            peer.healthy, peer.error = False, exc.reason
            peer.draining = peer.draining or exc.draining
            return
        if not peer.healthy:
            log.info("peer %s is healthy", peer.number)
        peer.healthy, peer.error = True, ""
        peer.draining = bool(body.get("draining"))
        peer.connections, peer.rooms = body["connections"], body["rooms"]
        peer.load = stats_load(body)
        seen = body.get("unreached_for_caller")  # absent from a node of an older release
        peer.unreached_this_node_for = float(seen) if isinstance(seen, int | float) \
            and not isinstance(seen, bool) and seen > 0 else 0.0
        peer.fetched_at = started

    def mark_failed(self, number: int, reason: str, draining: bool = False) -> None:
        """Stop placing on ``number`` until a later stats poll says it is fine again."""
        peer = self._peers.get(number)
        if peer:
            peer.healthy, peer.error = False, reason
            peer.draining = peer.draining or draining

    # -- room creation --------------------------------------------------------------------

    async def create_room(self, number: int, name: str, private: bool, timeout: float,
                          key: str | None = None) -> dict[str, Any]:
        """Create a room on peer ``number`` (under Idempotency-Key ``key``, if given);
        raises PeerError (never hangs past timeout), IdempotencyConflict on a 422."""
        peer = self._peers.get(number)
        if peer is None:
            raise PeerError(number, "not a known peer")
        headers = {KEY_HEADER: key} if key else None
        body = await self._request(peer, "POST", ROOMS_PATH, {"name": name, "private": private},
                                   timeout, expect=201, headers=headers)
        if not isinstance(body, dict) or body.get("instance") != number:
            raise PeerError(number, "room answer is not a room of this instance")
        return body

    async def find_key(self, number: int, key: str, timeout: float) -> dict[str, Any] | None:
        """``{"room", "fingerprint"}`` of the room peer ``number`` created under ``key``, or
        None when it has none; raises PeerError when it cannot say."""
        peer = self._peers.get(number)
        if peer is None:
            raise PeerError(number, "not a known peer")
        body = await self._request(peer, "GET", KEYS_PATH + key, None, timeout,
                                   expect=(200, 404))
        if not isinstance(body, dict):
            raise PeerError(number, "creation-key answer is not a JSON object")
        if "room" not in body:
            return None
        room = body["room"]
        if not isinstance(room, dict) or room.get("instance") != number:
            raise PeerError(number, "creation-key answer is not a room of this instance")
        return body

    # -- where rooms live -----------------------------------------------------------------

    async def room_state(self, number: int, room_id: str, timeout: float) -> Any:
        """Peer ``number``'s answer about ``room_id`` (``GET /internal/rooms/<room_id>``):
        the JSON body, or None when it knows nothing of the room (404). Raises PeerError
        when it cannot say (unknown peer, unreachable, too slow, another status). Asked of
        peers believed down as well: a refused connection costs a millisecond."""
        peer = self._peers.get(number)
        if peer is None:
            raise PeerError(number, "not an instance of this cluster")
        body = await self._request(peer, "GET", room_state_path(room_id), None, timeout,
                                   expect=(200, 404))
        if isinstance(body, dict) and body.get("error") == "not_found":
            return None
        if not isinstance(body, dict) or "state" not in body:
            # a 404 of no route (a node of an older release) says nothing about the room
            raise PeerError(number, "does not answer where rooms live")
        return body

    async def _request(self, peer: PeerState, method: str, path: str, payload: Any,
                       timeout: float, expect: int | tuple[int, ...],
                       headers: dict[str, str] | None = None) -> Any:
        if self._session is None:
            raise PeerError(peer.number, "peer pool is not started")
        limit = aiohttp.ClientTimeout(total=max(timeout, 0.05))
        wanted = expect if isinstance(expect, tuple) else (expect,)
        try:
            async with self._session.request(method, peer.base_url + path, json=payload,
                                             headers=headers, timeout=limit) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                if resp.status == 422 and isinstance(body, dict) \
                        and body.get("error") == IdempotencyConflict.code:
                    raise IdempotencyConflict()
                if resp.status not in wanted:
                    code = body.get("error") if isinstance(body, dict) else None
                    raise PeerError(peer.number, f"answered {resp.status} {code or ''}".strip(),
                                    draining=(resp.status == 503 and code == "draining"),
                                    status=resp.status, body=body)
                return body
        except TimeoutError:
            raise PeerError(peer.number, f"no answer within {timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise PeerError(peer.number, f"unreachable ({exc.__class__.__name__})") from None
