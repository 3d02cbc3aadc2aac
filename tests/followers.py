"""Members that stay in their room wherever it moves, for the drain, rebalance and scale-in
tests: they reach the nodes through a router (as through the ALB), follow ``moved`` (the
event, the refusal and the ack) to the room's new namespace with ``last_seq`` and their
member token, and resend a message the old node did not take with the same ``client_id``.

A ``Follower`` that sends (``sending=True``) sends one message after the other and records
every ok ack (``acked``: client_id -> seq) and the instance that gave it; one that does not
just stays connected (a connection is load). Waiting is on events with deadlines; the only
pauses are a sender's pace between messages and the backoff of a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import socketio

from shardchat import urls

ACK_TIMEOUT = 5.0
CONNECT_TIMEOUT = 10.0
PACE = 0.05  # seconds between a sender's messages: enough traffic, little CPU
RETRY = 0.1  # seconds before trying again after an unavailable answer or a lost ack


class Follower:
    """One member of one room, through the router at ``base_url``."""

    def __init__(self, base_url: str, room: dict[str, Any], name: str,
                 transport: str = "websocket", sending: bool = False,
                 invite: str | None = None) -> None:
        self.base_url = base_url
        self.room_id = room["id"]
        self.where = {k: room[k] for k in ("instance", "namespace", "socketio_path")}
        self.name = name
        self.transport = transport
        self.sending = sending
        self.invite = invite or room.get("invite")
        self.sio: socketio.AsyncClient | None = None
        self.token: str | None = None
        self.last_seq: int | None = None
        self.welcomed = asyncio.Event()
        self.acked: dict[str, int] = {}  # client_id -> seq
        self.acked_on: dict[str, int] = {}  # client_id -> instance that acked it
        self.moves_seen = 0  # moved events, refusals and acks
        self.resent: list[str] = []  # client ids sent again after a moved ack
        self.errors: list[Any] = []  # anything unexpected
        self._moved_to: dict[str, Any] | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._following: set[asyncio.Future[None]] = set()
        self._count = 0

    # -- connection -----------------------------------------------------------------------

    async def join(self) -> Follower:
        await self._connect(self.where)
        return self

    async def _connect(self, where: dict[str, Any]) -> None:
        """Connect at ``where`` (retrying while the room is not served there yet); the old
        client is closed once the new one is welcomed."""
        ns, path = where["namespace"], where["socketio_path"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_TIMEOUT
        while True:
            sio = socketio.AsyncClient(reconnection=False)
            outcome: asyncio.Future = loop.create_future()
            sio.on("welcome", lambda w, f=outcome: f.done() or f.set_result(("welcome", w)),
                   namespace=ns)
            sio.on("connect_error", lambda d=None, f=outcome: f.done()
                   or f.set_result(("refused", d)), namespace=ns)
            sio.on("moved", self._on_moved, namespace=ns)
            sio.on("message", self._on_message, namespace=ns)
            auth = {"name": self.name}
            if self.invite:
                auth["invite"] = self.invite
            if self.token:
                auth["token"] = self.token
            if self.last_seq is not None:
                auth["last_seq"] = self.last_seq
            try:
                await sio.connect(self.base_url, namespaces=[ns], socketio_path=path,
                                  transports=[self.transport], auth=auth, wait=False)
                kind, data = await asyncio.wait_for(outcome, CONNECT_TIMEOUT)
            except (socketio.exceptions.ConnectionError, TimeoutError) as exc:
                kind, data = "failed", repr(exc)
            if kind == "welcome":
                break
            await sio.disconnect()
            code = (data.get("data") or {}).get("code") if isinstance(data, dict) else None
            if code == "moved":  # it moved on before we got there
                self.moves_seen += 1
                where, ns, path = data["data"], data["data"]["namespace"], \
                    data["data"]["socketio_path"]
                continue
            if loop.time() > deadline:
                raise AssertionError(f"{self.name} could not join {ns}: {kind} {data}")
            await asyncio.sleep(RETRY)  # "unavailable": arriving there in a moment
        old, self.sio = self.sio, sio
        self.where = {"instance": urls.parse_room_namespace(ns).instance, "namespace": ns,
                      "socketio_path": path}
        self.token = data["you"]["token"]
        for message in data["history"]:
            self._on_message(message)
        self.welcomed.set()
        if old is not None:
            with contextlib.suppress(Exception):
                await old.disconnect()

    def _on_moved(self, data: dict[str, Any]) -> None:
        self.moves_seen += 1
        self._moved_to = data
        if not self.sending:  # a sender follows from its loop; an idle member at once
            task = asyncio.ensure_future(self._follow(data))
            self._following.add(task)
            task.add_done_callback(self._following.discard)

    def _on_message(self, message: dict[str, Any]) -> None:
        if self.last_seq is None or message["seq"] > self.last_seq:
            self.last_seq = message["seq"]

    async def _follow(self, where: dict[str, Any]) -> None:
        if where["namespace"] == self.where["namespace"]:
            return
        self.welcomed.clear()
        try:
            await self._connect(where)
        except Exception as exc:
            self.errors.append(repr(exc))

    @property
    def settled(self) -> bool:
        """Connected, welcomed, where the last ``moved`` said the room is."""
        return (self.welcomed.is_set() and self.sio is not None and self.sio.connected
                and (self._moved_to is None
                     or self._moved_to["namespace"] == self.where["namespace"]))

    # -- sending ----------------------------------------------------------------------------

    def start(self) -> Follower:
        self._task = asyncio.get_running_loop().create_task(self._send_loop())
        return self

    async def _send_loop(self) -> None:
        while not self._stop.is_set():
            cid = f"{self.name}-{self._count}"
            self._count += 1
            try:
                await self._send_until_stored(cid)
            except Exception as exc:
                self.errors.append(repr(exc))
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), PACE)

    async def _send_until_stored(self, cid: str) -> None:
        """Send ``cid`` until some owner acks it ok (the same client_id every time, so a
        resend of a message that was stored after all is a duplicate, not a second copy)."""
        tries = 0
        while True:
            tries += 1
            if tries > 200:
                raise AssertionError(f"{cid} was never stored")
            if self._moved_to is not None and self._moved_to["namespace"] != \
                    self.where["namespace"]:
                await self._follow(self._moved_to)
            sio, ns = self.sio, self.where["namespace"]
            try:
                ack = await sio.call("message", {"text": cid, "client_id": cid},
                                     namespace=ns, timeout=ACK_TIMEOUT)
            except (socketio.exceptions.TimeoutError, socketio.exceptions.BadNamespaceError,
                    socketio.exceptions.DisconnectedError):
                await asyncio.sleep(RETRY)  # no ack: disconnected by the move, or lost
                continue
            if isinstance(ack, dict) and ack.get("ok"):
                self.acked[cid] = ack["seq"]
                self.acked_on[cid] = self.where["instance"]
                if tries > 1:
                    self.resent.append(cid)
                return
            if isinstance(ack, dict) and ack.get("error") == "moved":
                self.moves_seen += 1
                self._moved_to = {k: ack[k] for k in ("instance", "namespace",
                                                      "socketio_path")}
                continue
            if isinstance(ack, dict) and ack.get("error") == "unavailable":
                await asyncio.sleep(RETRY)
                continue
            raise AssertionError(f"{cid}: unexpected ack {ack!r}")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 60)

    async def close(self) -> None:
        await self.stop()
        if self.sio is not None:
            with contextlib.suppress(Exception):
                await self.sio.disconnect()


async def room_history(base_url: str, room: dict[str, Any], instance: int) -> list[dict]:
    """Every stored message of the room, read by a fresh member on ``instance`` (the
    welcome from seq 0, then older pages if the welcome could not hold them all)."""
    ns = urls.room_namespace(instance, room["id"])
    sio = socketio.AsyncClient(reconnection=False)
    welcome: asyncio.Future = asyncio.get_running_loop().create_future()
    sio.on("welcome", lambda w: welcome.done() or welcome.set_result(w), namespace=ns)
    sio.on("connect_error", lambda d=None: welcome.done()
           or welcome.set_exception(AssertionError(f"refused on {ns}: {d}")), namespace=ns)
    auth = {"name": "auditor", "last_seq": 0}
    if room.get("invite"):
        auth["invite"] = room["invite"]
    await sio.connect(base_url, namespaces=[ns], socketio_path=urls.socketio_path(instance),
                      transports=["websocket"], auth=auth, wait=False)
    try:
        data = await asyncio.wait_for(welcome, CONNECT_TIMEOUT)
        messages = list(data["history"])
        more = data.get("more", False)
        while more and messages and messages[0]["seq"] > 1:
            page = await sio.call("history", {"before": messages[0]["seq"], "limit": 100},
                                  namespace=ns, timeout=ACK_TIMEOUT)
            assert page.get("ok"), page
            messages = page["messages"] + messages
            more = bool(page.get("more")) and bool(page["messages"])
        return messages
    finally:
        await sio.disconnect()
