"""Rate limits that reconnecting cannot reset (SPEC sections 4 and 6).

Every limit is counted per member identity and per client address by the node itself, so a
client that drops its connection and comes back, or rotates its display name, or forges
``X-Forwarded-For``, gets no new allowance. The nodes run with small limits and a long
window (so nothing refills during a test); each test speaks from addresses of its own,
through ``X-Forwarded-For`` (believed from loopback by default) or through its own loopback
source address, so tests sharing a node never share a bucket.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import socketio

from shardchat import config
from shardchat.cluster.router import Router, serve
from shardchat.cluster.rules import build_rules
from shardchat.config import ConfigError, NodeSettings
from shardchat.node.clientaddr import ClientAddresses
from shardchat.node.ratelimit import ADDRESS, IDENTITY, TABLE, RateLimiter
from tests.conftest import (
    Refused,
    RoomClient,
    acreate_room,
    assert_failed_ack,
    assert_refusal_shape,
    first_of,
)
from tests.support import SECRET, NodeProcess, bound_port, http_json, running_nodes

pytestmark = pytest.mark.timeout(120)

WINDOW = 600.0  # long enough that no bucket refills noticeably while a test runs
LIMITS = {"rate_limit_window": WINDOW, "rate_limit_messages": 5, "rate_limit_typing": 5,
          "rate_limit_history": 5, "rate_limit_members": 5, "rate_limit_joins": 12,
          "rate_limit_rooms": 3, "rate_limit_lookups": 4, "rate_limit_address_multiple": 2}
PROXY = "127.0.0.2"  # the one trusted proxy of the ``proxied`` node
PROXIED_LIMITS = {"rate_limit_window": WINDOW, "rate_limit_joins": 2, "rate_limit_rooms": 2,
                  "rate_limit_address_multiple": 2, "trusted_proxies": [f"{PROXY}/32"]}

_addresses = itertools.count(1)
_sources = itertools.count(3)  # 127.0.0.3, .4, ...: loopback source addresses of our own


def fresh_address() -> str:
    """A client address no other test in this module uses (documentation ranges)."""
    n = next(_addresses)
    return f"198.51.100.{n}" if n < 255 else f"2001:db8:{n:x}::1"


def fresh_source() -> str:
    return f"127.0.0.{next(_sources)}"


@pytest.fixture(scope="module")
def limited(tmp_path_factory) -> Iterator[NodeProcess]:
    """A node with small limits, trusting loopback's X-Forwarded-For (the default)."""
    with running_nodes(tmp_path_factory.mktemp("limited"), 1, node=LIMITS) as (node,):
        yield node


@pytest.fixture(scope="module")
def proxied(tmp_path_factory) -> Iterator[NodeProcess]:
    """A node whose only trusted proxy is 127.0.0.2: 127.0.0.1 is just another client."""
    with running_nodes(tmp_path_factory.mktemp("proxied"), 1, node=PROXIED_LIMITS) as (node,):
        yield node


# ---------------------------------------------------------------------------------------
# clients with an address of their own


class Joiner:
    """Opens room clients from one client address; closes them all at the end."""

    def __init__(self, node: NodeProcess, transport: list[str], *, xff: str | None = None,
                 source: str | None = None):
        self.node = node
        self.transport = transport
        self.headers = {"X-Forwarded-For": xff} if xff else {}
        self.source = source
        self.opened: list[tuple[RoomClient, aiohttp.ClientSession | None]] = []

    def session(self) -> aiohttp.ClientSession | None:
        if self.source is None:
            return None
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            local_addr=(self.source, 0)))

    async def join(self, room: dict[str, Any], name: str, token: str | None = None
                   ) -> RoomClient:
        """Join (passing back a member ``token`` if given) and wait for the welcome;
        raises Refused on CONNECT_ERROR."""
        session = self.session()
        kwargs = {"http_session": session} if session is not None else {}
        sio = socketio.AsyncClient(reconnection=False, **kwargs)
        client = RoomClient(sio, room["namespace"])
        self.opened.append((client, session))
        await sio.connect(self.node.base_url, namespaces=[room["namespace"]],
                          socketio_path=room["socketio_path"], transports=self.transport,
                          auth={"name": name, **({"token": token} if token else {})},
                          headers=self.headers, wait=False)
        queue, data = await first_of(client.events["welcome"], client.connect_errors)
        if queue is client.connect_errors:
            await self.close(client)
            raise Refused(data)
        client.welcome = data
        return client

    async def close(self, client: RoomClient) -> None:
        for entry in list(self.opened):
            if entry[0] is client:
                self.opened.remove(entry)
                await client.close()
                if entry[1] is not None:
                    await entry[1].close()

    async def close_all(self) -> None:
        for client, _session in list(self.opened):
            await self.close(client)


