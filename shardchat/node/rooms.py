"""The room service: join, leave, message, typing, history, presence, recovery.

Every room is one Socket.IO namespace (``/i<N>/room/<id>``); the service keeps the member
list of each room itself, so a broadcast is a loop over a dict and never a lookup in
python-socketio's room tables.

Joining is the subtle part. The ``welcome`` carries the room's history, and a message may be
committed while a joiner is between "history read" and "member added". A joiner is therefore
added at once but marked *not ready*: broadcasts meant for it are buffered, and once the
welcome is out, buffered messages newer than the welcome's ``last_seq`` are delivered, so a
joiner sees every message exactly once and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from socketio.exceptions import ConnectionRefusedError as SioRefused

from shardchat import urls
from shardchat.config import Config
from shardchat.node import limits, payloads, ratelimit
from shardchat.node.activity import ActivityTracker
from shardchat.node.engine import Delivery, json_size
from shardchat.node.handoff.records import (
    FROZEN_TIMEOUT,
    INCOMING_REFUSAL,
    NO_MOVES,
    MovedTo,
    MoveView,
)
from shardchat.node.invites import Invites
from shardchat.node.members import MemberTokens
from shardchat.node.ratelimit import RateLimiter, limit_identity
from shardchat.node.store import CreationKey, MessageRecord, RoomRecord, Store, StoreError
from shardchat.refusal import Refusal

log = logging.getLogger("shardchat.rooms")

WELCOME_HISTORY = 50  # SPEC: the welcome holds the latest 50 messages
TYPING_REPEAT_SECONDS = 2.0
# After ``moved``, members stay connected this long before they are disconnected (SPEC: within
# a second), so that the acks of their messages in flight (``moved``, most of them waiting
# at the gate) still reach them: a client drops an ack that follows the DISCONNECT.
MOVED_GRACE = 0.3
FROZEN_WAIT = 15.0  # seconds a message of a moving room waits for the move's outcome, at most
UNREADABLE_ROOM = Refusal("unavailable", "This room's history cannot be read on this server "
                          "right now (its log says why); try again later.")


@dataclass
class Member:
    sid: str
    name: str
    limit_key: Any  # whose per-member rate limits it spends (ratelimit.limit_identity)
    address: str  # the client address its limits are also counted against
    eio_sid: str | None = None  # the connection's Engine.IO session, fixed for its life
    # Who this is, as the server issued it (members.py): the same across reconnects that
    # pass the member token back, never taken from what the client claims. Key anything
    # per person (dedup, rate limits) on (room, identity), never on the display name.
    identity: str = ""
    ready: bool = False
    floor: int = 0  # highest seq the welcome already carried
    typing: bool = False
    typing_at: float = 0.0
    buffered: list[tuple[str, Any]] = field(default_factory=list)

    def public(self) -> dict[str, str]:
        """How others see this member; the public member id, never the token."""
        return {"sid": self.sid, "name": self.name, "member": self.identity}


@dataclass
class Joining:
    """What the connect handler learned, kept until the CONNECT packet is out."""

    room_id: str
    name: str
    last_seq: int | None
    identity: str  # the member id
    token: str  # its token, for this member's welcome only
    limit_key: Any
    address: str


@dataclass
class Room:
    record: RoomRecord
    namespace: str
    members: dict[str, Member] = field(default_factory=dict)


class RoomService:
    def __init__(self, cfg: Config, number: int, store: Store, delivery: Delivery):
        self.cfg = cfg
        self.number = number
        self.settings = cfg.node
        self.store = store
        self.delivery = delivery  # the engine, as the room service may use it
        self.invites = Invites(cfg.cluster.secret, cfg.node.invite_ttl_days * 86400)
        self.member_tokens = MemberTokens(cfg.cluster.secret)
        self.rooms: dict[str, Room] = {}
        self.by_namespace: dict[str, Room] = {}  # saves parsing the namespace per event
        self.joining: dict[tuple[str, str], Joining] = {}
        self.limiter = RateLimiter(cfg.node)  # outlives connections, so reconnects count
        self.draining = False
        # how busy each room is (the load measure's input); one call per stored message
        self.activity = ActivityTracker()
        self.moves: MoveView = NO_MOVES  # rooms that left, arrive, or are frozen (handoff/)
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- rooms --------------------------------------------------------------------------

    async def create_room(self, name: str, private: bool,
                          key: CreationKey | None = None) -> dict[str, Any]:
        """Create a room on this node (durable before it returns) and describe it; ``key``:
        the Idempotency-Key it is created under (``idempotency.py``)."""
        record = RoomRecord(id=secrets.token_urlsafe(16), name=name.strip(),
                            private=bool(private), created_at=int(time.time() * 1000))
        await self.store.create_room(record, key)
        self.activity.touch(record.id)  # a new room counts as in use: its people are coming
        return self.describe(record)

    def describe(self, record: RoomRecord, invite: bool = True) -> dict[str, Any]:
        """The creation answer of a room of this node; ``invite``: with a fresh invite when
        the room is private (never for a lookup: that is open to anyone with the id)."""
        return payloads.placed_room(
            record, instance=self.number, public_url=self.cfg.cluster.public_url,
            invite=self.invites.issue(record.id) if record.private and invite else None)

    def describe_owned(self, room_id: str) -> dict[str, Any] | None:
        """The creation answer, without invite, of a room this node serves; None when it
        serves no room ``room_id``."""
        record = self.store.get_room(room_id) if urls.valid_room_id(room_id) else None
        return None if record is None else self.describe(record, invite=False)

    def _room(self, room_id: str) -> Room | None:
        room = self.rooms.get(room_id)
        if room is None:
            record = self.store.get_room(room_id)
            if record is None:
                return None
            room = Room(record, urls.room_namespace(self.number, room_id))
            self.rooms[room_id] = room
            self.by_namespace[room.namespace] = room
        return room

    def connection_count(self) -> int:
        return sum(len(r.members) for r in self.rooms.values()) + len(self.joining)

    def connections_by_room(self) -> dict[str, int]:
        """Members connected now per room, for the rooms that have any."""
        return {rid: len(r.members) for rid, r in self.rooms.items() if r.members}

    # -- connect ------------------------------------------------------------------------

    def admit(self, namespace: str, sid: str, auth: Any, address: str) -> None:
        """Connect handler: decide, or raise the refusal as a CONNECT_ERROR. ``address`` is
        the client's (``ClientAddresses.of_environ``), for the per-address join limit."""
        refusal, joining = self._check_connect(namespace, auth, address)
        if refusal is not None:
            # a join flood must not become a log flood: rate-limited refusals are counted
            # in the metrics instead
            level = logging.DEBUG if refusal.code == "rate_limited" else logging.INFO
            log.log(level, "refused %s on %s: %s", sid, namespace, refusal.code)
            raise SioRefused(refusal.message, refusal.connect_error()["data"])
        self.joining[(namespace, sid)] = joining

    def _check_connect(self, namespace: str, auth: Any, address: str
                       ) -> tuple[Refusal | None, Any]:
        addr = urls.parse_room_namespace(namespace)
        if addr is None:
            return Refusal("not_found", f"{namespace!r} is not a room: room namespaces look like "
                           f"{urls.room_namespace(self.number, '<room id>')}."), None
        if addr.instance != self.number:
            return Refusal("wrong_instance", f"Room namespace {namespace} belongs to instance "
                           f"{addr.instance}, but this is instance {self.number}: connect with "
                           f"path {urls.socketio_path(addr.instance)}."), None
        moved = self.moves.moved_to(addr.room_id)
        if moved is not None:  # before draining: a drained node's rooms have all moved
            return moved.refusal(), None
        if self.draining:
            return Refusal("draining", "This server is restarting; reconnect in a few "
                           "seconds."), None
        if auth is None:
            auth = {}
        if not isinstance(auth, dict):
            return Refusal("bad_request", 'auth must be an object: {"name": "..."}.'), None
        bad = limits.check_display_name(auth.get("name"), self.settings)
        if bad:
            return bad, None
        last_seq = auth.get("last_seq")
        if last_seq is not None and (not limits.is_int(last_seq) or last_seq < 0):
            return Refusal("bad_request", '"last_seq" must be a whole number >= 0.'), None
        token = auth.get("token")
        if token is not None and not isinstance(token, str):
            return Refusal("bad_request", '"token" must be the string the welcome gave you '
                           '(welcome.you.token), or left out.'), None
        name = auth["name"].strip()
        who = self.member_tokens.identify(addr.room_id, token)
        limit_key = limit_identity(addr.room_id, name, who.member, returning=who.token == token)
        # before the room is looked up: a flood of joins must not become a flood of reads
        limited = self.limiter.take("joins", identity=limit_key, address=address)
        if limited:
            return ratelimit.refusal(limited, self.settings.rate_limit_window), None
        room = self._room(addr.room_id)
        if room is None and self.moves.incoming(addr.room_id):
            return INCOMING_REFUSAL, None
        if room is None:
            return Refusal("not_found", f"There is no room {addr.room_id!r} on instance "
                           f"{self.number}: check the link, or create a new room."), None
        if room.record.private:
            why = self.invites.check(room.record.id, auth.get("invite"))
            if why:
                return Refusal("forbidden", why), None
        pending = sum(1 for (ns, _), _j in self.joining.items() if ns == namespace)
        if len(room.members) + pending >= self.settings.room_capacity:
            return Refusal("full", f"The room is full ({self.settings.room_capacity} people); "
                           "try again later."), None
        return None, Joining(room.record.id, name, last_seq, who.member, who.token, limit_key,
                             address)

    async def connected(self, namespace: str, sid: str) -> None:
        """After CONNECT went out: welcome the joiner, then tell the others."""
        joining = self.joining.pop((namespace, sid), None)
        room = self.rooms.get(joining.room_id) if joining else None
        if joining is None or room is None:
            moved = self.moves.moved_to(joining.room_id) if joining else None
            if moved is not None:  # the room left between the connect and now
                await self.delivery.disconnect(namespace, sid, moved.refusal())
            return
        member = Member(sid, joining.name, joining.limit_key, joining.address,
                        self.delivery.transport_id(namespace, sid),
                        identity=joining.identity)
        room.members[sid] = member  # not ready: broadcasts are buffered for it
        self.activity.touch(room.record.id)
        try:
            welcome = await self._welcome(room, member, joining.last_seq)
        except StoreError as exc:
            log.error("room %s cannot be joined, its history is unreadable: %s",
                      room.record.id, exc)
            room.members.pop(sid, None)
            await self.delivery.disconnect(namespace, sid, UNREADABLE_ROOM)
            return
        # The token goes to this member only: it is in no public() and never broadcast.
        welcome["you"] = {**welcome["you"], "token": joining.token}
        me = [(sid, member.eio_sid)]
        await self.delivery.emit(namespace, "welcome", welcome, me)
        member.floor = welcome["last_seq"]
        member.ready = True
        for event, data in member.buffered:
            if event != "message" or data["seq"] > member.floor:
                await self.delivery.emit(namespace, event, data, me)
        member.buffered.clear()
        await self._broadcast(room, "presence", {"event": "join", "member": member.public(),
                                                 "count": len(room.members)}, skip=sid)

    async def _welcome(self, room: Room, member: Member, last_seq: int | None) -> dict:
        """The welcome: the latest 50 messages, or every message after ``last_seq`` when the
        store still holds that gap (``recovered``), as far as they fit in one page; the rest
        is marked ``more`` and paged back with ``history``."""
        rid = room.record.id
        after, limit, recovered = 0, WELCOME_HISTORY, False
        if last_seq is not None:
            gap = self.store.gap(rid, last_seq)
            if gap is not None:
                after, limit, recovered = last_seq, gap, True
        history, more = await self._page(rid, after=after, limit=limit)
        top = history[-1]["seq"] if history else 0
        if recovered:
            top = max(top, last_seq)
        welcome = {
            "room": payloads.room(room.record),
            "you": member.public(),
            "members": [m.public() for m in room.members.values()],
            "last_seq": top,
            "history": history,
            "recovered": recovered,
        }
        if more:
            welcome["more"] = True
        if room.record.private:
            welcome["invite"] = self.invites.issue(rid)
        return welcome

    async def disconnected(self, namespace: str, sid: str) -> None:
        self.joining.pop((namespace, sid), None)
        room = self.by_namespace.get(namespace)
        if room is None:
            return
        member = room.members.pop(sid, None)
        if member is not None:
            await self._broadcast(room, "presence", {"event": "leave",
                                                     "member": member.public(),
                                                     "count": len(room.members)})

    async def wait_idle(self, timeout: float) -> None:
        """Wait until no message is between "received" and "committed" (or timeout)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    # -- events -------------------------------------------------------------------------

    def _member(self, namespace: str, sid: str) -> tuple[Room | None, Member | None]:
        room = self.by_namespace.get(namespace)
        return room, (room.members.get(sid) if room else None)

    def _moved(self, namespace: str) -> MovedTo | None:
        """Where the room of ``namespace`` went, when it left this node."""
        addr = urls.parse_room_namespace(namespace)
        return self.moves.moved_to(addr.room_id) if addr is not None else None

    async def message(self, namespace: str, sid: str, data: Any) -> dict[str, Any]:
        room, member = self._member(namespace, sid)
        if member is None:
            moved = self._moved(namespace)
            if moved is not None:
                return moved.ack()
            return Refusal("bad_request", "You are not in this room; reconnect.").ack()
        bad = limits.check_message(data, self.settings)
        if bad:
            return bad.ack()
        limited = self.limiter.take("messages", identity=member.limit_key,
                                    address=member.address)
        if limited:
            return ratelimit.refusal(limited, self.settings.rate_limit_window).ack()
        # A moving room is frozen while its last messages are copied: a message waits for
        # the outcome, and is stored here only if the room stays. Nothing may be awaited
        # between the last look at the gate and append_message, which hands out the seq.
        while (gate := self.moves.gate(room.record.id)) is not None:
            try:
                moved = await gate.wait(FROZEN_WAIT)
            except TimeoutError:
                return FROZEN_TIMEOUT.ack()
            if moved is not None:
                return moved.ack()
        moved = self.moves.moved_to(room.record.id)
        if moved is not None:
            return moved.ack()
        self.in_flight += 1
        self._idle.clear()
        try:
            msg, duplicate = await self.store.append_message(
                room.record.id, sender_sid=sid, sender_name=member.name,
                sender_member=member.identity, text=data["text"],
                client_id=data.get("client_id"), ts=int(time.time() * 1000))
        except StoreError:
            log.exception("store refused a message in %s", room.record.id)
            return {"ok": False, "error": "unavailable",
                    "message": "The message could not be saved; send it again."}
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
        if not duplicate:
            self.activity.message(room.record.id)
            await self._broadcast(room, "message", payloads.message(msg))
        return {"ok": True, "seq": msg.seq, "ts": msg.ts}

    async def typing(self, namespace: str, sid: str, data: Any) -> None:
        room, member = self._member(namespace, sid)
        if member is None or not isinstance(data, dict):
            return
        state, now = bool(data.get("typing")), time.monotonic()
        if state == member.typing and now - member.typing_at < TYPING_REPEAT_SECONDS:
            return  # a repeat of what the others already know: not worth a broadcast
        if self.limiter.take("typing", identity=member.limit_key, address=member.address):
            return  # over the limit: dropped (typing has no ack), counted in the metrics
        member.typing, member.typing_at = state, now
        await self._broadcast(room, "typing", {"sid": sid, "name": member.name,
                                               "typing": state}, skip=sid)

    async def history(self, namespace: str, sid: str, data: Any) -> dict[str, Any]:
        room, member = self._member(namespace, sid)
        moved = self._moved(namespace)  # also while the members are being told
        if moved is not None:
            return moved.ack()
        if member is None:
            return Refusal("bad_request", "You are not in this room; reconnect.").ack()
        bad = limits.check_history(data)
        if bad:
            return bad.ack()
        if self.delivery.backlogged(member.eio_sid):
            return Refusal("rate_limited", "Earlier replies have not reached you yet; read "
                           "them, then ask for more history.").ack()
        limited = self.limiter.take("history", identity=member.limit_key,
                                    address=member.address)
        if limited:
            return ratelimit.refusal(limited, self.settings.rate_limit_window).ack()
        try:
            messages, more = await self._page(
                room.record.id, before=data.get("before"),
                limit=data.get("limit", limits.DEFAULT_HISTORY_LIMIT))
        except StoreError as exc:
            log.error("history of room %s is unreadable: %s", room.record.id, exc)
            return UNREADABLE_ROOM.ack()
        ack: dict[str, Any] = {"ok": True, "messages": messages}
        if more:
            ack["more"] = True
        return ack

    async def _page(self, room_id: str, *, after: int = 0, before: int | None = None,
                    limit: int) -> tuple[list[dict], bool]:
        """The newest messages of a range whose JSON list fits in ``node.max_page_bytes``
        (each message counts its encoding and a comma), and whether older ones of the range
        were left out. The bound is below ``write_buffer_cap``, so no page can make its
        reader look slow. Each payload is built once: measured, then sent."""
        built: dict[int, dict[str, Any]] = {}

        def listed_size(record: MessageRecord) -> int:
            """Bytes one message adds to a JSON list: its encoding and a separator."""
            payload = built[record.seq] = payloads.message(record)
            return json_size(payload) + 1

        records, more = await self.store.newest(
            room_id, after=after, before=before, limit=limit,
            max_bytes=self.settings.max_page_bytes - 1, size=listed_size)
        return [built[r.seq] for r in records], more

    # -- moves --------------------------------------------------------------------------

    async def announce_moved(self, room_id: str, moved: MovedTo) -> int:
        """The room now lives elsewhere: tell every member where (``moved``), then, after
        ``MOVED_GRACE``, end their connection to this namespace (the DISCONNECT takes the
        same path as the event, so it cannot overtake it). Meanwhile their messages are
        acked ``moved``. Returns how many members were told."""
        self.activity.forget(room_id)  # another node's load now (its numbers go with it)
        room = self.rooms.pop(room_id, None)
        if room is None:
            return 0
        self.by_namespace.pop(room.namespace, None)
        members = list(room.members.values())
        room.members.clear()  # their leaves are not announced: nobody stays to hear them
        await self.delivery.emit(room.namespace, "moved", moved.event(),
                               [(m.sid, m.eio_sid) for m in members])
        await asyncio.sleep(MOVED_GRACE)
        for m in members:
            await self.delivery.leave(room.namespace, m.sid)
        return len(members)

    # -- delivery -----------------------------------------------------------------------

    async def _broadcast(self, room: Room, event: str, data: Any, skip: str | None = None
                         ) -> None:
        """Deliver to every ready member (buffer for joiners still being welcomed)."""
        ready = []
        seq = data["seq"] if event == "message" else None
        for sid, m in room.members.items():
            if sid == skip:
                continue
            if not m.ready:
                m.buffered.append((event, data))
            elif seq is None or seq > m.floor:  # the welcome may already hold this one
                ready.append((sid, m.eio_sid))
        await self.delivery.emit(room.namespace, event, data, ready)
