"""The official JavaScript socket.io-client, run under Node against a real node: the client
every browser uses must connect with the /i<N>/socket.io path, send, receive, get acks and
refusals, over both transports, and talk to a Python client in the same room."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from shardchat import urls
from tests import crowd
from tests.conftest import acreate_room
from tests.support import ROOT, JsClient

pytestmark = [pytest.mark.node_js, pytest.mark.timeout(60)]

SCRIPT = Path(__file__).parent / "js" / "client_roundtrip.mjs"
TOKEN_SCRIPT = Path(__file__).parent / "js" / "reconnect_with_token.mjs"
WALK_SCRIPT = Path(__file__).parent / "js" / "members_walk.mjs"
CLIENT_PACKAGE = ROOT / "node_modules" / "socket.io-client" / "package.json"

if shutil.which("node") is None or not CLIENT_PACKAGE.exists():
    pytest.skip("needs node and node_modules/socket.io-client (npm ci)",
                allow_module_level=True)


async def start_js(node, room: dict, *, name: str = "js", transport: str = "websocket",
                   auth: dict | None = None, namespace: str | None = None,
                   emits: list[dict] | None = None, wait_for_text: str | None = None,
                   script: Path = SCRIPT, **extra: Any) -> JsClient:
    if auth is None:
        auth = {"name": name}
        if room.get("invite"):
            auth["invite"] = room["invite"]
    spec = {"url": node.base_url, "namespace": namespace or room["namespace"],
            "path": room["socketio_path"], "transports": [transport], "auth": auth,
            "emits": emits or [], "wait_for_text": wait_for_text, "timeout_ms": 15000,
            **extra}
    proc = await asyncio.create_subprocess_exec(
        "node", str(script), json.dumps(spec), cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return JsClient(proc)


@pytest.fixture(params=["websocket", "polling"])
def js_transport(request) -> str:
    return request.param


def message(text: str, client_id: str | None = None) -> dict:
    data: dict[str, Any] = {"text": text}
    if client_id is not None:
        data["client_id"] = client_id
    return {"event": "message", "data": data}


async def test_js_client_connects_sends_and_gets_ack_and_broadcast(node1, js_transport):
    room = await acreate_room(node1, "JS room")
    assert room["socketio_path"] == urls.socketio_path(1)
    js = await start_js(node1, room, transport=js_transport,
                        emits=[message("hello from js", "js-1"), message("second")],
                        wait_for_text="second")
    welcome = await js.next("welcome")
    assert welcome["transport"] == js_transport
    assert welcome["data"]["room"] == {"id": room["id"], "name": "JS room", "private": False}
    assert welcome["data"]["you"]["name"] == "js"
    await js.next("done")
    await js.stop()

    acks = [e["data"] for e in js.all("ack")]
    assert [a["ok"] for a in acks] == [True, True]
    assert [a["seq"] for a in acks] == [1, 2]
    msgs = [e["data"] for e in js.all("message")]
    assert [(m["seq"], m["text"], m["client_id"]) for m in msgs] == [
        (1, "hello from js", "js-1"), (2, "second", None)]
    you = welcome["data"]["you"]
    assert msgs[0]["from"] == {"sid": you["sid"], "name": you["name"], "member": you["member"]}
    assert msgs[0]["ts"] == acks[0]["ts"]


async def test_js_and_python_clients_talk_in_one_room(node1, connect, js_transport):
    room = await acreate_room(node1, "Mixed", private=True)
    py = await connect(node1, room, name="py", transport=[js_transport])
    js = await start_js(node1, room, transport=js_transport, emits=[message("from js")],
                        wait_for_text="from py")
    joined = await py.next("presence")
    assert joined["event"] == "join" and joined["member"]["name"] == "js"
    from_js = await py.next("message")
    assert from_js["text"] == "from js" and from_js["from"]["name"] == "js"
    await py.send_ok("from py")
    await js.next("done")
    texts = [e["data"]["text"] for e in js.all("message")]
    assert texts == ["from js", "from py"]
    left = await py.next("presence")  # the script closes its socket after "done"
    assert left["event"] == "leave" and left["member"]["name"] == "js"
    await js.stop()


@pytest.mark.parametrize("case", ["not_found", "forbidden", "bad_request", "wrong_instance"])
async def test_js_client_sees_refusal_codes(node1, js_transport, case):
    private = await acreate_room(node1, "Locked", private=True)
    kwargs: dict[str, Any] = {"auth": {"name": "js"}}
    if case == "not_found":
        kwargs["namespace"] = urls.room_namespace(1, "no-such-room")
    elif case == "bad_request":
        kwargs["auth"] = {"name": "n" * 41, "invite": private["invite"]}
    elif case == "wrong_instance":
        kwargs["namespace"] = urls.room_namespace(2, private["id"])
    js = await start_js(node1, private, transport=js_transport, **kwargs)
    refused = await js.next("connect_error")
    assert refused["data"] == {"code": case}, refused
    assert isinstance(refused["message"], str) and refused["message"]
    await js.stop()
    assert js.all("welcome") == []


async def test_js_client_gets_failed_acks_and_stays_connected(node1, js_transport):
    room = await acreate_room(node1)
    js = await start_js(node1, room, transport=js_transport,
                        emits=[message(""), message("x" * 4001), {"event": "message",
                                                                  "data": "not an object"},
                               {"event": "history", "data": {"before": 1, "limit": 0}},
                               message("fine")],
                        wait_for_text="fine")
    await js.next("done")
    await js.stop()
    acks = [e["data"] for e in js.all("ack")]
    assert [a.get("error") for a in acks[:4]] == ["empty", "too_long", "bad_request",
                                                  "bad_request"]
    assert all(a["ok"] is False and a["message"] for a in acks[:4])
    assert acks[4]["ok"] is True and acks[4]["seq"] == 1


async def test_js_client_passes_its_member_token_back_and_its_retry_is_stored_once(
        node1, connect, js_transport):
    room = await acreate_room(node1, "Reconnects", private=True)
    py = await connect(node1, room, name="py", transport=[js_transport])
    retry = {"text": "once only", "client_id": "js-retry-1"}
    js = await start_js(node1, room, transport=js_transport, script=TOKEN_SCRIPT,
                        retry=retry)
    await js.next("done")
    await js.stop()

    first, second = (e["data"] for e in js.all("welcome"))
    assert first["you"]["member"] == second["you"]["member"]
    auths = [e["data"] for e in js.all("auth")]
    assert "token" not in auths[0]
    assert auths[-1]["token"] == first["you"]["token"], "the reconnect did not pass it back"
    acks = [e["data"] for e in js.all("ack")]
    assert [a["ok"] for a in acks] == [True, True]
    assert acks[0]["seq"] == acks[1]["seq"] == 1, acks

    got = await py.next("message")
    assert got["text"] == "once only" and got["from"]["member"] == first["you"]["member"]
    await py.send_ok("barrier")
    assert [m["text"] for m in [await py.next("message")]] == ["barrier"]
    page = await py.call("history", {"limit": 10})
    assert [m["text"] for m in page["messages"]] == ["once only", "barrier"]


async def test_js_client_walks_the_member_list_in_join_order(node1, js_transport):
    room = await acreate_room(node1, "Walked")
    early = await crowd.join_in_order(node1, room, 11)
    try:
        js = await start_js(node1, room, name="walker", transport=js_transport,
                            script=WALK_SCRIPT, limit=4)
        welcome = (await js.next("welcome"))["data"]
        done = await js.next("done")
        await js.stop()
    finally:
        await crowd.leave_all(early)
    you = welcome["you"]
    everyone = [m.public for m in early] + [
        {"sid": you["sid"], "name": "walker", "member": you["member"]}]
    assert welcome["member_count"] == 12
    assert done["members"] == everyone
    pages = [e["data"] for e in js.all("page")]
    assert [len(p["members"]) for p in pages] == [4, 4, 4]
    assert [p["next"] for p in pages] == [everyone[3]["sid"], everyone[7]["sid"], None]
