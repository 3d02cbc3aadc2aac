"""Rate limits that reconnecting cannot reset: token buckets per member identity and per
client address, held by the node rather than by a connection.

An event is allowed only when both its member's bucket and its address's bucket hold a
token, and only then is a token taken from each. The address bucket of every kind holds
``rate_limit_address_multiple`` times the member's, so a few people behind one NAT are not
throttled as one, while one client rotating identities still is. Room creations have
no member and count per address only.

The buckets live in one table bounded by ``rate_limit_max_keys``. A bucket untouched for a
whole window has refilled, so it is the same as no bucket and is dropped; the table is kept
in order of last use, so that sweep looks only at its oldest entries. When the table is
full of live buckets, events that would need a new one are refused (fail closed): memory
stays bounded, and nobody gets through unlimited because the table was flooded.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from shardchat.config import NodeSettings
from shardchat.refusal import Refusal

IDENTITY, ADDRESS, TABLE = "identity", "address", "table"
SWEEPS_PER_WINDOW = 8  # an idle bucket lingers about 1/8 window past its expiry
SWEEP_BATCH = 512  # expired buckets dropped per sweep at most
ADDRESS_ONLY = frozenset({"rooms", "lookups"})  # kinds no member spends: HTTP API calls


def limit_identity(room_id: str, name: str, member: str, returning: bool
                   ) -> tuple[str, str, str]:
    """Whose per-member limits a connection spends: the one place that decides it.

    A returning member (it passed back a valid member token) counts as its server-issued
    member id: the same across reconnects, and nobody without its token can spend from it.
    A connection without a valid token gets a fresh member id every time, so keying it on
    that id would refill its limits at every reconnect; it counts under its display name in
    the room instead (shared with whoever else comes without a token under that name).
    Rotating both names and tokens still leaves the per-address bucket."""
    if returning:
        return ("member", room_id, member)
    return ("name", room_id, name)


@dataclass(frozen=True)
class Limited:
    """Why an event was refused: whose bucket was empty, its size, and when to retry."""

    kind: str
    scope: str  # IDENTITY, ADDRESS or TABLE
    limit: int
    retry_after: float


class _Bucket:
    __slots__ = ("key", "tokens", "updated")

    def __init__(self, tokens: float, updated: float, key: tuple[str, str, Hashable]):
        self.tokens = tokens
        self.updated = updated
        self.key = key  # its key in the table (kind, scope, key)


_SCOPES = {IDENTITY: 0, ADDRESS: 1}  # a scope's place in ``RateLimiter._index[kind]``


class RateLimiter:
    """Every bucket of one node, keyed by (kind, scope, key)."""

    def __init__(self, settings: NodeSettings, clock: Callable[[], float] = time.monotonic):
        self.window = settings.rate_limit_window
        self.max_keys = settings.rate_limit_max_keys
        self.clock = clock
        multiple = settings.rate_limit_address_multiple
        per_member = {"messages": settings.rate_limit_messages,
                      "typing": settings.rate_limit_typing,
                      "history": settings.rate_limit_history,
                      "members": settings.rate_limit_members,
                      "joins": settings.rate_limit_joins}
        # kind -> (bucket size per member, per address); room creations have no member
        self._caps: dict[str, tuple[int, int]] = {
            kind: (cap, cap * multiple) for kind, cap in per_member.items()}
        # kinds without a member: counted per address only
        self._caps["rooms"] = (0, settings.rate_limit_rooms)
        self._caps["lookups"] = (0, settings.rate_limit_lookups)
        self._buckets: OrderedDict[tuple[str, str, Hashable], _Bucket] = OrderedDict()
        # the same buckets by kind, then (by identity, by address): found without a key
        self._index: dict[str, tuple[dict[Hashable, _Bucket], dict[Hashable, _Bucket]]] = {
            kind: ({}, {}) for kind in self._caps}
        self.refused: Counter[str] = Counter()
        self._sweep_at = 0.0
        self.table_full = 0

    def take(self, kind: str, *, identity: Hashable | None = None,
             address: str | None = None) -> Limited | None:
        """Spend one ``kind`` event of ``identity`` and of ``address``; None if allowed,
        else why not (and then nothing is spent).

        The common case (both buckets exist, both hold a token, no sweep due) is decided
        here without building anything: the buckets are found by their key in the index
        of their kind and scope, spent and moved to the end of the table (each knows its
        own table key). Everything else takes ``_take`` (new buckets, refusals, sweeps)."""
        now = self.clock()
        if now < self._sweep_at:
            ids, addresses = self._index[kind]
            id_cap, addr_cap = self._caps[kind]
            window = self.window
            ib = ids.get(identity) if identity is not None else None
            ab = addresses.get(address) if address is not None else None
            if (ib is not None or identity is None) and (ab is not None or address is None):
                it = at = 0.0
                if ib is not None:
                    it = ib.tokens + (now - ib.updated) * id_cap / window
                    if it < 1.0:
                        return self._take(kind, identity, address, now)
                if ab is not None:
                    at = ab.tokens + (now - ab.updated) * addr_cap / window
                    if at < 1.0:
                        return self._take(kind, identity, address, now)
                buckets = self._buckets
                if ib is not None:
                    ib.tokens = (id_cap if it > id_cap else it) - 1.0
                    ib.updated = now
                    buckets.move_to_end(ib.key)
                if ab is not None:
                    ab.tokens = (addr_cap if at > addr_cap else at) - 1.0
                    ab.updated = now
                    buckets.move_to_end(ab.key)
                return None
        return self._take(kind, identity, address, now)

    def _take(self, kind: str, identity: Hashable | None, address: str | None,
              now: float) -> Limited | None:
        """``take``, every case: sweeps, new buckets, a full table, refusals."""
        if now >= self._sweep_at:
            self._expire(now)
        buckets, window = self._buckets, self.window
        id_cap, addr_cap = self._caps[kind]
        plan: list[tuple[tuple[str, str, Hashable], _Bucket | None, float]] = []
        worst: Limited | None = None
        new = 0
        for scope, key, cap in ((IDENTITY, identity, id_cap), (ADDRESS, address, addr_cap)):
            if key is None:
                continue
            bkey = (kind, scope, key)
            bucket = buckets.get(bkey)
            if bucket is None:
                tokens = float(cap)
                new += 1
            else:
                tokens = bucket.tokens + (now - bucket.updated) * cap / window
                if tokens > cap:
                    tokens = float(cap)
                elif tokens < 1.0:
                    wait = (1.0 - tokens) * window / cap
                    if worst is None or wait > worst.retry_after:
                        worst = Limited(kind, scope, cap, wait)
            plan.append((bkey, bucket, tokens))
        if worst is None and new and not self._fits(new, now):
            self.table_full += 1
            oldest = next(iter(buckets.values()))
            worst = Limited(kind, TABLE, self.max_keys, oldest.updated + window - now)
        if worst is not None:
            self.refused[f"{kind}.{worst.scope}"] += 1
            return worst
        for bkey, bucket, tokens in plan:
            if bucket is None:
                bucket = buckets[bkey] = _Bucket(tokens - 1.0, now, bkey)
                self._index[kind][_SCOPES[bkey[1]]][bkey[2]] = bucket
            else:
                bucket.tokens = tokens - 1.0
                bucket.updated = now
                buckets.move_to_end(bkey)
        return None

    def _fits(self, new: int, now: float) -> bool:
        """Whether ``new`` more buckets fit (after dropping the expired ones, if need be)."""
        if len(self._buckets) + new <= self.max_keys:
            return True
        self._expire(now)
        return len(self._buckets) + new <= self.max_keys

    def _expire(self, now: float) -> None:
        """Drop buckets idle for a whole window: they are full again, as good as absent.

        Oldest first, so only expired buckets (and one more) are looked at, and at most
        ``SWEEP_BATCH`` of them per call, so that a table emptying at once does not stall
        the event loop; ``take`` calls it a few times per window, or at once while expired
        buckets are left."""
        buckets = self._buckets
        horizon = now - self.window
        for _ in range(SWEEP_BATCH):
            if not buckets or next(iter(buckets.values())).updated > horizon:
                self._sweep_at = now + self.window / SWEEPS_PER_WINDOW
                return
            (kind, scope, key), _ = buckets.popitem(last=False)
            del self._index[kind][_SCOPES[scope]][key]
        self._sweep_at = now

    def stats(self) -> dict[str, Any]:
        return {"keys": len(self._buckets), "max_keys": self.max_keys,
                "refused": dict(self.refused), "table_full": self.table_full}


# ---------------------------------------------------------------------------------------
# what the client is told


_TOO_FAST = {"messages": "You are sending messages too fast",
             "typing": "You are sending typing updates too fast",
             "history": "You are asking for history too often",
             "members": "You are asking for the member list too often",
             "joins": "You are joining too often",
             "rooms": "You are creating rooms too fast",
             "lookups": "You are looking up rooms too often"}
_NOUN = {"messages": "messages", "typing": "typing updates", "history": "history requests",
         "members": "member list requests",
         "joins": "joins", "rooms": "new rooms", "lookups": "room lookups"}


@dataclass(frozen=True)
class RateRefusal(Refusal):
    """A ``rate_limited`` refusal that also says, as a number, when to retry."""

    retry_after: float = 0.0

    def ack(self) -> dict[str, Any]:
        return {**super().ack(), "retry_after": self.retry_after}

    def connect_error(self) -> dict[str, Any]:
        out = super().connect_error()
        out["data"]["retry_after"] = self.retry_after
        return out


def refusal(limited: Limited, window: float) -> RateRefusal:
    """The SPEC ``rate_limited`` refusal for ``limited``, with a sentence a person can act
    on: what the limit is, whose it is, and how many seconds to wait."""
    wait = round(max(limited.retry_after, 0.1), 1)
    kind, per = limited.kind, f"{window:g} s"
    if limited.scope == TABLE:
        why = "The server is tracking too many senders right now"
    elif limited.scope == ADDRESS and kind not in ADDRESS_ONLY:
        why = (f"Too many {_NOUN[kind]} come from your network address (at most "
               f"{limited.limit} per {per} for everyone sharing it)")
    elif kind in ADDRESS_ONLY:
        why = f"{_TOO_FAST[kind]} (at most {limited.limit} per {per} from one address)"
    else:
        why = f"{_TOO_FAST[kind]} (at most {limited.limit} per {per})"
    return RateRefusal("rate_limited", f"{why}; try again in {wait:.1f} s.", wait)
