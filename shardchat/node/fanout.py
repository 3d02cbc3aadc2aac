"""Broadcast of one event to the members of a room (the hot path).

This first version delegates to python-socketio's ``emit`` per namespace; the room service
only ever calls ``Fanout.emit`` so the delivery strategy can change here alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import socketio

from shardchat.config import NodeSettings


class Fanout:
    def __init__(self, sio: socketio.AsyncServer, settings: NodeSettings):
        self.sio = sio
        self.settings = settings
        self._sent = 0

    async def emit(self, namespace: str, event: str, data: Any, recipients: Iterable[str],
                   skip_sid: str | None = None) -> None:
        for sid in recipients:
            if sid != skip_sid:
                self._sent += 1
                await self.sio.emit(event, data, to=sid, namespace=namespace)

    def stats(self) -> dict[str, int]:
        return {"slow": self._sent, "fast": 0, "dropped_slow_readers": 0}
