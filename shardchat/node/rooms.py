"""The room service: join, leave, message, typing, history, presence, recovery.

Every room is one Socket.IO namespace (``/i<N>/room/<id>``); the service keeps the member
list of each room itself, so a broadcast is a loop over a dict and never a lookup in
python-socketio's room tables.

Joining is the subtle part. The ``welcome`` carries the room's history, and a message may be
committed while a joiner is between "history read" and "member added". A joiner is therefore
added at once but marked *not ready*: broadcasts meant for it are buffered, and once the
welcome is out, buffered messages newer than the welcome's ``last_seq`` are delivered, so a
joiner sees every message exactly once and in order.

Large rooms (SPEC section 10): a join costs the other members O(1). The member list is a
``Roster`` (join order, paged with ``members``), a welcome lists only the room's first
``node.welcome_members`` members and ``member_count``, and above
``node.presence_batch_members`` members joins and leaves go out once per tick as one
``presence`` batch (``presence.py``). A joiner's welcome and its first batch are cut at the
same instant: the welcome's member list is taken, its buffered presence events (older than
that list) are dropped and its own join is logged, all without awaiting in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from socketio.exceptions import ConnectionRefusedError as SioRefused

from shardchat import urls
from shardchat.config import Config, welcome_member_cap
from shardchat.node import limits, payloads, presence, ratelimit
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
from shardchat.node.roster import Member, Roster, UnknownCursor
from shardchat.node.store import (
    AckRefused,
    CreationKey,
    MessageRecord,
    RoomRecord,
    Store,
    StoreError,
)
from shardchat.refusal import Refusal

log = logging.getLogger("shardchat.rooms")

WELCOME_HISTORY = 50  # SPEC: the welcome holds the latest 50 messages
TYPING_REPEAT_SECONDS = 2.0
# After ``moved``, members stay connected this long before they are disconnected (SPEC: within
# a second), so that the acks of their messages in flight (``moved``, most of them waiting
# at the gate) still reach them: a client drops an ack that follows the DISCONNECT.
MOVED_GRACE = 0.3
FROZEN_WAIT = 15.0  # seconds a message of a moving room waits for the move's outcome, at most
UNSAVED = {"ok": False, "error": "unavailable",
           "message": "The message could not be saved; send it again."}
UNREADABLE_ROOM = Refusal("unavailable", "This room's history cannot be read on this server "
                          "right now (its log says why); try again later.")


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
    members: Roster = field(default_factory=Roster)


class RoomService:
    def __init__(self, cfg: Config, number: int, store: Store, delivery: Delivery):
        self.cfg = cfg
        self.number = number
        self.settings = cfg.node
        self.welcome_members = welcome_member_cap(cfg.node)
        self.store = store
        self.delivery = delivery  # the engine, as the room service may use it
        self.invites = Invites(cfg.cluster.secret, cfg.node.invite_ttl_days * 86400)
        self.member_tokens = MemberTokens(cfg.cluster.secret)
        self.rooms: dict[str, Room] = {}
        self.by_namespace: dict[str, Room] = {}  # saves parsing the namespace per event
        self.joining: dict[tuple[str, str], Joining] = {}
        self._joining_in: Counter[str] = Counter()  # namespace -> len of its joining
        # joins and leaves of large rooms, told once per tick (presence.py)
        self.batches = presence.Batches(
            cfg.node, lambda room, data, skip: self._broadcast(room, "presence", data, skip),
            self._tell_sids, lambda room: self.rooms.get(room.record.id) is room)
        self.limiter = RateLimiter(cfg.node)  # outlives connections, so reconnects count
        self.draining = False
        # how busy each room is (the load measure's input); one call per stored message
        self.activity = ActivityTracker()
        self.moves: MoveView = NO_MOVES  # rooms that left, arrive, or are frozen (handoff/)
        self.in_flight = 0
        self._tails: set[asyncio.Task] = set()  # direct-path broadcasts that had to await
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
            record, instance=self.number, public_url=self.cfg.public_url_for(self.number),
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
        if (namespace, sid) not in self.joining:
            self._joining_in[namespace] += 1
        self.joining[(namespace, sid)] = joining

    def _take_joining(self, namespace: str, sid: str) -> Joining | None:
        """The join of ``sid`` once its CONNECT went out (or it left before that)."""
        joining = self.joining.pop((namespace, sid), None)
        if joining is not None:
            left = self._joining_in[namespace] - 1
            if left:
                self._joining_in[namespace] = left
            else:
                del self._joining_in[namespace]
        return joining

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
        # counted, never searched for: a join costs the same in a room of thousands
        if len(room.members) + self._joining_in[namespace] >= self.settings.room_capacity:
            return Refusal("full", f"The room is full ({self.settings.room_capacity} people); "
                           "try again later."), None
        return None, Joining(room.record.id, name, last_seq, who.member, who.token, limit_key,
                             address)

    async def connected(self, namespace: str, sid: str) -> None:
        """After CONNECT went out: welcome the joiner, then tell the others."""
        joining = self._take_joining(namespace, sid)
        room = self.rooms.get(joining.room_id) if joining else None
        if joining is None or room is None:
            moved = self.moves.moved_to(joining.room_id) if joining else None
            if moved is not None:  # the room left between the connect and now
                await self.delivery.disconnect(namespace, sid, moved.refusal())
            return
        member = Member(sid, joining.name, joining.limit_key, joining.address,
                        self.delivery.transport_id(namespace, sid),
                        identity=joining.identity)
        room.members.add(member)  # not ready: broadcasts are buffered for it
        self.activity.touch(room.record.id)
        try:
            history = await self._welcome_history(room, joining.last_seq)
        except StoreError as exc:
            log.error("room %s cannot be joined, its history is unreadable: %s",
                      room.record.id, exc)
            room.members.remove(sid)
            await self.delivery.disconnect(namespace, sid, UNREADABLE_ROOM)
            return
        if room.members.get(sid) is not member:
            return  # it left (or the room moved) while its history was read
        # From here to the emit nothing is awaited: the member list the welcome holds, the
        # presence events it supersedes and the join's announcement are one instant.
        welcome = self._welcome(room, member, history)
        member.buffered = [b for b in member.buffered if b[0] != "presence"]
        alone = self.batches.announce(room, member.public(), joined=True)
        # The token goes to this member only: it is in no public() and never broadcast.
        welcome["you"] = {**welcome["you"], "token": joining.token}
        me = [(sid, member.eio_sid)]
        await self.delivery.emit(namespace, "welcome", welcome, me)
        room.members.mark_ready(member, welcome["last_seq"])
        for event, data in member.buffered:
            if event != "message" or data["seq"] > member.floor:
                await self.delivery.emit(namespace, event, data, me)
        member.buffered.clear()
        if alone and room.members.get(sid) is member:  # not when it left meanwhile
            await self._broadcast(room, "presence", {"event": "join", "member": member.public(),
                                                     "count": len(room.members)}, skip=(sid,))

    async def _welcome_history(self, room: Room, last_seq: int | None
                               ) -> tuple[list[dict], bool, int, bool]:
        """The welcome's messages: the latest 50, or every message after ``last_seq`` when
        the store still holds that gap (``recovered``), as far as they fit in one page; the
        rest is marked ``more`` and paged back with ``history``. Returns (history, more,
        last_seq, recovered)."""
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
        return history, more, top, recovered

    def _welcome(self, room: Room, member: Member,
                 history: tuple[list[dict], bool, int, bool]) -> dict[str, Any]:
        """The welcome around its messages: the room, the joiner, the room's first
        ``node.welcome_members`` members in join order (``welcome_member_cap``) and how many
        there are in all."""
        messages, more, top, recovered = history
        welcome = {
            "room": payloads.room(room.record),
            "you": member.public(),
            "members": room.members.head(self.welcome_members),  # encoded once per change
            "member_count": len(room.members),
            "last_seq": top,
            "history": messages,
            "recovered": recovered,
        }
        if more:
            welcome["more"] = True
        if room.record.private:
            welcome["invite"] = self.invites.issue(room.record.id)
        return welcome

    async def disconnected(self, namespace: str, sid: str) -> None:
        self._take_joining(namespace, sid)
        room = self.by_namespace.get(namespace)
        if room is None:
            return
        member = room.members.remove(sid)
        if member is None:
            return
        if not room.members:
            # the last one out: a pending batch has nobody left to tell, and a member who
            # joins next is welcomed with the room as it is (the roster, not the batch)
            self.batches.drop(room.record.id)
            return
        if self.batches.announce(room, member.public(), joined=False):
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
        refused = self._refuse_message(member, data)
        if refused is not None:
            return refused
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
        self._begin_write()
        try:
            msg, duplicate = await self.store.append_message(
                room.record.id, sender_sid=sid, sender_name=member.name,
                sender_member=member.identity, text=data["text"],
                client_id=data.get("client_id"), ts=int(time.time() * 1000))
        except AckRefused as exc:  # stored here, its copy on the follower not confirmed
            return await self._refuse_unconfirmed(room, exc)
        except StoreError:
            log.exception("store refused a message in %s", room.record.id)
            return dict(UNSAVED)
        finally:
            self._end_write()
        if not duplicate:
            self.activity.message(room.record.id)
            await self._broadcast(room, "message", payloads.message(msg))
        return {"ok": True, "seq": msg.seq, "ts": msg.ts}

    def _refuse_message(self, member: Member, data: Any) -> dict[str, Any] | None:
        """The ack refusing a message for its content or its sender's rate, else None (and
        one of the sender's message tokens spent): both message paths ask this."""
        bad = limits.check_message(data, self.settings)
        if bad:
            return bad.ack()
        limited = self.limiter.take("messages", identity=member.limit_key,
                                    address=member.address)
        if limited:
            return ratelimit.refusal(limited, self.settings.rate_limit_window).ack()
        return None

    def message_now(self, namespace: str, sid: str, data: Any,
                    reply: Callable[[Any], None]) -> bool:
        """``message`` for the engine's direct path (a websocket frame, in its own callback):
        the same checks in the same order, the seq handed out now, and the broadcast and
        ``reply(ack)`` once the commit is back, all without a task or a future.

        What it leaves to ``message`` (False: nothing checked, spent or stored): a sender
        that is not a member (the refusal, or ``moved``, is ``message``'s), a room that
        is frozen or gone, whose gate ``message`` awaits, and every message under sync
        replication, whose ack awaits the follower's (``Store.ack_gate``). The engine then
        runs ``message`` in a task, and the sender's next messages follow it there until it
        is done, so a client's messages still get seqs in frame order."""
        if self.store.ack_gate is not None:  # sync replication: the ack awaits the follower
            return False
        room, member = self._member(namespace, sid)
        if member is None:
            return False
        rid = room.record.id
        if self.moves.gate(rid) is not None or self.moves.moved_to(rid) is not None:
            return False
        refused = self._refuse_message(member, data)
        if refused is not None:
            reply(refused)
            return True
        self._begin_write()
        try:
            self.store.append_now(rid, sender_sid=sid, sender_name=member.name,
                                  sender_member=member.identity, text=data["text"],
                                  client_id=data.get("client_id"), ts=int(time.time() * 1000),
                                  done=functools.partial(self._stored, room, reply))
        except StoreError:
            self._end_write()
            log.exception("store refused a message in %s", rid)
            reply(dict(UNSAVED))
        except BaseException:
            self._end_write()
            raise
        return True

    def _stored(self, room: Room, reply: Callable[[Any], None], msg: MessageRecord | None,
                error: BaseException | None, duplicate: bool = False) -> None:
        """A direct-path message is durable (or its commit failed): broadcast it, then
        ack. Runs in the writer's commit callback, so it never raises into it."""
        self._end_write()
        if error is not None or msg is None:
            log.error("store refused a message in %s: %s", room.record.id, error)
            reply(dict(UNSAVED))
            return
        try:
            if not duplicate:
                self.activity.message(room.record.id)
                data = payloads.message(msg)
                if not self._broadcast_now(room, "message", data):
                    # an engine that cannot emit now: the broadcast, then the ack, awaited
                    task = asyncio.ensure_future(self._broadcast_then(room, data, msg, reply))
                    self._tails.add(task)
                    task.add_done_callback(self._tails.discard)
                    return
        except Exception:
            log.exception("broadcasting message %s of room %s failed", msg.seq, room.record.id)
        reply({"ok": True, "seq": msg.seq, "ts": msg.ts})

    async def _broadcast_then(self, room: Room, data: dict[str, Any], msg: MessageRecord,
                              reply: Callable[[Any], None]) -> None:
        await self._broadcast(room, "message", data)
        reply({"ok": True, "seq": msg.seq, "ts": msg.ts})

    def _begin_write(self) -> None:
        self.in_flight += 1
        if self.in_flight == 1:  # it is set only at 0: clear it once, not per message
            self._idle.clear()

    def _end_write(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    async def _refuse_unconfirmed(self, room: Room, refused: AckRefused) -> dict[str, Any]:
        """Sync replication could not confirm the copy (``Store.ack_gate``): the message is
        stored here, so the room sees it now (a resend is a duplicate and is not broadcast
        again); the sender hears ``unavailable`` and may resend to learn when it is safe."""
        if not refused.duplicate:
            self.activity.message(room.record.id)
            await self._broadcast(room, "message", payloads.message(refused.message))
        return Refusal("unavailable", refused.reason).ack()

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
                                               "typing": state}, skip=(sid,))

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

    async def members(self, namespace: str, sid: str, data: Any) -> dict[str, Any]:
        """A page of the member list in join order (SPEC section 10): at most ``limit``
        members after ``after`` (a sid; null: from the first), as many as fit in
        ``node.max_page_bytes``, and ``next``, the ``after`` of the next page (null at the
        end). O(log n + limit) whatever the room's size (``roster.py``)."""
        room, member = self._member(namespace, sid)
        moved = self._moved(namespace)
        if moved is not None:
            return moved.ack()
        if member is None:
            return Refusal("bad_request", "You are not in this room; reconnect.").ack()
        bad = limits.check_members(data)
        if bad:
            return bad.ack()
        if self.delivery.backlogged(member.eio_sid):
            return Refusal("rate_limited", "Earlier replies have not reached you yet; read "
                           "them, then ask for more members.").ack()
        limited = self.limiter.take("members", identity=member.limit_key,
                                    address=member.address)
        if limited:
            return ratelimit.refusal(limited, self.settings.rate_limit_window).ack()
        after = data.get("after")
        try:
            following = room.members.after(after)
        except UnknownCursor:
            return Refusal("bad_request", f'"after" {after!r} is not a member of this room and '
                           'did not leave it lately: start again with "after": null.').ack()
        page, more = self._members_page(following,
                                        data.get("limit", limits.DEFAULT_MEMBERS_LIMIT))
        return {"ok": True, "members": page, "next": page[-1]["sid"] if more else None}

    def _members_page(self, following: Iterator[Member], limit: int
                      ) -> tuple[list[dict[str, str]], bool]:
        """Up to ``limit`` members whose JSON list fits in ``node.max_page_bytes`` (at least
        one), and whether more follow them."""
        page: list[dict[str, str]] = []
        used, room_for = 2, self.settings.max_page_bytes
        for m in following:
            if len(page) == limit:
                return page, True
            public = m.public()
            size = json_size(public) + 1
            if page and used + size > room_for:
                return page, True
            page.append(public)
            used += size
        return page, False

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
        self.batches.drop(room_id)
        members = room.members.clear()  # their leaves are not announced: nobody stays
        await self.delivery.emit(room.namespace, "moved", moved.event(),
                               [(m.sid, m.eio_sid) for m in members])
        await asyncio.sleep(MOVED_GRACE)
        for m in members:
            await self.delivery.leave(room.namespace, m.sid)
        return len(members)

    # -- delivery -----------------------------------------------------------------------

    async def _broadcast(self, room: Room, event: str, data: Any,
                         skip: Collection[str] = ()) -> None:
        """Deliver to every ready member but ``skip`` (buffer for joiners still being
        welcomed)."""
        ready = []
        seq = data["seq"] if event == "message" else None
        for sid, m in room.members.items():
            if sid in skip:
                continue
            if not m.ready:
                m.buffered.append((event, data))
            elif seq is None or seq > m.floor:  # the welcome may already hold this one
                ready.append((sid, m.eio_sid))
        await self.delivery.emit(room.namespace, event, data, ready)

    def _broadcast_now(self, room: Room, event: str, data: Any,
                       skip: Collection[str] = ()) -> bool:
        """``_broadcast`` without awaiting (the direct path); False, and nothing done, when
        the engine cannot emit now.

        A message to a room whose members are all ready takes the roster's recipient list
        as it is (``Roster.recipients``: built once per change of members, not per
        message); otherwise each member is looked at, as ``_broadcast`` does."""
        seq = data["seq"] if event == "message" else None
        if seq is not None and not skip:
            everyone = room.members.recipients(seq)
            if everyone is not None:
                return self.delivery.emit_now(room.namespace, event, data, everyone)
        ready = []
        held = []
        for sid, m in room.members.items():
            if sid in skip:
                continue
            if not m.ready:
                held.append(m)
            elif seq is None or seq > m.floor:  # the welcome may already hold this one
                ready.append((sid, m.eio_sid))
        if not self.delivery.emit_now(room.namespace, event, data, ready):
            return False
        for m in held:  # joiners being welcomed get it after their welcome
            m.buffered.append((event, data))
        return True

    async def _tell_sids(self, room: Room, sids: list[str], data: Any) -> None:
        """A ``presence`` event to these members, those still in (buffered for any still
        being welcomed): one encoding for all of them."""
        ready = []
        for sid in sids:
            member = room.members.get(sid)
            if member is None:
                continue
            if not member.ready:
                member.buffered.append(("presence", data))
            else:
                ready.append((sid, member.eio_sid))
        if ready:
            await self.delivery.emit(room.namespace, "presence", data, ready)
