"""SPEC sections 2, 3 and 5 over plain HTTP: room creation, health, pages, the 421 for a
misrouted request, and the secret-checked internal listener."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from shardchat import urls
from tests.support import AUTH, SECRET, NodeProcess, http_json, running_nodes

pytestmark = pytest.mark.timeout(60)

PUBLIC_URL = "https://chat.example.com"
GENERATED_ID = re.compile(r"^[A-Za-z0-9_-]{22,64}$")


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("http")
    with running_nodes(tmp, 1, public_url=PUBLIC_URL) as nodes:
        yield nodes[0]


def post_room(node: NodeProcess, body) -> tuple[int, object]:
    return http_json("POST", f"{node.base_url}/api/rooms", body)


def get(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def assert_error(status: int, body, expected_status: int, code: str | None) -> None:
    """SPEC 3: errors are JSON {"error": code, "message": sentence}."""
    assert status == expected_status, (status, body)
    assert isinstance(body, dict), body
    if code is not None:
        assert body.get("error") == code, body
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("message"), str) and body["message"].strip(), body


# ---------------------------------------------------------------------------------------
# POST /api/rooms


def test_create_public_room_returns_every_spec_field(node):
    status, room = post_room(node, {"name": "Team chat", "private": False})
    assert status == 201, room
    path = urls.room_path(1, room["id"])
    assert room == {"id": room["id"], "name": "Team chat", "private": False, "instance": 1,
                    "path": path, "url": PUBLIC_URL + path, "namespace": path,
                    "socketio_path": "/i1/socket.io"}
    assert GENERATED_ID.match(room["id"]), room["id"]


def test_create_private_room_carries_an_invite(node):
    status, room = post_room(node, {"name": "Secret", "private": True})
    assert status == 201, room
    assert room["private"] is True
    assert isinstance(room["invite"], str) and len(room["invite"]) >= 16
    assert room["namespace"] == room["path"] == urls.room_path(1, room["id"])
    assert room["url"] == PUBLIC_URL + room["path"]


def test_private_defaults_to_false(node):
    status, room = post_room(node, {"name": "Default"})
    assert status == 201, room
    assert room["private"] is False and "invite" not in room


def test_generated_room_ids_are_long_random_and_unique(node):
    ids = [post_room(node, {"name": f"r{i}"})[1]["id"] for i in range(20)]
    assert len(set(ids)) == 20
    assert all(GENERATED_ID.match(i) for i in ids), ids


def test_room_name_of_100_characters_is_kept_exactly(node):
    name = "ü" * 99 + "🚀"
    status, room = post_room(node, {"name": name})
    assert status == 201, room
    assert room["name"] == name


BAD_BODIES = {
    "name_missing": {},
    "name_blank": {"name": "   "},
    "name_empty": {"name": ""},
    "name_101_chars": {"name": "n" * 101},
    "name_number": {"name": 5},
    "name_null": {"name": None},
    "private_string": {"name": "ok", "private": "yes"},
    "private_number": {"name": "ok", "private": 1},
    "body_list": ["ok"],
    "body_string": "ok",
    "body_null": None,
}


@pytest.mark.parametrize("body", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_bad_room_request_is_400_bad_request(node, body):
    raw = json.dumps(body).encode()
    status, answer = post_room(node, raw)
    assert_error(status, answer, 400, "bad_request")


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b'{"name": "x"'],
                         ids=["garbage", "empty", "not_utf8", "truncated"])
def test_room_request_that_is_not_json_is_400_bad_request(node, raw):
    status, answer = post_room(node, raw)
    assert_error(status, answer, 400, "bad_request")


def test_room_request_over_max_body_is_413(node):
    body = json.dumps({"name": "big", "pad": "x" * (17 * 1024)}).encode()
    status, answer = post_room(node, body)
    assert_error(status, answer, 413, None)


def test_created_room_counts_in_internal_stats(node):
    before = http_json("GET", f"{node.internal_url}/internal/stats", headers=AUTH)[1]
    post_room(node, {"name": "counted"})
    status, after = http_json("GET", f"{node.internal_url}/internal/stats", headers=AUTH)
    assert status == 200
    assert set(after) >= {"instance", "connections", "rooms", "draining"}
    assert after["instance"] == 1 and after["draining"] is False
    assert isinstance(after["connections"], int)
    assert after["rooms"] == before["rooms"] + 1


# ---------------------------------------------------------------------------------------
# health, pages, assets


def test_healthz_says_ok_with_instance(node):
    assert http_json("GET", f"{node.base_url}/i1/healthz") == (200, {"instance": 1,
                                                                      "status": "ok"})


def test_default_routed_healthz_answers(node):
    status, _ = http_json("GET", f"{node.base_url}/healthz")
    assert status == 200


def test_room_page_is_html_for_an_existing_room(node):
    _, room = post_room(node, {"name": "Page"})
    status, ctype, body = get(node.base_url + room["path"])
    assert status == 200 and ctype.startswith("text/html"), (status, ctype)
    assert b"<html" in body.lower()


@pytest.mark.parametrize("room_id", ["doesNotExist123", "a" * 64, "bad!id"])
def test_room_page_is_404_for_an_unknown_room(node, room_id):
    status, _, _ = get(f"{node.base_url}/i1/room/{room_id}")
    assert status == 404


def test_landing_page_is_html(node):
    status, ctype, body = get(node.base_url + "/")
    assert status == 200 and ctype.startswith("text/html")
    assert b"<html" in body.lower()


@pytest.mark.parametrize("base", ["/static", "/i1/static"])
def test_socketio_client_script_is_served(node, base):
    status, ctype, body = get(f"{node.base_url}{base}/vendor/socket.io.min.js")
    assert status == 200 and "javascript" in ctype, (status, ctype)
    assert len(body) > 10_000


# ---------------------------------------------------------------------------------------
# misrouted requests


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/i37/healthz"), ("POST", "/i37/room/abc"), ("GET", "/i37/static/app.css"),
    ("GET", "/i37/socket.io/?EIO=4&transport=polling")])
def test_request_for_another_instance_is_421_naming_both(node, method, path):
    """(A GET of a room page of an instance the cluster does not have is looked up and
    redirected instead: ``test_lookup.py``.)"""
    status, body = http_json(method, node.base_url + path, b"" if method == "POST" else None)
    assert_error(status, body, 421, "wrong_instance")
    message = body["message"]
    assert re.search(r"\b37\b", message) and re.search(r"\b1\b", message), message


def test_prefix_lookalikes_are_not_another_instance(node):
    """/i01/ or /i1x/ are not instance prefixes: plain 404, not a routing error."""
    for path in ("/i01/healthz", "/i1x/healthz"):
        status, _ = http_json("GET", node.base_url + path)
        assert status == 404, path


# ---------------------------------------------------------------------------------------
# internal listener


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": SECRET}],
                         ids=["none", "wrong", "no_bearer"])
def test_internal_listener_requires_the_cluster_secret(node, headers):
    status, body = http_json("GET", f"{node.internal_url}/internal/stats", headers=headers)
    assert_error(status, body, 401, None)
    status, body = http_json("POST", f"{node.internal_url}/internal/rooms",
                             {"name": "x", "private": False}, headers=headers)
    assert_error(status, body, 401, None)


def test_internal_create_room_pins_the_room_here(node):
    status, room = http_json("POST", f"{node.internal_url}/internal/rooms",
                             {"name": "Pinned", "private": True}, headers=AUTH)
    assert status == 201, room
    assert room["instance"] == 1 and room["invite"]
    assert room["url"] == PUBLIC_URL + urls.room_path(1, room["id"])
    assert get(node.base_url + room["path"])[0] == 200