@pytest.fixture
async def joiners() -> AsyncIterator[Any]:
    """``joiners(node, transport, xff=..., source=...)`` -> a Joiner, closed at the end."""
    made: list[Joiner] = []

    def _make(node: NodeProcess, transport: list[str], **kwargs: Any) -> Joiner:
        made.append(Joiner(node, transport, **kwargs))
        return made[-1]

    yield _make
    for joiner in made:
        await joiner.close_all()


async def send_until_refused(client: RoomClient, tries: int, label: str
                             ) -> tuple[int, dict | None]:
    """Send up to ``tries`` messages; (how many were acked ok, the first refusal)."""
    for i in range(tries):
        ack = await client.send(f"{label} {i}")
        if not ack.get("ok"):
            return i, ack
    return tries, None


async def emit_paced(client: RoomClient, event: str, payloads: list[Any]) -> None:
    """Emit every payload, with a round trip after each ten: a long-polling client sends
    whatever is queued in one POST, and Engine.IO refuses a POST of more than 16 packets.
    (The round trip is a blank message: refused as ``empty`` before any limit is spent.)"""
    for start in range(0, len(payloads), 10):
        for data in payloads[start:start + 10]:
            await client.emit(event, data)
        assert_failed_ack(await client.call("message", {"text": " "}), "empty")


def assert_rate_limited(ack: Any) -> None:
    assert_failed_ack(ack, "rate_limited")
    assert ack["retry_after"] > 0 and "try again in" in ack["message"], ack


async def post_room(base: str, *, xff: str | None = None, source: str | None = None
                    ) -> tuple[int, dict, Any]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0)) if source else None
    headers = {"X-Forwarded-For": xff} if xff else {}
    async with aiohttp.ClientSession(connector=connector) as s, s.post(
            f"{base}/api/rooms", json={"name": "flood"}, headers=headers) as r:
        return r.status, await r.json(), r.headers


def assert_429(status: int, body: dict, headers: Any) -> None:
    assert status == 429, body
    assert body["error"] == "rate_limited" and "try again in" in body["message"], body
    assert body["retry_after"] > 0
    assert int(headers["Retry-After"]) >= 1


# ---------------------------------------------------------------------------------------
# messages


async def test_ten_reconnects_cannot_exceed_the_message_limit(limited, joiners, transport):
    room = await acreate_room(limited)
    mallory = joiners(limited, transport, xff=fresh_address())
    acked, refusals = 0, []
    for reconnect in range(10):
        client = await mallory.join(room, "mallory")
        sent, refused = await send_until_refused(client, 6, f"try {reconnect}")
        acked += sent
        refusals.append(refused)
        await mallory.close(client)
    assert acked == LIMITS["rate_limit_messages"]
    assert all(r is not None for r in refusals)
    assert_rate_limited(refusals[-1])
    reader = await joiners(limited, transport, xff=fresh_address()).join(room, "reader")
    stored = await reader.call("history", {"limit": 100})
    assert len(stored["messages"]) == LIMITS["rate_limit_messages"], stored


