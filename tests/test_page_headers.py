"""Security headers on every answer of the public listener, and a browser that obeys them.

The pages get a Content-Security-Policy that allows only their own origin (no inline
script, no framing); every answer carries nosniff and sends no Referer (the room URL holds
the invite). A policy that broke the page would show in the browser test below: it drives
the landing page and a room over WebSocket in Chromium and fails on any CSP violation.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import CHROMIUM, NodeProcess, http_json, require_browser, running_nodes

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[NodeProcess]:
    with running_nodes(tmp_path_factory.mktemp("headers"), 1) as nodes:
        yield nodes[0]


def fetch(url: str, method: str = "GET", body: bytes | None = None,
          headers: dict | None = None) -> tuple[int, dict[str, str]]:
    """(status, headers with lower-case names) of one request; 4xx/5xx answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}


def policy(headers: dict[str, str]) -> dict[str, str]:
    """The CSP as {directive: sources}."""
    out = {}
    for part in headers["content-security-policy"].split(";"):
        name, _, sources = part.strip().partition(" ")
        out[name] = sources
    return out


def assert_common(headers: dict[str, str]) -> None:
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-frame-options"] == "DENY"
    assert policy(headers)["frame-ancestors"] == "'none'"


def test_pages_carry_a_self_only_policy(node):
    status, room = http_json("POST", f"{node.base_url}/api/rooms", {"name": "headers"})
    assert status == 201
    for path in ("/", room["path"], room["path"] + "?invite=abc"):
        status, headers = fetch(node.base_url + path, headers={"Host": "chat.example.com"})
        assert status == 200 and headers["content-type"].startswith("text/html"), path
        assert_common(headers)
        csp = policy(headers)
        assert csp["default-src"] == csp["script-src"] == csp["style-src"] == "'self'"
        assert csp["img-src"] == "'self'" and csp["object-src"] == "'none'"
        assert csp["connect-src"].split() == ["'self'", "ws://chat.example.com",
                                              "wss://chat.example.com"]
        assert "unsafe" not in headers["content-security-policy"]


def test_a_host_header_that_is_not_a_host_is_left_out_of_the_policy(node):
    for host in ("evil.example.com; script-src *", "a b", "x'y"):
        status, headers = fetch(node.base_url + "/", headers={"Host": host})
        if status == 200:  # aiohttp may refuse such a request outright (400)
            assert policy(headers)["connect-src"] == "'self'", host


@pytest.mark.parametrize("path", ["/static/app.css", "/static/room.js", "/static/favicon.svg",
                                  "/i1/static/landing.js", "/static/vendor/socket.io.min.js",
                                  "/healthz", "/i1/healthz", "/no/such/page",
                                  "/i1/room/no-such-room", "/i2/room/x"])
def test_every_other_answer_carries_the_headers(node, path):
    status, headers = fetch(node.base_url + path)
    assert status in (200, 404, 421), (path, status)
    assert_common(headers)
    if not headers["content-type"].startswith("text/html"):
        assert headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"


def test_api_answers_and_long_polling_carry_the_headers(node):
    for status_expected, body in ((201, b'{"name": "x"}'), (400, b"not json")):
        status, headers = fetch(f"{node.base_url}/api/rooms", "POST", body,
                                {"Content-Type": "application/json"})
        assert status == status_expected
        assert_common(headers)
    status, headers = fetch(f"{node.base_url}/i1/socket.io/?EIO=4&transport=polling")
    assert status == 200
    assert_common(headers)


def test_the_pages_need_nothing_inline():
    """What the policy forbids is not in the pages: a new inline bit would fail here first."""
    web = Path(__file__).resolve().parents[1] / "shardchat" / "web"
    for page in web.glob("*.html"):
        html = page.read_text()
        assert "<script>" not in html and "<style" not in html, page
        assert " style=" not in html and "javascript:" not in html, page
        assert "data:" not in html, page
        assert not any(f" on{ev}=" in html for ev in ("click", "load", "error", "submit")), page


def test_the_browser_runs_the_pages_without_a_policy_violation(node):
    """Landing page -> create a room -> join it over WebSocket -> send: no violation."""
    require_browser()
    from playwright import sync_api
    violations: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_context().new_page()
            page.set_default_timeout(15_000)
            frames: list[str] = []
            page.on("websocket", lambda ws: ws.on("framereceived",
                                                   lambda frame: frames.append(str(frame))))
            page.on("console", lambda msg: violations.append(msg.text)
                    if "Content Security Policy" in msg.text else None)
            page.add_init_script("document.addEventListener('securitypolicyviolation', e => "
                                 "console.error('Content Security Policy: ' + e.violatedDirective"
                                 " + ' ' + e.blockedURI))")
            page.goto(node.base_url + "/")
            page.fill("#room-name", "policy check")
            page.click("#create-button")
            page.wait_for_url("**/i1/room/**")
            sync_api.expect(page.locator("#name-dialog")).to_be_visible()
            page.fill("#name-input", "Ana")
            page.click("#name-submit")
            sync_api.expect(page.locator("#status")).to_have_attribute("data-state",
                                                                       "connected")
            loaded = page.evaluate("() => performance.getEntriesByType('resource')"
                                   ".map(e => e.name).join(' ')")
            page.fill("#composer-input", "hello under a strict policy")
            page.press("#composer-input", "Enter")
            sync_api.expect(page.locator("#messages .msg:not(.pending)",
                                         has_text="hello under a strict policy")).to_be_visible()
        finally:
            browser.close()
    assert violations == [], violations
    assert "/static/app.css" in loaded and "/static/room.js" in loaded, loaded
    assert frames, "the room never spoke over a WebSocket (blocked by connect-src?)"
