"""Room members that follow their room when it moves, as a real client does (SPEC section 8).

A ``Member`` is one load-generator client (``wsclient.SioClient``) plus what a real client
keeps across connections: its member token, the newest seq it has seen, and the messages it
has sent but not seen acked. It does what the room page does (``web/static/room.js``,
``follow``): when its room moves it gets ``moved`` (or a message acked ``moved``, or a
connect refused ``moved``), drops the old connection at once and connects to the room's new
namespace on the new node with ``last_seq`` and its token; the welcome's history brings what
it missed, and what it had not seen acked is sent again there with the same ``client_id`` (a
resend of a message the old node did store is a duplicate the new node answers with the
first seq).

Each member checks what it receives: seqs come one after the other, so a seq it has seen
is a duplicate and a jump is a loss; every wait is bounded (``FOLLOW_TIMEOUT``) and every
retry counted (``CONNECT_ATTEMPTS``, ``SEND_TRIES``). The room keeps the timing the move
benchmark reports: the longest gap between two deliveries at each member while it watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import Room
from bench.servers import Endpoint
from bench.wsclient import HandshakeError, SioClient, connect
from shardchat import urls

SEQ_MARK = b'"seq":'
FOLLOW_TIMEOUT = 30.0  # seconds from ``moved`` to the welcome on the new node, at most
CONNECT_ATTEMPTS = 50  # connects of one join or rejoin (refused ``unavailable``, ``moved``)
RETRY_WAIT = 0.1  # seconds before a connect or message the server asked to repeat
SEND_TRIES = 8  # sends of one message (each move or lost connection is one more)

Resolve = Callable[[int], tuple[str, int]]  # instance number -> (host, port) of its node


class FollowError(RuntimeError):
    """A member could not (re)join its room within its bounds."""


@dataclass
class Outgoing:
    """One message a member sends until it is acked (or refused for good)."""

    text: str
    client_id: str
    done: asyncio.Future  # the final ack: {"ok": true, "seq", "ts"} or the refusal
    sent_at: float = field(default_factory=time.monotonic)
    acked_at: float | None = None
    tries: int = 0


@dataclass(eq=False)
class FollowingRoom(Room):
    """The members of one room, what they received, and when.

    ``watching``: members record the longest gap between two deliveries (``max_gap``);
    ``rejoined``: how many members were welcomed again after following a move."""

    followers: list[Member] = field(default_factory=list)
    watching: bool = False
    rejoined: int = 0
    rejoin_need: int = 0
    rejoin_waiter: asyncio.Future | None = None
    last_rejoin_at: float | None = None
    rejoin_limit: asyncio.Semaphore | None = None  # None: every member rejoins at once

    def on_rejoined(self, now: float) -> None:
        self.rejoined += 1
        self.last_rejoin_at = now
        if (self.rejoin_waiter is not None and self.rejoined >= self.rejoin_need
                and not self.rejoin_waiter.done()):
            self.rejoin_waiter.set_result(None)

    async def wait_rejoined(self, need: int, timeout: float) -> None:
        """Until ``need`` rejoins in all (counted from the room's start), or TimeoutError."""
        if self.rejoined >= need:
            return
        self.rejoin_need = need
        self.rejoin_waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.rejoin_waiter, timeout)
        finally:
            self.rejoin_waiter = None

    def watch(self, on: bool) -> None:
        """Start (or stop) timing the gaps between deliveries at every member."""
        self.watching = on
        if on:
            for m in self.followers:
                m.max_gap = 0.0


