"""Fuzz: HTTP bodies, headers and paths, sent byte for byte.

``POST /api/rooms`` (public) and ``POST /internal/rooms`` (internal) with any body: a room is
created exactly when the body is a JSON object with a valid name (SPEC 3), otherwise the
answer is a JSON error ``{"error", "message"}`` with a 4xx status. The internal listener
with any ``Authorization`` header: only the cluster secret opens it, anything else is 401
JSON. Any method and path under ``/i<N>/``: never a server error, every error JSON. After
each request the node is alive and its bystanders unharmed (``Harness.check``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardchat import urls
from tests.fuzz.conftest import examples
from tests.fuzz.harness import Harness, RawAnswer, assert_error_shape, raw_http
from tests.fuzz.strategies import (
    Blob,
    deep_nesting,
    dumps,
    hostile_text,
    json_values,
)
from tests.support import SECRET

# one worker runs the whole module, so the module has one node (pytest -n 2)
pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(300), pytest.mark.xdist_group("fuzz_http")]

MAX_ROOM_NAME_CHARS = 100
MAX_BODY_BYTES = 16 * 1024  # node.max_body_bytes default


def request(method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b""
            ) -> bytes:
    """An HTTP/1.1 request with exactly these bytes (Content-Length added when a body)."""
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1",
             b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def send(harness: Harness, port: int, raw: bytes) -> RawAnswer:
    answer = harness.run(raw_http(port, raw))
    assert answer is not None, f"the node closed without an HTTP answer to {Blob(raw)!r}"
    return answer


def assert_not_server_error(answer: RawAnswer, what: str) -> None:
    assert answer.status < 500, (
        f"{what}: {answer.status} ({answer.content_type}) {answer.body[:300]!r}")


# ---------------------------------------------------------------------------------------
# room creation bodies


def _bad_char(ch: str) -> bool:
    code = ord(ch)
    return 0xD800 <= code <= 0xDFFF or code < 32 or code == 0x7F


def room_outcome(raw: bytes) -> set[int]:
    """The statuses a create-room body may get: 201, 400 or 413 (SPEC 3)."""
    if len(raw) > MAX_BODY_BYTES:
        return {413}
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {400}
    if not isinstance(body, dict):
        return {400}
    name, private = body.get("name"), body.get("private", False)
    if not isinstance(name, str) or not name.strip() or not isinstance(private, bool):
        return {400}
    if len(name.strip()) > MAX_ROOM_NAME_CHARS:
        return {400}
    if any(_bad_char(ch) for ch in name.strip()):
        return {400}  # SPEC 4: not valid Unicode, or control characters
    if any(_bad_char(ch) for ch in name) or any(0x80 <= ord(ch) <= 0x9F for ch in name):
        return {201, 400}  # around the trimmed name, or C1 controls: either is fair
    return {201}


ROOM_BODIES = st.one_of(
    st.builds(lambda name, private, extra, ascii_only: dumps(
        {"name": name, "private": private, **extra}, ascii_only),
        st.one_of(hostile_text(120), json_values(4), st.text(min_size=1, max_size=30)),
        st.one_of(st.booleans(), json_values(3)),
        st.dictionaries(hostile_text(8), json_values(3), max_size=2), st.booleans()),
    st.builds(dumps, json_values()),
    deep_nesting(),
    st.integers(0, MAX_BODY_BYTES + 100).map(lambda n: dumps({"name": "x", "pad": "p" * n})),
    hostile_text(80),
).map(lambda text: Blob(text.encode("utf-8", "surrogatepass"))) | st.binary(max_size=200)

CONTENT_TYPES = st.sampled_from([b"application/json", b"application/json; charset=latin-1",
                                 b"text/plain", b"application/x-www-form-urlencoded",
                                 b"multipart/form-data; boundary=x", b"", b"\xff\xfe"])


@examples(100)
@given(body=ROOM_BODIES, content_type=CONTENT_TYPES,
       listener=st.sampled_from(["public", "internal"]))
def test_any_create_room_body_gets_a_room_or_a_json_error(harness: Harness, body: bytes,
                                                           content_type: bytes,
                                                           listener: str) -> None:
    harness.ready()
    node = harness.node
    headers = [(b"Content-Type", content_type)]
    if listener == "internal":
        port, target = node.internal_port, b"/internal/rooms"
        headers.append((b"Authorization", f"Bearer {SECRET}".encode()))
    else:
        port, target = node.port, b"/api/rooms"
    answer = send(harness, port, request("POST", target, headers, body))
    what = f"POST {target.decode()} with {Blob(body)!r}"
    assert_not_server_error(answer, what)
    allowed = room_outcome(body)
    assert answer.status in allowed, (
        f"{what}: answered {answer.status} {answer.body[:300]!r}, expected {sorted(allowed)}")
    if answer.status == 201:
        check_created_room(harness, answer.json(), body, what)
    else:
        assert_error_shape(answer, what)
    harness.check(what)


def check_created_room(harness: Harness, room: Any, body: bytes, what: str) -> None:
    """A created room says what was asked for, and its page is served."""
    asked = json.loads(body)
    assert room["name"] == asked["name"].strip(), f"{what}: created {room!r}"
    assert room["private"] is asked.get("private", False), f"{what}: created {room!r}"
    assert urls.valid_room_id(room["id"]), f"{what}: created {room!r}"
    page = send(harness, harness.node.port, request("GET", room["path"].encode(), []))
    assert page.status == 200, f"{what}: the new room's page answered {page.status}"


# ---------------------------------------------------------------------------------------
# the internal listener's secret


def header_values() -> st.SearchStrategy[bytes]:
    """Authorization values: near-misses of the secret, and bytes that are not UTF-8."""
    secret = SECRET.encode()
    no_newlines = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    return st.one_of(
        st.just(b"Bearer " + secret),
        st.sampled_from([b"Bearer", b"Bearer ", b"bearer " + secret, b"Bearer  " + secret,
                         b"Bearer " + secret + b" ", b"Bearer " + secret[:-1],
                         b"Bearer " + secret + b"\xff", b"Basic " + secret, secret,
                         b"Bearer " + secret.upper(), b"\xff\xfe\xfd", b"Bearer \xc3(",
                         b"Bearer " + "é".encode("latin-1"), b"Bearer \x00" + secret]),
        no_newlines,
        no_newlines.map(lambda b: b"Bearer " + b),
        hostile_text(40).map(lambda t: t.encode("utf-8", "surrogatepass")
                             .replace(b"\r", b"").replace(b"\n", b"")),
    )


@examples(100)
@given(values=st.lists(header_values(), max_size=2),
       path=st.sampled_from(["/internal/stats", "/internal/metrics", "/internal/rooms",
                             "/internal/nothing", "/"]))
def test_only_the_cluster_secret_opens_the_internal_listener(harness: Harness,
                                                              values: list[bytes],
                                                              path: str) -> None:
    harness.ready()
    method = "POST" if path == "/internal/rooms" else "GET"
    body = b'{"name": "internal fuzz"}' if method == "POST" else b""
    headers = [(b"Authorization", v) for v in values] + [(b"Content-Type", b"application/json")]
    answer = send(harness, harness.node.internal_port,
                  request(method, path.encode(), headers, body))
    what = f"{method} {path} with Authorization {values!r}"
    assert_not_server_error(answer, what)
    secret = f"Bearer {SECRET}".encode()
    given = [v.strip(b" \t") for v in values]  # surrounding whitespace is not the value
    if answer.status == 400 and answer.content_type != "application/json":
        pass  # the HTTP parser refused a header byte before any handler ran
    elif given == [secret]:
        assert answer.status in (200, 201, 404), f"{what}: {answer.status} {answer.body!r}"
    elif secret in given:
        assert answer.status in (200, 201, 401, 404), f"{what}: {answer.status}"  # repeated
    else:
        assert answer.status == 401, f"{what}: {answer.status} {answer.body[:300]!r}"
        assert_error_shape(answer, what)
    harness.check(what)


# ---------------------------------------------------------------------------------------
# any path under the instance prefix


SEGMENTS = st.one_of(
    st.sampled_from(["room", "static", "socket.io", "healthz", "api", "rooms", "..", ".",
                     "%2e%2e", "%00", "%ff", "%", "%zz", "vendor", "socket.io.min.js",
                     "app.css", "index.html", "a" * 300, "room.html", ""]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E).filter(
        lambda c: c not in "/?#%"), max_size=12),
    hostile_text(12).map(lambda t: "".join(f"%{b:02X}" for b in t.encode("utf-8",
                                                                       "surrogatepass"))),
)


@examples(120)
@given(method=st.sampled_from(["GET", "GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS",
                               "PATCH"]),
       segments=st.lists(SEGMENTS, min_size=0, max_size=5),
       instance=st.sampled_from([1, 1, 1, 2, 9999, 0]),
       query=st.one_of(st.just(""), st.sampled_from(["EIO=4&transport=polling",
                                                     "EIO=3", "EIO=4&transport=websocket",
                                                     "sid=x&EIO=4&transport=polling",
                                                     "%ff=%00", "a" * 2000])),
       body=st.binary(max_size=64))
def test_any_path_under_the_prefix_gets_no_server_error(harness: Harness, method: str,
                                                        segments: list[str], instance: int,
                                                        query: str, body: bytes) -> None:
    harness.ready()
    target = f"/i{instance}/" + "/".join(segments) + (f"?{query}" if query else "")
    answer = send(harness, harness.node.port,
                  request(method, target.encode(), [(b"Content-Type", b"application/json")],
                          body if method in ("POST", "PUT", "PATCH") else b""))
    what = f"{method} {target[:300]}"
    assert_not_server_error(answer, what)
    if answer.status >= 400 and method != "HEAD" and not engineio_answer(target, answer):
        assert_error_shape(answer, what)
    if instance not in (1, 0) and urls.valid_instance(instance):
        assert answer.status == 421, f"{what}: answered {answer.status}, expected 421"
    harness.check(what)


def engineio_answer(target: str, answer: RawAnswer) -> bool:
    """Engine.IO's own refusals on its endpoint (a JSON string in text/plain, as every
    Engine.IO server answers): its clients read the status, not the body."""
    return "/socket.io" in target.split("?")[0] and answer.content_type == "text/plain"