async def test_rotating_display_names_hits_the_address_limit(limited, joiners, transport):
    room = await acreate_room(limited)
    address_limit = LIMITS["rate_limit_messages"] * LIMITS["rate_limit_address_multiple"]
    same_nat = joiners(limited, transport, xff=fresh_address())
    acked, last = 0, None
    for n in range(4):
        client = await same_nat.join(room, f"name{n}")
        sent, last = await send_until_refused(client, 6, f"name{n}")
        acked += sent
    assert acked == address_limit
    assert_rate_limited(last)
    assert "network address" in last["message"], last
    # someone at another address is not affected
    other = await joiners(limited, transport, xff=fresh_address()).join(room, "someone")
    await other.send_ok("still fine")


async def test_a_member_with_its_token_keeps_its_limits_across_reconnects(limited, joiners,
                                                                         transport):
    room = await acreate_room(limited)
    alice = joiners(limited, transport, xff=fresh_address())
    first = await alice.join(room, "alice")
    token = first.welcome["you"]["token"]
    await alice.close(first)
    client = await alice.join(room, "alice", token=token)
    sent, refused = await send_until_refused(client, 6, "with token")
    assert sent == LIMITS["rate_limit_messages"]
    assert_rate_limited(refused)
    await alice.close(client)
    # the member id, not the name, is whose limits these are
    renamed = await alice.join(room, "alice, renamed", token=token)
    assert_rate_limited(await renamed.send("after a reconnect under another name"))


async def test_nobody_without_the_token_spends_a_members_limits(limited, joiners, transport):
    room = await acreate_room(limited)
    alice = joiners(limited, transport, xff=fresh_address())
    first = await alice.join(room, "alice")
    token = first.welcome["you"]["token"]
    await alice.close(first)
    impostor = await joiners(limited, transport, xff=fresh_address()).join(room, "alice")
    sent, refused = await send_until_refused(impostor, 6, "as alice")
    assert sent == LIMITS["rate_limit_messages"] and refused is not None
    back = await alice.join(room, "alice", token=token)
    await back.send_ok("the real alice is not throttled by the impostor")


# ---------------------------------------------------------------------------------------
# typing and history


async def test_typing_flood_reaches_others_at_most_the_limit(limited, joiners, transport):
    room = await acreate_room(limited)
    alice = await joiners(limited, transport, xff=fresh_address()).join(room, "alice")
    bob = await joiners(limited, transport, xff=fresh_address()).join(room, "bob")
    metrics_url = f"{limited.internal_url}/internal/metrics"
    auth = {"Authorization": f"Bearer {SECRET}"}
    _s, before = await asyncio.to_thread(http_json, "GET", metrics_url, headers=auth)
    # a keystroke-per-event client: repeats are suppressed and spend nothing, so its stop
    # still gets through
    await emit_paced(alice, "typing", [{"typing": True}] * 50 + [{"typing": False}])
    # then a flood of toggles
    await emit_paced(alice, "typing", [{"typing": i % 2 == 0} for i in range(200)])
    await alice.send_ok("barrier")  # handled after every typing event before it
    await bob.next("message")
    seen = [t["typing"] for t in bob.pending("typing")]
    assert seen[:2] == [True, False], seen
    assert len(seen) == LIMITS["rate_limit_typing"], seen
    _s, after = await asyncio.to_thread(http_json, "GET", metrics_url, headers=auth)
    dropped = [m["rate_limits"]["refused"].get("typing.identity", 0) for m in (before, after)]
    assert dropped[1] - dropped[0] >= 99  # every other toggle, at least, was counted


async def test_history_flood_is_refused_across_reconnects(limited, joiners, transport):
    room = await acreate_room(limited)
    reader = joiners(limited, transport, xff=fresh_address())
    client = await reader.join(room, "scroller")
    acks = [await client.call("history", {"limit": 10}) for _ in range(8)]
    assert [a["ok"] for a in acks] == [True] * 5 + [False] * 3, acks
    assert_rate_limited(acks[-1])
    assert "history" in acks[-1]["message"]
    assert client.connected
    await reader.close(client)
    again = await reader.join(room, "scroller")
    assert_rate_limited(await again.call("history", {"limit": 10}))
    await again.send_ok("messages have a bucket of their own")


