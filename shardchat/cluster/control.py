"""The operator's side of the internal API: what ``shardchat move | drain | rebalance`` and
``shardchat up`` ask the running nodes, over their internal listeners with the cluster
secret (paths: ``internal_api.py``).

Every call is bounded, and each answer is read into a typed value here, so the
orchestration (``moves.py``) never handles raw JSON. A node that cannot be reached, is too
slow or does not answer JSON raises ``NodeDown``; any answer with a status comes back as
``(status, body)`` for the caller to judge, since what a refusal means depends on what was
asked.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import aiohttp

from shardchat import internal_api, whereabouts
from shardchat.cluster.load import RoomLoad
from shardchat.config import Config

STATS_TIMEOUT = 5.0  # seconds for a stats, state or drained call
LISTING_TIMEOUT = 60.0  # seconds for a room listing (100,000 rooms are a few megabytes)
MOVE_TIMEOUT = 120.0  # seconds one move may take (a large room copies many pages)


class NodeDown(Exception):
    """Instance ``number`` did not answer (``reason`` says how it failed)."""

    def __init__(self, number: int, where: str, reason: str):
        super().__init__(f"instance {number} ({where}): {reason}")
        self.number = number
        self.where = where
        self.reason = reason


@dataclass(frozen=True)
class NodeState:
    """One instance as its stats describe it; ``error`` when it did not answer."""

    number: int
    where: str  # host:internal_port, for messages
    up: bool
    error: str | None = None
    rooms: int = 0
    connections: int = 0
    load: float | None = None
    drained: bool = False
    shutting_down: bool = False  # SIGTERM: draining for a stop (not ``drained``)

    @property
    def takes_rooms(self) -> bool:
        return self.up and not self.drained and not self.shutting_down

    def why_not(self) -> str | None:
        """Why this instance takes no room (down, drained, stopping), or None."""
        if not self.up:
            return f"instance {self.number} does not answer on its internal listener " \
                   f"({self.where}: {self.error})"
        if self.drained:
            return f"instance {self.number} is drained (it takes no rooms until it is " \
                   "undrained or restarted)"
        if self.shutting_down:
            return f"instance {self.number} is shutting down"
        return None


class Nodes:
    """JSON calls to the instances of ``cfg`` (``async with Nodes(cfg) as nodes``)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.numbers = sorted(i.number for i in cfg.instances)
        self._base = {i.number: f"http://{i.host}:{i.internal_port}" for i in cfg.instances}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Nodes:
        self._session = aiohttp.ClientSession(
            headers=internal_api.auth_header(self.cfg.cluster.secret),
            cookie_jar=aiohttp.DummyCookieJar(), connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def where(self, number: int) -> str:
        return self._base[number].removeprefix("http://")

    async def call(self, number: int, method: str, path: str, body: Any = None, *,
                   timeout: float = STATS_TIMEOUT) -> tuple[int, Any]:
        """``(status, JSON body)`` of one call; NodeDown when there is no answer."""
        assert self._session is not None, "use Nodes as an async context manager"
        try:
            async with self._session.request(
                    method, self._base[number] + path, json=body,
                    timeout=aiohttp.ClientTimeout(total=max(timeout, 0.1))) as resp:
                try:
                    return resp.status, await resp.json(content_type=None)
                except ValueError:
                    raise NodeDown(number, self.where(number), f"answered {resp.status} "
                                   "without JSON") from None
        except TimeoutError:
            raise NodeDown(number, self.where(number),
                           f"no answer within {timeout:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            errno = getattr(exc.os_error, "errno", None)
            reason = os.strerror(errno) if errno else "cannot connect"
            raise NodeDown(number, self.where(number), reason.lower()) from None
        except aiohttp.ClientError as exc:
            raise NodeDown(number, self.where(number),
                           f"unreachable ({exc.__class__.__name__})") from None

    # -- stats and drains -------------------------------------------------------------------

    async def state(self, number: int) -> NodeState:
        where = self.where(number)
        try:
            status, body = await self.call(number, "GET", internal_api.STATS_PATH)
        except NodeDown as exc:
            return NodeState(number, where, False, exc.reason)
        if status != 200 or not isinstance(body, dict) or body.get("instance") != number:
            return NodeState(number, where, False, f"answered {status} {str(body)[:80]}")
        drained = body.get("drained") is True
        load = body.get("load")
        return NodeState(number, where, True, None, _count(body, "rooms"),
                         _count(body, "connections"),
                         float(load) if isinstance(load, int | float)
                         and not isinstance(load, bool) else None,
                         drained, bool(body.get("draining")) and not drained)

    async def survey(self) -> dict[int, NodeState]:
        """Every instance's state, asked all at once."""
        states = await asyncio.gather(*(self.state(n) for n in self.numbers))
        return {s.number: s for s in states}

    async def set_drained(self, number: int, drained: bool) -> None:
        status, body = await self.call(number, "POST", internal_api.DRAINED_PATH,
                                       {"drained": drained})
        if status != 200:
            raise NodeDown(number, self.where(number), f"refused to set drained: {status} "
                           f"{body}")

    # -- rooms ------------------------------------------------------------------------------

    async def rooms(self, number: int) -> list[RoomLoad]:
        """Every room instance ``number`` owns, with its load (``GET /internal/rooms``)."""
        status, body = await self.call(number, "GET", internal_api.ROOMS_PATH,
                                       timeout=LISTING_TIMEOUT)
        if status != 200 or not isinstance(body, dict):
            raise NodeDown(number, self.where(number), f"listing answered {status}")
        try:
            out = [RoomLoad.from_dict(row) for row in body.get("active") or []]
        except ValueError as exc:
            raise NodeDown(number, self.where(number), f"listing is unreadable: {exc}") \
                from None
        out.extend(RoomLoad(rid) for rid in body.get("idle") or [] if isinstance(rid, str))
        return out

    async def room_state(self, number: int, room_id: str) -> whereabouts.RoomState | None:
        """What instance ``number`` is to the room (None: it knows nothing of it); NodeDown
        when it does not answer or answers something that is no room state."""
        status, body = await self.call(number, "GET", internal_api.room_state_path(room_id))
        if status == 404 and isinstance(body, dict) and body.get("error") == "not_found":
            return None
        try:
            if status != 200:
                raise whereabouts.BadState(f"answered {status}")
            return whereabouts.parse_state(number, room_id, body)
        except whereabouts.BadState as exc:
            raise NodeDown(number, self.where(number), str(exc)) from None

    async def room_numbers(self, number: int, room_id: str) -> dict[str, float] | None:
        """``{"activity", "idle_seconds"}`` of an owned room, None when not there."""
        try:
            status, body = await self.call(number, "GET",
                                           internal_api.room_load_path(room_id))
        except NodeDown:
            return None
        if status != 200 or not isinstance(body, dict):
            return None
        try:
            row = RoomLoad.from_dict(body)
        except ValueError:
            return None
        return {"activity": row.activity, "idle_seconds": row.idle_seconds}

    async def hand_numbers(self, number: int, room_id: str, numbers: dict[str, float]
                           ) -> bool:
        """Give a moved room's numbers to its new owner; False when it did not take them."""
        try:
            status, _ = await self.call(number, "POST", internal_api.room_load_path(room_id),
                                        numbers)
        except NodeDown:
            return False
        return status == 200

    async def move(self, source: int, room_id: str, target: int,
                   timeout: float = MOVE_TIMEOUT) -> tuple[int, Any]:
        """Ask the owner to move the room (``POST /internal/rooms/<id>/move``)."""
        return await self.call(source, "POST", internal_api.move_path(room_id),
                               {"to": target}, timeout=timeout)


def _count(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
