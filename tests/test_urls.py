"""The /i<N>/ scheme: every path a client, the router and the ALB rely on (SPEC section 2)."""

from __future__ import annotations

import pytest

from shardchat import urls


def test_instance_paths():
    assert urls.prefix(3) == "/i3"
    assert urls.path_pattern(3) == "/i3/*"
    assert urls.room_path(3, "abc") == "/i3/room/abc"
    assert urls.room_namespace(3, "abc") == urls.room_path(3, "abc")
    assert urls.socketio_path(3) == "/i3/socket.io"
    assert urls.healthz_path(3) == "/i3/healthz"
    assert urls.static_prefix(3) == "/i3/static"


@pytest.mark.parametrize("n", [1, 9999])
def test_instance_range_limits_are_accepted(n):
    assert urls.valid_instance(n)
    assert urls.prefix(n) == f"/i{n}"


@pytest.mark.parametrize("n", [0, -1, 10_000, True, 1.0, "1", None])
def test_instance_outside_range_is_rejected(n):
    assert not urls.valid_instance(n)
    with pytest.raises(ValueError, match=r"1\.\.9999"):
        urls.prefix(n)


@pytest.mark.parametrize("path,instance", [
    ("/i1", 1), ("/i1/", 1), ("/i3/static/app.js", 3), ("/i9999/healthz", 9999),
    ("/", None), ("/api/rooms", None), ("/healthz", None), ("/i01/x", None), ("/i1x/x", None),
    ("/i0/x", None), ("/i10000/x", None), ("/x/i1/", None), ("", None), ("/i/x", None),
])
def test_instance_of_path(path, instance):
    assert urls.instance_of_path(path) == instance


@pytest.mark.parametrize("path,rest", [
    ("/i3/static/app.js", "/static/app.js"), ("/i3", "/"), ("/i3/", "/"),
    ("/api/rooms", "/api/rooms"), ("/i03/x", "/i03/x"),
])
def test_strip_prefix(path, rest):
    assert urls.strip_prefix(path) == rest


def test_parse_room_namespace_round_trips():
    address = urls.parse_room_namespace(urls.room_namespace(42, "Ab_-9"))
    assert address == urls.RoomAddress(42, "Ab_-9")


@pytest.mark.parametrize("namespace", [
    "/", "", None, "/i1/room/", "/i1/room/a/b", "/i1/room/bad!id", "/i01/room/a",
    "/i1/rooms/a", "/room/a", "/i1/room/" + "a" * 65, "i1/room/a",
])
def test_parse_room_namespace_rejects_non_rooms(namespace):
    assert urls.parse_room_namespace(namespace) is None


@pytest.mark.parametrize("room_id,ok", [
    ("a", True), ("A-z_0-9", True), ("a" * 64, True), ("a" * 65, False), ("", False),
    ("a b", False), ("a/b", False), ("ä", False), ("a.b", False), (5, False), (None, False),
])
def test_valid_room_id(room_id, ok):
    assert urls.valid_room_id(room_id) is ok


@pytest.mark.parametrize("base,expected", [
    ("https://chat.example.com", "https://chat.example.com/i2/room/x"),
    ("https://chat.example.com/", "https://chat.example.com/i2/room/x"),
    ("https://example.com/chat/", "https://example.com/chat/i2/room/x"),
])
def test_join_url(base, expected):
    assert urls.join_url(base, urls.room_path(2, "x")) == expected