async def test_members_flood_is_refused_across_reconnects(limited, joiners, transport):
    room = await acreate_room(limited)
    reader = joiners(limited, transport, xff=fresh_address())
    client = await reader.join(room, "lister")
    acks = [await client.call("members", {"after": None, "limit": 10}) for _ in range(7)]
    assert [a["ok"] for a in acks] == [True] * 5 + [False] * 2, acks
    assert_rate_limited(acks[-1])
    assert "member list" in acks[-1]["message"]
    await reader.close(client)
    again = await reader.join(room, "lister")
    assert_rate_limited(await again.call("members", {"after": None, "limit": 10}))
    ok = await again.call("history", {"limit": 1})
    assert ok["ok"] is True, "history has a bucket of its own"


# ---------------------------------------------------------------------------------------
# joins and room creation


async def test_join_flood_is_refused_rate_limited(limited, joiners, transport):
    room = await acreate_room(limited)
    flooder = joiners(limited, transport, xff=fresh_address())
    per_member = LIMITS["rate_limit_joins"]
    for _ in range(per_member):
        await flooder.close(await flooder.join(room, "again"))
    with pytest.raises(Refused) as info:
        await flooder.join(room, "again")
    assert_refusal_shape(info.value, "rate_limited")
    assert info.value.data["data"]["retry_after"] > 0
    # fresh names from the same address: only up to the address's allowance
    address_left = per_member * LIMITS["rate_limit_address_multiple"] - per_member
    for n in range(address_left):
        await flooder.close(await flooder.join(room, f"new{n}"))
    with pytest.raises(Refused) as info:
        await flooder.join(room, "yet another name")
    assert_refusal_shape(info.value, "rate_limited")
    assert "network address" in info.value.data["message"]
    await joiners(limited, transport, xff=fresh_address()).join(room, "elsewhere")


async def test_room_creation_flood_gets_429_with_retry_after(limited):
    address = fresh_address()
    for _ in range(LIMITS["rate_limit_rooms"]):
        status, body, _h = await post_room(limited.base_url, xff=address)
        assert status == 201, body
    assert_429(*await post_room(limited.base_url, xff=address))
    status, body, _h = await post_room(limited.base_url, xff=fresh_address())
    assert status == 201, body


async def get_lookup(base: str, path: str, xff: str) -> tuple[int, dict, Any]:
    async with aiohttp.ClientSession() as s, s.get(
            base + path, headers={"X-Forwarded-For": xff}, allow_redirects=False) as r:
        body = await r.json() if r.content_type == "application/json" else {}
        return r.status, body, r.headers


async def test_lookups_and_redirects_of_gone_instances_share_one_limit_per_address(limited):
    """Each may cost a request to every node, so neither is free to repeat."""
    room = await acreate_room(limited)
    address = fresh_address()
    for n in range(LIMITS["rate_limit_lookups"]):
        path = f"/api/rooms/{room['id']}" if n % 2 else f"/i9/room/{room['id']}"
        status, _body, _h = await get_lookup(limited.base_url, path, address)
        assert status in (200, 308), (path, status)
    for path in (f"/api/rooms/{room['id']}", f"/i9/room/{room['id']}"):
        status, body, headers = await get_lookup(limited.base_url, path, address)
        assert_429(status, body, headers)
        assert "looking up rooms too often" in body["message"], body
    status, _body, _h = await get_lookup(limited.base_url, f"/api/rooms/{room['id']}",
                                         fresh_address())
    assert status == 200
    # the room's own page on its own instance asks nobody, so it spends nothing
    status, _body, _h = await get_lookup(limited.base_url, room["path"], address)
    assert status == 200


async def test_internal_room_creation_is_not_limited(limited):
    for _ in range(LIMITS["rate_limit_rooms"] + 2):
        await acreate_room(limited)


