"""Every refusal code of SPEC section 4, provoked for real, and hostile input that must not
hurt anyone else: the node and the other clients carry on."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import pytest
from aiohttp import WSCloseCode

from shardchat import urls
from shardchat.node.invites import Invites
from tests.conftest import (
    ENGINES,
    acreate_room,
    assert_failed_ack,
    assert_refusal_shape,
    create_room,
    refusal,
)
from tests.support import SECRET, async_wait_until, running_nodes

pytestmark = pytest.mark.timeout(90)
ENGINES = ENGINES  # every test here runs on the fast and the stock engine


# ---------------------------------------------------------------------------------------
# connect refusals


async def test_unknown_room_is_refused_not_found(node1, transport):
    refused = await refusal(node1, "no-such-room-here", transport=transport)
    assert_refusal_shape(refused, "not_found")


async def test_namespace_of_another_instance_is_refused_wrong_instance(node1, transport):
    room = await acreate_room(node1)
    # the right socket.io path for this node, but a namespace under instance 2's prefix
    refused = await refusal(node1, room, namespace=urls.room_namespace(2, room["id"]),
                            transport=transport)
    assert_refusal_shape(refused, "wrong_instance")


@pytest.mark.parametrize("invite", [None, "", "not-a-real-invite", "x" * 500],
                         ids=["missing", "empty", "wrong", "huge"])
async def test_private_room_without_valid_invite_is_forbidden(node1, transport, invite):
    room = await acreate_room(node1, "Private", private=True)
    refused = await refusal(node1, room, invite=invite, transport=transport)
    assert_refusal_shape(refused, "forbidden")


async def test_private_room_with_invite_is_joined(node1, connect, transport):
    room = await acreate_room(node1, "Private", private=True)
    assert isinstance(room["invite"], str) and room["invite"]
    alice = await connect(node1, room, transport=transport)
    assert alice.welcome["room"]["private"] is True


async def test_public_room_ignores_an_invite(node1, connect, transport):
    room = await acreate_room(node1, "Public")
    alice = await connect(node1, room, invite="whatever", transport=transport)
    assert alice.welcome["room"]["id"] == room["id"]


async def test_expired_invite_is_forbidden(node1, connect, transport):
    """An invite signed with the cluster's real secret but past its expiry is refused,
    saying it expired; the same secret's unexpired invite opens the room (so the refusal is
    the expiry's, not the signature's). Issued already expired: nothing waits for time."""
    room = await acreate_room(node1, "Short-lived", private=True)
    invites = Invites(SECRET, ttl_seconds=60)
    expired = invites.issue(room["id"], now=time.time() - 120)  # expired a minute ago
    refused = await refusal(node1, room, invite=expired, transport=transport)
    assert_refusal_shape(refused, "forbidden")
    assert "expired" in refused.data["message"], refused.data
    fresh = await connect(node1, room, invite=invites.issue(room["id"]), transport=transport)
    assert fresh.welcome["room"]["id"] == room["id"]


BAD_AUTH = {
    "no_auth": None,
    "name_missing": {},
    "name_blank": {"name": "   "},
    "name_empty": {"name": ""},
    "name_41_chars": {"name": "n" * 41},
    "name_number": {"name": 42},
    "name_list": {"name": ["alice"]},
    "auth_string": "alice",
    "auth_list": ["alice"],
    "last_seq_string": {"name": "alice", "last_seq": "5"},
    "last_seq_float": {"name": "alice", "last_seq": 1.5},
    "last_seq_bool": {"name": "alice", "last_seq": True},
}


@pytest.mark.parametrize("auth", list(BAD_AUTH.values()), ids=list(BAD_AUTH))
async def test_bad_auth_is_refused_bad_request(node1, transport, auth):
    room = await acreate_room(node1)
    refused = await refusal(node1, room, auth=auth, transport=transport)
    assert_refusal_shape(refused, "bad_request")


async def test_name_of_40_characters_is_accepted(node1, connect, transport):
    room = await acreate_room(node1)
    name = "ü" * 39 + "🚀"
    alice = await connect(node1, room, name=name, transport=transport)
    assert alice.welcome["you"]["name"] == name


async def test_full_room_refuses_until_someone_leaves(tmp_path, connect, transport, engine):
    with running_nodes(tmp_path, 1, engine=engine, node={"room_capacity": 2}) as (node,):
        room = await acreate_room(node)
        alice = await connect(node, room, name="alice", transport=transport)
        bob = await connect(node, room, name="bob", transport=transport)
        refused = await refusal(node, room, name="carol", transport=transport)
        assert_refusal_shape(refused, "full")

        other = await acreate_room(node, "other room")
        dave = await connect(node, other, name="dave", transport=transport)
        assert dave.welcome["members"] == [dave.public]

        assert (await alice.next("presence"))["event"] == "join"  # bob's
        await bob.close()
        leave = await alice.next("presence")
        assert leave["event"] == "leave" and leave["count"] == 1
        carol = await connect(node, room, name="carol", transport=transport)
        assert len(carol.welcome["members"]) == 2
        for c in (alice, carol, dave):
            await c.close()


async def sigterm_and_wait_draining(node) -> None:
    """SIGTERM the node and wait until its health check reports draining."""
    node.proc.send_signal(signal.SIGTERM)

    async def draining():
        status, body = await asyncio.to_thread(node.healthz)
        return status == 503 and body

    body = await async_wait_until(draining, 10, what="healthz to say 503")
    assert body == {"instance": 1, "status": "draining"}


async def test_draining_node_refuses_new_connections(tmp_path, transport, engine):
    with running_nodes(tmp_path, 1, engine=engine, node={"drain_grace_seconds": 30}) as (node,):
        room = await acreate_room(node)
        await sigterm_and_wait_draining(node)
        refused = await refusal(node, room, transport=transport)
        assert_refusal_shape(refused, "draining")
        assert node.proc.poll() is None, "the node must keep draining for the grace period"
        node.kill()


async def test_draining_node_refuses_joins_on_an_open_socket(tmp_path, engine):
    with running_nodes(tmp_path, 1, engine=engine, node={"drain_grace_seconds": 30}) as (node,):
        room = await acreate_room(node)
        ns = room["namespace"]
        async with aiohttp.ClientSession() as session:
            sock = await raw_socket(session, node)  # Engine.IO session opened before SIGTERM
            await sigterm_and_wait_draining(node)
            answer = await sock.join(ns, {"name": "late"})
            assert answer and answer.startswith(f"44{ns},"), answer
            data = json.loads(answer[len(f"44{ns},"):])
            assert data["data"]["code"] == "draining" and data["message"], data
            await sock.ws.close()
        node.kill()


# ---------------------------------------------------------------------------------------
# failed requests: the ack says why, the connection stays up


async def assert_still_works(client, text: str = "still here") -> None:
    """After a failed request the same connection can still send and receive."""
    assert client.connected
    ack = await client.send_ok(text)
    msg = await client.next("message")
    assert msg["seq"] == ack["seq"] and msg["text"] == text


async def test_empty_message_is_refused(node1, connect, transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, transport=transport)
    assert_failed_ack(await alice.send(""), "empty")
    await assert_still_works(alice)
    assert (await alice.call("history", {"before": 10, "limit": 10}))["messages"][0]["seq"] == 1


async def test_message_over_max_length_is_refused_too_long(node1, connect, transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, transport=transport)
    assert_failed_ack(await alice.send("x" * 4001), "too_long")
    await assert_still_works(alice)


async def test_rate_limited_sender_is_told_and_stays_connected(tmp_path, connect, transport,
                                                              engine):
    with running_nodes(tmp_path, 1, engine=engine, node={"rate_limit_messages": 3,
                                                         "rate_limit_window": 60}) as (node,):
        room = await acreate_room(node)
        alice = await connect(node, room, transport=transport)
        for i in range(3):
            await alice.send_ok(f"m{i}")
        assert_failed_ack(await alice.send("one too many"), "rate_limited")
        assert alice.connected
        history = await alice.call("history", {"before": 100, "limit": 100})
        assert history["ok"] is True
        assert [m["text"] for m in history["messages"]] == ["m0", "m1", "m2"]
        await alice.close()
        # the limit belongs to the member, not the connection: coming back does not refill it
        again = await connect(node, room, transport=transport)
        assert_failed_ack(await again.send("after a reconnect"), "rate_limited")


BAD_MESSAGES = {
    "payload_string": "hello",
    "payload_list": ["hello"],
    "payload_number": 5,
    "payload_null": None,
    "text_missing": {},
    "text_number": {"text": 5},
    "text_null": {"text": None},
    "text_object": {"text": {"a": 1}},
    "client_id_65_chars": {"text": "hi", "client_id": "c" * 65},
    "client_id_number": {"text": "hi", "client_id": 7},
    "client_id_object": {"text": "hi", "client_id": {"id": 1}},
}


@pytest.mark.parametrize("payload", list(BAD_MESSAGES.values()), ids=list(BAD_MESSAGES))
async def test_malformed_message_is_refused_bad_request(node1, connect, transport, payload):
    room = await acreate_room(node1)
    alice = await connect(node1, room, transport=transport)
    assert_failed_ack(await alice.call("message", payload), "bad_request")
    await assert_still_works(alice)


async def test_client_id_of_64_chars_is_accepted(node1, connect, transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, transport=transport)
    ack = await alice.send_ok("hi", client_id="c" * 64)
    assert (await alice.next("message"))["client_id"] == "c" * 64
    assert ack["seq"] == 1


BAD_HISTORY = {
    "limit_0": {"before": 5, "limit": 0},
    "limit_101": {"before": 5, "limit": 101},
    "limit_negative": {"before": 5, "limit": -1},
    "limit_string": {"before": 5, "limit": "10"},
    "before_string": {"before": "5", "limit": 10},
    "before_float": {"before": 5.5, "limit": 10},
    "payload_string": "history",
    "payload_list": [5, 10],
}


@pytest.mark.parametrize("payload", list(BAD_HISTORY.values()), ids=list(BAD_HISTORY))
async def test_malformed_history_request_is_refused_bad_request(node1, connect, transport,
                                                                payload):
    room = await acreate_room(node1)
    alice = await connect(node1, room, transport=transport)
    assert_failed_ack(await alice.call("history", payload), "bad_request")
    await assert_still_works(alice)


async def test_history_limit_100_is_accepted(node1, connect, transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, transport=transport)
    await alice.send_ok("only")
    page = await alice.call("history", {"before": 2, "limit": 100})
    assert page["ok"] is True and [m["text"] for m in page["messages"]] == ["only"]


async def test_bad_typing_and_unknown_events_leave_the_connection_up(node1, connect,
                                                                     transport):
    room = await acreate_room(node1)
    alice = await connect(node1, room, name="alice", transport=transport)
    bob = await connect(node1, room, name="bob", transport=transport)
    for payload in ("yes", None, [True], {"typing": "yes"}, {}):
        await alice.emit("typing", payload)
    await alice.emit("no_such_event", {"x": 1})
    await alice.emit("message", {"text": "no ack requested"})
    assert (await bob.next("message"))["text"] == "no ack requested"
    assert (await alice.next("message"))["text"] == "no ack requested"
    await assert_still_works(alice)
    assert bob.connected


# ---------------------------------------------------------------------------------------
# hostile packets on a raw Engine.IO websocket


NO_ANSWER = "<no answer>"


class RawSocket:
    """An Engine.IO v4 websocket spoken by hand, to send what no real client would."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        # the code of the close frame the node sent, if one arrived (``ws.close_code`` turns
        # into 1006 when the reply to it cannot be written, as the node has hung up)
        self.close_frame: int | None = None

    async def read(self, timeout: float = 5.0) -> str | None:
        """The next text frame (answering pings), None once the socket is closed, or
        NO_ANSWER when nothing arrives within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(100):
            try:
                msg = await asyncio.wait_for(self.ws.receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                return NO_ANSWER
            if msg.type == aiohttp.WSMsgType.CLOSE:
                self.close_frame = msg.data
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                return None
            if msg.type == aiohttp.WSMsgType.TEXT and msg.data == "2":
                await self.ws.send_str("3")
                continue
            if msg.type == aiohttp.WSMsgType.TEXT:
                return msg.data
        raise AssertionError("too many frames")

    async def until(self, prefixes: tuple[str, ...], timeout: float = 5.0) -> str | None:
        """Read until a frame starting with one of ``prefixes``; None/NO_ANSWER as read."""
        for _ in range(20):
            frame = await self.read(timeout)
            if frame is None or frame == NO_ANSWER or frame.startswith(prefixes):
                return frame
        raise AssertionError(f"no frame starting with {prefixes}")

    async def join(self, namespace: str, auth: dict, timeout: float = 5.0) -> str | None:
        """Send a namespace CONNECT and return the node's answer (None: socket closed)."""
        try:
            await self.ws.send_str(f"40{namespace},{json.dumps(auth)}")
        except ConnectionResetError:  # the node closed it before the CONNECT went out
            return None
        return await self.until((f"40{namespace},", f"44{namespace},"), timeout)


