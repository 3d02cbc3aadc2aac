"""Idempotent room creation: one ``Idempotency-Key`` makes at most one room, cluster-wide.

A client that did not get an answer to ``POST /api/rooms`` (network error, 502/503/504) can
not tell whether the room was made. It sends the same request again with the same
``Idempotency-Key`` header and gets the same room back, whichever node answers the retry:

* the node that *stores* a keyed room stores the key with it, in the room's own transaction
  (``Store.create_room(..., key=...)``), so a room never exists without its key, also after
  ``kill -9``. Keys are remembered for ``KEY_TTL_MS`` (24 h);
* the node that *answers* a keyed creation first asks itself and every healthy peer
  (``GET /internal/creation-keys/<key>``) whether one of them holds the key, and only places
  a new room when none does (``cluster/placement.py``); the key travels with the internal
  create call so the owner records it;
* on the owner, ``KeyedCreations`` makes concurrent creations with one key share one room:
  a second call waits for the first one's commit and answers its room.

The key stands for the room, invite included, so it must be unguessable: 16..128 letters,
digits, ``-`` or ``_`` (a UUID, or 128 random bits in base64url, as the landing page sends).
The same key with a different body (name or privacy) is refused (422
``idempotency_conflict``), never answered with the first room. What both the owner and the
answering node must agree on (the header, the key's form, the fingerprint, ``replay`` and
``IdempotencyConflict``) is the peer contract, ``shardchat/internal_api.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from shardchat.internal_api import fingerprint, replay
from shardchat.node.store import CreationKey, Store


class KeyedCreations:
    """The owner's side: keyed rooms of this node, created at most once per key."""

    def __init__(self, store: Store, rooms: Any) -> None:
        self._store = store
        self._rooms = rooms  # RoomService: create_room(..., key=...) and describe(record)
        self._inflight: dict[str, asyncio.Future[None]] = {}

    async def find(self, key: str) -> dict[str, Any] | None:
        """``{"room", "fingerprint"}`` of this node's room under ``key``, or None. A creation
        with that key still committing here is waited for, so the answer is final."""
        pending = self._inflight.get(key)
        if pending is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        hit = self._store.find_key(key)
        if hit is None:
            return None
        return {"room": self._rooms.describe(hit.room), "fingerprint": hit.fingerprint}

    async def create(self, key: str, name: str, private: bool) -> dict[str, Any]:
        """The room under ``key`` on this node: the existing one, or a new one."""
        while True:
            found = await self.find(key)
            if found is not None:
                return replay(found, name, private)
            if key not in self._inflight:  # else another call started it while we waited
                break
        loop = asyncio.get_running_loop()
        done = self._inflight[key] = loop.create_future()
        try:
            return await self._rooms.create_room(
                name, private, key=CreationKey(key, fingerprint(name, private)))
        finally:
            del self._inflight[key]
            done.set_result(None)
