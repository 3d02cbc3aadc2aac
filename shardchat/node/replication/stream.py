"""The owner's side of the follower stream: what was committed, numbered and kept for a while.

``ShipLog`` hears of every committed batch (``GroupCommitWriter.post_commit``) and every
room a move's step changed (``Moves.changed``), on the event loop in commit order, and gives
each the next position of its epoch (``records.py``). The newest ``node.replication_backlog``
records stay in memory; the batch is encoded once, when it is committed, so what the writer
thread does is unchanged and the cost on the loop is one JSON encoding per commit.

The follower opens a websocket to ``/internal/replication/stream`` on the owner's internal
listener (cluster secret), saying which epoch and position it holds. ``serve`` resumes it
right after that position when the ring still holds it, and otherwise (an owner restarted,
so the epoch is new; a follower further behind than the backlog) sends a **snapshot** first:
a consistent copy of the owner's store file taken at a known position (a read transaction
opened inside a job of the writer thread, between two commits, then copied by SQLite's
backup in a worker thread without holding the writer), followed by the records after it.
The follower acks each position once it is on its disk; the acks drive the sync ack gate
(``gate.py``) and the lag in ``/internal/metrics``.

One follower per owner: a second stream (the follower reconnecting before the old
connection timed out) replaces the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sqlite3
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from shardchat.node.replication import records
from shardchat.node.store import Store, schema
from shardchat.node.store.writer import Batch

log = logging.getLogger("shardchat.node.replication")

SNAPSHOT_CHUNK = 256 * 1024  # bytes per binary frame of a snapshot
SNAPSHOT_NAME = "replication-snapshot-{session}.sqlite3"  # one per stream served
FRAME_RECORDS = 256  # records one websocket frame carries at most
HEARTBEAT = 2.0  # websocket pings: a cut connection is noticed within about twice this


@dataclass(slots=True)
class _Entry:
    pos: int
    payload: str | None  # an encoded batch, or None for a room image read when shipped
    room_id: str | None
    size: int
    at: float  # monotonic time of the commit


class ShipLog:
    """Positions, the ring of recent records, the follower's acks; see the module doc."""

    def __init__(self, store: Store, follower: int, backlog: int) -> None:
        self.store = store
        self.follower = follower
        self.backlog = backlog
        self.epoch = secrets.token_hex(8)
        self.head = 0
        self.acked = 0  # the follower's last ack in this epoch
        self.connected = False
        self.changed_at = time.monotonic()  # when ``connected`` last changed
        self.snapshots = 0
        self._ring: deque[_Entry] = deque()
        self._wake = asyncio.Event()
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._session = 0  # the stream being served; an older one ends
        self.on_caught_up: list = []  # callbacks once the follower acked the head

    # -- what the store tells (event loop, commit order) ---------------------------------

    def committed(self, batch: Batch) -> None:
        """``writer.post_commit``: one batch, one position."""
        if not batch.rooms and not batch.messages:
            return
        self.head += 1
        payload = records.batch_record(self.head, batch)
        self._push(_Entry(self.head, payload, None, len(payload), time.monotonic()))

    def room_changed(self, room_id: str) -> None:
        """``Moves.changed``: a room image at the next position."""
        self.head += 1
        self._push(_Entry(self.head, None, room_id, 512, time.monotonic()))

    def reset(self, why: str) -> None:
        """A new epoch: the follower starts again from a snapshot (after an adoption, whose
        rooms arrive in bulk). Waiting acks are released by its first ack."""
        log.info("replication to instance %d starts a new epoch (%s): the follower "
                 "re-copies from a snapshot", self.follower, why)
        self.epoch, self.head, self.acked = secrets.token_hex(8), 0, 0
        self._ring.clear()
        self._waiters = {0: _merge(list(self._waiters.values()))} if self._waiters else {}
        self._session += 1  # ends the stream being served
        self._wake.set()

    def close(self) -> None:
        """The node stops: end the stream being served (the follower will resume)."""
        self._session += 1
        self._wake.set()

    def _push(self, entry: _Entry) -> None:
        self._ring.append(entry)
        if len(self._ring) > self.backlog:
            self._ring.popleft()
        self._wake.set()

    # -- acks ------------------------------------------------------------------------------

    def wait_ack(self, pos: int) -> asyncio.Future[None]:
        """A future that resolves once the follower acked ``pos`` (shared per position)."""
        fut = self._waiters.get(pos)
        if fut is None:
            fut = self._waiters[pos] = asyncio.get_running_loop().create_future()
        return fut

    def _acked(self, epoch: str, pos: int) -> None:
        if epoch != self.epoch or pos <= self.acked:
            return
        self.acked = min(pos, self.head)
        for p in [p for p in self._waiters if p <= self.acked]:
            fut = self._waiters.pop(p)
            if not fut.done():
                fut.set_result(None)
        if self.acked >= self.head:
            for tell in self.on_caught_up:
                tell()

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected, self.changed_at = connected, time.monotonic()

    # -- the stream ------------------------------------------------------------------------

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """The websocket of one follower (see the module docstring)."""
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=1024 * 1024)
        await ws.prepare(request)
        self._session += 1
        session = self._session
        epoch = request.query.get("epoch", "")
        try:
            pos = int(request.query.get("pos", "0"))
        except ValueError:
            pos = -1
        log.info("instance %s follows from epoch %s position %d (here: epoch %s, head %d)",
                 request.query.get("follower", "?"), epoch or "-", pos, self.epoch, self.head)
        acks = asyncio.get_running_loop().create_task(self._read_acks(ws, session))
        acks.add_done_callback(lambda _t: self._wake.set())  # the follower went away
        self._set_connected(True)
        try:
            cursor = pos if epoch == self.epoch and self._holds_after(pos) else None
            await ws.send_str(json.dumps({"t": records.HELLO, "epoch": self.epoch,
                                          "head": self.head, "resume": cursor is not None}))
            while session == self._session and not ws.closed:
                if cursor is None or not self._holds_after(cursor):
                    cursor = await self._send_snapshot(ws, session)
                    continue
                self._wake.clear()
                while cursor < self.head and session == self._session and not ws.closed:
                    if not self._holds_after(cursor):  # trimmed while sending: snapshot
                        break
                    frame, cursor = await self._frame(cursor)
                    await ws.send_str(frame)
                if cursor >= self.head and session == self._session and not acks.done():
                    await self._wake.wait()
                if acks.done():
                    break
        except (ConnectionError, RuntimeError) as exc:  # the follower went away mid-send
            log.info("replication stream to instance %d ended: %s", self.follower, exc)
        finally:
            if session == self._session:
                self._set_connected(False)
            acks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acks
            await ws.close()
        return ws

    def _holds_after(self, pos: int) -> bool:
        """The ring holds every record after ``pos`` (or ``pos`` is the head)."""
        if pos == self.head:
            return True
        return bool(self._ring) and self._ring[0].pos <= pos + 1 and pos < self.head

    async def _read_acks(self, ws: web.WebSocketResponse, session: int) -> None:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                body = json.loads(msg.data)
                if body["t"] == records.ACK and session == self._session:
                    self._acked(str(body["epoch"]), int(body["pos"]))

    async def _frame(self, cursor: int) -> tuple[str, int]:
        """The records after ``cursor`` the ring holds, up to ``FRAME_RECORDS``, as one
        frame (one record per line: JSON never holds a raw newline), and the last one's
        position. One frame per wake-up, not per commit, when commits come fast."""
        first = self._ring[0].pos
        lines = []
        while cursor < self.head and len(lines) < FRAME_RECORDS:
            entry = self._ring[cursor + 1 - first]
            lines.append(await self._payload(entry))
            cursor = entry.pos
            if self._ring[0].pos != first:  # trimmed while an image was read
                break
        return "\n".join(lines), cursor

    async def _payload(self, entry: _Entry) -> str:
        if entry.payload is not None:
            return entry.payload
        image = await asyncio.to_thread(_read_image, self.store.path, entry.room_id)
        return records.image_record(entry.pos, image)

    async def _send_snapshot(self, ws: web.WebSocketResponse, session: int) -> int:
        """A copy of the store at a known position, sent; that position."""
        path = self.store.directory / SNAPSHOT_NAME.format(session=session)
        pos = await self._snapshot(path)
        self.snapshots += 1
        size = path.stat().st_size
        log.info("sending a snapshot of %d bytes at position %d to instance %d", size, pos,
                 self.follower)
        try:
            await ws.send_str(json.dumps({"t": records.SNAPSHOT, "epoch": self.epoch,
                                          "pos": pos, "size": size}))
            with open(path, "rb") as f:  # noqa: ASYNC230 - local reads of 256 KiB
                while chunk := f.read(SNAPSHOT_CHUNK):
                    await ws.send_bytes(chunk)
            await ws.send_str(json.dumps({"t": records.SNAPSHOT_END}))
        finally:
            path.unlink(missing_ok=True)
        return pos

    async def _snapshot(self, path: Path) -> int:
        at: list[int] = []

        def pin(_conn: sqlite3.Connection) -> sqlite3.Connection:
            # Between two commits of the writer: a read transaction opened now sees
            # exactly what is committed, which is position ``self.head`` once ``done`` runs.
            reader = schema.connect(self.store.path, query_only=True)
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM rooms").fetchone()
            return reader

        reader = await self.store.writer.write_job(pin, lambda _r: at.append(self.head))
        try:
            await asyncio.to_thread(_backup, reader, path)
        finally:
            reader.close()
        return at[0]

    # -- metrics -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The follower's lag: positions, bytes and seconds behind the head."""
        behind = [e for e in self._ring if e.pos > self.acked]
        return {"follower": self.follower, "epoch": self.epoch, "head": self.head,
                "acked": self.acked, "connected": self.connected,
                "records_behind": self.head - self.acked,
                "bytes_behind": sum(e.size for e in behind),
                "seconds_behind": round(time.monotonic() - behind[0].at, 3) if behind else 0.0,
                "backlog": len(self._ring), "snapshots": self.snapshots}


def _merge(futures: list[asyncio.Future[None]]) -> asyncio.Future[None]:
    """One future that, resolved, resolves every one of ``futures``."""
    merged = asyncio.get_running_loop().create_future()

    def release(_f: asyncio.Future[None]) -> None:
        for fut in futures:
            if not fut.done():
                fut.set_result(None)

    merged.add_done_callback(release)
    return merged


def _backup(reader: sqlite3.Connection, path: Path) -> None:
    path.unlink(missing_ok=True)
    dest = sqlite3.connect(path)
    try:
        reader.backup(dest)
    finally:
        dest.close()


def _read_image(path: Path, room_id: str | None) -> dict[str, Any]:
    conn = schema.connect(path, query_only=True)
    try:
        return records.read_image(conn, room_id or "")
    finally:
        conn.close()