async def raw_socket(session: aiohttp.ClientSession, node) -> RawSocket:
    url = (f"ws://127.0.0.1:{node.port}{urls.socketio_path(node.number)}/"
           "?EIO=4&transport=websocket")
    ws = await session.ws_connect(url, autoping=True, max_msg_size=0)
    sock = RawSocket(ws)
    opening = await sock.read()
    assert opening and opening.startswith("0{"), opening
    return sock


DROPPED, JOINED = "dropped", "joined"
REFUSED_BAD_REQUEST = "refused: bad_request"


def garbage(ns: str) -> dict[str, list[tuple[str | bytes, str]]]:
    """Frames no well-behaved client sends, grouped by what they exercise, each with what
    the node does with the socket: a text frame that is not an Engine.IO packet at all (no
    packet-type digit) ends the connection (DROPPED); anything that is one, however
    malformed, is ignored, so the namespace CONNECT sent next on that socket is accepted
    (JOINED); a CONNECT whose auth is not JSON is itself answered with a bad_request
    refusal."""
    return {
        "not_engineio": [("hello", DROPPED), ("", DROPPED), ("9", JOINED), ("{}", DROPPED)],
        "invalid_json": [("4" + "2" + "[\"message\",{", JOINED),
                         (f"40{ns},{{not json", REFUSED_BAD_REQUEST), ("42[oops", JOINED)],
        "wrong_shapes": [(f, JOINED) for f in (
            f"42{ns},{{}}", f"42{ns},\"message\"", f"42{ns},[]", f"42{ns},[5]",
            f"42{ns},[\"message\"]", f"42{ns},1[\"message\",{{\"text\":[]}}]",
            f"43{ns},99[]", f"41{ns},", "4x", "44/,{}")],
        "events_before_connect": [(f, JOINED) for f in (
            f"42{ns},[\"message\",{{\"text\":\"sneaky\"}}]",
            f"42{ns},7[\"history\",{{\"before\":5,\"limit\":5}}]",
            "42[\"message\",{\"text\":\"sneaky\"}]")],
        "binary": [(f, JOINED) for f in (
            b"\x00\xff\xfe garbage", b"",
            f"451-{ns},[\"message\",{{\"_placeholder\":true,\"num\":0}}]", b"\x04\x05")],
        "unknown_namespace": [(f, JOINED) for f in (
            "40/not/a/room,{}", "40/i1/room/../../etc,{}", "40/i1/room/" + "x" * 5000 + ",{}")],
    }