# ---------------------------------------------------------------------------------------
# whose X-Forwarded-For is believed


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(proxied, joiners, transport):
    room = await acreate_room(proxied)
    source = fresh_source()  # not a trusted proxy: its X-Forwarded-For proves nothing
    allowance = PROXIED_LIMITS["rate_limit_joins"] * PROXIED_LIMITS["rate_limit_address_multiple"]
    for n in range(allowance):
        forger = joiners(proxied, transport, xff=fresh_address(), source=source)
        await forger.close(await forger.join(room, f"forger{n}"))
    forger = joiners(proxied, transport, xff=fresh_address(), source=source)
    with pytest.raises(Refused) as info:
        await forger.join(room, "forger-last")
    assert_refusal_shape(info.value, "rate_limited")


async def test_forwarded_for_from_a_trusted_proxy_is_believed(proxied, joiners, transport):
    room = await acreate_room(proxied)
    client_a = joiners(proxied, transport, xff=fresh_address(), source=PROXY)
    allowance = PROXIED_LIMITS["rate_limit_joins"] * PROXIED_LIMITS["rate_limit_address_multiple"]
    for n in range(allowance):
        await client_a.close(await client_a.join(room, f"a{n}"))
    with pytest.raises(Refused) as info:
        await client_a.join(room, "a-last")
    assert_refusal_shape(info.value, "rate_limited")
    client_b = joiners(proxied, transport, xff=fresh_address(), source=PROXY)
    await client_b.join(room, "b")  # another client behind the same proxy: its own bucket


async def test_room_creation_believes_only_trusted_forwarded_for(proxied):
    source = fresh_source()
    statuses = [(await post_room(proxied.base_url, xff=fresh_address(), source=source))[0]
                for _ in range(PROXIED_LIMITS["rate_limit_rooms"] + 1)]
    assert statuses == [201, 201, 429], statuses
    behind_proxy = [(await post_room(proxied.base_url, xff=a, source=PROXY))[0]
                    for a in (fresh_address(), fresh_address(), fresh_address())]
    assert behind_proxy == [201, 201, 201]