class Member:
    """One member of ``room`` that follows it wherever it moves (module docstring)."""

    def __init__(self, room: FollowingRoom, name: str, endpoint: Endpoint, resolve: Resolve):
        self.room = room
        self.name = name
        self.endpoint = endpoint
        self.resolve = resolve
        self.client: SioClient | None = None
        self.token: str | None = None
        self.last_seq: int | None = None  # None until the first welcome
        self.ready = False  # welcomed, and its room has not moved since
        self.moving = False
        self.closing = False
        self.outbox: list[Outgoing] = []  # to send once (re)welcomed
        self.instance_history: list[int] = []  # where it was welcomed, in order
        self.duplicates = 0  # deliveries of a seq it had seen
        self.missing = 0  # seqs it never got (a jump in the seqs it received)
        self.unrecovered = 0  # rejoins whose welcome could not bring the whole gap
        self.resent = 0  # messages sent again (acked ``moved``, or their connection lost)
        self.follows = 0  # moves followed
        self.error: str | None = None
        self.last_at: float | None = None
        self.max_gap = 0.0
        self.moved_at: float | None = None  # the last move: when it heard of it ...
        self.left_at: float | None = None  # ... when it dropped the old connection ...
        self.rejoined_at: float | None = None  # ... and when the new node welcomed it
        self._welcomed: asyncio.Future | None = None
        self._task: asyncio.Task | None = None

    # -- joining and following -------------------------------------------------------------

    async def join(self, timeout: float = 10.0) -> None:
        """The first connect: until welcomed (bounded)."""
        await asyncio.wait_for(self._connect(), timeout)

    async def _connect(self) -> None:
        """Connect to ``endpoint`` until welcomed: a refusal ``moved`` points elsewhere, one
        ``unavailable`` (the room is arriving there) is tried again a moment later."""
        last: Exception | None = None
        for _ in range(CONNECT_ATTEMPTS):
            ep = self.endpoint
            auth: dict[str, Any] = {"name": self.name}
            if self.token is not None:
                auth["token"] = self.token
            if self.last_seq is not None:
                auth["last_seq"] = self.last_seq
            self._welcomed = asyncio.get_running_loop().create_future()
            try:
                client = await connect(ep.host, ep.port, ep.path, ep.namespace, auth,
                                       on_message=self._on_message, on_event=self._on_event,
                                       on_leave=self._on_leave)
            except HandshakeError as exc:
                data = (exc.refusal or {}).get("data") or {}
                if data.get("code") == "moved":
                    self.endpoint = self._endpoint_of(data)
                    continue
                if data.get("code") == "unavailable":
                    await asyncio.sleep(RETRY_WAIT)  # the server's "in a moment"
                    continue
                raise FollowError(f"{self.name}: {exc}") from None
            except (OSError, TimeoutError) as exc:
                last = exc
                await asyncio.sleep(RETRY_WAIT)
                continue
            self.client = client
            await asyncio.wait_for(asyncio.shield(self._welcomed), FOLLOW_TIMEOUT)
            return
        raise FollowError(f"{self.name}: no welcome after {CONNECT_ATTEMPTS} connects"
                          f" (last: {last or 'refused'})")

    def _endpoint_of(self, fields: dict[str, Any]) -> Endpoint:
        host, port = self.resolve(int(fields["instance"]))
        return Endpoint(host, port, fields["socketio_path"], fields["namespace"])

    def _follow(self, fields: dict[str, Any]) -> None:
        """The room moved (``moved`` event or ack): rejoin it where it is now."""
        if self.moving or self.closing:
            return
        self.moving, self.ready = True, False
        self.moved_at = time.monotonic()
        self.follows += 1
        self.endpoint = self._endpoint_of(fields)
        self._task = asyncio.get_running_loop().create_task(self._rejoin())

    async def _rejoin(self) -> None:
        self.left_at = time.monotonic()
        old = self.client
        try:
            if old is not None:
                old.close()  # acks still awaited there fail, and their messages go again
            limit = self.room.rejoin_limit or contextlib.nullcontext()
            async with limit:
                await asyncio.wait_for(self._connect(), FOLLOW_TIMEOUT)
        except (FollowError, TimeoutError, OSError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return
        finally:
            self.moving = False
        self.rejoined_at = time.monotonic()
        self.room.on_rejoined(self.rejoined_at)

    def _on_leave(self, client: SioClient) -> None:
        if client is self.client:
            self.ready = False
        if client is self.client and not self.moving and not self.closing:
            # lost without a move: a real client reconnects where it was, with last_seq
            self.moving = True
            self._task = asyncio.get_running_loop().create_task(self._rejoin())

    def _on_event(self, client: SioClient, packet: bytes) -> None:
        body = packet[len(client.event_prefix):]
        if body.startswith(b'["welcome",'):
            self._on_welcome(client, json.loads(body)[1])
        elif body.startswith(b'["moved",') and client is self.client:
            self._follow(json.loads(body)[1])

    def _on_welcome(self, client: SioClient, welcome: dict[str, Any]) -> None:
        self.client = client
        self.token = welcome["you"].get("token", self.token)
        if self.last_seq is None:  # the first join: the history is the past, not a delivery
            self.last_seq = welcome["last_seq"]
        else:
            if not welcome.get("recovered") or welcome.get("more"):
                self.unrecovered += 1
            new = sum(self._seen(m["seq"]) for m in welcome.get("history", ()))
            if new:
                self._delivered(new)
        self.instance_history.append(urls.instance_of_path(client.path) or 0)
        self.ready = True
        if self._welcomed is not None and not self._welcomed.done():
            self._welcomed.set_result(None)
        queued, self.outbox = self.outbox, []
        for o in queued:
            self._dispatch(o)

    # -- receiving ---------------------------------------------------------------------------

    def _on_message(self, client: SioClient, payload: bytes) -> None:
        idx = payload.find(SEQ_MARK)
        if idx < 0:
            return
        start = idx + len(SEQ_MARK)
        if self._seen(int(payload[start:payload.index(b",", start)])):
            self._delivered(1)

    def _seen(self, seq: int) -> int:
        """1 when ``seq`` is new to this member, 0 for a duplicate; counts any jump."""
        last = self.last_seq or 0
        if seq <= last:
            self.duplicates += 1
            return 0
        if seq > last + 1:
            self.missing += seq - last - 1
        self.last_seq = seq
        return 1

    def _delivered(self, count: int) -> None:
        now = time.monotonic()
        if self.room.watching and self.last_at is not None and now - self.last_at > self.max_gap:
            self.max_gap = now - self.last_at
        self.last_at = now
        self.room.add_delivered(count)

    # -- sending -----------------------------------------------------------------------------

    def send(self, text: str, client_id: str) -> Outgoing:
        """Send a message until it is acked: now, or once (re)welcomed."""
        o = Outgoing(text, client_id, asyncio.get_running_loop().create_future())
        self._dispatch(o)
        return o

    def _dispatch(self, o: Outgoing) -> None:
        client = self.client
        if (not self.ready or client is None or client.transport is None
                or client.transport.is_closing()):
            self.outbox.append(o)
            return
        if o.tries >= SEND_TRIES:
            self._finish(o, {"ok": False, "error": "gave_up",
                             "message": f"not acked after {o.tries} sends"})
            return
        o.tries += 1
        fut = client.emit("message", {"text": o.text, "client_id": o.client_id}, ack=True)
        fut.add_done_callback(lambda f: self._acked(o, f))

    def _acked(self, o: Outgoing, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.resent += 1  # its connection ended: again on the next one, same client_id
            self.outbox.append(o)
            return
        res = fut.result()
        ack = res[0] if isinstance(res, list) and res and isinstance(res[0], dict) else {}
        if ack.get("ok"):
            self._finish(o, ack)
        elif ack.get("error") == "moved":
            self.resent += 1
            self.outbox.append(o)
            self._follow(ack)  # the ack says where, should ``moved`` itself be late
        elif ack.get("error") == "unavailable":  # frozen longer than the node waits
            self.resent += 1
            asyncio.get_running_loop().call_later(RETRY_WAIT, self._dispatch, o)
        else:
            self._finish(o, ack)

    @staticmethod
    def _finish(o: Outgoing, ack: dict[str, Any]) -> None:
        if not o.done.done():
            o.acked_at = time.monotonic()
            o.done.set_result(ack)

    def close(self) -> None:
        self.closing = True
        if self._task is not None:
            self._task.cancel()
        for o in self.outbox:
            if not o.done.done():
                o.done.cancel()
        if self.client is not None:
            self.client.close()


async def join_room(room: FollowingRoom, endpoints: list[Endpoint], resolve: Resolve,
                    prefix: str, *, concurrency: int = 100, timeout: float = 120.0) -> None:
    """Connect a member per endpoint into ``room``, ``concurrency`` at a time, each until
    welcomed."""
    sem = asyncio.Semaphore(concurrency)

    async def one(j: int, ep: Endpoint) -> None:
        member = Member(room, f"{prefix}-{j}", ep, resolve)
        room.followers.append(member)
        async with sem:
            await member.join()

    await asyncio.wait_for(asyncio.gather(*(one(j, ep) for j, ep in enumerate(endpoints))),
                           timeout)


def close_rooms(rooms: list[FollowingRoom]) -> None:
    for room in rooms:
        for m in room.followers:
            m.close()