def outcome(answer: str | None, ns: str) -> str:
    """What a join's answer says happened to the socket (the answer itself when odd)."""
    if answer is None:
        return DROPPED
    if answer.startswith(f"40{ns},"):
        return JOINED
    if answer.startswith(f"44{ns},"):
        return f"refused: {json.loads(answer[len(ns) + 3:])['data']['code']}"
    return answer


@pytest.mark.parametrize("kind", list(garbage("/x")))
async def test_garbage_packets_never_hurt_the_node_or_other_clients(node1, connect, kind):
    room = await acreate_room(node1)
    ns = room["namespace"]
    bystander = await connect(node1, room, name="bystander")
    got, expected = [], []
    async with aiohttp.ClientSession() as session:
        for frame, fate in garbage(ns)[kind]:
            sock = await raw_socket(session, node1)
            if isinstance(frame, bytes):
                await sock.ws.send_bytes(frame)
            else:
                await sock.ws.send_str(frame)
            got.append((frame[:40], outcome(await sock.join(ns, {"name": "raw"}), ns)))
            expected.append((frame[:40], fate))
            await sock.ws.close()
    assert got == expected
    await assert_others_unharmed(node1, room, bystander, connect)


async def test_garbage_over_long_polling_never_hurts_the_node(node1, connect):
    room = await acreate_room(node1)
    ns = room["namespace"]
    bystander = await connect(node1, room, name="bystander", transport=["polling"])
    endpoint = f"{node1.base_url}{urls.socketio_path(node1.number)}/?EIO=4&transport=polling"
    bodies = [b"garbage", b"4{", b"42[\"message\"", b"\xff\xfe\x00", b"",
              "\x1e".join(["40" + ns + ',{"name":"p"}', "42" + ns + ",[", "9"]).encode()]
    statuses = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(endpoint) as resp:
            opening = await resp.text()
        assert opening.startswith("0{"), opening
        url = f"{endpoint}&sid={json.loads(opening[1:])['sid']}"
        for body in bodies:
            async with session.post(url, data=body) as resp:
                statuses.append(resp.status)
        for url in (f"{endpoint}&sid=not-a-session", f"{endpoint[:-7]}carrier-pigeon"):
            async with session.post(url, data=b"40") as resp:
                statuses.append(resp.status)
    assert all(status < 500 for status in statuses), statuses
    await assert_others_unharmed(node1, room, bystander, connect)