async def test_through_the_local_router_each_client_has_its_own_address(limited):
    router = Router(build_rules([limited.number]), {limited.number: ("127.0.0.1", limited.port)})
    runner = await serve(router, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{bound_port(runner)}"
    try:
        near, far = fresh_source(), fresh_source()
        for _ in range(LIMITS["rate_limit_rooms"]):
            status, body, _h = await post_room(base, source=near)
            assert status == 201, body
        assert_429(*await post_room(base, source=near))
        status, body, _h = await post_room(base, source=far)
        assert status == 201, body
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------------------
# the pieces on their own: the bucket table and the address rules


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(**settings: Any) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    return RateLimiter(NodeSettings(**{"rate_limit_window": 10.0, **settings}), clock), clock


def test_a_bucket_refills_at_limit_per_window():
    lim, clock = limiter(rate_limit_messages=4, rate_limit_address_multiple=10)
    assert all(lim.take("messages", identity="a", address="x") is None for _ in range(4))
    refused = lim.take("messages", identity="a", address="x")
    assert refused.scope == IDENTITY and refused.limit == 4
    assert refused.retry_after == pytest.approx(2.5)  # one token per 10 s / 4
    clock.now += 2.5
    assert lim.take("messages", identity="a", address="x") is None
    assert lim.take("messages", identity="a", address="x") is not None


def test_both_buckets_must_allow_and_a_refusal_spends_nothing():
    lim, _clock = limiter(rate_limit_messages=2, rate_limit_address_multiple=2)
    for name in ("a", "a", "b", "b"):
        assert lim.take("messages", identity=name, address="x") is None
    refused = lim.take("messages", identity="c", address="x")
    assert refused.scope == ADDRESS and refused.limit == 4
    # c's own bucket was not spent by the refusal: elsewhere it still has its 2
    assert lim.take("messages", identity="c", address="y") is None
    assert lim.take("messages", identity="c", address="y") is None


def test_a_full_table_refuses_new_keys_and_idle_buckets_free_it():
    lim, clock = limiter(rate_limit_max_keys=4)
    assert lim.take("messages", identity="a", address="x") is None
    assert lim.take("messages", identity="b", address="y") is None
    refused = lim.take("messages", identity="c", address="z")
    assert refused.scope == TABLE and refused.retry_after == pytest.approx(10.0)
    assert lim.take("messages", identity="a", address="x") is None  # known keys go on
    clock.now += 5
    assert lim.take("messages", identity="a", address="x") is None
    clock.now += 5  # b/y idle a whole window: refilled, dropped
    assert lim.take("messages", identity="c", address="z") is None
    assert lim.stats()["keys"] == 4 and lim.stats()["table_full"] == 1


def test_many_identities_do_not_grow_the_table_past_its_cap():
    lim, clock = limiter(rate_limit_max_keys=1000, rate_limit_joins=1)
    allowed = 0
    for i in range(20_000):
        clock.now += 0.0001
        allowed += lim.take("joins", identity=f"id{i}", address=f"10.0.{i % 256}.1") is None
    assert lim.stats()["keys"] <= 1000
    assert allowed <= 1000


def test_expired_buckets_are_dropped_a_batch_at_a_time():
    lim, clock = limiter(rate_limit_max_keys=10_000)
    for i in range(3000):
        assert lim.take("typing", identity=f"id{i}", address=f"a{i}") is None
    clock.now += 10.0  # everything idle a whole window
    sizes = []
    for _ in range(16):
        lim.take("typing", identity="late", address="y")
        sizes.append(lim.stats()["keys"])
    assert sizes[0] >= 6000 - 512, sizes  # one sweep never drops the whole table at once
    assert sizes[-1] == 2, sizes  # but a few events later only the live buckets are left


ADDRESSES = [
    # (trusted, peer, X-Forwarded-For, client key)
    (["127.0.0.0/8"], "203.0.113.5", "198.51.100.1", "203.0.113.5"),  # untrusted peer
    (["127.0.0.0/8"], "127.0.0.1", "198.51.100.1", "198.51.100.1"),
    (["127.0.0.0/8"], "127.0.0.1", None, "127.0.0.1"),
    (["10.0.0.0/16"], "10.0.1.2", "6.6.6.6, 198.51.100.7, 10.0.3.4", "198.51.100.7"),
    (["10.0.0.0/16"], "10.0.1.2", "10.0.9.9", "10.0.9.9"),  # only proxies: the left-most
    (["10.0.0.0/16"], "10.0.1.2", "bogus, 10.0.3.4", "10.0.3.4"),
    (["::1/128"], "::1", "2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    (["::1/128"], "::ffff:203.0.113.9", "198.51.100.1", "203.0.113.9"),
    (["127.0.0.0/8"], "127.0.0.1", "[2001:db8::1]:443", "2001:db8::/64"),
    (["127.0.0.0/8"], "127.0.0.1", "198.51.100.3:5555", "198.51.100.3"),
    (["127.0.0.0/8"], None, "198.51.100.1", "unknown"),
]


@pytest.mark.parametrize(("trusted", "peer", "xff", "key"), ADDRESSES)
def test_client_address_is_the_right_most_untrusted_hop(trusted, peer, xff, key):
    assert ClientAddresses(trusted).resolve(peer, xff) == key


def test_rate_limit_keys_are_validated_by_name():
    base = {"cluster": {"secret": "s"}, "instances": [{"number": 1}]}
    for key, value in (("rate_limit_typing", 0), ("rate_limit_joins", -1),
                       ("rate_limit_members", 0),
                       ("rate_limit_rooms", 0), ("rate_limit_lookups", 0),
                       ("rate_limit_address_multiple", 0),
                       ("rate_limit_max_keys", 1), ("trusted_proxies", ["10.0.0.1/16"]),
                       ("trusted_proxies", ["router"]), ("trusted_proxies", "127.0.0.1")):
        with pytest.raises(ConfigError) as info:
            config.parse({**base, "node": {key: value}}, env={})
        assert info.value.key.startswith(f"node.{key}"), (key, info.value.key)
    cfg = config.parse({**base, "node": {"trusted_proxies": ["10.0.0.0/16", "::1"]}}, env={})
    assert cfg.node.trusted_proxies == ("10.0.0.0/16", "::1")
