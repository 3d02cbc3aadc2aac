"""The follower's side of the stream: keep the copy of one owner, resume after any cut.

``Follow`` runs one task per followed owner: it opens the owner's stream
(``stream.ShipLog.serve``) with the epoch and position its copy holds (``copy.py``), takes a
snapshot when the owner sends one, and applies records as they come. Records that arrive
while one apply is on disk are applied together, one transaction and one fsync, and the last
position of them is acked: the follower's own group commit. A cut connection (the owner
died, a network cut, an owner restart) is retried with a bounded back-off; the resume point
is always what is on disk, so nothing is applied twice and nothing is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from shardchat.internal_api import REPLICATION_STREAM_PATH
from shardchat.node.replication import records
from shardchat.node.replication.copy import FollowedCopy

log = logging.getLogger("shardchat.node.replication")

RETRY_FIRST, RETRY_MAX = 0.2, 2.0  # seconds between two attempts to reach the owner


class Follow:
    """The copy of instance ``owner`` kept by this node, ``number``."""

    def __init__(self, number: int, owner: int, copy: FollowedCopy,
                 locate: Callable[[int], str | None], headers: dict[str, str]) -> None:
        self.number = number
        self.owner = owner
        self.copy = copy
        self._locate = locate
        self._headers = headers
        self.epoch, self.pos = "", 0
        self.connected = False
        self.applied_at = 0.0  # monotonic time of the last apply
        self.owner_head = 0
        self.snapshots = 0
        self.connects = 0
        self._task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._disk = asyncio.Lock()  # one apply or install at a time on the copy

    async def start(self) -> None:
        await asyncio.to_thread(self.copy.open)
        self.epoch, self.pos = await asyncio.to_thread(self.copy.position)
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"follow-{self.owner}")

    async def stop(self) -> None:
        """Stop following (an adoption, or the node stops); the copy stays on disk."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.to_thread(self.copy.close)

    async def _run(self) -> None:
        delay = RETRY_FIRST
        async with aiohttp.ClientSession(headers=self._headers) as session:
            while True:
                try:
                    await self._follow_once(session)
                    delay = RETRY_FIRST
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.debug("following instance %d: %s", self.owner, exc)
                except Exception:
                    log.exception("following instance %d failed", self.owner)
                self.connected = False
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)

    async def _follow_once(self, session: aiohttp.ClientSession) -> None:
        base = self._locate(self.owner)
        if base is None:
            raise OSError(f"instance {self.owner} has no known address")
        url = (f"{base}{REPLICATION_STREAM_PATH}?follower={self.number}&epoch={self.epoch}"
               f"&pos={self.pos}")
        async with session.ws_connect(url, heartbeat=2.0, max_msg_size=0,
                                      timeout=aiohttp.ClientWSTimeout(ws_close=2.0)) as ws:
            self.connected = True
            self.connects += 1
            self._queue = asyncio.Queue()  # what an earlier connection left is resent
            applier = asyncio.get_running_loop().create_task(self._apply_loop(ws))
            try:
                await self._receive(ws)
            finally:
                applier.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await applier

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        snapshot: Any = None
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY and snapshot is not None:
                snapshot[1].write(msg.data)
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            for line in msg.data.split("\n"):  # a frame may carry several records
                snapshot = await self._on_text(records.decode(line), snapshot, ws)
        if snapshot is not None:
            snapshot[1].close()

    async def _on_text(self, body: dict[str, Any], snapshot: Any,
                       ws: aiohttp.ClientWebSocketResponse) -> Any:
        """One text record of the stream; the snapshot being received, if any."""
        kind = body.get("t")
        if kind == records.RECORD:
            self.owner_head = max(self.owner_head, body["pos"])
            self._queue.put_nowait(body)
        elif kind == records.HELLO:
            self.owner_head = body["head"]
            if not body["resume"]:
                log.info("instance %d follows instance %d from a snapshot (it holds "
                         "epoch %s position %d)", self.number, self.owner,
                         self.epoch or "-", self.pos)
        elif kind == records.SNAPSHOT:
            path = self.copy.path.with_suffix(".incoming")
            # a local file written in 256 KiB frames: blocking writes this small are fine
            return (body, open(path, "wb"), path)  # noqa: ASYNC230
        elif kind == records.SNAPSHOT_END and snapshot is not None:
            head, f, path = snapshot
            f.close()
            await self._install(path, head["epoch"], head["pos"], ws)
            return None
        return snapshot

    async def _install(self, path: Path, epoch: str, pos: int,
                       ws: aiohttp.ClientWebSocketResponse) -> None:
        async with self._disk:
            await asyncio.to_thread(self.copy.install, path, epoch, pos)
            self.epoch, self.pos = epoch, pos
        self.snapshots += 1
        self.applied_at = time.monotonic()
        await ws.send_str(json.dumps({"t": records.ACK, "epoch": epoch, "pos": pos}))

    async def _apply_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            await self._apply_all(ws)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("applying the stream of instance %d failed; reconnecting",
                          self.owner)
            await ws.close()

    async def _apply_all(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            async with self._disk:
                fresh = [r for r in batch if r["pos"] > self.pos]
                if fresh:
                    if fresh[0]["pos"] != self.pos + 1:  # never: the owner sends in order
                        raise RuntimeError(f"stream of instance {self.owner} skipped from "
                                           f"{self.pos} to {fresh[0]['pos']}")
                    self.pos = await asyncio.to_thread(self.copy.apply, self.epoch, fresh)
                    self.applied_at = time.monotonic()
            await ws.send_str(records.encode({"t": records.ACK, "epoch": self.epoch,
                                              "pos": self.pos}))

    def stats(self) -> dict[str, Any]:
        return {"owner": self.owner, "connected": self.connected, "epoch": self.epoch,
                "pos": self.pos, "owner_head": self.owner_head,
                "records_behind": max(0, self.owner_head - self.pos),
                "seconds_since_apply": (round(time.monotonic() - self.applied_at, 3)
                                        if self.applied_at else None),
                "snapshots": self.snapshots, "connects": self.connects}