async def test_oversize_long_polling_post_is_answered_promptly(node1):
    """A POST over node.max_packet_bytes gets a 4xx at once, even when the client has no
    long-poll GET pending (a hung request would hold a connection and a handler)."""
    endpoint = f"{node1.base_url}{urls.socketio_path(node1.number)}/?EIO=4&transport=polling"
    body = b'42/i1/room/x,["message",{"text":"' + b"x" * (100 * 1024) + b'"}]'
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.get(endpoint) as resp:
            sid = json.loads((await resp.text())[1:])["sid"]
        try:
            async with asyncio.timeout(5):
                async with session.post(f"{endpoint}&sid={sid}", data=body) as resp:
                    status = resp.status
        except TimeoutError:
            raise AssertionError("the node did not answer an over-size polling POST within "
                                 "5 s") from None
    assert 400 <= status < 500, status
    assert node1.proc.poll() is None


async def test_packet_over_max_size_is_not_processed(node1, connect):
    room = await acreate_room(node1)
    ns = room["namespace"]
    bystander = await connect(node1, room, name="bystander")
    async with aiohttp.ClientSession() as session:
        sock = await raw_socket(session, node1)
        assert (await sock.join(ns, {"name": "big"})).startswith(f"40{ns},")
        huge = json.dumps(["message", {"text": "huge", "pad": "x" * (100 * 1024)}])
        await sock.ws.send_str(f"42{ns},1{huge}")
        # the node closes that websocket as "message too big" without answering anything
        answer = await sock.until((f"43{ns},",), timeout=5)
        assert answer is None, f"an over-size packet was answered: {answer[:80]!r}"
        assert sock.close_frame == WSCloseCode.MESSAGE_TOO_BIG, (sock.close_frame,
                                                                 sock.ws.exception())
    await assert_others_unharmed(node1, room, bystander, connect)


