"""Moving a room, live, from this node to another (SPEC section 8).

``Handoff`` is what the node wires in: the room service asks it about moved, incoming and
frozen rooms (``records.MoveView``); the internal listener hands it the move requests and
the steps peers send (``routes.py``). The steps themselves: ``source.py`` (copy, freeze,
delta, forward, activate) and ``target.py`` (hold the copy, activate it); the durable state
is the store's (``Store.moves``, ``node/store/moves.py``). Why exactly one node owns a room
at every moment, whichever node is killed when: docs/architecture.md, "The handoff".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from shardchat import whereabouts
from shardchat.config import Config
from shardchat.internal_api import auth_header
from shardchat.node.handoff.peer import Peers
from shardchat.node.handoff.ports import MoveStore, RoomHost, RoomStore
from shardchat.node.handoff.records import Gate, MovedTo, MoveReport
from shardchat.node.handoff.source import Source
from shardchat.node.handoff.target import Target

log = logging.getLogger("shardchat.handoff")


def config_locator(cfg: Config) -> Callable[[int], str | None]:
    """Instance number -> base URL of its internal listener, from the config's instances."""
    where = {i.number: f"http://{i.host}:{i.internal_port}" for i in cfg.instances}
    return where.get


class Handoff:
    """The moves of one node: its rooms leaving (``source``) and rooms arriving (``target``)."""

    def __init__(self, cfg: Config, number: int, store: RoomStore, moves: MoveStore,
                 host: RoomHost, *,
                 locate: Callable[[int], str | None] | None = None,
                 draining: Callable[[], bool] = lambda: False):
        self.cfg = cfg
        self.number = number
        self.store = store
        self.moves = moves
        self.host = host
        self.peers = Peers(auth_header(cfg.cluster.secret), locate or config_locator(cfg))
        self.source = Source(number, store, moves, host, self.peers, self.where)
        self.target = Target(number, moves, self.peers, draining)
        self._running: set[asyncio.Task[MoveReport]] = set()

    def where(self, room_id: str, instance: int) -> MovedTo:
        return MovedTo(room_id, instance, self.cfg.public_url_for(instance))

    # -- records.MoveView ---------------------------------------------------------------------

    def moved_to(self, room_id: str) -> MovedTo | None:
        forward = self.moves.forward(room_id)
        return self.where(room_id, forward.instance) if forward is not None else None

    def incoming(self, room_id: str) -> bool:
        return self.moves.incoming(room_id) is not None

    def gate(self, room_id: str) -> Gate | None:
        return self.source.gate(room_id)

    # -- what operators and peers ask -------------------------------------------------------

    async def move(self, room_id: str, to: int) -> MoveReport:
        """Run a move to the end, even when the caller stops waiting: a move cut off between
        its steps would keep the room frozen until its bounds ran out."""
        task = asyncio.get_running_loop().create_task(self.source.move(room_id, to),
                                                      name=f"move-{room_id}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    def state(self, room_id: str) -> dict[str, Any] | None:
        """``GET /internal/rooms/<id>``: what this node is to the room, None when nothing.
        The shapes of ``whereabouts.RoomState``, with what a move adds: the owner's move
        under way (``moving``), the forward's move and last seq, the incoming copy's move
        (the target of a move asks its source this, ``target.py``)."""
        room = self.host.describe_owned(room_id)
        if room is not None:
            out = whereabouts.owner_answer(self.number, room)
            move = self.source.moving.get(room_id)
            if move is not None:
                out["moving"] = {"to": move.target, "move_id": move.move_id,
                                 "frozen": move.gate is not None}
            return out
        incoming = self.moves.incoming(room_id)
        if incoming is not None:
            return {"state": whereabouts.INCOMING, "instance": self.number,
                    "from": incoming.source,
                    "move_id": incoming.move_id}
        forward = self.moves.forward(room_id)
        if forward is not None:
            return {"state": whereabouts.FORWARDED, "instance": self.number,
                    "to": forward.instance,
                    "move_id": forward.move_id, "last_seq": forward.last_seq,
                    "activated": forward.activated,
                    "room": {"id": room_id, **self.where(room_id, forward.instance).fields()}}
        return None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """After the store is open: finish the moves a crash interrupted, on both sides."""
        self.source.recover()
        self.target.start()

    async def close(self) -> None:
        """Let running moves end (each is bounded; the node's drain bounds this step too),
        then stop the retries and the look at incoming rooms: a restart resumes them."""
        if self._running:
            await asyncio.wait(set(self._running))
        await self.source.close()
        await self.target.close()
        await self.peers.close()