async def test_raw_event_to_a_room_not_joined_is_not_delivered(node1, connect):
    room_a = await acreate_room(node1, "A")
    room_b = await acreate_room(node1, "B")
    bob = await connect(node1, room_b, name="bob")
    ns_a, ns_b = room_a["namespace"], room_b["namespace"]
    async with aiohttp.ClientSession() as session:
        sock = await raw_socket(session, node1)
        assert (await sock.join(ns_a, {"name": "mallory"})).startswith(f"40{ns_a},")
        await sock.ws.send_str(f"42{ns_b},[\"message\",{{\"text\":\"sneaky\"}}]")
        await sock.ws.send_str(f"42{ns_a},5[\"message\",{{\"text\":\"in A\"}}]")
        answer = await sock.until((f"43{ns_a},5",))
        assert answer and answer.startswith(f"43{ns_a},5"), answer
        await sock.ws.close()
    ack = await bob.send_ok("mine")
    assert ack["seq"] == 1
    assert [m["text"] for m in [await bob.next("message"), *bob.pending("message")]] == ["mine"]


async def assert_others_unharmed(node, room, bystander, connect,
                                 history: tuple[str, ...] = ()) -> None:
    """The node is alive, the bystander still connected, and a new client still works;
    ``history``: the texts legitimately sent in the room before (nothing hostile got in)."""
    assert node.proc.poll() is None, "the node process died:\n" + node.log()
    status, _ = await asyncio.to_thread(node.healthz)
    assert status == 200
    newcomer = await connect(node, room, name="newcomer")
    ack = await newcomer.send_ok("still fine")
    msg = await bystander.next("message")
    assert msg["text"] == "still fine" and msg["seq"] == ack["seq"]
    assert all(m["text"] != "sneaky" for m in bystander.pending("message"))
    assert [m["text"] for m in newcomer.welcome["history"]] == list(history)
    assert bystander.connected


def test_refusal_helpers_agree_with_room_json(node1):
    """The room JSON the tests build on carries the namespace and path the node serves."""
    room = create_room(node1, "shape check")
    assert room["namespace"] == urls.room_namespace(node1.number, room["id"])
    assert room["socketio_path"] == urls.socketio_path(node1.number)
